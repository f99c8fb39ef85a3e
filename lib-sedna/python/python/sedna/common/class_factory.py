"""Sedna's `sedna.common.class_factory`: register your classes by type and alias, look them
up by name.

    from sedna.common.class_factory import ClassFactory, ClassType

    @ClassFactory.register(ClassType.HEM, alias="Uncertain")
    class Uncertain:
        def __init__(self, margin=0.2, **kwargs): ...
        def __call__(self, infer_result=None) -> bool: ...

A hard-example-mining class registered this way is what `JointInference` and
`IncrementalLearning` use when `HEM_NAME` names it; Sedna's built-in algorithms are registered
under their names (Threshold, CrossEntropy, IBT, Random, CloudOnly, EdgeOnly) and run in Rust.
"""

import threading

__all__ = ["ClassFactory", "ClassType"]


class ClassType:
    """The kinds of registered classes (Sedna's names and values)."""

    GENERAL = "general"
    HEM = "hard_example_mining"
    FL_AGG = "aggregation"
    MTL = "multi_task_learening"
    UTD = "unseen_task_detect"
    OF = "optical_flow"
    ALGORITHM = "algorithm"
    DATASET = "data_process"
    CALLBACK = "post_process_callback"
    UTP = "unseen_task_processing"
    KM = "knowledge_management"
    STP = "seen_task_processing"


class ClassFactory:
    """The registry: `{type: {alias: class}}`."""

    __registry__ = {}
    _lock = threading.Lock()

    @classmethod
    def register(cls, type_name=ClassType.GENERAL, alias=None):
        """A decorator registering the class under `alias` (default: its name)."""

        def wrapper(t_cls):
            cls.register_cls(t_cls, type_name, alias)
            return t_cls

        return wrapper

    @classmethod
    def register_cls(cls, t_cls, type_name=ClassType.GENERAL, alias=None):
        """Registers `t_cls`; registering another class under a taken name is an error."""
        name = alias or t_cls.__name__
        with cls._lock:
            registered = cls.__registry__.setdefault(type_name, {})
            if registered.get(name, t_cls) is not t_cls:
                raise ValueError(f"Cannot register duplicate class ({name}) of type {type_name}")
            registered[name] = t_cls
        return t_cls

    @classmethod
    def register_from_package(cls, package, type_name=ClassType.GENERAL):
        """Registers every public class of a module."""
        import inspect

        for name, t_cls in inspect.getmembers(package, inspect.isclass):
            if not name.startswith("_"):
                cls.register_cls(t_cls, type_name, name)

    @classmethod
    def is_exists(cls, type_name, cls_name=None):
        """Whether the type (and the name in it) is registered."""
        registered = cls.__registry__.get(type_name)
        if registered is None:
            return False
        return cls_name is None or cls_name in registered

    @classmethod
    def get_cls(cls, type_name, t_cls_name=None):
        """The class registered as `t_cls_name` under `type_name`."""
        if not cls.is_exists(type_name, t_cls_name):
            known = sorted(cls.__registry__.get(type_name, {}))
            raise ValueError(f"no {type_name} class named {t_cls_name!r}; registered: {known}")
        return cls.__registry__[type_name][t_cls_name]

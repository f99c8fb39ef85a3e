"""Sedna's `sedna.common.config`: what a worker reads from the environment the controller
injects.

    from sedna.common.config import Context, BaseConfig
    epochs = int(Context.get_parameters("epochs", 1))
    BaseConfig.model_url, BaseConfig.train_dataset_url, BaseConfig.namespace, ...

Values are read from the environment when they are asked for (Sedna reads them once at
import), so a value set later is seen.
"""

import json
import os

__all__ = ["BaseConfig", "Context"]

# attribute -> (variable, default), as Sedna's BaseConfig names them.
_FIELDS = {
    "device_category": ("DEVICE_CATEGORY", "CPU"),
    "backend_type": ("BACKEND_TYPE", "TENSORFLOW"),
    "lc_server": ("LC_SERVER", "http://127.0.0.1:9100"),
    "original_dataset_url": ("ORIGINAL_DATASET_URL", None),
    "train_dataset_url": ("TRAIN_DATASET_URL", None),
    "test_dataset_url": ("TEST_DATASET_URL", None),
    "data_path_prefix": ("DATA_PATH_PREFIX", "/home/data"),
    "namespace": ("NAMESPACE", ""),
    "worker_name": ("WORKER_NAME", ""),
    "service_name": ("SERVICE_NAME", ""),
    "job_name": ("JOB_NAME", "sedna"),
    "pretrained_model_url": ("PRETRAINED_MODEL_URL", "./"),
    "model_url": ("MODEL_URL", None),
    "model_name": ("MODEL_NAME", None),
    "log_level": ("LOG_LEVEL", "INFO"),
    "transmitter": ("TRANSMITTER", "ws"),
    "agg_data_path": ("AGG_DATA_PATH", "./"),
    "parameters": ("PARAMETERS", None),
}


class _FromEnvironment(type):
    def __getattr__(cls, name):
        if name in _FIELDS:
            variable, default = _FIELDS[name]
            return os.environ.get(variable, default)
        raise AttributeError(name)

    def __dir__(cls):
        return sorted(set(super().__dir__()) | set(_FIELDS))


class BaseConfig(metaclass=_FromEnvironment):
    """The worker's settings, as attributes of the class or of an instance. Credentials are
    not here: mount them as files (`SEDNA_CREDENTIALS_DIR`), they are never read from the
    environment."""

    def __getattr__(self, name):
        return getattr(type(self), name)

    def to_json(self):
        """The settings as a dict."""
        return {name: getattr(type(self), name) for name in _FIELDS}


class Context:
    """Sedna's access to the worker's parameters: a template's own variables and the
    controller's."""

    @classmethod
    def get_parameters(cls, param, default=None):
        """The variable `param` (or its upper-case name), else `default`."""
        value = os.environ.get(param) or os.environ.get(str(param).upper())
        return value if value else default

    @classmethod
    def get_algorithm_from_api(cls, algorithm, **param):
        """`{"method": <ALGORITHM>_NAME, "param": {...}}` from `<ALGORITHM>_NAME` and
        `<ALGORITHM>_PARAMETERS` (Sedna's `[{key, value}]` list), with `param` laid over;
        `{}` when `<ALGORITHM>_NAME` is not set."""
        name = cls.get_parameters(f"{algorithm}_NAME")
        if not name:
            return {}
        try:
            listed = json.loads(cls.get_parameters(f"{algorithm}_PARAMETERS", "[]"))
            parameters = {p["key"]: p.get("value", "") for p in listed if "key" in p}
        except (ValueError, TypeError, AttributeError):
            parameters = {}
        parameters.update(param)
        return {"method": name, "param": parameters}

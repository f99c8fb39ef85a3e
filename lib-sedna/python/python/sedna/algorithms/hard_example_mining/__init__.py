"""Sedna's hard-example-mining classes, registered in `ClassFactory` under `ClassType.HEM`:

    from sedna.algorithms.hard_example_mining import ThresholdFilter
    is_hard = ThresholdFilter(threshold=0.9)(probabilities)

Each is a callable `(infer_result) -> bool` as in Sedna (`infer_result`: class probabilities,
or detection boxes `[x1, y1, x2, y2, score, label, ...]` per row for IBT), computed by the Rust
implementation of the same algorithm.
"""

import numpy as np

from ... import _sedna
from ...common.class_factory import ClassFactory, ClassType

__all__ = [
    "BaseFilter",
    "ThresholdFilter",
    "CrossEntropyFilter",
    "IBTFilter",
    "RandomFilter",
    "CloudOnlyFilter",
    "EdgeOnlyFilter",
]


class BaseFilter:
    """A mining algorithm of the Rust registry, called with an inference result."""

    name = None

    def __init__(self, **kwargs):
        parameters = {k: str(v) for k, v in kwargs.items()}
        self._inner = _sedna.HardExampleMining(self.name, parameters)

    def __call__(self, infer_result=None):
        if infer_result is None:
            return bool(self._inner.is_hard(None))
        data = np.asarray(infer_result, dtype=np.float32)
        if data.ndim == 2 and data.shape[0] == 1 and data.shape[1] < 5:
            data = data[0]
        if data.ndim == 2 and data.shape[0] == 1 and self.name != "IBT":
            data = data[0]
        return bool(self._inner.is_hard(data))

    @classmethod
    def data_check(cls, data):
        """Whether `data` is a non-empty result."""
        return data is not None and len(data) > 0


def _filter(name, alias=None):
    @ClassFactory.register(ClassType.HEM, alias=alias or name)
    class Filter(BaseFilter):
        pass

    Filter.name = name
    return Filter


ThresholdFilter = _filter("Threshold")
ThresholdFilter.__name__ = ThresholdFilter.__qualname__ = "ThresholdFilter"
CrossEntropyFilter = _filter("CrossEntropy")
CrossEntropyFilter.__name__ = CrossEntropyFilter.__qualname__ = "CrossEntropyFilter"
IBTFilter = _filter("IBT")
IBTFilter.__name__ = IBTFilter.__qualname__ = "IBTFilter"
RandomFilter = _filter("Random")
RandomFilter.__name__ = RandomFilter.__qualname__ = "RandomFilter"
CloudOnlyFilter = _filter("CloudOnly")
CloudOnlyFilter.__name__ = CloudOnlyFilter.__qualname__ = "CloudOnlyFilter"
EdgeOnlyFilter = _filter("EdgeOnly")
EdgeOnlyFilter.__name__ = EdgeOnlyFilter.__qualname__ = "EdgeOnlyFilter"

"""sedna: edge-cloud collaborative AI, with a Rust core.

The same concepts as Sedna's Python library (JointInference, FederatedLearning, hard-example
mining, datasets, worker configuration), implemented in Rust:

- ``Model``: an ONNX model on ONNX Runtime (from the ``onnxruntime`` wheel), explicit
  execution providers, hot reload.
- ``HardExampleMining``, ``register_hem``: Threshold, CrossEntropy, IBT, Random, CloudOnly,
  EdgeOnly, and your own.
- ``JointInference``, ``serve_cloud``: edge model + mining + cloud, with an on-disk queue for
  hard examples while the cloud is unreachable.
- ``FederatedLearning``, ``Aggregator``, ``encode_weights``/``decode_weights``: weights as
  binary tensors (f32, fp16, int8), FedAvg and friends.
- ``Trainer``, ``load_training_data``: train an ONNX model (its float initializers are the
  weights) on numpy data; ``save`` writes the same graph with the trained weights.
- ``config_from_env``, ``Storage``, ``parse_txt_index``, ``parse_csv``, ``scan_directory``.
"""

import importlib.util as _importlib_util
import os as _os
import pathlib as _pathlib

from . import _sedna
from ._sedna import (  # noqa: F401
    Aggregator,
    AggregationError,
    CloudServer,
    ConfigError,
    DatasetError,
    FederatedLearning,
    FederatedLearningError,
    HardExampleMining,
    HemError,
    InferenceError,
    JointInference,
    JointInferenceError,
    Model,
    SednaError,
    Storage,
    StorageError,
    TrainError,
    Trainer,
    WeightsError,
    aggregators,
    config_from_env,
    decode_frame,
    decode_weights,
    encode_weights,
    hem_names,
    load_training_data,
    parse_csv,
    parse_txt_index,
    register_hem,
    report_status,
    run_aggregation_server,
    scan_directory,
    serve_cloud,
    serve_estimator,
    train_frame,
)

__all__ = [
    "Aggregator",
    "AggregationError",
    "CloudServer",
    "ConfigError",
    "DatasetError",
    "FederatedLearning",
    "FederatedLearningError",
    "HardExampleMining",
    "HemError",
    "InferenceError",
    "JointInference",
    "JointInferenceError",
    "Model",
    "SednaError",
    "Storage",
    "StorageError",
    "TrainError",
    "Trainer",
    "WeightsError",
    "aggregators",
    "config_from_env",
    "decode_frame",
    "decode_weights",
    "encode_weights",
    "hem_names",
    "load_training_data",
    "onnxruntime_library",
    "parse_csv",
    "parse_txt_index",
    "register_hem",
    "scan_directory",
    "report_status",
    "run_aggregation_server",
    "serve_cloud",
    "serve_estimator",
    "train_frame",
]


def onnxruntime_library():
    """The ONNX Runtime library file: ``ORT_DYLIB_PATH``, else the one inside the installed
    ``onnxruntime`` wheel (found without importing it). None when neither exists."""
    explicit = _os.environ.get("ORT_DYLIB_PATH")
    if explicit:
        return explicit
    spec = _importlib_util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        capi = _pathlib.Path(location) / "capi"
        candidates = sorted(capi.glob("libonnxruntime.so.1.*")) + sorted(
            capi.glob("libonnxruntime*.dylib")
        )
        if candidates:
            return str(candidates[-1])
    return None


def _load_runtime():
    path = onnxruntime_library()
    if path is not None:
        try:
            _sedna.init_runtime(path)
        except InferenceError:
            # Reported with the full search when a model is first loaded.
            pass


_load_runtime()

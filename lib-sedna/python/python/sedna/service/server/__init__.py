"""Sedna's `sedna.service.server.AggregationServer`, so a Sedna aggregation worker script
(`examples/federated_learning/*/aggregation_worker/aggregate.py`) runs unchanged:

    from sedna.service.server import AggregationServer
    AggregationServer(aggregation="FedAvg", exit_round=10, participants_count=2).start()

It runs the platform's aggregation worker in this process (the round protocol with round ids
and timeouts, checkpoints, evaluation on `TEST_DATASET_URL`, status reports, the final model
written to `MODEL_URL`), configured by the environment the FederatedLearningJob controller
injects. `aggregation` names a class registered with `ClassFactory` under `ClassType.FL_AGG`
(yours: it is called each round with `AggClient`s) or a built-in algorithm (run in Rust).
Training workers are the platform's (`sedna-edge-worker train`) or Python ones
(`sedna.core.federated_learning.FederatedLearning`).
"""

import os

import numpy as np

from ... import _sedna
from ...algorithms import aggregation as _builtin  # noqa: F401  (registers FedAvg)
from ...algorithms.aggregation import AggClient
from ...common.class_factory import ClassFactory, ClassType

__all__ = ["AggregationServer"]


class AggregationServer:
    """A FederatedLearningJob's aggregation worker, Sedna-style."""

    def __init__(self, aggregation="FedAvg", exit_round=None, participants_count=None,
                 ws_size=None, host=None, http_port=None, **kwargs):
        self.aggregation = aggregation
        self.exit_round = exit_round
        self.participants_count = participants_count
        # Sedna's websocket frame size: frames here carry their own bounded lengths.
        self.max_frame_bytes = ws_size
        self.host = host
        self.port = http_port
        self.instance = None

    def _resolve(self):
        """(name, callable or None): a user's registered class, else a Rust built-in."""
        aggregation = self.aggregation
        if isinstance(aggregation, type):
            cls, name = aggregation, aggregation.__name__
        elif isinstance(aggregation, str):
            name = aggregation
            cls = ClassFactory.get_cls(ClassType.FL_AGG, name) \
                if ClassFactory.is_exists(ClassType.FL_AGG, name) else None
        else:
            cls, name = type(aggregation), type(aggregation).__name__
            self.instance = aggregation
        ours = cls is not None and cls.__module__ == _builtin.__name__
        if cls is None or (ours and name in _sedna.aggregators()):
            if name not in _sedna.aggregators():
                raise ValueError(f"aggregation {name!r} is neither registered (ClassType.FL_AGG) "
                                 f"nor built in ({', '.join(_sedna.aggregators())})")
            return name, None
        if self.instance is None:
            self.instance = cls()
        instance = self.instance

        def aggregate(clients):
            updated = instance.aggregate([AggClient(num_samples=n, weights=w) for n, w in clients])
            return [np.asarray(w, dtype=np.float32) for w in updated]

        return name, aggregate

    def start(self):
        """Serves the job until its last round (blocking); raises FederatedLearningError when
        the job fails."""
        name, aggregate = self._resolve()
        args = []
        rounds = self.exit_round or os.environ.get("exit_round")
        if rounds and not os.environ.get("SEDNA_FL_ROUNDS"):
            args += ["--rounds", str(int(rounds))]
        if self.participants_count and not os.environ.get("PARTICIPANTS_COUNT"):
            os.environ["PARTICIPANTS_COUNT"] = str(int(self.participants_count))
        if self.max_frame_bytes:
            args += ["--max-frame-bytes", str(int(self.max_frame_bytes))]
        if self.host or self.port:
            host = self.host or os.environ.get("SEDNA_LISTEN_HOST", "127.0.0.1")
            port = self.port or os.environ.get("AGG_PORT", "7363")
            args += ["--listen", f"{host}:{port}"]
        if aggregate is None:
            args += ["--algorithm", name]
        _sedna.run_aggregation_server(aggregate, name=name, args=args)

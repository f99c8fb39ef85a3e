"""Federated learning with Sedna's contract:

    from sedna.core.federated_learning import FederatedLearning
    fl = FederatedLearning(estimator=Estimator, aggregation="FedAvg")
    fl.train(train_data=train_data, valid_data=valid_data, epochs=1)

`estimator` is your class (or an instance of it) with Sedna's methods: ``train(train_data,
valid_data=None, **kwargs)``, ``evaluate(data, **kwargs)``, ``predict(data)``, ``load(url)``,
``save(path)``, ``get_weights()`` and ``set_weights(weights)`` with the weights as a list of
arrays, in the model's parameter order (as Keras and PyTorch give them). The worker speaks the
platform's round protocol through lib-sedna's transport, so Python and Rust training workers
can be clients of one job: the global weights arrive named (the ONNX initializer names) and
your list is matched to them by position, shapes checked.

The job comes from the environment the controller injects: ``JOB_NAME``, ``WORKER_NAME``,
the aggregator (``SEDNA_AGG_TUNNEL`` through the node's ``SEDNA_CLOUD_PROXY``, else
``AGG_IP``/``AGG_PORT``), ``SEDNA_FL_UPDATE_ENCODING`` (f32, f16, int8).
"""

import os

import numpy as np

from ... import _sedna
from .._common import num_samples

__all__ = ["FederatedLearning"]


_num_samples = num_samples


def _parse(value):
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


class _Adapter:
    """Your estimator as the round protocol sees it: named float32 tensors."""

    def __init__(self, estimator, train_data, valid_data, kwargs):
        self.estimator = estimator
        self.train_data = train_data
        self.valid_data = valid_data
        self.kwargs = kwargs
        self.names = None

    def get_weights(self):
        weights = [np.ascontiguousarray(w, dtype=np.float32) for w in self.estimator.get_weights()]
        names = self.names or [f"weight_{i}" for i in range(len(weights))]
        if len(names) != len(weights):
            raise ValueError(
                f"get_weights() gave {len(weights)} arrays; the job's model has {len(names)}: {names}"
            )
        return dict(zip(names, weights))

    def set_weights(self, weights):
        self.names = list(weights)
        self.estimator.set_weights([weights[n] for n in self.names])

    def train(self, settings):
        kwargs = dict(self.kwargs)
        kwargs.update({k: _parse(v) for k, v in settings.items()})
        result = self.estimator.train(self.train_data, valid_data=self.valid_data, **kwargs)
        metrics = {}
        if isinstance(result, dict):
            metrics = {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating))}
        return _num_samples(self.train_data), metrics

    def evaluate(self):
        data = self.valid_data if self.valid_data is not None else self.train_data
        result = self.estimator.evaluate(data)
        if isinstance(result, dict):
            return {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating))}
        return {}

    def num_samples(self):
        return _num_samples(self.train_data)


class FederatedLearning:
    """A training worker of a FederatedLearningJob, Sedna-style."""

    def __init__(self, estimator, aggregation="FedAvg", transmitter=None):
        self.estimator = estimator() if isinstance(estimator, type) else estimator
        # The aggregator applies the job's algorithm; kept for Sedna's signature and logs.
        self.aggregation = aggregation
        self.job_name = os.environ.get("JOB_NAME", "federated-learning")
        self.worker_name = os.environ.get("WORKER_NAME", os.environ.get("HOSTNAME", "worker"))
        self.history = []

    def _route(self):
        proxy, tunnel = os.environ.get("SEDNA_CLOUD_PROXY"), os.environ.get("SEDNA_AGG_TUNNEL")
        if proxy and tunnel:
            return {"proxy": proxy, "target": tunnel}
        host = os.environ.get("AGG_IP")
        if host:
            return {"address": f"{host}:{os.environ.get('AGG_PORT', '7363')}"}
        raise _sedna.FederatedLearningError(
            "no aggregator: set AGG_IP (and AGG_PORT), or run on a node with SEDNA_CLOUD_PROXY and SEDNA_AGG_TUNNEL"
        )

    def train(self, train_data, valid_data=None, post_process=None, **kwargs):
        """Takes part in every round of the job; returns the per-round training metrics. The
        estimator holds the final global weights afterwards."""
        adapter = _Adapter(self.estimator, train_data, valid_data, kwargs)
        self.history = _sedna.run_federated_client(
            self.job_name,
            self.worker_name,
            adapter,
            os.environ.get("SEDNA_FL_UPDATE_ENCODING", "f32"),
            **self._route(),
        )
        return post_process(self.history) if callable(post_process) else self.history

    def predict(self, data, **kwargs):
        """The estimator's prediction (with the weights it holds)."""
        return self.estimator.predict(data, **kwargs)

    def evaluate(self, data, **kwargs):
        """The estimator's evaluation."""
        return self.estimator.evaluate(data, **kwargs)

    def save(self, model_path):
        """Saves the estimator's model."""
        return self.estimator.save(model_path)

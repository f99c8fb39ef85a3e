"""Incremental learning with Sedna's contract, so a user-written train, eval or inference
worker can replace the built-in ones (`sedna-cloud-worker train|evaluate`,
`sedna-edge-worker infer`):

    from sedna.core.incremental_learning import IncrementalLearning
    il = IncrementalLearning(estimator=Estimator)
    il.train(train_data)                      # train worker
    il.evaluate(test_data)                    # eval worker
    infer_res, res, is_hard = il.inference(x) # inference worker

`estimator` is your class (or an instance of it) with Sedna's methods: ``load(url)``,
``train(train_data, valid_data=None, **kwargs)``, ``evaluate(data, **kwargs)`` (a dict of
metrics by name), ``predict(data, **kwargs)`` and ``save(path)``. The round comes from the
environment the controller injects: ``BASE_MODEL_URL`` (what training starts from),
``MODEL_URL`` (where the trained model goes), ``MODEL_URLS`` (``candidate;deployed`` to
evaluate), ``SEDNA_ROUND``, ``JOB_NAME``, ``NAMESPACE``, and ``HEM_NAME``/``HEM_PARAMETERS``
for the inference worker's hard-example mining. ``train`` and ``evaluate`` report to the job's
status (``status.training``, ``status.evaluation``) through the node's local API, which is what
moves the job's stage machine on.
"""

import json
import os
import time

import numpy as np

from ... import _sedna
from .._common import num_samples

__all__ = ["IncrementalLearning"]


_num_samples = num_samples


def _metrics(result):
    if not isinstance(result, dict):
        return {}
    return {str(k): float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating, np.integer))}


def _local_path(url):
    if url.startswith("file://"):
        return url[len("file://"):]
    return url


class IncrementalLearning:
    """A worker of an IncrementalLearningJob, Sedna-style."""

    def __init__(self, estimator, hard_example_mining=None):
        self.estimator = estimator() if isinstance(estimator, type) else estimator
        self.job_name = os.environ.get("JOB_NAME")
        self.namespace = os.environ.get("NAMESPACE", "default")
        self.round = int(os.environ.get("SEDNA_ROUND", "0") or 0)
        if hard_example_mining is None and os.environ.get("HEM_NAME"):
            hard_example_mining = {
                "method": os.environ["HEM_NAME"],
                "param": os.environ.get("HEM_PARAMETERS") or None,
            }
        self.hem = None
        if hard_example_mining:
            self.hem = _sedna.HardExampleMining(
                hard_example_mining["method"], hard_example_mining.get("param")
            )
        self._loaded = None
        model = os.environ.get("MODEL_URL")
        if os.environ.get("MODEL_URLS") is None and os.environ.get("BASE_MODEL_URL") is None and model:
            # The inference worker: serve the deployed model.
            self.estimator.load(_local_path(model))
            self._loaded = model

    def _report(self, status):
        if not self.job_name:
            return False
        return _sedna.report_status(
            "sedna.io/v1alpha1", "IncrementalLearningJob", self.namespace, self.job_name, json.dumps(status)
        )

    def train(self, train_data, valid_data=None, post_process=None, **kwargs):
        """Trains from ``BASE_MODEL_URL`` on ``train_data``, saves to ``MODEL_URL`` and reports
        ``status.training``. Returns what the estimator's ``train`` returned (through
        ``post_process`` if given)."""
        base = os.environ.get("BASE_MODEL_URL")
        if base:
            self.estimator.load(_local_path(base))
        started = time.monotonic()
        result = self.estimator.train(train_data, valid_data=valid_data, **kwargs)
        seconds = time.monotonic() - started
        output = os.environ.get("MODEL_URL")
        if output:
            path = _local_path(output)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.estimator.save(path)
        metrics = _metrics(result)
        self._report({"training": {
            "round": self.round, "modelUrl": output or "", "samples": _num_samples(train_data),
            "epochs": int(kwargs.get("epochs", metrics.get("epochs", 1))),
            "loss": metrics.get("loss", 0.0), "seconds": seconds,
        }})
        return post_process(result) if callable(post_process) else result

    def evaluate(self, data, post_process=None, **kwargs):
        """Evaluates every model of ``MODEL_URLS`` (``candidate;deployed``) on ``data``;
        reports ``status.evaluation``; returns the list of metric dicts in that order."""
        urls = [u.strip() for u in os.environ.get("MODEL_URLS", "").split(";") if u.strip()]
        if not urls:
            raise _sedna.ConfigError("MODEL_URLS is not set: which models are evaluated?")
        results = []
        for url in urls:
            self.estimator.load(_local_path(url))
            results.append(_metrics(self.estimator.evaluate(data, **kwargs)))
        if len(results) == 2:
            self._report({"evaluation": {
                "round": self.round, "samples": _num_samples(data),
                "candidate": results[0], "deployed": results[1],
            }})
        return post_process(results) if callable(post_process) else results

    def inference(self, data, post_process=None, **kwargs):
        """Sedna's ``(infer_res, res, is_hard)``: the estimator's prediction, after
        ``post_process`` when given, and whether the mining algorithm finds it hard (judged on
        the prediction as class probabilities)."""
        infer_res = self.estimator.predict(data, **kwargs)
        res = post_process(infer_res) if callable(post_process) else infer_res
        is_hard = False
        if self.hem is not None:
            probabilities = np.asarray(infer_res, dtype=np.float32)
            if probabilities.ndim == 2 and probabilities.shape[0] == 1:
                probabilities = probabilities[0]
            is_hard = bool(self.hem.is_hard(probabilities))
        return infer_res, res, is_hard

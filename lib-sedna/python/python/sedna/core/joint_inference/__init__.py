"""Joint inference with Sedna's contract:

    from sedna.core.joint_inference import JointInference, BigModelService

    # the edge (little model)
    ji = JointInference(estimator=Estimator, hard_example_mining={"method": "IBT", "param": {...}})
    is_hard, result, edge_result, cloud_result = ji.inference(data, post_process=...)

    # the cloud (big model): blocks, serving on BIG_MODEL_BIND_PORT
    BigModelService(estimator=Estimator).start()

`estimator` is your class (or an instance of it) with ``load(model_url)`` and
``predict(data, **kwargs)``. The model comes from ``MODEL_URL``; the mining algorithm from the
argument or ``HEM_NAME``/``HEM_PARAMETERS`` (Sedna's built-ins run in Rust; your own classes
registered with ``ClassFactory.register(ClassType.HEM, alias)`` work too); the cloud from
``BIG_MODEL_IP``/``BIG_MODEL_PORT`` — or, on a node behind NAT, through the node's cloud proxy
(``SEDNA_CLOUD_PROXY`` + ``SEDNA_CLOUD_TUNNEL``). ``MINING_MODE`` is
``inference-then-mining`` (default) or ``mining-then-inference``, as in Sedna.

The wire protocol is Sedna's: ``POST /<service>/predict`` with ``{"data": ...}`` answered by
``{"result": ...}``. ``sedna-cloud-worker`` answers it too (beside its gRPC service), so an
unmodified Sedna little-model app can use the platform's cloud worker, and this
``BigModelService`` can serve an unmodified Sedna app. For ONNX models the Rust fast path stays:
``sedna.JointInference`` and ``sedna-edge-worker``.
"""

import http.client
import json
import os
import socket
import threading

import numpy as np

from ... import _sedna
from ...algorithms import hard_example_mining as _builtin_hem  # noqa: F401  (registers them)
from ...common.class_factory import ClassFactory, ClassType
from ...common.config import BaseConfig, Context

__all__ = ["JointInference", "BigModelService"]


def _local(url):
    return url[len("file://"):] if url and url.startswith("file://") else url


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _service_name():
    return os.environ.get("SERVICE_NAME") or BaseConfig.job_name


def _callback(post_process):
    if callable(post_process):
        return post_process
    if post_process is not None:
        return ClassFactory.get_cls(ClassType.CALLBACK, post_process)
    return None


class _Cloud:
    """Sedna's ModelClient: `POST /<service>/predict` with `{"data": ...}`."""

    def __init__(self, service, host, port, timeout):
        self.path = f"/{service}/predict"
        self.host, self.port, self.timeout = host, int(port), timeout
        self.proxy = os.environ.get("SEDNA_CLOUD_PROXY")
        self.tunnel = os.environ.get("SEDNA_CLOUD_TUNNEL")

    def _connection(self):
        if self.proxy and self.tunnel:
            # The node's cloud proxy: CONNECT <namespace/pod/endpoint>, then plain HTTP.
            host, port = self.proxy.rsplit(":", 1)
            sock = socket.create_connection((host, int(port)), timeout=self.timeout)
            sock.sendall(f"CONNECT {self.tunnel} HTTP/1.1\r\nHost: {self.tunnel}\r\n\r\n".encode())
            head = b""
            while not head.endswith(b"\r\n\r\n") and len(head) < 4096:
                byte = sock.recv(1)
                if not byte:
                    break
                head += byte
            if not head.startswith(b"HTTP/1.1 200"):
                sock.close()
                raise ConnectionError(f"cloud proxy {self.proxy}: {head.decode(errors='replace').strip()}")
            conn = http.client.HTTPConnection(self.tunnel.replace("/", "."), timeout=self.timeout)
            conn.sock = sock
            return conn
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def inference(self, data, **kwargs):
        body = dict(_jsonable(kwargs))
        body["data"] = _jsonable(data)
        conn = self._connection()
        try:
            conn.request("POST", self.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise ConnectionError(f"cloud answered {response.status}: {payload[:200].decode(errors='replace')}")
        return json.loads(payload)


class JointInference:
    """The edge side of a JointInferenceService, Sedna-style."""

    def __init__(self, estimator=None, hard_example_mining=None):
        if estimator is None:
            raise ValueError("JointInference needs an estimator (your class with load and predict)")
        self.estimator = estimator() if isinstance(estimator, type) else estimator
        self.model_path = _local(BaseConfig.model_url)
        if self.model_path:
            self.estimator.load(self.model_path)
        if not hard_example_mining:
            hard_example_mining = Context.get_algorithm_from_api("HEM")
        self.hard_example_mining_algorithm = None
        if hard_example_mining:
            method = hard_example_mining.get("method", "IBT")
            parameters = hard_example_mining.get("param") or {}
            if isinstance(parameters, str):
                parameters = {p["key"]: p.get("value", "") for p in json.loads(parameters)}
            self.hard_example_mining_algorithm = ClassFactory.get_cls(ClassType.HEM, method)(**parameters)
        timeout = float(Context.get_parameters("SEDNA_CLOUD_TIMEOUT_MS", 5000)) / 1000
        self.cloud = _Cloud(
            _service_name(),
            Context.get_parameters("BIG_MODEL_IP", "127.0.0.1"),
            Context.get_parameters("BIG_MODEL_PORT", "5000"),
            timeout,
        )
        self.cloud_errors = 0

    def _edge(self, data, callback, **kwargs):
        edge_result = self.estimator.predict(data, **kwargs)
        res = callback(edge_result) if callback else edge_result
        return res, edge_result

    def inference(self, data=None, post_process=None, **kwargs):
        """Sedna's `[is_hard_example, result, edge_result, cloud_result]`: the edge model
        answers; a hard example (by the mining algorithm) is also sent to the cloud, whose
        answer wins. A cloud that cannot be reached leaves the edge's answer (counted in
        `cloud_errors`)."""
        callback = _callback(post_process)
        mode = Context.get_parameters("MINING_MODE", "inference-then-mining")
        cloud_result = None
        if mode == "inference-then-mining":
            res, edge_result = self._edge(data, callback, **kwargs)
            is_hard = bool(self.hard_example_mining_algorithm(res)) if self.hard_example_mining_algorithm else False
            if is_hard:
                try:
                    cloud_result = self.cloud.inference(data, **kwargs)["result"]
                except (OSError, ValueError, KeyError) as err:
                    self.cloud_errors += 1
                    self.last_cloud_error = str(err)
                else:
                    res = cloud_result
        elif mode == "mining-then-inference":
            if self.hard_example_mining_algorithm is None:
                raise ValueError("Hard example mining algorithm is not set.")
            is_hard = bool(self.hard_example_mining_algorithm(data))
            edge_result = None
            if is_hard:
                cloud_result = self.cloud.inference(data, **kwargs)["result"]
                res = callback(cloud_result) if callback else cloud_result
            else:
                res, edge_result = self._edge(data, callback, **kwargs)
        else:
            raise ValueError(f"Invalid MINING_MODE: {mode}.")
        return [is_hard, res, edge_result, cloud_result]


class BigModelService:
    """The cloud side, Sedna-style: serves your estimator's `predict` on
    `BIG_MODEL_BIND_PORT` (default 5000), in both protocols on one port: the platform's gRPC
    (what `sedna-edge-worker` and `sedna.JointInference` speak) and Sedna's HTTP JSON
    (`POST /<service>/predict`, what Sedna's little-model apps and `JointInference` above
    send). Requests are bounded (64 MiB); an estimator's exception is the request's error."""

    def __init__(self, estimator=None):
        if estimator is None:
            raise ValueError("BigModelService needs an estimator (your class with load and predict)")
        self.estimator = estimator
        self.host = Context.get_parameters("BIG_MODEL_BIND_IP", "0.0.0.0")
        self.port = int(Context.get_parameters("BIG_MODEL_BIND_PORT", "5000"))
        self.service = _service_name()
        self.server = None
        self._stopped = threading.Event()

    def inference(self, data=None, post_process=None, **kwargs):
        """The estimator's answer (after `post_process`)."""
        res = self.estimator.predict(data, **kwargs)
        callback = _callback(post_process)
        return callback(res) if callback else res

    def start(self, block=True):
        """Loads the model (`MODEL_URL`) and serves until stopped (blocking, as Sedna's; Ctrl-C
        stops it); with `block=False` serves in the background and returns the bound port."""
        if isinstance(self.estimator, type):
            self.estimator = self.estimator()
        model = _local(BaseConfig.model_url)
        if model:
            self.estimator.load(model)
        self.server = _sedna.serve_estimator(lambda inputs: self.inference(inputs), self.host, self.port)
        self.port = self.server.port
        if block:
            try:
                while not self._stopped.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
            finally:
                self.stop()
        return self.port

    def stop(self):
        """Stops serving."""
        self._stopped.set()
        if self.server is not None:
            self.server.stop()

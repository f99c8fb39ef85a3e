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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from ...algorithms import hard_example_mining as _builtin_hem  # noqa: F401  (registers them)
from ...common.class_factory import ClassFactory, ClassType
from ...common.config import BaseConfig, Context

__all__ = ["JointInference", "BigModelService", "MAX_REQUEST_BYTES"]

#: The largest request body the big-model service accepts.
MAX_REQUEST_BYTES = 64 << 20


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
    `BIG_MODEL_BIND_PORT` (default 5000) at `POST /<service>/predict`."""

    def __init__(self, estimator=None):
        if estimator is None:
            raise ValueError("BigModelService needs an estimator (your class with load and predict)")
        self.estimator = estimator
        self.host = Context.get_parameters("BIG_MODEL_BIND_IP", "0.0.0.0")
        self.port = int(Context.get_parameters("BIG_MODEL_BIND_PORT", "5000"))
        self.service = _service_name()
        self.server = None

    def inference(self, data=None, post_process=None, **kwargs):
        """The estimator's answer (after `post_process`)."""
        res = self.estimator.predict(data, **kwargs)
        callback = _callback(post_process)
        return callback(res) if callback else res

    def _handler(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/") == f"/{service.service}":
                    self._reply(200, {"infos": [{"url": f"/{service.service}/predict", "method": "POST"}]})
                else:
                    self._reply(404, {"error": f"use POST /{service.service}/predict"})

            def do_POST(self):
                if self.path != f"/{service.service}/predict":
                    return self._reply(404, {"error": f"use POST /{service.service}/predict"})
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    return self._reply(400, {"error": "bad Content-Length"})
                if length > MAX_REQUEST_BYTES:
                    return self._reply(413, {"error": f"the body is over {MAX_REQUEST_BYTES} bytes"})
                try:
                    request = json.loads(self.rfile.read(length))
                    data = request["data"]
                except (ValueError, KeyError, TypeError):
                    return self._reply(400, {"error": 'the body must be JSON {"data": ...}'})
                try:
                    result = service.inference(np.asarray(data, dtype=np.float32)
                                               if isinstance(data, list) else data,
                                               post_process=request.get("callback"))
                except Exception as err:  # the estimator's error, reported to the caller
                    return self._reply(500, {"error": f"{type(err).__name__}: {err}"})
                self._reply(200, {"result": _jsonable(result)})

        return Handler

    def start(self, block=True):
        """Loads the model (`MODEL_URL`) and serves until stopped (blocking, as Sedna's);
        with `block=False` serves in a thread and returns the bound port."""
        if isinstance(self.estimator, type):
            self.estimator = self.estimator()
        model = _local(BaseConfig.model_url)
        if model:
            self.estimator.load(model)
        self.server = ThreadingHTTPServer((self.host, self.port), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        if block:
            self.server.serve_forever()
        else:
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.port

    def stop(self):
        """Stops serving."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

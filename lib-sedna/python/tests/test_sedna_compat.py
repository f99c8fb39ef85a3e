"""Sedna apps move over unchanged: workers written as Sedna's `examples/` scripts write them
(`from sedna.core.joint_inference import JointInference, BigModelService`,
`sedna.datasources`, `sedna.common.config`, `sedna.common.class_factory`,
`sedna.algorithms.hard_example_mining`), with small ONNX/numpy estimators in place of
TensorFlow, against the platform's real cloud worker (`sedna cloud-worker`, which answers
Sedna's HTTP JSON protocol beside its gRPC) and against `BigModelService`."""

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

import sedna
from sedna.algorithms.hard_example_mining import IBTFilter, ThresholdFilter
from sedna.common.class_factory import ClassFactory, ClassType
from sedna.common.config import BaseConfig, Context
from sedna.core.joint_inference import BigModelService, JointInference
from sedna.datasources import CSVDataParse, TxtDataParse

ROOT = pathlib.Path(__file__).resolve().parents[3]
MNIST = ROOT / "models" / "mnist"


def sedna_binary():
    path = os.environ.get("SEDNA_BIN") or str(
        pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug" / "sedna")
    assert pathlib.Path(path).exists(), f"{path}: build it first (scripts/test does)"
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits(n):
    images = (MNIST / "test-images.idx3-ubyte").read_bytes()[16:]
    labels = (MNIST / "test-labels.idx1-ubyte").read_bytes()[8:]
    x = np.frombuffer(images, np.uint8)[: n * 784].reshape(n, 784).astype(np.float32) / 255
    return x, np.frombuffer(labels, np.uint8)[:n].astype(np.int64)


class Estimator:
    """A Sedna-style estimator around an ONNX model (Sedna's examples wrap TensorFlow)."""

    def __init__(self, **kwargs):
        self.session = None

    def load(self, model_url=""):
        self.session = ort.InferenceSession(model_url, providers=["CPUExecutionProvider"])

    def predict(self, data, **kwargs):
        x = np.asarray(data, dtype=np.float32).reshape(-1, 784)
        outputs = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, {"input": x})))
        return outputs["probabilities"]


@pytest.fixture
def cloud_worker(tmp_path):
    port = free_port()
    env = dict(os.environ, MODEL_URL=str(MNIST / "cloud" / "model.onnx"), BIG_MODEL_PORT=str(port),
               SEDNA_CACHE_DIR=str(tmp_path / "cache"), RUST_LOG="warn")
    proc = subprocess.Popen([sedna_binary(), "cloud-worker"], env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def post(port, path, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_sedna_little_model_app_uses_the_platforms_cloud_worker(cloud_worker, monkeypatch):
    # The environment the JointInferenceService controller injects into the edge worker.
    monkeypatch.setenv("MODEL_URL", str(MNIST / "edge" / "model.onnx"))
    monkeypatch.setenv("JOB_NAME", "digits")
    monkeypatch.setenv("BIG_MODEL_IP", "127.0.0.1")
    monkeypatch.setenv("BIG_MODEL_PORT", str(cloud_worker))
    monkeypatch.setenv("HEM_NAME", "Threshold")
    monkeypatch.setenv("HEM_PARAMETERS", json.dumps([{"key": "threshold", "value": "0.9"}]))
    for key in ("SEDNA_CLOUD_PROXY", "SEDNA_CLOUD_TUNNEL", "MINING_MODE"):
        monkeypatch.delenv(key, raising=False)
    # As Sedna's little_model.py: the estimator class, the mining from the environment.
    inference_instance = JointInference(estimator=Estimator)
    x, y = digits(60)
    correct_edge = correct_final = hard = 0
    for sample, label in zip(x, y):
        is_hard_example, final_result, edge_result, cloud_result = inference_instance.inference(sample)
        correct_edge += int(np.argmax(edge_result) == label)
        correct_final += int(np.argmax(final_result) == label)
        if is_hard_example:
            hard += 1
            assert cloud_result is not None and len(cloud_result) == 10
            assert final_result == cloud_result
            assert abs(sum(cloud_result) - 1) < 1e-3  # the cloud model's probabilities
        else:
            assert cloud_result is None
    assert inference_instance.cloud_errors == 0
    assert 5 <= hard <= 55, hard
    assert correct_final >= correct_edge

    # What an unmodified Sedna app sends, on the wire: errors are clear.
    status, answer = post(cloud_worker, "/digits/predict", {"data": x[0].tolist()})
    assert status == 200 and len(answer["result"]) == 10 and answer["model_version"] == 1
    status, answer = post(cloud_worker, "/digits/predict", {"data": [[1, 2], [3]]})
    assert status == 400 and "ragged" in answer["error"]
    status, answer = post(cloud_worker, "/digits/predict", {"data": [1.0] * 783})
    assert status == 400 and "784" in answer["error"]
    status, answer = post(cloud_worker, "/digits/predict", {"samples": []})
    assert status == 400 and "data" in answer["error"]


class BigEstimator(Estimator):
    """The big model of Sedna's big_model.py, here the platform's MNIST cloud model."""


def test_big_model_service_serves_a_sedna_little_model_and_the_platforms_edge(monkeypatch, tmp_path):
    port = free_port()
    monkeypatch.setenv("MODEL_URL", str(MNIST / "cloud" / "model.onnx"))
    monkeypatch.setenv("BIG_MODEL_BIND_PORT", str(port))
    monkeypatch.setenv("BIG_MODEL_BIND_IP", "127.0.0.1")
    monkeypatch.setenv("JOB_NAME", "digits")
    service = BigModelService(estimator=BigEstimator)
    service.start(block=False)
    try:
        monkeypatch.setenv("MODEL_URL", str(MNIST / "edge" / "model.onnx"))
        monkeypatch.setenv("BIG_MODEL_PORT", str(port))
        for key in ("HEM_NAME", "SEDNA_CLOUD_PROXY", "SEDNA_CLOUD_TUNNEL"):
            monkeypatch.delenv(key, raising=False)
        # Every sample to the cloud: Sedna's CloudOnly, from the class factory by name.
        ji = JointInference(estimator=Estimator(), hard_example_mining={"method": "CloudOnly", "param": {}})
        x, y = digits(20)
        finals = [ji.inference(sample)[1] for sample in x]
        accuracy = np.mean([np.argmax(np.asarray(f).reshape(-1)) == label for f, label in zip(finals, y)])
        assert ji.cloud_errors == 0 and accuracy >= 0.9, accuracy
        status, answer = post(port, "/digits/predict", {"nodata": 1})
        assert status == 400 and "data" in answer["error"]
        status, _ = post(port, "/a/b/predict", {"data": [0.0] * 784})
        assert status == 404
        # The same port speaks the platform's gRPC: the Rust edge side (ONNX fast path) uses it.
        edge = sedna.JointInference(str(MNIST / "edge" / "model.onnx"), "CloudOnly",
                                    f"grpc://127.0.0.1:{port}", str(tmp_path / "queue"))
        is_hard, result, _, cloud = edge.inference(x[:1])
        assert is_hard and cloud is not None
        assert int(np.argmax(np.asarray(cloud["output"]).reshape(-1))) == y[0]
    finally:
        service.stop()


def test_a_user_hem_registered_with_the_class_factory_is_used_by_name(monkeypatch):
    @ClassFactory.register(ClassType.HEM, alias="Margin")
    class Margin:
        def __init__(self, margin=0.5, **kwargs):
            self.margin = float(margin)

        def __call__(self, infer_result=None):
            top = np.sort(np.asarray(infer_result).reshape(-1))[::-1]
            return bool(top[0] - top[1] < self.margin)

    assert ClassFactory.is_exists(ClassType.HEM, "Margin")
    assert ClassFactory.get_cls(ClassType.HEM, "Threshold") is ThresholdFilter
    with pytest.raises(ValueError, match="duplicate"):
        ClassFactory.register_cls(ThresholdFilter, ClassType.HEM, "Margin")
    with pytest.raises(ValueError, match="registered"):
        ClassFactory.get_cls(ClassType.HEM, "Nope")
    monkeypatch.setenv("MODEL_URL", str(MNIST / "edge" / "model.onnx"))
    monkeypatch.setenv("HEM_NAME", "Margin")
    monkeypatch.setenv("HEM_PARAMETERS", json.dumps([{"key": "margin", "value": "0.3"}]))
    monkeypatch.setenv("BIG_MODEL_PORT", str(free_port()))  # nothing listens: edge answers stand
    ji = JointInference(estimator=Estimator)
    assert isinstance(ji.hard_example_mining_algorithm, Margin)
    assert ji.hard_example_mining_algorithm.margin == 0.3
    x, _ = digits(30)
    results = [ji.inference(sample) for sample in x]
    assert any(r[0] for r in results) and not all(r[0] for r in results)
    assert all(r[3] is None for r in results) and ji.cloud_errors == sum(r[0] for r in results)


def test_sednas_builtin_filters_judge_as_sedna_does():
    assert ThresholdFilter(threshold=0.9)([0.5, 0.3, 0.2]) is True
    assert ThresholdFilter(threshold=0.9)([[0.95, 0.05]]) is False
    boxes = [[0, 0, 10, 10, 0.95, 1], [5, 5, 20, 20, 0.4, 2]]
    assert IBTFilter(threshold_img=0.9, threshold_box=0.9)(boxes) is True
    assert IBTFilter(threshold_img=0.4, threshold_box=0.5)(boxes) is False


def test_datasources_parse_sedna_indexes(tmp_path):
    index = tmp_path / "train.txt"
    index.write_text("images/a.jpg 1\nimages/b.jpg 0\n\nimages/c.jpg\n")
    train = TxtDataParse(data_type="train")
    train.parse(str(index))
    assert list(train.x) == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    assert list(train.y) == ["1", "0", 0] or [str(v) for v in train.y] == ["1", "0", "0"]
    assert train.num_examples() == 3 and len(train) == 3
    # Multi-field lines (an image and its boxes), handed to the user's func, kept whole.
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("a.jpg 1,2,3,4,0 5,6,7,8,1\nb.jpg 9,9,9,9,0\n")

    def parse_line(line):
        path, *rest = line.split()
        return [path, [list(map(int, b.split(","))) for b in rest]]

    det = TxtDataParse(data_type="train", func=parse_line)
    det.parse(str(boxes), use_raw=True)
    assert det.x[0][0] == "a.jpg" and det.x[0][1][1] == [5, 6, 7, 8, 1]
    test = TxtDataParse(data_type="test")
    test.parse(f"file://{index}", str(tmp_path / "missing.txt"))
    assert len(test.x) == 3 and len(test.y) == 0

    table = tmp_path / "data.csv"
    table.write_text("temp,humidity,label\n21.5,40,ok\n35.0,80,alarm\n")
    csv_data = CSVDataParse(data_type="train")
    csv_data.parse(str(table), label="label")
    assert len(csv_data.x) == 2 and list(csv_data.y) == ["ok", "alarm"]
    inline = CSVDataParse(data_type="train")
    inline.parse({"temp": 1.0, "label": "ok"}, label="label")
    assert list(inline.y) == ["ok"]


def test_context_and_base_config_read_the_controllers_environment(monkeypatch):
    monkeypatch.setenv("epochs", "3")
    monkeypatch.setenv("TRAIN_DATASET_URL", "/data/train.txt")
    monkeypatch.setenv("NAMESPACE", "team-a")
    monkeypatch.setenv("HEM_NAME", "IBT")
    monkeypatch.setenv("HEM_PARAMETERS", '[{"key": "threshold_img", "value": "0.9"}]')
    assert int(Context.get_parameters("epochs", 1)) == 3
    assert Context.get_parameters("missing", "x") == "x"
    assert BaseConfig.train_dataset_url == "/data/train.txt"
    assert BaseConfig().namespace == "team-a"
    assert BaseConfig.job_name == os.environ.get("JOB_NAME", "sedna")
    assert Context.get_algorithm_from_api("HEM", threshold_box=0.5) == {
        "method": "IBT", "param": {"threshold_img": "0.9", "threshold_box": 0.5}}
    monkeypatch.delenv("HEM_NAME")
    assert Context.get_algorithm_from_api("HEM") == {}

"""The Python API against the real ONNX Runtime, the real digits model and real sockets."""

import json
import pathlib
import socket
import threading

import numpy as np
import pytest

import sedna

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODEL = ROOT / "models" / "digits" / "model.onnx"
TEST_CSV = ROOT / "models" / "digits" / "test.csv"


@pytest.fixture(scope="module")
def digits():
    columns, x, labels = sedna.parse_csv(str(TEST_CSV), label="label")
    assert len(columns) == 64
    return (x / 16.0).astype(np.float32), np.array([int(v) for v in labels])


@pytest.fixture(scope="module")
def model():
    return sedna.Model(str(MODEL), intra_threads=1)


def test_model_metadata_and_accuracy_on_the_held_out_split(model, digits):
    x, y = digits
    assert model.inputs == [("input", "float32", [None, 64])]
    names = {name: dtype for name, dtype, _ in model.outputs}
    assert names == {"label": "int64", "probabilities": "float32"}
    out = model.run({"input": x})
    assert out["probabilities"].dtype == np.float32
    assert out["probabilities"].shape == (450, 10)
    accuracy = float((out["label"] == y).mean())
    assert abs(accuracy - 0.9733) < 0.001
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-4)
    # One array for a one-input model; batching gives the same answer.
    batched = model.run_batched(x, 64)
    np.testing.assert_array_equal(batched["label"], out["label"])
    # Non-contiguous input is accepted.
    np.testing.assert_array_equal(model.run(x[::2])["label"], out["label"][::2])
    assert model.version == 1


def test_model_errors_are_python_exceptions_with_the_rust_message(model):
    with pytest.raises(sedna.InferenceError, match="dimension 1 must be 64"):
        model.run(np.zeros((1, 63), dtype=np.float32))
    with pytest.raises(sedna.InferenceError, match="must be float32, got int64"):
        model.run(np.zeros((1, 64), dtype=np.int64))
    with pytest.raises(sedna.InferenceError, match="expected a numpy array"):
        model.run({"input": [[0.0] * 64]})
    with pytest.raises(sedna.InferenceError, match="nope.onnx"):
        sedna.Model("/nonexistent/nope.onnx")
    assert issubclass(sedna.InferenceError, sedna.SednaError)


def test_asking_for_cuda_without_it_raises_instead_of_falling_back():
    with pytest.raises(sedna.InferenceError, match="no fallback to CPU"):
        sedna.Model(str(MODEL), providers=["cuda"])
    with pytest.raises(sedna.InferenceError, match="unknown execution provider"):
        sedna.Model(str(MODEL), providers=["tpu"])


def test_hot_reload(tmp_path, digits):
    x, _ = digits
    path = tmp_path / "model.onnx"
    path.write_bytes(MODEL.read_bytes())
    m = sedna.Model(str(path))
    assert not m.reload_if_changed()
    assert m.reload() == 2
    path.write_bytes(b"broken")
    with pytest.raises(sedna.InferenceError):
        m.reload()
    assert m.version == 2
    assert m.run(x[:3])["label"].shape == (3,)


def test_hard_example_mining_matches_sedna_formulas():
    ce = sedna.HardExampleMining("CrossEntropy", {"threshold_cross_entropy": "0.5"})
    assert ce.is_hard(np.array([0.5, 0.5], dtype=np.float32))
    assert not ce.is_hard(np.array([0.9, 0.1]))
    threshold = sedna.HardExampleMining(
        "Threshold", '[{"key": "threshold", "value": "0.5"}]'
    )
    boxes = np.array([[0, 0, 1, 1, 0.9, 1], [0, 0, 1, 1, 0.2, 1], [0, 0, 1, 1, 0.3, 1]])
    assert threshold.is_hard(boxes)
    assert sedna.HardExampleMining("CloudOnly").is_hard()
    assert not sedna.HardExampleMining("EdgeOnly").is_hard()
    with pytest.raises(sedna.HemError, match="threshold"):
        sedna.HardExampleMining("Threshold", {"threshold": "1.5"})
    with pytest.raises(sedna.HemError, match="unknown hard-example mining algorithm"):
        sedna.HardExampleMining("Magic")
    assert {"Threshold", "CrossEntropy", "IBT", "Random", "CloudOnly", "EdgeOnly"} <= set(
        sedna.hem_names()
    )


def test_a_python_hem_is_registered_and_used():
    class TopTwoMargin:
        def __init__(self, parameters):
            self.margin = float(parameters.get("margin", "0.2"))

        def is_hard(self, data):
            top = np.sort(data)[-2:]
            return bool(top[1] - top[0] < self.margin)

    sedna.register_hem("TopTwoMargin", TopTwoMargin)
    hem = sedna.HardExampleMining("TopTwoMargin", {"margin": "0.3"})
    assert hem.name == "TopTwoMargin"
    assert hem.is_hard(np.array([0.45, 0.55, 0.0], dtype=np.float32))
    assert not hem.is_hard(np.array([0.1, 0.9, 0.0], dtype=np.float32))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_joint_inference_queues_while_the_cloud_is_down(tmp_path, model, digits):
    x, _ = digits
    port = free_port()
    cloud = sedna.serve_cloud(model, port=port)
    hem = sedna.HardExampleMining("CrossEntropy", {"threshold_cross_entropy": "0.9"})
    ji = sedna.JointInference(
        model, hem, f"http://127.0.0.1:{port}", str(tmp_path / "queue"), timeout=2.0
    )
    hard = 0
    for i in range(60):
        is_hard, result, edge, cloud_result = ji.inference(x[i : i + 1], id=f"s{i}")
        if is_hard:
            hard += 1
            assert cloud_result is not None
            np.testing.assert_array_equal(result["label"], cloud_result["label"])
        else:
            assert cloud_result is None
            np.testing.assert_array_equal(result["label"], edge["label"])
    assert hard > 0
    cloud.stop()
    queued = []
    for i in range(60, 120):
        is_hard, result, edge, cloud_result = ji.inference(x[i : i + 1], id=f"s{i}")
        if is_hard:
            assert cloud_result is None
            queued.append(f"s{i}")
    assert queued and ji.queued == len(queued)
    assert ji.resend() == []
    cloud = sedna.serve_cloud(model, port=port)
    answers = ji.resend()
    assert [a[0] for a in answers] == queued
    assert all("label" in a[1] for a in answers)
    stats = ji.stats
    assert stats["inferences"] == 120
    assert stats["hard_examples"] == hard + len(queued)
    assert stats["cloud_answers"] == stats["hard_examples"]
    assert stats["refused"] == 0
    assert abs(stats["upload_ratio"] - stats["hard_examples"] / 120) < 1e-12
    cloud.stop()


def test_joint_inference_against_a_grpc_cloud_worker(tmp_path, model, digits):
    x, _ = digits
    port = free_port()
    cloud = sedna.serve_cloud(model, port=port, protocol="grpc")
    hem = sedna.HardExampleMining("CloudOnly")
    ji = sedna.JointInference(model, hem, f"grpc://127.0.0.1:{port}", str(tmp_path / "q"))
    is_hard, result, edge, cloud_result = ji.inference(x[:1])
    assert is_hard and cloud_result is not None
    np.testing.assert_array_equal(cloud_result["label"], edge["label"])
    cloud.stop()
    with pytest.raises(sedna.JointInferenceError, match="protocol"):
        sedna.serve_cloud(model, port=free_port(), protocol="carrier-pigeon")


def test_a_cloud_worker_with_the_services_token_answers_only_callers_that_send_it(
    tmp_path, model, digits, monkeypatch
):
    x, _ = digits
    token = tmp_path / "token"
    token.write_text("the-service-token\n")
    # The controller mounts the token in both workers and names it in this variable.
    monkeypatch.setenv("SEDNA_SERVICE_TOKEN_FILE", str(token))
    port = free_port()
    cloud = sedna.serve_cloud(model, port=port, protocol="grpc")
    hem = sedna.HardExampleMining("CloudOnly")
    ji = sedna.JointInference(model, hem, f"grpc://127.0.0.1:{port}", str(tmp_path / "q"))
    is_hard, _, _, cloud_result = ji.inference(x[:1])
    assert is_hard and cloud_result is not None
    monkeypatch.delenv("SEDNA_SERVICE_TOKEN_FILE")
    stranger = sedna.JointInference(model, hem, f"grpc://127.0.0.1:{port}", str(tmp_path / "q2"))
    with pytest.raises(sedna.JointInferenceError, match="token"):
        stranger.inference(x[:1])
    monkeypatch.setenv("SEDNA_SERVICE_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(sedna.JointInferenceError, match="SEDNA_SERVICE_TOKEN_FILE"):
        sedna.JointInference(model, hem, f"grpc://127.0.0.1:{port}", str(tmp_path / "q3"))
    cloud.stop()


class Softmax:
    """A numpy softmax regression, as an app would write an estimator."""

    def __init__(self, x, y, test_x, test_y):
        self.w = np.zeros((64, 10), dtype=np.float32)
        self.b = np.zeros(10, dtype=np.float32)
        self.x, self.y, self.test_x, self.test_y = x, y, test_x, test_y

    @property
    def num_samples(self):
        return len(self.y)

    def get_weights(self):
        return {"w": self.w, "b": self.b}

    def set_weights(self, weights):
        self.w, self.b = weights["w"].copy(), weights["b"].copy()

    def _p(self, x):
        z = x @ self.w + self.b
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def train(self, settings):
        for _ in range(int(settings.get("epochs", "10"))):
            g = self._p(self.x)
            g[np.arange(len(self.y)), self.y] -= 1
            self.w -= 0.5 * (self.x.T @ g) / len(self.y)
            self.b -= 0.5 * g.mean(axis=0)
        return len(self.y), {"loss": float(-np.log(self._p(self.x)[np.arange(len(self.y)), self.y]).mean())}

    def evaluate(self):
        return {"accuracy": float((self._p(self.test_x).argmax(axis=1) == self.test_y).mean())}


def test_federated_learning_clients_and_aggregator(digits):
    x, y = digits
    test = np.arange(len(y)) % 3 == 0
    groups = [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    clients = []
    for k, classes in enumerate(groups):
        mask = ~test & np.isin(y, classes)
        est = Softmax(x[mask], y[mask], x[test], y[test])
        clients.append(sedna.FederatedLearning("digits", f"edge-{k}", est, encoding="fp16"))
    for c in clients:
        join = sedna.decode_frame(c.join())
        assert join["type"] == "join" and join["encodings"][0] == "fp16"
    aggregator = sedna.Aggregator("FedAvg")
    global_weights = {"w": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}
    for round_ in range(1, 16):
        frame = sedna.train_frame(round_, global_weights, {"epochs": "10"})
        updates = []
        for c in clients:
            update = sedna.decode_frame(c.handle(frame))
            assert update["type"] == "update" and update["round"] == round_
            updates.append((update["weights"], update["num_samples"]))
        global_weights = aggregator.aggregate(global_weights, updates)
    probe = Softmax(x, y, x[test], y[test])
    probe.set_weights(global_weights)
    assert probe.evaluate()["accuracy"] > 0.85
    assert clients[0].state == "waiting" and len(clients[0].history) == 15
    with pytest.raises(sedna.AggregationError, match="unknown aggregation"):
        sedna.Aggregator("FedMagic")
    with pytest.raises(sedna.FederatedLearningError, match="SDNF"):
        clients[0].handle(b"garbage frame that is long enough")


def test_weights_round_trip_within_documented_bounds():
    rng = np.random.default_rng(0)
    w = {"conv": rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "bias": np.zeros(8, np.float32)}
    exact = sedna.decode_weights(sedna.encode_weights(w, "f32"))
    np.testing.assert_array_equal(exact["conv"], w["conv"])
    half = sedna.decode_weights(sedna.encode_weights(w, "fp16"))
    assert np.all(np.abs(half["conv"] - w["conv"]) <= np.abs(w["conv"]) * 2**-11 + 2**-25)
    q = sedna.decode_weights(sedna.encode_weights(w, "int8"))
    span = w["conv"].max() - w["conv"].min()
    assert np.abs(q["conv"] - w["conv"]).max() <= span / 510 * 1.001
    assert len(sedna.encode_weights(w, "int8")) < len(sedna.encode_weights(w, "f32")) / 3
    with pytest.raises(sedna.WeightsError, match="unknown encoding"):
        sedna.encode_weights(w, "int4")


def test_config_from_env_reads_sedna_names_and_names_bad_variables(monkeypatch):
    monkeypatch.setenv("BIG_MODEL_IP", "10.0.0.7")
    monkeypatch.setenv("HEM_NAME", "CrossEntropy")
    monkeypatch.setenv("HEM_PARAMETERS", json.dumps([{"key": "threshold_cross_entropy", "value": "0.8"}]))
    monkeypatch.setenv("MODEL_URL", "s3://models/edge.onnx")
    c = sedna.config_from_env()
    assert c["big_model"] == ("10.0.0.7", 5000)
    assert c["hem_name"] == "CrossEntropy"
    assert c["hem_parameters"] == {"threshold_cross_entropy": "0.8"}
    monkeypatch.setenv("BIG_MODEL_PORT", "http")
    with pytest.raises(sedna.ConfigError, match="BIG_MODEL_PORT"):
        sedna.config_from_env()
    monkeypatch.delenv("BIG_MODEL_PORT")
    monkeypatch.setenv("SECRET_ACCESS_KEY", "do-not-use")
    with pytest.warns(UserWarning, match="SECRET_ACCESS_KEY is set in the environment and ignored"):
        sedna.config_from_env()


def test_storage_and_dataset_indexes(tmp_path):
    storage = sedna.Storage(str(tmp_path / "cache"))
    url = f"file://{tmp_path}/models/m.onnx"
    storage.upload(url, MODEL.read_bytes())
    path, sha, size, cached = storage.fetch(url)
    assert not cached and size == MODEL.stat().st_size
    assert sha == "b524bdf48c5429fcd1b19d3223d93fad5960b5b0dc0bf1315a2fd99a8ccc1994"
    assert storage.fetch(url)[3] is True
    with pytest.raises(sedna.StorageError, match="no such object"):
        storage.fetch(f"file://{tmp_path}/none.onnx")
    index = tmp_path / "data" / "train.txt"
    index.parent.mkdir()
    index.write_text("img/a.jpg 1\nimg/b.jpg 0\n")
    assert sedna.parse_txt_index(str(index)) == [
        (str(tmp_path / "data" / "img" / "a.jpg"), "1"),
        (str(tmp_path / "data" / "img" / "b.jpg"), "0"),
    ]
    index.write_text("a b c\n")
    with pytest.raises(sedna.DatasetError, match="line 1"):
        sedna.parse_txt_index(str(index))


def test_threads_share_one_model_and_get_every_answer(model, digits):
    x, _ = digits
    expected = model.run(x[:50])["label"]
    results = []

    def work():
        for i in range(50):
            results.append((i, model.run(x[i : i + 1])["label"][0]))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 150
    assert all(label == expected[i] for i, label in results)

"""A federated-learning job with a Python worker written as Sedna users write them (a PyTorch
estimator with train/evaluate/predict/get_weights/set_weights, weights as a list of arrays) and
two Rust training workers (`sedna edge-worker train`), all clients of one aggregator
(`sedna cloud-worker aggregate`) on 127.0.0.1, each on its own non-IID MNIST shard."""

import gzip
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

import sedna
from sedna.core.federated_learning import FederatedLearning

ROOT = pathlib.Path(__file__).resolve().parents[3]
MNIST = ROOT / "models" / "mnist"
import torch  # noqa: E402  (scripts/setup installs it)


def sedna_binary():
    path = os.environ.get("SEDNA_BIN") or str(
        pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug" / "sedna")
    assert pathlib.Path(path).exists(), f"{path}: build it first (scripts/test does)"
    return path


def idx(path):
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if struct.unpack(">I", data[:4])[0] == 0x803:
        n, r, c = struct.unpack(">III", data[4:16])
        return np.frombuffer(data[16:], np.uint8).reshape(n, 1, r, c).astype(np.float32) / 255
    return np.frombuffer(data[8:], np.uint8).astype(np.int64)


class Estimator:
    """What a Sedna user writes: the model in their framework (here PyTorch, the same CNN as
    models/mnist/cnn), trained on their data."""

    def __init__(self):
        sys.path.insert(0, str(MNIST))
        from trainable import CNN

        torch.manual_seed(0)
        torch.set_num_threads(1)
        self.model = CNN()
        self.model.load_state_dict(torch.jit.load(str(MNIST / "cnn" / "init.pt")).state_dict())

    def get_weights(self):
        return [p.detach().numpy().copy() for p in self.model.parameters()]

    def set_weights(self, weights):
        with torch.no_grad():
            for p, w in zip(self.model.parameters(), weights):
                assert tuple(p.shape) == w.shape, (p.shape, w.shape)
                p.copy_(torch.from_numpy(np.asarray(w)))

    def train(self, train_data, valid_data=None, epochs=1, batch_size=64, learning_rate=0.05, **kwargs):
        x, y = torch.from_numpy(train_data[0]), torch.from_numpy(train_data[1])
        optimizer = torch.optim.SGD(self.model.parameters(), lr=learning_rate, momentum=0.9)
        self.model.train()
        for _ in range(int(epochs)):
            order = torch.randperm(len(x))
            for i in range(0, len(x), int(batch_size)):
                batch = order[i:i + int(batch_size)]
                loss = torch.nn.functional.cross_entropy(self.model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return {"train_loss": loss.item()}

    def evaluate(self, data, **kwargs):
        with torch.no_grad():
            logits = self.model(torch.from_numpy(data[0]))
        return {"accuracy": float((logits.argmax(1).numpy() == data[1]).mean())}

    def predict(self, data, **kwargs):
        with torch.no_grad():
            return self.model(torch.from_numpy(data)).numpy()

    def load(self, model_url):
        pass

    def save(self, model_path):
        torch.save(self.model.state_dict(), model_path)


def test_a_python_worker_and_rust_workers_train_in_one_job(tmp_path, monkeypatch):
    binary = sedna_binary()
    settings = json.dumps([{"key": "epochs", "value": "1"}, {"key": "learning_rate", "value": "0.05"},
                           {"key": "optimizer", "value": "sgd"}, {"key": "momentum", "value": "0.9"}])
    env = dict(os.environ, JOB_NAME="digits", RAYON_NUM_THREADS="1", CANDLE_NUM_THREADS="1")
    aggregator = subprocess.Popen(
        [binary, "cloud-worker", "aggregate", "--listen", "127.0.0.1:0"], cwd=tmp_path,
        env=dict(env, MODEL_URL=str(tmp_path / "final.onnx"), BASE_MODEL_URL=str(MNIST / "cnn" / "init.onnx"),
                 TEST_DATASET_URL=str(MNIST / "test-images.idx3-ubyte"), PARTICIPANTS_COUNT="3",
                 SEDNA_FL_ROUNDS="2", SEDNA_FL_SETTINGS=settings, SEDNA_OUTPUT_DIR=str(tmp_path / "agg")),
        stdout=subprocess.PIPE, stderr=open(tmp_path / "aggregator.log", "w"), text=True)
    workers = []
    try:
        port = aggregator.stdout.readline().strip().rsplit(":", 1)[1]
        for k in (0, 1):
            workers.append(subprocess.Popen(
                [binary, "edge-worker", "train"], cwd=tmp_path,
                env=dict(env, WORKER_NAME=f"rust-{k}", MODEL_URL=str(MNIST / "cnn" / "init.onnx"),
                         TRAIN_DATASET_URL=str(MNIST / "shards" / f"client-{k}-images.idx3-ubyte.gz"),
                         AGG_IP="127.0.0.1", AGG_PORT=port, threads="1",
                         SEDNA_OUTPUT_DIR=str(tmp_path / f"rust-{k}"), SEDNA_CACHE_DIR=str(tmp_path / f"cache-{k}")),
                stderr=open(tmp_path / f"rust-{k}.log", "w")))

        # The Python worker, as in Sedna's examples.
        monkeypatch.setenv("JOB_NAME", "digits")
        monkeypatch.setenv("WORKER_NAME", "python-2")
        monkeypatch.setenv("AGG_IP", "127.0.0.1")
        monkeypatch.setenv("AGG_PORT", port)
        train = (idx(MNIST / "shards" / "client-2-images.idx3-ubyte.gz"), idx(MNIST / "shards" / "client-2-labels.idx1-ubyte.gz"))
        test = (idx(MNIST / "test-images.idx3-ubyte"), idx(MNIST / "test-labels.idx1-ubyte"))
        fl = FederatedLearning(estimator=Estimator, aggregation="FedAvg")
        history = fl.train(train_data=train, valid_data=test, batch_size=64)

        assert [round_ for round_, _ in history] == [1, 2]
        assert all("train_loss" in metrics for _, metrics in history)
        assert aggregator.wait(timeout=120) == 0, (tmp_path / "aggregator.log").read_text()
        for w in workers:
            assert w.wait(timeout=60) == 0
        rounds = [json.loads(line) for line in (tmp_path / "agg" / "rounds.jsonl").read_text().splitlines()]
        assert [r["participants"] for r in rounds] == [["python-2", "rust-0", "rust-1"]] * 2
        assert rounds[-1]["test_accuracy"] > 0.85, rounds
        # The Python worker ends with the final global model, as the Rust ones do.
        final = sedna.Trainer(str(tmp_path / "final.onnx")).weights()
        for (name, want), got in zip(final.items(), fl.estimator.get_weights()):
            np.testing.assert_array_equal(got, want, err_msg=name)
        assert fl.evaluate(test)["accuracy"] == pytest.approx(rounds[-1]["test_accuracy"], abs=1e-3)
    finally:
        for p in [aggregator, *workers]:
            if p.poll() is None:
                p.kill()


AGGREGATE_PY = '''
# A Sedna aggregation worker script (examples/federated_learning/*/aggregation_worker/aggregate.py)
# with the user's own aggregation class registered in the ClassFactory.
import json
import os

import numpy as np

from sedna.algorithms.aggregation import BaseAggregation
from sedna.common.class_factory import ClassFactory, ClassType
from sedna.common.config import Context
from sedna.service.server import AggregationServer


@ClassFactory.register(ClassType.FL_AGG, alias="Median")
class Median(BaseAggregation):
    def aggregate(self, clients):
        with open(os.environ["CALLS"], "a") as f:
            f.write(json.dumps([c.num_samples for c in clients]) + "\\n")
        return [np.median(np.stack([c.weights[i] for c in clients]), axis=0)
                for i in range(len(clients[0].weights))]


def run_server():
    aggregation_algorithm = Context.get_parameters("aggregation_algorithm", "FedAvg")
    exit_round = int(Context.get_parameters("exit_round", 3))
    participants_count = int(Context.get_parameters("participants_count", 1))
    server = AggregationServer(aggregation=aggregation_algorithm, exit_round=exit_round,
                               ws_size=20 * 1024 * 1024, participants_count=participants_count)
    server.start()


if __name__ == "__main__":
    run_server()
'''


def test_a_sedna_aggregation_script_with_its_own_class_aggregates_the_rounds(tmp_path):
    binary = sedna_binary()
    script = tmp_path / "aggregate.py"
    script.write_text(AGGREGATE_PY)
    port = str(_free_port())
    calls = tmp_path / "calls.jsonl"
    env = dict(os.environ, JOB_NAME="digits", RAYON_NUM_THREADS="1", CANDLE_NUM_THREADS="1")
    for key in ("PARTICIPANTS_COUNT", "SEDNA_FL_ROUNDS", "SEDNA_LOCAL_KUBECONFIG"):
        env.pop(key, None)
    server = subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path,
        env=dict(env, aggregation_algorithm="Median", exit_round="2", participants_count="2",
                 CALLS=str(calls), AGG_PORT=port, SEDNA_LISTEN_HOST="127.0.0.1",
                 MODEL_URL=str(tmp_path / "final.onnx"), BASE_MODEL_URL=str(MNIST / "mlp" / "init.onnx"),
                 TEST_DATASET_URL=str(MNIST / "test-images.idx3-ubyte"),
                 SEDNA_OUTPUT_DIR=str(tmp_path / "agg"), SEDNA_CACHE_DIR=str(tmp_path / "agg-cache")),
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "aggregate.log", "w"))
    workers = []
    try:
        for k in (0, 1):
            workers.append(subprocess.Popen(
                [binary, "edge-worker", "train"], cwd=tmp_path,
                env=dict(env, WORKER_NAME=f"rust-{k}", MODEL_URL=str(MNIST / "mlp" / "init.onnx"),
                         TRAIN_DATASET_URL=str(MNIST / "shards" / f"client-{k}-images.idx3-ubyte.gz"),
                         AGG_IP="127.0.0.1", AGG_PORT=port, threads="1", epochs="1", learning_rate="0.05",
                         SEDNA_OUTPUT_DIR=str(tmp_path / f"rust-{k}"), SEDNA_CACHE_DIR=str(tmp_path / f"cache-{k}")),
                stderr=open(tmp_path / f"rust-{k}.log", "w")))
        assert server.wait(timeout=180) == 0, (tmp_path / "aggregate.log").read_text()
        for w in workers:
            assert w.wait(timeout=60) == 0
    finally:
        for p in [server, *workers]:
            if p.poll() is None:
                p.kill()
    # The user's class aggregated both rounds, each from both workers' updates.
    rounds_called = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(rounds_called) == 2 and all(len(c) == 2 and min(c) > 1000 for c in rounds_called), rounds_called
    rounds = [json.loads(line) for line in (tmp_path / "agg" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["test_accuracy"] > 0.3, rounds  # chance is 0.1; two non-IID shards
    final = sedna.Trainer(str(tmp_path / "final.onnx")).weights()
    start = sedna.Trainer(str(MNIST / "mlp" / "init.onnx")).weights()
    assert any(not np.array_equal(final[n], start[n]) for n in final)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

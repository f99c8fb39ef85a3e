"""Incremental-learning workers written as Sedna users write them: an estimator class with
load/train/evaluate/predict/save (here on lib-sedna's Trainer and the ONNX MLP), driven by
`sedna.core.incremental_learning.IncrementalLearning` with the environment the controller
injects. Real data: the MNIST-trained MLP meets the shifted UCI digits (models/digits-shift)."""

import gzip
import pathlib

import numpy as np
import pytest

import sedna
from sedna.core.incremental_learning import IncrementalLearning

ROOT = pathlib.Path(__file__).resolve().parents[3]
SHIFT = ROOT / "models" / "digits-shift"
DEPLOYED = ROOT / "models" / "mnist" / "mlp" / "mnist.onnx"


def idx(path):
    data = gzip.decompress(path.read_bytes())
    if data[2:4] == b"\x08\x03":
        return np.frombuffer(data[16:], np.uint8).reshape(-1, 784).astype(np.float32) / 255
    return np.frombuffer(data[8:], np.uint8).astype(np.int64)


class Estimator:
    """What a Sedna user writes (Sedna's examples wrap TensorFlow the same way)."""

    def __init__(self):
        self.trainer = None

    def load(self, model_url):
        self.trainer = sedna.Trainer(model_url, threads=1)

    def train(self, train_data, valid_data=None, epochs=1, **kwargs):
        x, y = train_data
        report = self.trainer.fit(x, y, epochs=epochs, batch_size=32, optimizer="sgd",
                                  momentum=0.9, learning_rate=0.02, fedprox_mu=5, seed=0)
        return {"loss": report["history"][-1]["train_loss"], "epochs": report["epochs"]}

    def evaluate(self, data, **kwargs):
        x, y = data
        return self.trainer.evaluate(x, y)

    def predict(self, data, **kwargs):
        logits = self.trainer.predict(data)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def save(self, model_path):
        self.trainer.save(model_path)


@pytest.fixture
def shifted():
    return (idx(SHIFT / "stream-images.idx3-ubyte.gz"), idx(SHIFT / "stream-labels.idx1-ubyte.gz"),
            idx(SHIFT / "test-images.idx3-ubyte.gz"), idx(SHIFT / "test-labels.idx1-ubyte.gz"))


def test_a_sedna_style_train_then_eval_worker_improves_on_the_shifted_digits(shifted, tmp_path, monkeypatch):
    x, y, xt, yt = shifted
    candidate = tmp_path / "round-1" / "model.onnx"
    for key in ("MODEL_URLS", "HEM_NAME", "SEDNA_LOCAL_KUBECONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("JOB_NAME", "digits")
    monkeypatch.setenv("SEDNA_ROUND", "1")
    monkeypatch.setenv("BASE_MODEL_URL", f"file://{DEPLOYED}")
    monkeypatch.setenv("MODEL_URL", str(candidate))
    # The train worker: trains from the deployed model, writes the candidate.
    result = IncrementalLearning(estimator=Estimator).train((x[:400], y[:400]), epochs=5)
    assert result["epochs"] == 5 and result["loss"] > 0
    assert candidate.exists()
    # The eval worker: candidate then deployed, Sedna's MODEL_URLS order.
    monkeypatch.delenv("BASE_MODEL_URL")
    monkeypatch.setenv("MODEL_URLS", f"{candidate};file://{DEPLOYED}")
    new, old = IncrementalLearning(estimator=Estimator()).evaluate((xt, yt))
    assert old["accuracy"] == pytest.approx(0.664, abs=1e-3)
    assert new["accuracy"] - old["accuracy"] > 0.10, (new["accuracy"], old["accuracy"])
    # No local API in this test: reporting is skipped, not an error.
    assert sedna._sedna.report_status("sedna.io/v1alpha1", "IncrementalLearningJob", "default", "digits", "{}") is False
    with pytest.raises(ValueError, match="JSON object"):
        sedna._sedna.report_status("sedna.io/v1alpha1", "IncrementalLearningJob", "default", "digits", "[1]")


def test_the_inference_worker_answers_with_sednas_triple_and_mines_hard_examples(shifted, monkeypatch):
    x, y, _, _ = shifted
    for key in ("MODEL_URLS", "BASE_MODEL_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MODEL_URL", str(DEPLOYED))
    monkeypatch.setenv("HEM_NAME", "Threshold")
    monkeypatch.setenv("HEM_PARAMETERS", '[{"key": "threshold", "value": "0.9"}]')
    il = IncrementalLearning(estimator=Estimator)
    hard = 0
    for i in range(100):
        infer_res, res, is_hard = il.inference(x[i:i + 1], post_process=lambda p: int(p.argmax()))
        assert infer_res.shape == (1, 10) and res == int(infer_res.argmax())
        assert is_hard == (infer_res.max() < 0.9)
        hard += is_hard
    # The MNIST model is unsure of many shifted digits: those are the ones to label.
    assert 20 < hard < 90, hard

"""sedna.Trainer from Python: numpy in and out, real MNIST digits, the saved model run by ONNX
Runtime, weights by name, and clear errors."""

import pathlib

import numpy as np
import pytest

import sedna

ROOT = pathlib.Path(__file__).resolve().parents[3]
MNIST = ROOT / "models" / "mnist"


@pytest.fixture(scope="module")
def mnist():
    x, y = sedna.load_training_data(str(MNIST / "train-images.idx3-ubyte.gz"))
    xt, yt = sedna.load_training_data(str(MNIST / "test-images.idx3-ubyte"))
    assert x.shape == (8000, 784) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    return x, y, xt, yt


def test_the_cnn_trains_from_numpy_and_ort_runs_the_saved_model_the_same(mnist, tmp_path):
    x, y, xt, yt = mnist
    trainer = sedna.Trainer(str(MNIST / "cnn" / "init.onnx"), threads=2)
    assert trainer.input == ("input", [1, 28, 28])
    assert trainer.output == ("logits", 10)
    assert trainer.backend == "candle"
    events = []
    report = trainer.fit(
        # Every third digit (the split is ordered by class).
        x[::3].reshape(-1, 1, 28, 28), y[::3], validation=(xt, yt), callback=events.append,
        epochs=2, batch_size=64, optimizer="sgd", momentum=0.9, learning_rate=0.05, seed=1,
    )
    assert report["epochs"] == 2 and report["steps"] == 2 * 42
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[1]["validation_accuracy"] == report["history"][1]["validation_accuracy"]
    assert sum(e["event"] == "step" for e in events) == 84
    evaluation = trainer.evaluate(xt, yt)
    assert evaluation["accuracy"] > 0.9, evaluation["accuracy"]
    assert np.array(evaluation["confusion"]).sum() == 2000
    assert {"loss", "precision", "recall", "f1", "f1_9"} <= evaluation.keys()

    path = tmp_path / "cnn.onnx"
    trainer.save(str(path))
    assert path.read_bytes() == trainer.to_onnx()
    ours = trainer.predict(xt)
    theirs = sedna.Model(str(path)).run({"input": xt.reshape(-1, 1, 28, 28)})["logits"]
    assert np.abs(ours - theirs).max() <= 1e-4


def test_weights_round_trip_by_name_and_mismatches_are_refused(mnist):
    trainer = sedna.Trainer(str(MNIST / "mlp" / "init.onnx"))
    weights = trainer.weights()
    assert list(weights) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert weights["fc1.weight"].shape == (256, 784)
    halved = {name: w / 2 for name, w in weights.items()}
    trainer.set_weights(halved)
    for name, w in trainer.weights().items():
        np.testing.assert_array_equal(w, halved[name])
    with pytest.raises(sedna.TrainError, match='no trainable tensor "fc3.weight"'):
        trainer.set_weights({"fc3.weight": np.zeros(3, np.float32)})
    with pytest.raises(sedna.TrainError, match=r'"fc2.bias" has shape \[3\]'):
        trainer.set_weights({"fc2.bias": np.zeros(3, np.float32)})


def test_same_seed_same_weights(mnist):
    x, y, _, _ = mnist

    def run():
        t = sedna.Trainer(str(MNIST / "mlp" / "init.onnx"))
        t.fit(x[::16], y[::16], parameters=[{"key": "epochs", "value": "1"}, {"key": "seed", "value": 5}])
        return t.weights()

    a, b = run(), run()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_bad_models_data_and_settings_are_clear_errors(mnist):
    x, y, _, _ = mnist
    trainer = sedna.Trainer(str(MNIST / "mlp" / "init.onnx"))
    with pytest.raises(sedna.TrainError, match="unknown hyperparameter"):
        trainer.fit(x[:10], y[:10], epoch=1)
    with pytest.raises(sedna.TrainError, match=r"the samples have 64 values but the model's input `input` takes \[N, 784\]"):
        trainer.fit(np.zeros((4, 64), np.float32), np.zeros(4, np.int64))
    with pytest.raises(sedna.TrainError, match="label 12 does not fit"):
        trainer.fit(x[:2], np.array([1, 12]))
    with pytest.raises(sedna.TrainError, match="ai.onnx.ml.LinearClassifier"):
        sedna.Trainer(str(MNIST / "edge" / "model.onnx"))
    with pytest.raises(sedna.TrainError, match="CPU only"):
        sedna.Trainer(str(MNIST / "mlp" / "init.onnx"), device="cuda:0")
    with pytest.raises(sedna.TrainError, match="cargo feature `tch`"):
        sedna.Trainer(str(MNIST / "mlp" / "init.onnx"), backend="tch")
    with pytest.raises(sedna.TrainError, match="set it when creating the Trainer"):
        trainer.fit(x[:10], y[:10], threads=1)
    assert issubclass(sedna.TrainError, sedna.SednaError)

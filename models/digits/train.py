"""Trains the small digits classifier that lib-sedna's tests and benchmarks run.

Data: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits"
test set (1,797 real 8x8 grey-level images, 10 classes; shipped inside the scikit-learn
wheel, BSD-3-Clause; the UCI data is CC BY 4.0). Split: a stratified 75/25 split with
random_state=0 (1,347 train / 450 held out).

Model: a multilayer perceptron, 64 -> 64 (ReLU) -> 10, exported with skl2onnx as
`input` float32 [N, 64] (pixels 0..16 scaled to 0..1) -> `probabilities` float32 [N, 10]
and `label` int64 [N].

Run:  .venv/bin/python models/digits/train.py   (writes model.onnx, test.csv and MANIFEST.md)
"""

import hashlib
import pathlib

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=0
    )
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0)
    clf.fit(x_train, y_train)
    accuracy = float((clf.predict(x_test) == y_test).mean())

    onx = to_onnx(
        clf,
        x_train[:1],
        options={id(clf): {"zipmap": False}},
        initial_types=None,
        target_opset=17,
    )
    # Stable names for apps: one input, two outputs.
    graph = onx.graph
    rename = {graph.input[0].name: "input"}
    for out in graph.output:
        if out.type.tensor_type.elem_type == 1:
            rename[out.name] = "probabilities"
        else:
            rename[out.name] = "label"
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for value in list(graph.input) + list(graph.output):
        value.name = rename.get(value.name, value.name)
    onx.producer_name = "sedna models/digits/train.py"
    data = onx.SerializeToString()
    (HERE / "model.onnx").write_bytes(data)

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    label, proba = None, None
    outs = session.run(None, {"input": x_test})
    for meta, value in zip(session.get_outputs(), outs):
        if meta.name == "label":
            label = value
        else:
            proba = value
    onnx_accuracy = float((label == y_test).mean())
    agree = float((label == clf.predict(x_test)).mean())
    # The held-out split as text: label, then the 64 raw pixel values (0..16).
    rows = ["label," + ",".join(f"p{i}" for i in range(64))]
    for pixels, target in zip(np.rint(x_test * 16).astype(np.int64), y_test):
        rows.append(f"{target}," + ",".join(str(v) for v in pixels))
    (HERE / "test.csv").write_text("\n".join(rows) + "\n")
    sha = hashlib.sha256(data).hexdigest()
    (HERE / "MANIFEST.md").write_text(
        f"""# digits: small MLP digit classifier (ONNX)

- Data: scikit-learn's bundled UCI Optical Recognition of Handwritten Digits (1,797 real
  8x8 images, 10 classes; scikit-learn BSD-3-Clause, UCI data CC BY 4.0).
- Split: `train_test_split(test_size=0.25, stratify=y, random_state=0)`: 1,347 train /
  450 held out; the held-out split is `test.csv` (header, then per row the label and the 64
  raw pixel values 0..16).
- Model: MLP 64 -> 64 ReLU -> 10 (scikit-learn {__import__('sklearn').__version__}), exported
  with skl2onnx, opset 17, no ZipMap.
- Contract: input `input` float32 [N, 64], pixel values / 16 (0..1); outputs `label` int64 [N],
  `probabilities` float32 [N, 10] (softmax, rows sum to 1).
- Held-out accuracy: {accuracy:.4f} (scikit-learn), {onnx_accuracy:.4f} (ONNX Runtime
  {ort.__version__}); predictions agree on {agree:.4f} of samples.
- sha256 of model.onnx: `{sha}` ({len(data)} bytes).
- Rebuild: `.venv/bin/python models/digits/train.py`.
"""
    )
    print(f"accuracy {accuracy:.4f} onnx {onnx_accuracy:.4f} sha256 {sha}")


if __name__ == "__main__":
    main()

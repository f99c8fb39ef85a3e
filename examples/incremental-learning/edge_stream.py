"""The incremental-learning example's outside world: the stream a camera would see, and a
labeller standing in for a person.

  feed  --start N --count K --to DIR   writes stream digits N..N+K-1 of models/digits-shift as
                                       PGM files s-<index>.pgm (atomically) into DIR
  label --hard-examples DIR --index F  appends each hard example not yet in the index F with
                                       its true label (`hard-examples/s-000123.pgm 7`)
  accuracy --model M.onnx              accuracy of an ONNX model on the shifted held-out set
                                       and on MNIST's (ONNX Runtime)
"""

import argparse
import gzip
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHIFT = ROOT / "models" / "digits-shift"


def idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def feed(start: int, count: int, to: Path) -> None:
    images = idx(SHIFT / "stream-images.idx3-ubyte.gz")
    to.mkdir(parents=True, exist_ok=True)
    end = min(start + count, len(images))
    for i in range(start, end):
        tmp = to / f".s-{i:06d}.pgm.tmp"
        tmp.write_bytes(b"P5\n28 28\n255\n" + images[i].tobytes())
        os.replace(tmp, to / f"s-{i:06d}.pgm")
    print(f"fed {end - start} digits ({start}..{end - 1})")


def label(hard: Path, index: Path) -> None:
    labels = idx(SHIFT / "stream-labels.idx1-ubyte.gz")
    index.parent.mkdir(parents=True, exist_ok=True)
    known = set()
    if index.exists():
        known = {line.split()[0] for line in index.read_text().splitlines() if line.strip()}
    rel = os.path.relpath(hard, index.parent)
    new = []
    for name in sorted(os.listdir(hard)) if hard.exists() else []:
        if not (name.startswith("s-") and name.endswith(".pgm")):
            continue
        entry = f"{rel}/{name}"
        if entry not in known:
            new.append(f"{entry} {labels[int(name[2:-4])]}\n")
    with open(index, "a") as f:
        f.writelines(new)
    print(f"labelled {len(new)} new hard examples ({len(known) + len(new)} in the index)")


def accuracy(model: str) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = []
    for images, labels in [
        (SHIFT / "test-images.idx3-ubyte.gz", SHIFT / "test-labels.idx1-ubyte.gz"),
        (ROOT / "models/mnist/test-images.idx3-ubyte", ROOT / "models/mnist/test-labels.idx1-ubyte"),
    ]:
        x = idx(images).reshape(-1, 784).astype(np.float32) / 255.0
        y = idx(labels)
        probs = session.run(None, {name: x})[-1]
        out.append(float((probs.argmax(axis=1) == y).mean()))
    print(f"shifted {out[0]:.4f} original {out[1]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("feed")
    f.add_argument("--start", type=int, default=0)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--to", type=Path, required=True)
    lab = sub.add_parser("label")
    lab.add_argument("--hard-examples", type=Path, required=True)
    lab.add_argument("--index", type=Path, required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--model", required=True)
    args = parser.parse_args()
    if args.command == "feed":
        feed(args.start, args.count, args.to)
    elif args.command == "label":
        label(args.hard_examples, args.index)
    else:
        accuracy(args.model)


if __name__ == "__main__":
    main()

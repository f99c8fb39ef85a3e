"""A real domain shift for the MNIST models: scikit-learn's UCI handwritten digits (other
writers, scanned at 32x32 and averaged down to 8x8 with 17 grey levels) scaled to MNIST's
framing: bilinear to 20x20, centred by mass in 28x28, pixels 0..255.

Writes, in this directory, IDX files (as MNIST's) of a stratified split:
  stream-{images.idx3-ubyte,labels.idx1-ubyte}.gz  1,297 digits the edge sees in service
  test-{images.idx3-ubyte,labels.idx1-ubyte}.gz      500 held out (50 per class)

Rebuild: .venv/bin/pip install scikit-learn && .venv/bin/python models/digits-shift/make.py
"""

import gzip
import struct
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent


def to_mnist(img8: np.ndarray) -> np.ndarray:
    """8x8 (0..16) -> 28x28 uint8, MNIST-like: 20x20 box, centred by mass."""
    src = img8.astype(np.float64) / 16.0
    n = 20
    # bilinear, pixel centres aligned
    coords = (np.arange(n) + 0.5) * 8 / n - 0.5
    c0 = np.clip(np.floor(coords).astype(int), 0, 7)
    c1 = np.clip(c0 + 1, 0, 7)
    t = np.clip(coords - c0, 0, 1)
    rows = src[c0, :] * (1 - t)[:, None] + src[c1, :] * t[:, None]
    big = rows[:, c0] * (1 - t)[None, :] + rows[:, c1] * t[None, :]
    out = np.zeros((28, 28))
    out[4:24, 4:24] = big
    total = out.sum()
    if total > 0:
        ys, xs = np.indices(out.shape)
        cy, cx = (ys * out).sum() / total, (xs * out).sum() / total
        dy, dx = int(round(13.5 - cy)), int(round(13.5 - cx))
        out = np.roll(np.roll(out, dy, axis=0), dx, axis=1)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        header = struct.pack(">IIII", 0x803, *array.shape)
    else:
        header = struct.pack(">II", 0x801, array.shape[0])
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def main() -> None:
    digits = load_digits()
    images = np.stack([to_mnist(x) for x in digits.images])
    labels = digits.target.astype(np.uint8)
    rng = np.random.default_rng(0)
    test = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test.extend(rng.choice(idx, 50, replace=False).tolist())
    test = np.array(sorted(test))
    stream = np.setdiff1d(np.arange(len(labels)), test)
    stream = stream[rng.permutation(len(stream))]
    write_idx(HERE / "stream-images.idx3-ubyte.gz", images[stream])
    write_idx(HERE / "stream-labels.idx1-ubyte.gz", labels[stream])
    write_idx(HERE / "test-images.idx3-ubyte.gz", images[test])
    write_idx(HERE / "test-labels.idx1-ubyte.gz", labels[test])
    print(f"stream {len(stream)}, test {len(test)}")


if __name__ == "__main__":
    main()

"""Splits the MNIST train split (train-images/labels.idx?-ubyte.gz) into three non-IID shards for
federated learning: label skew drawn from a Dirichlet distribution (alpha 0.5, seed 0), the
usual way FL papers and Flower's partitioners make clients disagree. Each class's digits are
divided among the clients in proportions drawn from Dir(alpha); every digit lands in exactly
one shard. Written as gzipped IDX files, `shards/client-{0,1,2}-{images.idx3,labels.idx1}-ubyte.gz`,
with a summary of the class counts in `shards/README.md`.

Run:  .venv/bin/python models/mnist/shards.py   (numpy)
"""

import gzip
import io
import pathlib
import struct

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
CLIENTS, ALPHA, SEED = 3, 0.5, 0


def read(name):
    data = gzip.decompress((HERE / name).read_bytes())
    if struct.unpack(">I", data[:4])[0] == 0x803:
        n, r, c = struct.unpack(">III", data[4:16])
        return np.frombuffer(data[16:], np.uint8).reshape(n, r * c)
    return np.frombuffer(data[8:], np.uint8)


def gz(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as f:
        f.write(data)
    return out.getvalue()


def main() -> None:
    images, labels = read("train-images.idx3-ubyte.gz"), read("train-labels.idx1-ubyte.gz")
    rng = np.random.default_rng(SEED)
    parts = [[] for _ in range(CLIENTS)]
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        p = rng.dirichlet([ALPHA] * CLIENTS)
        cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(int)
        for k, part in enumerate(np.split(idx, cuts)):
            parts[k].extend(part.tolist())
    out = HERE / "shards"
    out.mkdir(exist_ok=True)
    rows = []
    for k, part in enumerate(parts):
        part = np.array(sorted(part))
        x, y = images[part], labels[part]
        (out / f"client-{k}-images.idx3-ubyte.gz").write_bytes(
            gz(struct.pack(">IIII", 0x803, len(x), 28, 28) + x.tobytes()))
        (out / f"client-{k}-labels.idx1-ubyte.gz").write_bytes(
            gz(struct.pack(">II", 0x801, len(y)) + y.tobytes()))
        counts = np.bincount(y, minlength=10)
        rows.append(f"| client-{k} | {len(y):,} | " + " | ".join(str(n) for n in counts) + " |")
    (out / "README.md").write_text(
        "# Non-IID shards of the MNIST train split for federated learning\n\n"
        f"Made by `models/mnist/shards.py`: each class divided among {CLIENTS} clients in proportions "
        f"drawn from Dirichlet(alpha = {ALPHA}), numpy seed {SEED}; every one of the 8,000 training "
        "digits is in exactly one shard. Held-out split: `../test-images.idx3-ubyte`.\n\n"
        "| shard | digits | " + " | ".join(str(c) for c in range(10)) + " |\n"
        "|---|---|" + "---|" * 10 + "\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""PyTorch eager reference for train-bench: trains models/mnist/{mlp,cnn} from the same
initial weights (the TorchScript twin's parameters loaded into the eager module), on the same
data, with the same batch size, optimizer, learning-rate schedule (per step, as lib-sedna's
trainer computes it) and thread count; prints one JSON line.

Run by `cargo run --release -p sedna-bench --bin train-bench`; by hand:
  .venv/bin/python bench/python/train_pytorch.py --model cnn --epochs 12
"""

import argparse
import gzip
import json
import math
import pathlib
import resource
import struct
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "models" / "mnist"))
from trainable import CNN, MLP  # noqa: E402


def idx(path: pathlib.Path):
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic = struct.unpack(">I", data[:4])[0]
    if magic == 0x803:
        n, r, c = struct.unpack(">III", data[4:16])
        return np.frombuffer(data[16:], np.uint8).reshape(n, r * c).astype(np.float32) / 255.0
    return np.frombuffer(data[8:], np.uint8).astype(np.int64)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["mlp", "cnn"], required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    folder = ROOT / "models" / "mnist"
    x_train = idx(folder / "train-images.idx3-ubyte.gz")
    y_train = idx(folder / "train-labels.idx1-ubyte.gz")
    x_test = idx(folder / "test-images.idx3-ubyte")
    y_test = idx(folder / "test-labels.idx1-ubyte")
    shape = (-1, 784) if a.model == "mlp" else (-1, 1, 28, 28)
    x_train = torch.from_numpy(x_train).reshape(shape)
    y_train = torch.from_numpy(y_train)
    x_test = torch.from_numpy(x_test).reshape(shape)
    y_test = torch.from_numpy(y_test)

    model = MLP() if a.model == "mlp" else CNN()
    model.load_state_dict(torch.jit.load(str(folder / a.model / "init.pt")).state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum,
                                weight_decay=a.weight_decay)
    n = len(x_train)
    total = a.epochs * math.ceil(n / a.batch_size)
    generator = torch.Generator().manual_seed(a.seed)
    step = 0
    epochs = []
    for epoch in range(a.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        losses = []
        start = time.perf_counter()
        for i in range(0, n, a.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = a.lr * (1 + math.cos(math.pi * step / total)) / 2
            batch = order[i:i + a.batch_size]
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            logits = model(x_test)
            test_loss = torch.nn.functional.cross_entropy(logits, y_test).item()
            accuracy = (logits.argmax(1) == y_test).float().mean().item()
        epochs.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                       "samples_per_sec": n / seconds, "seconds": seconds,
                       "test_loss": test_loss, "test_accuracy": accuracy})
    seconds = sum(e["seconds"] for e in epochs)
    print(json.dumps({
        "backend": "pytorch", "model": a.model, "torch": torch.__version__,
        "samples_per_sec": a.epochs * n / seconds, "epochs": epochs,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))


if __name__ == "__main__":
    main()

"""Flower's side of fl-bench: Flower 1.42's FedAvg strategy (its `configure`/`aggregate_fit`
and its parameter serialization) driving the same CNN trained in PyTorch by in-process
clients, on the same non-IID shards (models/mnist/shards), from the same initial weights,
with the same local epochs, batch size, optimizer and rounds; the held-out split evaluated
after every round. Prints one JSON line.

Run by `cargo run --release -p sedna-bench --bin fl-bench`; needs `.venv/bin/pip install flwr`.
"""

import argparse
import gzip
import json
import pathlib
import resource
import struct
import sys
import time

import numpy as np
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

ROOT = pathlib.Path(__file__).resolve().parents[2]
MNIST = ROOT / "models" / "mnist"
sys.path.insert(0, str(MNIST))
from trainable import CNN  # noqa: E402


def idx(path):
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if struct.unpack(">I", data[:4])[0] == 0x803:
        n, r, c = struct.unpack(">III", data[4:16])
        return torch.from_numpy(np.frombuffer(data[16:], np.uint8).reshape(n, 1, r, c).astype(np.float32) / 255)
    return torch.from_numpy(np.frombuffer(data[8:], np.uint8).astype(np.int64))


def set_weights(model, arrays):
    with torch.no_grad():
        for p, w in zip(model.parameters(), arrays):
            p.copy_(torch.from_numpy(w))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--clients", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shards = [(idx(MNIST / "shards" / f"client-{k}-images.idx3-ubyte.gz"),
               idx(MNIST / "shards" / f"client-{k}-labels.idx1-ubyte.gz")) for k in range(a.clients)]
    x_test, y_test = idx(MNIST / "test-images.idx3-ubyte"), idx(MNIST / "test-labels.idx1-ubyte")
    model = CNN()
    model.load_state_dict(torch.jit.load(str(MNIST / "cnn" / "init.pt")).state_dict())
    initial = [p.detach().numpy().copy() for p in model.parameters()]
    strategy = FedAvg(min_fit_clients=a.clients, min_available_clients=a.clients,
                      initial_parameters=ndarrays_to_parameters(initial))
    parameters = ndarrays_to_parameters(initial)
    rounds = []
    for server_round in range(1, a.rounds + 1):
        start = time.perf_counter()
        down = sum(len(t) for t in parameters.tensors)
        results, up = [], 0
        for x, y in shards:
            # A client: the global weights in, local training, its weights out (Flower's
            # NumPy parameters, serialized as Flower sends them).
            client = CNN()
            set_weights(client, parameters_to_ndarrays(parameters))
            optimizer = torch.optim.SGD(client.parameters(), lr=a.lr, momentum=0.9)
            client.train()
            for _ in range(a.epochs):
                order = torch.randperm(len(x))
                for i in range(0, len(x), a.batch_size):
                    batch = order[i:i + a.batch_size]
                    loss = torch.nn.functional.cross_entropy(client(x[batch]), y[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            update = ndarrays_to_parameters([p.detach().numpy().copy() for p in client.parameters()])
            up += sum(len(t) for t in update.tensors)
            results.append((None, FitRes(status=Status(code=Code.OK, message=""), parameters=update,
                                         num_examples=len(x), metrics={})))
        parameters, _ = strategy.aggregate_fit(server_round, results, [])
        set_weights(model, parameters_to_ndarrays(parameters))
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        rounds.append({"round": server_round, "test_accuracy": accuracy, "seconds": time.perf_counter() - start,
                       "bytes_up_per_client": up / len(shards), "bytes_down_per_client": down})
    print(json.dumps({"framework": f"flwr {__import__('flwr').__version__}", "rounds": rounds,
                      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


if __name__ == "__main__":
    main()

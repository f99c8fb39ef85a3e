"""Flower's FedAvg (flwr.server.strategy.aggregate.aggregate) on numpy arrays, timed.

Prints one JSON line: {"flwr": version, "median_s": ..., "runs": [...]}.
Usage: fedavg_flower.py CLIENTS PARAMS_PER_LAYER LAYERS REPS
"""

import json
import sys
import time

import flwr
import numpy as np
from flwr.server.strategy.aggregate import aggregate


def main() -> None:
    clients, per_layer, layers, reps = (int(a) for a in sys.argv[1:5])
    rng = np.random.default_rng(0)
    results = [
        ([rng.standard_normal(per_layer, dtype=np.float32) for _ in range(layers)], int(rng.integers(50, 500)))
        for _ in range(clients)
    ]
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        out = aggregate(results)
        runs.append(time.perf_counter() - start)
        assert out[0].shape == (per_layer,)
    runs.sort()
    print(json.dumps({"flwr": flwr.__version__, "numpy": np.__version__, "median_s": runs[len(runs) // 2], "runs": runs}))


if __name__ == "__main__":
    main()

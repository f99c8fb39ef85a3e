"""Python onnxruntime on one sample at a time, timed. Prints one JSON line.
Usage: ort_python.py MODEL CSV ITERATIONS THREADS
"""

import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, csv, iterations, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    x = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.float32)[:, 1:] / 16.0
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rows = [x[i : i + 1].copy() for i in range(len(x))]
    for i in range(200):
        session.run(None, {"input": rows[i % len(rows)]})
    start = time.perf_counter()
    for i in range(iterations):
        session.run(None, {"input": rows[i % len(rows)]})
    elapsed = time.perf_counter() - start
    print(json.dumps({"onnxruntime": ort.__version__, "per_second": iterations / elapsed}))


if __name__ == "__main__":
    main()

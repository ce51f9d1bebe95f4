"""The cost of DP-SGD's noise against the fused kernel, with NumPy's generators; prints Markdown.

    NUMBA_NUM_THREADS=2 python benchmarks/dp_noise.py [--sizes 784,128,10] [--batch 64] [--reps 100]

Taking turns call by call (medians over ``--reps``), on P parameters of ``--sizes``, float32:

- **kernel**: a prepared clipped step's kernel, ``fastgrad.Step(net, max_norm=1)`` without noise,
  minus nothing (the whole call: its host overhead is small, ``benchmarks/step_overhead.py``);
- **dp_noise**: ``fastgrad.quantities.dp_noise`` as ``clipped_grad`` draws it (PCG64, float64, cast);
- **PCG64 float32**: ``default_rng(seed).standard_normal(P, dtype=np.float32)``;
- **Philox blocks, 1 / 2 threads**: ``Generator(Philox(key, counter=(0, 0, b, 0)))`` per block of
  16384 values, serially and on a 2-thread pool (deterministic for any thread count);
- **Philox raw bits, 2 threads**: ``Philox.random_raw`` for the same blocks' 32 bits per value, the
  floor of any transform on NumPy's Philox.

A script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

import fastgrad
from fastgrad.quantities import dp_noise

BLOCK = 16384


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="784,128,10")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    net = fastgrad.MLP(sizes, activation="tanh", loss="cross_entropy")
    P = net.num_params
    rng = np.random.default_rng(0)
    theta = net.init(seed=0, dtype=np.float32)
    X = rng.standard_normal((a.batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], a.batch)
    step = fastgrad.Step(net, np.float32, backend="numba", max_norm=1.0)
    key = np.random.SeedSequence(5).generate_state(2, np.uint64)
    out = np.empty(P, np.float32)
    n_blocks = -(-P // BLOCK)
    pool = ThreadPoolExecutor(2)

    def block(b):
        g = np.random.Generator(np.random.Philox(key=key, counter=np.array([0, 0, b, 0], np.uint64)))
        g.standard_normal(dtype=np.float32, out=out[b * BLOCK : (b + 1) * BLOCK])

    def raw(b):
        np.random.Philox(key=key, counter=np.array([0, 0, b, 0], np.uint64)).random_raw(BLOCK // 2)

    work = {
        "kernel (clipped step, no noise)": lambda: step(theta, X, y),
        "dp_noise (PCG64 float64, cast)": lambda: dp_noise(P, 5, np.float32),
        "PCG64 float32": lambda: np.random.default_rng(5).standard_normal(P, dtype=np.float32),
        "Philox blocks, 1 thread": lambda: [block(b) for b in range(n_blocks)],
        "Philox blocks, 2 threads": lambda: list(pool.map(block, range(n_blocks))),
        "Philox raw bits, 2 threads": lambda: list(pool.map(raw, range(n_blocks))),
    }
    times = {k: [] for k in work}
    for _ in range(5):
        for f in work.values():
            f()
    for _ in range(a.reps):
        for k, f in work.items():
            t0 = time.perf_counter_ns()
            f()
            times[k].append(time.perf_counter_ns() - t0)
    med = {k: float(np.median(v)) / 1e3 for k, v in times.items()}
    kernel = med["kernel (clipped step, no noise)"]
    load = os.getloadavg()
    print(f"# DP noise against the kernel, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n")
    print(f"{sizes} B = {a.batch} (P = {P}), float32; numpy {np.__version__}, numba {numba.__version__}, "
          f"Python {platform.python_version()}, {numba.get_num_threads()} threads; load {load[0]:.2f} "
          f"{load[1]:.2f}; medians of {a.reps} interleaved calls\n")  # fmt: skip
    print("| draw | median µs | ÷ kernel |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.0f} | {v / kernel:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

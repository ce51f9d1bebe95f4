"""The cost of DP-SGD's noise against the fused kernel; prints Markdown.

    NUMBA_NUM_THREADS=2 python benchmarks/dp_noise.py [--sizes 784,128,10] [--batch 64] [--reps 100]

Taking turns call by call (medians over ``--reps``), on P parameters of ``--sizes``, float32:

- **kernel**: a prepared clipped step, ``fastgrad.Step(net, max_norm=1)`` without noise (the whole
  call: its host overhead is small, ``benchmarks/step_overhead.py``; the kernels' last pass divides
  the clipped sum);
- **DP step, σ = 1**: the same step with ``noise_multiplier=1``: the kernels' last pass also draws
  the noise, scales and adds it, block by block (:func:`fastgrad.noise.noised_block`), so the
  difference from the kernel is what the noise costs inside a step;
- **draw ξ**: ``fastgrad.noise.standard_normal`` into a buffer (Philox4x32-10 + ziggurat), on all
  threads and on one;
- **fused pass**: ``privacy.dp_step`` on a clipped sum into a buffer (what the step adds), and the
  same call with σ = 0 (the division alone);
- **PCG64 float32**: NumPy's ``default_rng(seed).standard_normal(P, dtype=np.float32)``, the fastest
  NumPy draw (what ``dp_noise`` drew before, as float64 then cast, cost a little more).

A script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import numba
import numpy as np

import fastgrad
from fastgrad import noise, privacy

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/dp_noise.py): its folder is on sys.path
    import _timing


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
    dp = fastgrad.Step(net, np.float32, backend="numba", max_norm=1.0, noise_multiplier=1.0, seed=5)
    words = noise.seed_words(5)
    out = np.empty(P, np.float32)
    total = rng.standard_normal(P).astype(np.float32)
    norms = np.ones(a.batch, np.float32)
    threads = numba.get_num_threads()

    def one_thread():
        numba.set_num_threads(1)
        noise.standard_normal(P, np.float32, words, out=out)
        numba.set_num_threads(threads)

    work = {
        "kernel (clipped step, no noise)": lambda: step(theta, X, y),
        "DP step, σ = 1 (noise in the kernels' last pass)": lambda: dp(theta, X, y),
        f"draw ξ, {threads} threads": lambda: noise.standard_normal(P, np.float32, words, out=out),
        "draw ξ, 1 thread": one_thread,
        "fused dp_step pass (draw, scale, add, divide)": lambda: privacy.dp_step(
            total, norms, 1.0, 1.0, a.batch, 5, out=out
        ),
        "dp_step with σ = 0 (divide only)": lambda: privacy.dp_step(total, norms, 1.0, 0.0, a.batch, out=out),
        "PCG64 float32 (NumPy)": lambda: np.random.default_rng(5).standard_normal(P, dtype=np.float32),
    }
    _timing.warm_up(work.values(), rounds=5)
    load0 = _timing.load()
    times = _timing.turns({k: _timing.timer(f, clock=time.perf_counter_ns) for k, f in work.items()}, a.reps)
    load1 = _timing.load()
    med = {k: float(np.median(v)) / 1e3 for k, v in times.items()}
    kernel = med["kernel (clipped step, no noise)"]
    print(f"# DP noise against the kernel, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n")
    print(f"{sizes} B = {a.batch} (P = {P}), float32; numpy {np.__version__}, numba {numba.__version__}, "
          f"Python {platform.python_version()}, {threads} threads; load {load0[0]:.2f} → {load1[0]:.2f}; "
          f"medians of {a.reps} interleaved calls\n")  # fmt: skip
    print("| call | median µs | ÷ kernel | ns per value per thread |\n|---|---|---|---|")
    for k, v in med.items():
        per = v * 1e3 / P * (1 if "1 thread" in k else threads)
        print(f"| {k} | {v:.0f} | {v / kernel:.2f} | {per:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

"""fastgrad's host backends inside a process whose PyTorch thread pool is live; prints Markdown.

    NUMBA_NUM_THREADS=2 python benchmarks/blas_in_torch.py [--reps 60]
    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=2 python benchmarks/blas_in_torch.py   # the documented setting

[784, 128, 10], B = 64, float32, ``("loss", "grad")``. First alone (torch not imported), then
after ``import torch`` with torch's step (forward, loss, backward of the same MLP) taking turns
call by call with fastgrad's, as in a training loop; medians. The numpy backend's GEMMs run on
NumPy's OpenBLAS threads, the numba backend's on Numba's TBB threads (BLAS held to one thread),
torch's on its OpenMP pool. A script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numba
import numpy as np

import fastgrad

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/blas_in_torch.py): its folder is on sys.path
    import _timing

SIZES, B = [784, 128, 10], 64


def median_us(f, reps) -> float:
    return float(np.median(_timing.consecutive(f, reps, warmup=5, clock=time.perf_counter_ns))) / 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    a = ap.parse_args(argv)
    net = fastgrad.MLP(SIZES, activation="tanh", loss="cross_entropy")
    rng = np.random.default_rng(0)
    theta = net.init(seed=0, dtype=np.float32)
    X = rng.standard_normal((B, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], B)
    calls = {
        b: (lambda b=b: fastgrad.backprop(net, theta, X, y, ("loss", "grad"), backend=b))
        for b in ("numpy", "numba")
    }
    alone = {b: median_us(f, a.reps) for b, f in calls.items()}

    import torch

    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def torch_step():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(Xt), yt).backward()

    mixed = {}
    for b, f in calls.items():
        turn = {  # torch's step, then fastgrad's, as in a training loop; 5 rounds of warm-up
            "torch": _timing.timer(torch_step, clock=time.perf_counter_ns),
            "fastgrad": _timing.timer(f, clock=time.perf_counter_ns),
        }
        _timing.warm_up(turn.values(), rounds=5)
        t = _timing.turns(turn, a.reps)
        mixed[b] = (float(np.median(t["fastgrad"])) / 1e3, float(np.median(t["torch"])) / 1e3)
    load = _timing.load()
    env = {
        k: os.environ[k]
        for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")
        if k in os.environ
    }
    print(
        f"# host backends inside a torch process, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n"
    )
    print(
        f"{SIZES} B = {B}, float32; numpy {np.__version__}, numba {numba.__version__} "
        f"({numba.get_num_threads()} threads), torch {torch.__version__} ({torch.get_num_threads()} "
        "threads), "
        f"Python {platform.python_version()}; env {env or 'none'}; load {load[0]:.2f} {load[1]:.2f}; "
        f"medians of {a.reps}\n"
    )
    print("| backend | alone µs | after each torch step µs | torch step µs |\n|---|---|---|---|")
    for b in calls:
        print(f"| {b} | {alone[b]:.0f} | {mixed[b][0]:.0f} | {mixed[b][1]:.0f} |")


if __name__ == "__main__":
    sys.exit(main())

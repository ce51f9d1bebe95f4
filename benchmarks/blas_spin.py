"""A fastgrad call right after NumPy's multi-threaded GEMMs, and the GEMM rates behind the kernel.

    python benchmarks/blas_spin.py [--configs mnist128-B64,mnist,wide] [--rounds 15]

1. **After NumPy's threads.** Each configuration (``fastgrad.tools.configs``, float32, 2 threads): a
   prepared ``fastgrad.Step`` (``("loss", "grad")``) on the numba backend, timed after a pause of 0.25 s;
   the same on the numpy backend; and the numba step right after a 512 × 512 NumPy matmul on two
   threads. NumPy's OpenBLAS threads spin for a while after a GEMM (``OPENBLAS_THREAD_TIMEOUT``, 2^28
   cycles by default) and take the cores the kernel's threads need; fastgrad's hold of BLAS covers the
   library its kernels call (SciPy's), not NumPy's. Run twice, each in its own process: as the
   environment is, and with ``OPENBLAS_THREAD_TIMEOUT=4`` (read by OpenBLAS when it loads).
2. **GEMM rates.** Forward products of wide (256 × 1024 × 1024) and mnist's first layer
   (512 × 784 × 512), each after a pause: the kernels' way (a ``prange`` over two row tiles, one
   ``np.dot`` each, BLAS held to one thread), NumPy's two-thread GEMM over the whole batch, and
   ``torch.mm`` on two threads (when torch is installed).

Medians of ``--rounds`` single timings. A script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "2")
import numpy as np

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/blas_spin.py): its folder is on sys.path
    import _timing

CONFIGS = "mnist128-B64,mnist,wide"
PAUSE = 0.25


def _timed(f, calls: int = 1) -> float:
    f()
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls


def after_numpy(configs_arg: str, rounds: int) -> None:
    A = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "not set")
    for name in configs_arg.split(","):
        print(_after_numpy_row(name, timeout, rounds, A), flush=True)


def _after_numpy_row(name: str, timeout: str, rounds: int, A: np.ndarray) -> str:
    import fastgrad
    from fastgrad.tools import configs

    net, theta, X, y = configs.problem(name)
    numba_step = fastgrad.Step(net, np.float32, ("loss", "grad"), backend="numba")
    numpy_step = fastgrad.Step(net, np.float32, ("loss", "grad"), backend="numpy")
    times = {"numba": [], "numpy": [], "after": []}
    for _ in range(rounds):
        time.sleep(PAUSE)
        times["numba"].append(_timed(lambda: numba_step(theta, X, y)))
        time.sleep(PAUSE)
        times["numpy"].append(_timed(lambda: numpy_step(theta, X, y)))
        time.sleep(PAUSE)
        numba_step(theta, X, y)
        A @ A  # NumPy's OpenBLAS on two threads, which then spin
        t = time.perf_counter()
        numba_step(theta, X, y)
        times["after"].append(time.perf_counter() - t)
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    numpy_cell = f"{ms['numpy']:.3f} ({ms['numpy'] / ms['numba']:.2f}×)"
    after_cell = f"{ms['after']:.3f} ({ms['after'] / ms['numba']:.2f}×)"
    return f"| {name} | {timeout} | {ms['numba']:.3f} | {numpy_cell} | {after_cell} |"


def gemm_rates(rounds: int) -> None:
    from numba import njit, prange

    from fastgrad._threading import kernel_blas

    @njit(parallel=True)
    def row_tiles(a, w, out, tile):  # the kernels' way: each tile's A W^T on one thread
        for t in prange((a.shape[0] + tile - 1) // tile):
            r0 = t * tile
            r1 = min(a.shape[0], r0 + tile)
            np.dot(a[r0:r1], w.T, out[r0:r1])

    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        torch = None
    for shape in ((256, 1024, 1024), (512, 784, 512)):
        print(_gemm_row(shape, rounds, row_tiles, kernel_blas, torch), flush=True)


def _gemm_row(shape: tuple, rounds: int, row_tiles, kernel_blas, torch) -> str:
    R, n_in, n_out = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((R, n_in)).astype(np.float32)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    out = np.empty((R, n_out), np.float32)

    def tiles():
        with kernel_blas():
            row_tiles(a, w, out, R // 2)

    ways = {"numba, two row tiles": tiles, "NumPy, 2 threads": lambda: a @ w.T}
    if torch is not None:
        at, wt = torch.from_numpy(a), torch.from_numpy(w)
        ways["torch.mm, 2 threads"] = lambda: torch.mm(at, wt.T)
    times = {k: [] for k in ways}
    for _ in range(rounds):
        for k, f in ways.items():
            time.sleep(PAUSE)
            times[k].append(_timed(f, 3))
    flops = 2 * R * n_in * n_out
    cells = " | ".join(
        f"{1e3 * np.median(v):.2f} ms, {flops / np.median(v) / 1e9:.0f} GFLOP/s" for v in times.values()
    )
    return f"| {R} × {n_in} × {n_out} | {cells} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        after_numpy(args.configs, args.rounds)
        return 0
    import numba

    import fastgrad

    print(
        f"# fastgrad {fastgrad.__version__}, numba {numba.__version__}, numpy {np.__version__}; "
        f"{_timing.machine()}, {os.cpu_count()} cores, numba threads {numba.get_num_threads()}, "
        f"{_timing.utc_now()}, load average {_timing.load()[0]:.2f}"
    )
    print()
    print(
        "| config | OPENBLAS_THREAD_TIMEOUT | numba, ms | numpy backend, ms (÷ numba) "
        "| numba right after A @ A, ms (÷ numba) |"
    )
    print("|---|---|---|---|---|")
    for extra in ({}, {"OPENBLAS_THREAD_TIMEOUT": "4"}):
        child = [sys.executable, __file__, "--child", "--configs", args.configs, "--rounds", str(args.rounds)]
        subprocess.run(child, env={**os.environ, **extra}, check=True)
    print()
    print("| forward product | numba, two row tiles | NumPy, 2 threads | torch.mm, 2 threads |")
    print("|---|---|---|---|")
    gemm_rates(args.rounds)
    print(f"\n# load average after: {_timing.load()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time one DP-SGD step, fastgrad against Opacus, side by side in one run; print a Markdown table.

    python benchmarks/dp_step.py [--configs narrow,mnist,wide] [--rounds 3] [--reps 3] [--backend numba]

One step, on docs/design.md §6's configurations (float32, tanh, cross-entropy), both sides on 2 threads:

- **fastgrad**: ``clipped_grad(..., noise_multiplier=1, expected_batch_size=B)`` (one backward
  pass: norms, clipped sum, noise from NumPy's PCG64) and the SGD update ``θ -= lr·g``;
- **fastgrad, secure noise**: the same with ``secure_noise=True`` (noise from ``os.urandom``,
  four Gaussians per coordinate);
- **Opacus**: ``zero_grad``, forward, loss, backward through ``GradSampleModule``'s hooks
  (per-sample gradients), ``DPOptimizer.step()`` (norms, clip, sum, noise, ÷ B, SGD update);
- **Opacus, secure_mode**: ``DPOptimizer(secure_mode=True)``: four Gaussian draws per
  coordinate, here from torch's default generator (``torchcsprng``, which Opacus's
  ``PrivacyEngine`` would use, is not installed), so this times the draws, not a CSPRNG;
- **torch backward**: a plain forward + backward of the mean loss, the yardstick of docs/design.md §6.

The methods take turns call by call (``_timing.timed_rounds``: two untimed calls, then a
timed one), so each sees the same load; ratios are medians of paired per-call ratios (and,
in brackets, the ratio of the best calls). A script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys

import numpy as np

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/dp_step.py): its folder is on sys.path
    import _timing

THREADS = 2

SIGMA, C, LR = 1.0, 1.0, 0.1


def methods_for(name: str, backend: str) -> dict:
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    import fastgrad
    from fastgrad.tools import configs

    net, theta, X, y = configs.problem(name)
    B = len(X)
    work = theta.copy()

    def fastgrad_step(secure: bool):
        def step():
            seed = None if secure else 0
            g = fastgrad.clipped_grad(net, work, X, y, C, SIGMA, seed, backend,
                                      expected_batch_size=B, secure_noise=secure)  # fmt: skip
            work[...] = theta - np.float32(LR) * g  # from the same θ each call

        return step

    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def opacus_step(secure: bool):
        model = GradSampleModule(fastgrad.to_torch(net, theta))
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=SIGMA,
                          max_grad_norm=C, expected_batch_size=B, secure_mode=secure)  # fmt: skip

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xt), yt).backward()
            opt.step()

        return step

    plain = fastgrad.to_torch(net, theta)

    def torch_backward():
        plain.zero_grad()
        torch.nn.functional.cross_entropy(plain(Xt), yt).backward()

    return {
        "fastgrad": fastgrad_step(False),
        "fastgrad secure": fastgrad_step(True),
        "Opacus": opacus_step(False),
        "Opacus secure_mode": opacus_step(True),
        "torch backward": torch_backward,
    }


def noise_costs(P: int, reps: int = 20) -> tuple[float, float]:
    """Median ms of P standard normals: NumPy's default_rng, and fastgrad's secure draw."""
    from fastgrad import privacy

    out = []
    for secure in (False, True):
        draw = functools.partial(privacy.standard_normal, P, np.float32, None, secure=secure)
        out.append(1e3 * _timing.median(_timing.consecutive(draw, reps)))
    return out[0], out[1]


def _ms(r) -> str:
    return f"{r[0]:.1f} ({r[1]:.1f})"


def _ratio(res: dict, a: str, b: str) -> str:
    return f"{_timing.median_ratio(res[a][2], res[b][2]):.1f}× ({res[a][1] / res[b][1]:.1f}×)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="narrow,mnist,wide")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="numba")
    args = ap.parse_args(argv)

    import numba
    import opacus
    import torch

    import fastgrad
    from fastgrad.tools import configs

    torch.set_num_threads(THREADS)
    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    load = _timing.load()
    versions = f"torch {torch.__version__}, numba {numba.__version__}, numpy {np.__version__}"
    print(f"# one DP-SGD step: fastgrad {fastgrad.__version__} (backend {args.backend}) vs Opacus "
          f"{opacus.__version__}, {versions}")  # fmt: skip
    print(f"# {platform.node()} ({_timing.machine()}, {os.cpu_count()} cores), "
          f"{THREADS} threads each, {_timing.utc_now()}, "
          f"load average {load[0]:.1f}, {args.rounds}×{args.reps} timed calls per method")  # fmt: skip
    print()
    print("| config | fastgrad step | fastgrad, secure noise | Opacus step | Opacus secure_mode | "
          "torch backward | Opacus ÷ fastgrad | fastgrad ÷ torch backward |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        res = _timing.timed_rounds(methods_for(name, args.backend), args.rounds, args.reps)
        sizes, B = configs.config(name)
        times = " | ".join(
            _ms(res[m]) for m in ("fastgrad", "fastgrad secure", "Opacus", "Opacus secure_mode")
        )
        ratios = f"{_ratio(res, 'Opacus', 'fastgrad')} | {_ratio(res, 'fastgrad', 'torch backward')}"
        print(f"| {name} {list(sizes)} B={B} | {times} | {_ms(res['torch backward'])} | {ratios} |")
    print()
    print("Times in ms, median (best). Noise alone, P standard normals (median ms): NumPy PCG64 vs secure")
    for name in args.configs.split(","):
        P = configs.num_params(configs.config(name)[0])
        fast, secure = noise_costs(P)
        print(f"- {name}: P = {P}: {fast:.2f} ms vs {secure:.2f} ms ({secure / fast:.1f}×)")
    print(f"# load average after: {_timing.load()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

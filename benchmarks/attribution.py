"""Per-sample gradient inner products: fastgrad's gram and grad_dot against its own gradient and
torch.func, side by side in one run; print a Markdown table.

    python benchmarks/attribution.py [--configs mnist,wide] [--rounds 3] [--reps 1]
    python benchmarks/attribution.py --materialise      # the measurement behind MATERIALISE_MAX

docs/design.md §6's configurations (float32, tanh, cross-entropy), every side on 2 threads
(``NUMBA_NUM_THREADS=2``, ``torch.set_num_threads(2)``):

- **grad**: ``fastgrad.backprop(compute=("grad",), backend="numba")``, the yardstick;
- **gram**: ``fastgrad.gram(net, θ, X, y, backend="numba")``, the (B, B) Gram ∇ℓ_i·∇ℓ_j;
- **dot**: ``fastgrad.grad_dot(..., v, backend="numba")``, ∇ℓ_i·v for a fixed v (P,);
- **torch.func gram**: ``vmap(grad(loss))`` per-sample gradients, then Σ_l G_l G_lᵀ layer by
  layer (no concatenated (B, P) copy: the cheaper way for torch).

Times: the methods take turns call by call (``_timing.timed_rounds``), medians.
Peak memory: each method in a fresh subprocess, after a warm-up call on 2 samples of the
problem (imports, compiling, first-call caches; a warm-up on the whole batch would leave its
buffers resident, and the timed call would reuse them), the peak resident set of one call on
the whole batch above the resident set just before it (Linux: VmHWM reset by writing 5
to /proc/self/clear_refs, then read from /proc/self/status). That counts every allocator
(NumPy, Numba, torch, BLAS buffers) and only what the call itself adds. A script, not a test:
it asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys

os.environ.setdefault("NUMBA_NUM_THREADS", "2")
import numpy as np

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/attribution.py): its folder is on sys.path
    import _timing

THREADS = 2

METHODS = ("grad", "gram", "dot", "torch.func gram")


def method(name: str, config: str, rows: int | None = None):
    """A no-argument call of ``name`` on ``config``'s problem (its first ``rows`` samples)."""
    import fastgrad
    from fastgrad.tools import configs

    net, theta, X, y = configs.problem(config)
    X, y = X[:rows], y[:rows]
    if name == "grad":
        return lambda: fastgrad.backprop(net, theta, X, y, compute=("grad",), backend="numba")
    if name == "gram":
        return lambda: fastgrad.gram(net, theta, X, y, backend="numba")
    if name == "dot":
        v = np.random.default_rng(0).standard_normal(net.num_params).astype(np.float32)
        return lambda: fastgrad.grad_dot(net, theta, X, y, v, backend="numba")
    import torch
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(THREADS)
    model = fastgrad.to_torch(net, theta)
    params = {k: v.detach() for k, v in model.named_parameters()}
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def loss(p, x, t):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    per_sample = vmap(grad(loss), (None, 0, 0))

    def torch_gram():
        with torch.no_grad():
            g = per_sample(params, Xt, yt)
            total = None
            for t in g.values():
                flat = t.reshape(t.shape[0], -1)
                total = flat @ flat.T if total is None else total + flat @ flat.T
            return total

    return torch_gram


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_of_call(name: str, config: str) -> dict:
    """In this process: a warm-up call on 2 samples (imports, compiling, first-call caches), then the
    peak RSS of one call on the whole batch above the RSS before it."""
    method(name, config, 2)()
    f = method(name, config)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as c:
        c.write("5")  # resets VmHWM to the current RSS
    wall = _timing.timer(f)()
    return {"peak_mib": (_rss_kib("VmHWM") - before) / 1024, "wall_s": wall}


def peak_in_subprocess(name: str, config: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--peak", name, config], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def materialise_table(rows: int = 256, reps: int = 20) -> None:
    """Per layer shape: time of one rows × rows block, factorised vs materialised, float32, 1 BLAS thread."""
    from fastgrad import attribution
    from fastgrad._threading import single_threaded_blas

    rng = np.random.default_rng(0)
    print(f"{rows} × {rows} block, float32, BLAS on 1 thread, best of two medians of {reps} calls")
    print("| n_l × n_(l-1) | entries n_l(n_(l-1)+1) | factorised µs | materialised µs | mat/fact |")
    print("|---|---|---|---|---|")
    shapes = [
        (2, 3),
        (4, 4),
        (3, 10),
        (8, 8),
        (10, 16),
        (16, 16),
        (10, 32),
        (32, 32),
        (10, 64),
        (64, 64),
        (10, 256),
    ]
    with single_threaded_blas():
        for n_out, n_in in shapes:
            D1, D2 = (rng.standard_normal((rows, 1, n_out)).astype(np.float32) for _ in range(2))
            A1, A2 = (rng.standard_normal((rows, n_in)).astype(np.float32) for _ in range(2))
            t = {}
            for mat in (False, True, False, True):
                call = functools.partial(attribution._layer_block, D1, A1, D2, A2, False, mat)
                t.setdefault(mat, []).append(_timing.median(_timing.consecutive(call, reps, warmup=1)) * 1e6)
            f, m = min(t[False]), min(t[True])
            print(f"| {n_out} × {n_in} | {n_out * (n_in + 1)} | {f:.0f} | {m:.0f} | {m / f:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="mnist,wide")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--materialise", action="store_true")
    ap.add_argument("--peak", nargs=2, metavar=("METHOD", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak:
        print(json.dumps(peak_of_call(*args.peak)))
        return 0
    if args.materialise:
        materialise_table()
        return 0
    import numba
    import torch

    import fastgrad

    print(f"{_timing.utc_now()}, {_timing.machine()}")
    print(f"fastgrad {fastgrad.__version__}, numpy {np.__version__}, numba {numba.__version__}, ", end="")
    print(f"torch {torch.__version__}")
    print(f"load before: {_timing.load()}")
    print()
    print("| config | method | median ms | / grad | peak MiB of one call |")
    print("|---|---|---|---|---|")
    for config in args.configs.split(","):
        times = _timing.timed_rounds({m: method(m, config) for m in METHODS}, args.rounds, args.reps)
        grad_calls = times["grad"][2]
        for m in METHODS:
            med, _, calls = times[m]
            ratio = _timing.median_ratio(calls, grad_calls)
            peak = peak_in_subprocess(m, config)["peak_mib"]
            print(f"| {config} | {m} | {med:.1f} | {ratio:.2f} | {peak:.1f} |")
        tf_calls, gram_calls = times["torch.func gram"][2], times["gram"][2]
        tf_ratio = _timing.median_ratio(tf_calls, gram_calls)
        print(f"| {config} | torch.func gram / gram | | {tf_ratio:.1f}× | |")
    print()
    print(f"load after: {_timing.load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

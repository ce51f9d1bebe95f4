"""A whole training step through ``fastgrad.torch`` against PyTorch's plain step, in one torch process.

    python benchmarks/training_step.py [--configs mnist128-B64,narrow-B32,narrow-B256,mnist,wide]
                                       [--blocks 15] [--seconds 0.05] [--no-opacus]

Per configuration (``fastgrad.tools.configs``: tanh hidden layers, cross-entropy, float32; torch
and Numba both on 2 threads), the same model and batch, each method a real training step:

- **torch**: ``opt.zero_grad()``, forward, ``CrossEntropyLoss``, ``backward()``, ``opt.step()``;
- **fastgrad**: ``GradStep(X, y)`` (every ``p.grad``) then ``opt.step()``; and the same with
  torch on one thread (``torch.set_num_threads(1)`` at the start of each step; each method sets
  its own thread count), the rule of docs/training.md for loops where torch runs only the
  optimizer;
- **fastgrad DP**: a Poisson batch drawn from a dataset of 10·B samples (q = 0.1, so the expected
  batch is B), gathered (``DPGradStep.loader``: ``torch.index_select``), ``DPGradStep`` (norms,
  clipping, noise σ = 1, ÷ E) and ``opt.step()``: everything DP-SGD needs, against torch's
  *non-private* step (also with torch on one thread);
- **fastgrad SGD**: the same two fastgrad steps (plain and DP) with ``fastgrad.torch.SGD`` (the same
  update, bit for bit, as one compiled pass over the flat θ on Numba's threads) in place of
  ``torch.optim.SGD``, torch on one thread (it only gathers the DP batch); and the plain step as
  ``opt.step(step.closure(X, y))``, the update made in the kernels' last pass (the DP step's in its
  noise pass);
- **Opacus**: ``make_private``'s pieces (``GradSampleModule`` + ``DPOptimizer``, σ = 1) on the
  fixed batch: zero_grad, forward, loss, backward with per-sample hooks, ``opt.step()``.

Each optimizer is SGD with momentum 0.9 on its own copy of the model. The methods take turns in
blocks of consecutive steps (as in a training loop: torch's OpenMP pool and Numba's TBB pool meet
as they would there; no pause between steps), each block about ``--seconds`` long; per-step time
is a block's time / its steps. Reported: the median per-step ms of each method and the median of
the per-round paired ratios. A script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "2")
import numpy as np

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/training_step.py): its folder is on sys.path
    import _timing

THREADS = 2
CONFIGS = "mnist128-B64,narrow-B32,narrow-B256,mnist,wide"
CLOCK = time.perf_counter
AGAINST_TORCH = ("fastgrad", "fastgrad, torch 1 thread", "fastgrad DP", "fastgrad DP, torch 1 thread",
                 "fastgrad, fastgrad SGD", "fastgrad, fastgrad SGD closure",
                 "fastgrad DP, fastgrad SGD", "fastgrad DP, fastgrad SGD closure")  # fmt: skip


def methods_for(name: str, opacus_too: bool, threads: int) -> dict:
    import torch

    import fastgrad
    import fastgrad.torch as ft
    from fastgrad.tools import configs

    net, theta, X, y = configs.problem(name)
    B = len(X)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    rng = np.random.default_rng(1)
    N = 10 * B
    X_all = torch.from_numpy(rng.standard_normal((N, net.n_in)).astype(np.float32))
    y_all = torch.from_numpy(rng.integers(0, net.n_out, size=N))
    loss_fn = torch.nn.CrossEntropyLoss()

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    ref = fastgrad.to_torch(net, theta)
    ref_opt = sgd(ref)

    def torch_step():
        torch.set_num_threads(threads)
        ref_opt.zero_grad()
        loss_fn(ref(Xt), yt).backward()
        ref_opt.step()

    model = fastgrad.to_torch(net, theta)
    opt = sgd(model)
    step = ft.GradStep(model, loss_fn)

    def fastgrad_step():
        torch.set_num_threads(threads)
        step(Xt, yt)
        opt.step()

    def fastgrad_step_1():  # torch runs only the optimizer: on one thread (docs/training.md's rule)
        torch.set_num_threads(1)
        step(Xt, yt)
        opt.step()

    fused_model = fastgrad.to_torch(net, theta)
    fused_step = ft.GradStep(fused_model, loss_fn)
    fused_opt = ft.SGD(fused_step, lr=0.01, momentum=0.9)

    def fastgrad_fused_sgd():  # the update too on Numba's threads: torch computes nothing
        torch.set_num_threads(1)
        fused_step(Xt, yt)
        fused_opt.step()

    closure_model = fastgrad.to_torch(net, theta)
    closure_step = ft.GradStep(closure_model, loss_fn)
    closure_opt = ft.SGD(closure_step, lr=0.01, momentum=0.9)

    def fastgrad_closure_sgd():  # the gradient and the update in one compiled call
        torch.set_num_threads(1)
        closure_opt.step(closure_step.closure(Xt, yt))

    def dp_method(fused: bool):
        dp_model = fastgrad.to_torch(net, theta)
        dp = ft.DPGradStep(dp_model, loss_fn, num_samples=N, expected_batch_size=B, max_norm=1.0,
                           noise_multiplier=1.0, seed=0)  # fmt: skip
        dp_opt = ft.SGD(dp, lr=0.01, momentum=0.9) if fused else sgd(dp_model)
        batches = iter(())

        def dp_step(torch_threads=threads, closure=False):
            nonlocal batches
            torch.set_num_threads(torch_threads)
            batch = next(batches, None)
            if batch is None:
                batches = dp.loader(X_all, y_all, epochs=100)  # Poisson batches, gathered
                batch = next(batches)
            if closure:  # the update in the noise's pass
                dp_opt.step(dp.closure(*batch))
            else:
                dp(*batch)
                dp_opt.step()

        return dp_step

    dp_step, dp_fused_sgd, dp_closure_sgd = dp_method(False), dp_method(True), dp_method(True)

    methods = {
        "torch": torch_step,
        "fastgrad": fastgrad_step,
        "fastgrad, torch 1 thread": fastgrad_step_1,
        "fastgrad DP": dp_step,
        "fastgrad DP, torch 1 thread": lambda: dp_step(1),
        "fastgrad, fastgrad SGD": fastgrad_fused_sgd,
        "fastgrad, fastgrad SGD closure": fastgrad_closure_sgd,
        "fastgrad DP, fastgrad SGD": lambda: dp_fused_sgd(1),  # torch only gathers the batch
        "fastgrad DP, fastgrad SGD closure": lambda: dp_closure_sgd(1, closure=True),
    }
    if opacus_too:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        op_model = GradSampleModule(fastgrad.to_torch(net, theta))
        op_opt = DPOptimizer(sgd(op_model), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B)

        def opacus_step():
            torch.set_num_threads(threads)
            op_opt.zero_grad()
            loss_fn(op_model(Xt), yt).backward()
            op_opt.step()

        methods["Opacus"] = opacus_step
    return methods


def timed_blocks(methods: dict, blocks: int, seconds: float) -> dict:
    """{name: per-step ms of each block}: after a warm-up that also sizes each method's block to
    about ``seconds``, the methods take turns, one block each per round."""
    steps = {
        name: _timing.block_steps(f, seconds, warmup=3, most=200, clock=CLOCK) for name, f in methods.items()
    }
    samplers = {  # one untimed call first: refills the caches the previous method took
        name: _timing.timer(f, clock=CLOCK, settle=1, calls=steps[name]) for name, f in methods.items()
    }
    return {name: 1e3 * np.array(t) for name, t in _timing.turns(samplers, blocks).items()}


def ratio(res: dict, a: str, b: str) -> float:
    return _timing.median_ratio(res[a], res[b])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=0.05)
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=THREADS)
    args = ap.parse_args(argv)

    import numba
    import torch

    import fastgrad
    from fastgrad.tools import configs

    torch.set_num_threads(args.torch_threads)
    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    opacus_too = not args.no_opacus
    import opacus

    versions = (
        f"fastgrad {fastgrad.__version__}, torch {torch.__version__}, numba {numba.__version__}, "
        f"numpy {np.__version__}, opacus {opacus.__version__}"
    )
    env = {
        k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS") if k in os.environ
    }
    print(f"# training step: fastgrad.torch vs torch; {versions}")
    print(
        f"# {platform.node()} ({_timing.machine()}, {os.cpu_count()} cores), "
        f"torch threads {args.torch_threads}, numba threads {numba.get_num_threads()}, env {env or '{}'}, "
        f"{_timing.utc_now()}, "
        f"load average {_timing.load()[0]:.2f}, "
        f"{args.blocks} blocks of ~{args.seconds * 1e3:.0f} ms per method"
    )
    print()
    head = "| config | torch step |" + "".join(f" {method} | ÷ torch |" for method in AGAINST_TORCH)
    rule = "|---|---|" + "---|---|" * len(AGAINST_TORCH)
    if opacus_too:
        head += " Opacus step | Opacus ÷ DP |"
        rule += "---|---|"
    print(head)
    print(rule)
    for name in args.configs.split(","):
        sizes, B = configs.config(name)
        res = timed_blocks(methods_for(name, opacus_too, args.torch_threads), args.blocks, args.seconds)
        ms = {k: float(np.median(v)) for k, v in res.items()}
        row = f"| {name} {list(sizes)} B={B} | {ms['torch']:.3f} |"
        for method in AGAINST_TORCH:  # each fastgrad method: its ms and its paired ratio to torch's step
            row += f" {ms[method]:.3f} | {ratio(res, method, 'torch'):.2f} |"
        if opacus_too:
            row += f" {ms['Opacus']:.2f} | {ratio(res, 'Opacus', 'fastgrad DP'):.1f} |"
        print(row, flush=True)
    print()
    print(f"# load average after: {_timing.load()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

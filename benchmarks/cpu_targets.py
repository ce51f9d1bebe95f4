"""Measure the Numba CPU backend against PyTorch and the floors and print a Markdown table.

Job: the A/B of a CPU-kernel change (run it before and after, same machine; ``--threads 1
--clock cpu`` for the least noise): paired per-call ratios of the numba backend's quantities
to its own mean gradient, to PyTorch and to the floors, plus peak memory and compile time.
(``fastgrad bench`` is the user-facing comparison of every backend and peer; the asv suite
tracks history; ``benchmarks/gpu_check.py`` is the GPU's counterpart of this script.)

    python benchmarks/cpu_targets.py [--rounds 3] [--reps 10] [--skip-compile] [--skip-vmap]

Everything is float32, tanh hidden layers, cross-entropy, on docs/design.md §6's configurations,
with Numba and PyTorch both on 2 threads, measured side by side in this one run (the
peer is optional: ``pip install -e ".[peers]"``). After a warm-up, the methods take turns
(two untimed calls, then a timed one), ``rounds × reps`` times, so call i of every method sees the same
load from a noisy neighbour; ratios are medians of the per-call paired ratios (and the
ratio of the best calls). ``--threads 1 --clock cpu`` measures CPU time on one thread,
which a loaded machine disturbs least.

Configurations, problems and floors come from ``fastgrad.tools.configs`` (any name of its
``CONFIGS`` or ``SMALL_BATCH_CONFIGS`` for ``--configs``). Floors measured in the same run:
the write floor of per-sample gradients is the time the fill floor (a 2-thread Numba loop
writing outer products, ``configs.fill_kernel``) takes to fill the same (B, P) array; the
flop floor is 6·B·Σ n_l n_{l-1} at NumPy's sgemm rate on a square GEMM.

This is a script, not a test: nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/cpu_targets.py): its folder is on sys.path
    import _timing

THREADS = 2
CLOCK = time.perf_counter
# fastgrad (and so Numba) is imported inside the functions: the child processes time its import


def torch_methods(sizes, B, X, y, theta, net, vmap: bool):
    try:
        import torch
    except ImportError:
        return {}, None
    import fastgrad

    torch.set_num_threads(THREADS)
    model = fastgrad.to_torch(net, theta)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    params = list(model.parameters())

    def autograd_mean():
        for p in params:
            p.grad = None
        torch.nn.functional.cross_entropy(model(Xt), yt).backward()

    methods = {"torch autograd grad": autograd_mean}
    if vmap:
        from torch.func import functional_call, grad, vmap

        named = {k: v.detach() for k, v in model.named_parameters()}

        def loss_one(p, x, t):
            out = functional_call(model, p, (x[None],))
            return torch.nn.functional.cross_entropy(out, t[None])

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
        methods["torch.func vmap(grad)"] = lambda: per_sample(named, Xt, yt)
    return methods, torch.__version__


def table_row(name: str, res: dict, flop_floor: float) -> tuple[str, ...]:
    """One Markdown row: times as "median (best)", ratios as "median of paired ratios (ratio of bests)"."""

    def ratio(num, den):
        if num not in res or den not in res:
            return "–"
        a, b = res[num], res[den]
        return f"{_timing.median_ratio(a[2], b[2]):.2f} ({a[1] / b[1]:.2f})"

    g, ps = res["grad"], res["per_sample"]
    return (
        name, f"{g[0]:.2f} ({g[1]:.2f})", ratio("torch autograd grad", "grad"), ratio("grad+norms", "grad"),
        ratio("clipped_grad", "grad"), ratio("grad+variance", "grad"), f"{ps[0]:.1f} ({ps[1]:.1f})",
        ratio("per_sample", "write floor (fill B×P)"), ratio("torch.func vmap(grad)", "per_sample"),
        f"{flop_floor:.2f}",
    )  # fmt: skip


def sgemm_rate() -> float:
    """GFLOP/s of NumPy's float32 GEMM on 1024³ (``configs.sgemm_timer``), best of 12."""
    from threadpoolctl import threadpool_limits

    from fastgrad.tools import configs

    call, flops = configs.sgemm_timer(1024)
    with threadpool_limits(THREADS, user_api="blas"):
        best = _timing.best_of(call, 12)
    return flops / best / 1e9


def gemm_rates(m: int, k: int, n: int) -> str:
    """GFLOP/s of an (m, k) @ (k, n) float32 GEMM: Numba's np.dot (SciPy's OpenBLAS) and torch.mm."""
    from numba import njit

    @njit
    def numba_dot(a, b, c):
        np.dot(a, b, c)

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = np.empty((m, n), np.float32)
    numba_dot(a, b, c)  # compile, and load SciPy's BLAS before limiting it
    methods = {"Numba np.dot (OpenBLAS)": lambda: numba_dot(a, b, c)}
    try:
        import torch

        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        methods["torch.mm"] = lambda: torch.mm(ta, tb, out=tc)
    except ImportError:
        pass
    from threadpoolctl import threadpool_limits

    with threadpool_limits(THREADS, user_api="blas"):
        res = _timing.timed_rounds(methods, 3, 10, clock=CLOCK)
    flop = 2 * m * k * n / 1e9
    return ", ".join(f"{name} {flop / (best / 1e3):.0f}" for name, (med, best, _) in res.items())


def measure_config(name, rounds, reps, vmap):
    import fastgrad
    from fastgrad import cpu
    from fastgrad.tools import configs

    sizes, B = configs.config(name)
    net, theta, X, y = configs.problem(sizes, B)
    P = net.num_params
    ws = cpu.Workspace()
    out = np.empty((B, P), np.float32)
    fill = configs.fill_timer(out)  # the fill floor, into the very array per_sample writes

    def bp(compute, **kw):
        return lambda: fastgrad.backprop(
            net, theta, X, y, compute=compute, backend="numba", workspace=ws, **kw
        )

    methods = {
        "grad": bp(("grad",)),
        "grad+norms": bp(("grad", "norms")),
        "clipped_grad": lambda: fastgrad.clipped_grad(
            net, theta, X, y, 1.0, 0.0, backend="numba", workspace=ws
        ),
        "grad+variance": bp(("grad", "variance")),
        "per_sample": bp(("per_sample",), out=out),
        "write floor (fill B×P)": fill,
    }
    peer, torch_version = torch_methods(sizes, B, X, y, theta, net, vmap)
    methods.update(peer)
    res = _timing.timed_rounds(methods, rounds, reps if B * P < 3e8 else max(3, reps // 3), clock=CLOCK)
    return res, B, P, torch_version


def peak_memory_child():
    """Run in a fresh process: RSS peak of grad+norms and clipped_grad on mnist over the inputs and θ."""
    import fastgrad
    from fastgrad import cpu
    from fastgrad.tools import configs

    small = configs.problem([3, 4, 2], 3)
    fastgrad.backprop(*small, compute=("grad", "norms"), backend="numba")  # load the kernels
    fastgrad.clipped_grad(*small, 1.0, backend="numba")
    with open("/proc/self/status") as f:
        before = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith("Vm")}
    net, theta, X, y = configs.problem("mnist")
    inputs_kib = (theta.nbytes + X.nbytes + y.nbytes) / 1024
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    with open("/proc/self/status") as f:
        base = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith("Vm")}
    ws = cpu.Workspace()
    for _ in range(3):
        fastgrad.backprop(net, theta, X, y, compute=("grad", "norms"), backend="numba", workspace=ws)
        fastgrad.clipped_grad(net, theta, X, y, 1.0, backend="numba", workspace=ws)
    with open("/proc/self/status") as f:
        after = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith("Vm")}
    peak = (after["VmHWM"] - base["VmRSS"]) / 1024
    print(f"{peak:.1f} {inputs_kib / 1024:.1f} {before['VmRSS'] / 1024:.0f}")


def compile_child():
    """Run in a fresh process: seconds to import, then to compile (or load) and run every float32 kernel."""
    t0 = time.perf_counter()
    from fastgrad import cpu

    t1 = time.perf_counter()
    cpu.compile_all((np.float32,))
    t2 = time.perf_counter()
    print(f"{t1 - t0:.2f} {t2 - t1:.2f}")


def child(kind: str, cache_dir: str | None = None) -> str:
    env = dict(os.environ)
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def versions() -> str:
    import numba
    import scipy
    import threadpoolctl

    blas = [
        f"{i['internal_api']} {i['version']} ({i.get('architecture')}, {i['filepath'].split('/')[-2]})"
        for i in threadpoolctl.threadpool_info()
        if i["user_api"] == "blas"
    ]
    return (
        f"Python {platform.python_version()}, NumPy {np.__version__}, Numba {numba.__version__} "
        f"(threading layer {numba.threading_layer()}), SciPy {scipy.__version__}; BLAS: {'; '.join(blas)}"
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    global THREADS, CLOCK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--configs", default="narrow,mnist,wide", help="names in fastgrad.tools.configs")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-vmap", action="store_true")
    ap.add_argument("--threads", type=int, default=THREADS, help="Numba and PyTorch threads (default 2)")
    ap.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: process CPU time, robust to a loaded machine; meaningful with --threads 1",
    )  # fmt: skip
    ap.add_argument("--child", choices=["memory", "compile"])
    args = ap.parse_args()
    THREADS = args.threads
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.child == "memory":
        return peak_memory_child()
    if args.child == "compile":
        return compile_child()

    try:  # loaded first, as a user's training script would
        import torch
    except ImportError:
        pass
    import numba

    import fastgrad  # noqa: F401  (before Numba's threads start: fastgrad picks its threading layer)
    from fastgrad.tools import configs

    numba.set_num_threads(THREADS)
    print(f"# fastgrad numba backend, {_timing.utc_now()}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average at start {os.getloadavg()}")
    print(f"threads: {THREADS} (Numba and PyTorch); clock: {args.clock}")
    print(f"env OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')}")  # fmt: skip
    gflops = sgemm_rate()
    print(f"NumPy sgemm 1024³: {gflops:.0f} GFLOP/s")
    try:
        import torch

        torch.set_num_threads(THREADS)
    except ImportError:
        pass
    for shape in ((512, 784, 512), (128, 784, 512), (256, 1024, 1024)):
        print(f"GEMM {shape}, best GFLOP/s: {gemm_rates(*shape)}")
    rows = []
    torch_version = None
    for name in args.configs.split(","):
        res, B, P, torch_version = measure_config(name, args.rounds, args.reps, not args.skip_vmap)
        sizes = configs.config(name)[0]
        flop_floor = 1e3 * configs.mean_grad_flops(sizes, B) / (gflops * 1e9)
        print(f"\n## {name} {sizes} B={B} P={P}")
        for k, (med, best, _) in res.items():
            print(f"  {k:28s} median {med:9.2f} ms   best {best:9.2f} ms")
        write_gbs = configs.per_sample_bytes(sizes, B) / 1e9 / (res["write floor (fill B×P)"][1] / 1e3)
        print(f"  flop floor at {gflops:.0f} GFLOP/s: {flop_floor:.2f} ms; "
              f"write floor {write_gbs:.1f} GB/s (best)")  # fmt: skip
        rows.append(table_row(name, res, flop_floor))
    print(f"\nversions: {versions()}; torch {torch_version}; load average at end {os.getloadavg()}")
    print("\ntimes: median (best); ratios: median of the paired per-call ratios (ratio of the bests)\n")
    print(
        "| config | grad ms | torch autograd / grad | grad+norms / grad | clipped_grad / grad "
        "| grad+variance / grad | per_sample ms | per_sample / write floor "
        "| vmap(grad) / per_sample | flop floor ms |"
    )
    print("|---" * 10 + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    mem = child("memory").split()
    print(f"\npeak memory over inputs+θ, grad+norms and clipped_grad on mnist: {mem[0]} MiB "
          f"(inputs+θ {mem[1]} MiB, process RSS before {mem[2]} MiB)")  # fmt: skip
    if not args.skip_compile:
        with tempfile.TemporaryDirectory() as cache:
            cold = child("compile", cache).split()
            warm = child("compile", cache).split()
        print(f"float32: cold compile {cold[1]} s (import {cold[0]} s); "
              f"first call, disk cache warm, new process: {warm[1]} s (import {warm[0]} s)")  # fmt: skip
    print(f"ru_maxrss of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

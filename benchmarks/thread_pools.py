"""torch's OpenMP pool and Numba's pool in one training process: which settings keep them from fighting.

    python benchmarks/thread_pools.py [--configs mnist-B64,mnist-B256,mnist128-B64] [--rounds 3]
                                      [--steps 200] [--taskset 0,1]

Each variant runs in its own child process (environment variables such as ``OMP_WAIT_POLICY``
act only before torch is imported); the variants take turns, ``--rounds`` times, and the medians
are reported. In each child, per configuration (tanh, cross-entropy, float32, SGD with momentum):

- **torch**: PyTorch's plain step (zero_grad, forward, loss, backward, ``opt.step()``);
- **fastgrad**: ``fastgrad.torch.GradStep`` then ``opt.step()``;
- **kernel**: the ``GradStep`` call alone, with no torch operation between calls: the cost of the
  kernel in this process when no torch pool wakes up.

``--steps`` consecutive steps each, as in a training loop; ms per step, and the process's user
and system CPU time per step (``getrusage``): spinning pools show up as system time and as user
time well above 2 × wall time. ``--taskset`` pins the children to those CPUs (Linux), to emulate
a 2-core machine on a bigger one. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/thread_pools.py): its folder is on sys.path
    import _timing

VARIANTS = {
    "default": ({}, 2),
    "OMP_WAIT_POLICY=passive": ({"OMP_WAIT_POLICY": "passive"}, 2),
    "torch.set_num_threads(1)": ({}, 1),
    "NUMBA_THREADING_LAYER=omp": ({"NUMBA_THREADING_LAYER": "omp"}, 2),
}
CONFIGS = {"mnist-B64": ("mnist", 64), "mnist-B256": ("mnist", 256), "mnist128-B64": ("mnist128-B64", 64)}


def measure_config(cname: str, steps: int) -> dict:
    """{method: ms, user and system CPU ms per step} for one configuration, in this process."""
    import resource

    import torch

    import fastgrad
    import fastgrad.torch as ft
    from fastgrad.tools import configs

    base, B = CONFIGS[cname]
    net, theta, X, y = configs.problem(base, B)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss()
    ref = fastgrad.to_torch(net, theta)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    model = fastgrad.to_torch(net, theta)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = ft.GradStep(model, loss_fn)

    def torch_step():
        ref_opt.zero_grad()
        loss_fn(ref(Xt), yt).backward()
        ref_opt.step()

    def fastgrad_step():
        step(Xt, yt)
        opt.step()

    def kernel():
        step(Xt, yt)

    def wall_user_sys():  # a clock of three readings: wall, user CPU and system CPU seconds
        r = resource.getrusage(resource.RUSAGE_SELF)
        return np.array([time.perf_counter(), r.ru_utime, r.ru_stime])

    res = {}
    for name, f in (("torch", torch_step), ("fastgrad", fastgrad_step), ("kernel", kernel)):
        _timing.warm_up([f], each=5)
        wall, user, sys_ = 1e3 * _timing.timer(f, clock=wall_user_sys, calls=steps)()
        res[name] = {"ms": wall, "user": user, "sys": sys_}
    return res


def child(config_names: list[str], steps: int, torch_threads: int) -> dict:
    import numba
    import torch

    torch.set_num_threads(torch_threads)
    out = {c: measure_config(c, steps) for c in config_names}
    out["layer"] = numba.threading_layer()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--taskset", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = args.configs.split(",")
    if args.child is not None:
        print(json.dumps(child(names, args.steps, args.child)))
        return 0
    variants = args.variants.split(",")
    runs: dict[str, list] = {v: [] for v in variants}
    layers = {}
    for _ in range(args.rounds):
        for v in variants:
            extra_env, threads = VARIANTS[v]
            env = {**os.environ, "NUMBA_NUM_THREADS": "2", **extra_env}
            cmd = [sys.executable, __file__, "--configs", args.configs, "--steps", str(args.steps)]
            cmd += ["--child", str(threads)]
            if args.taskset:
                cmd = ["taskset", "-c", args.taskset, *cmd]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"# {v}: failed: {r.stderr[-800:]}")
                continue
            data = json.loads(r.stdout.strip().splitlines()[-1])
            layers[v] = data.pop("layer")
            runs[v].append(data)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    print(f"# {when} UTC, load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, "
          f"taskset {args.taskset}, {args.rounds} rounds × {args.steps} steps")  # fmt: skip
    print()
    print("| variant (numba layer) | config | torch ms (user/sys) | fastgrad ms (user/sys) | "
          "kernel alone ms | fastgrad ÷ torch |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for v in variants:
        if not runs[v]:
            continue
        for c in names:
            med = {
                k: {q: float(np.median([r[c][k][q] for r in runs[v]])) for q in ("ms", "user", "sys")}
                for k in ("torch", "fastgrad", "kernel")
            }
            ratio = float(np.median([r[c]["fastgrad"]["ms"] / r[c]["torch"]["ms"] for r in runs[v]]))
            t, f, k = med["torch"], med["fastgrad"], med["kernel"]
            cells = [f"{m['ms']:.2f} ({m['user']:.2f}/{m['sys']:.2f})" for m in (t, f)]
            print(f"| {v} ({layers[v]}) | {c} | {cells[0]} | {cells[1]} | {k['ms']:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

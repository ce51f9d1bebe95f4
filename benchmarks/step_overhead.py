"""Host overhead of a numba call, unprepared (``fastgrad.backprop``) and prepared (``fastgrad.Step``),
against the kernel alone, with a per-phase timeline of each; prints Markdown.

    NUMBA_NUM_THREADS=2 python benchmarks/step_overhead.py [--sizes 784,128,10] [--batch 64] [--reps 400]

Four measurements take turns call by call, so each sees the same load (medians over ``--reps``):

- **kernel**: the compiled call ``cpu.batch_backprop`` (``fused_backprop`` on the batch's one chunk, and
  the losses' sum) with a prepared call's arguments, inside the single-threaded-BLAS hold (what no host
  code around it can avoid);
- **unprepared**: ``fastgrad.backprop(net, θ, X, y, ("loss", "grad"), "numba")``;
- **prepared**: ``step(θ, X, y)`` of ``fastgrad.Step(net, compute=("loss", "grad"), backend="numba")``;
- the two **timelines**: the same work as each public call, re-enacted here from the internals it calls,
  with a clock read between phases (the re-enactment mirrors ``api.backprop``/``cpu.run`` and
  ``Step.__call__``; its total is printed next to the public call's as a check).

Overhead = median(call) − median(kernel). A script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import sys
import time

import numba
import numpy as np

import fastgrad
from fastgrad import api, cpu
from fastgrad.quantities import finish, needed

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/step_overhead.py): its folder is on sys.path
    import _timing

ns = time.perf_counter_ns


def kernel_args(step, theta, X, y):
    """A prepared call of ``step`` and the arguments it hands its compiled call ``batch_backprop`` (the
    packs as plain tuples), for a batch of one chunk."""
    inp = step._inputs(theta, X, y)
    call = step._prepared_call(inp.batch_size)
    assert call.chunk == inp.batch_size, "one chunk expected at this size"
    return (
        cpu.NO_CHECK,
        (call.layout, inp.theta, call.w_t),
        (inp.X, inp.labels, inp.targets),
        call.codes,
        call.flags,
        call.plan,
        call.scalars,
        call.bufs,
        call.scratch,
        call.row_out,
        call.sums,
        call.partial,
        call.tasks,
        call.chunk,
        call.no_update,
    )


def kernel_only(args) -> int:
    with cpu.kernel_blas:
        before = cpu.driver._set_chunksize(1)
        t0 = ns()
        cpu.batch_backprop(*args)
        t1 = ns()
        cpu.driver._set_chunksize(before)
        return t1 - t0


UNPREPARED = ("check_compute + check_inputs", "run() entry: fork check, claim, BLAS hold",
              "set-up: Results, PreparedCall", "kernel", "finish: loss mean, result dict",
              "BLAS release, unclaim", "BackpropResult")  # fmt: skip


def timeline_unprepared(net, theta, X, y) -> list[int]:
    t = [ns()]
    want = api.check_compute(("loss", "grad"))
    run = api._backend("numba")  # noqa: F841 - looked up as backprop does
    inp = api.check_inputs(net, theta, X, y)
    need = needed(want)
    t.append(ns())
    cpu._threading.check_fork_safe()
    ws = cpu._thread_workspace()
    claim, blas = ws.claimed(), cpu.kernel_blas
    claim.__enter__()
    blas.__enter__()
    t.append(ns())
    results = cpu.Results(net, inp.dtype, need, False, inp.batch_size, None)
    call = cpu.PreparedCall(net, inp.dtype, need, None, inp.batch_size, ws, results)
    th, Xw, labels, targets = (cpu._writeable(a) for a in (inp.theta, inp.X, inp.labels, inp.targets))
    t.append(ns())
    call.launch(th, Xw, labels, targets)
    t.append(ns())
    raw = call.finish()
    t.append(ns())
    blas.__exit__(None, None, None)
    claim.__exit__(None, None, None)
    t.append(ns())
    values = finish(want - {"loss"}, raw, inp.batch_size)
    api.BackpropResult(loss=float(raw["loss"]), **values)
    t.append(ns())
    return [b - a for a, b in itertools.pairwise(t)]


PREPARED = ("claim + per-call checks (types, shapes)", "fork check, prepared lookup, BLAS hold",
            "kernel (with the values' compiled check)", "finish: loss mean, result dict", "BLAS release",
            "BackpropResult, unclaim")  # fmt: skip


def timeline_prepared(step, theta, X, y) -> list[int]:
    t = [ns()]
    step._claim()
    inp = step._inputs(theta, X, y)
    t.append(ns())
    cpu._threading.check_fork_safe()
    call = step._prepared_call(inp.batch_size)
    w = cpu._writeable
    th, Xw, labels, targets = w(inp.theta), w(inp.X), w(inp.labels), w(inp.targets)
    blas = cpu.kernel_blas
    blas.__enter__()
    t.append(ns())
    call.launch(th, Xw, labels, targets, step._check)
    t.append(ns())
    raw = call.finish()
    t.append(ns())
    blas.__exit__(None, None, None)
    t.append(ns())
    values = finish(step.want - {"loss"}, raw, inp.batch_size)
    api.BackpropResult(loss=float(raw["loss"]), **values)
    step._busy.release()
    t.append(ns())
    return [b - a for a, b in itertools.pairwise(t)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="784,128,10")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=400)
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    dt = np.dtype(a.dtype)
    net = fastgrad.MLP(sizes, activation="tanh", loss="cross_entropy")
    rng = np.random.default_rng(0)
    theta = net.init(seed=0, dtype=dt)
    X = rng.standard_normal((a.batch, sizes[0])).astype(dt)
    y = rng.integers(0, sizes[-1], a.batch)
    step = fastgrad.Step(net, dt, compute=("loss", "grad"), backend="numba")
    args = kernel_args(step, theta, X, y)
    work = {
        "kernel": lambda: kernel_only(args),
        "unprepared": _timing.timer(
            lambda: fastgrad.backprop(net, theta, X, y, ("loss", "grad"), "numba"), clock=ns
        ),
        "prepared": _timing.timer(lambda: step(theta, X, y), clock=ns),
        "tl_u": lambda: timeline_unprepared(net, theta, X, y),
        "tl_p": lambda: timeline_prepared(step, theta, X, y),
    }
    _timing.warm_up(work.values(), rounds=20)  # compile, caches, thread pool
    samples = _timing.turns(work, a.reps)  # each returns its own sample: ns, or a timeline's phases
    med = {k: np.median(np.array(v), axis=0) / 1e3 for k, v in samples.items()}
    k = med["kernel"]
    load = _timing.load()
    print(f"# host overhead of a numba call, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n")
    print(f"{sizes} B = {a.batch}, {dt}, tanh, cross_entropy; numba {numba.__version__}, "
          f"numpy {np.__version__}, Python {platform.python_version()}, {numba.get_num_threads()} threads, "
          f"layer {numba.threading_layer()}; load {load[0]:.2f} {load[1]:.2f}; medians of {a.reps} "
          "interleaved calls\n")  # fmt: skip
    print("| call | median µs | minus kernel µs |\n|---|---|---|")
    print(f"| kernel alone (fused_backprop) | {k:.1f} | 0 |")
    for name, api_name in (("unprepared", "backprop"), ("prepared", "Step")):
        print(f"| {name} ({api_name}) | {med[name]:.1f} | {med[name] - k:.1f} |")
    for title, key, phases in (("unprepared", "tl_u", UNPREPARED), ("prepared", "tl_p", PREPARED)):
        print(f"\n{title} timeline (medians per phase, µs; sum {med[key].sum():.1f}):\n")
        print("| phase | µs |\n|---|---|")
        for p, v in zip(phases, med[key]):
            print(f"| {p} | {v:.1f} |")


if __name__ == "__main__":
    sys.exit(main())

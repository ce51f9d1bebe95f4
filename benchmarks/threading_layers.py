"""Numba's threading layers under the numba backend: speed, and small-call latency under load.

Job: the measurements behind fastgrad's choice of Numba's TBB layer (``fastgrad._threading``),
recorded in docs/benchmarks.md. A layer is fixed per process, so each measurement runs in a
child process per layer (``NUMBA_THREADING_LAYER``; ``omp-passive`` is OpenMP with
``OMP_WAIT_POLICY=PASSIVE``), and the children take turns, round after round, so that every
layer sees the same neighbours on a shared machine::

    python benchmarks/threading_layers.py [--rounds 3] [--layers tbb,omp,omp-passive]

1. speed: median time per call of the mean gradient (float32, tanh, cross-entropy) on
   docs/design.md §6's narrow (B = 4096) and mnist (B = 512) configurations and the small-batch narrow ones
   (B = 256, 32; ``fastgrad.tools.configs``), back to back after a warm-up; ratios to TBB are
   per round, then the median.
2. latency under load: median of back-to-back small calls (narrow-B32: [64, 64, 64, 10],
   B = 32, the mean gradient), first quiet, then with one busy process beside it
   (``python -c "while True: pass"``), in the same child; the ratio loaded / quiet.

The load average before and after is printed: on a machine shared with other work the
"quiet" phase is only as quiet as the neighbours. This is a script, not a test: it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/threading_layers.py): its folder is on sys.path
    import _timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {
    "tbb": {"NUMBA_THREADING_LAYER": "tbb"},
    "omp": {"NUMBA_THREADING_LAYER": "omp"},
    "omp-passive": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "PASSIVE"},
}
SPEED_CONFIGS = ("narrow", "mnist", "narrow-B256", "narrow-B32")
"""Names of ``fastgrad.tools.configs``' configurations (the single source of their sizes)."""
SMALL = "narrow-B32"
BUSY = "while True: pass"


def _problem(name: str):
    import fastgrad
    from fastgrad.tools import configs

    net, theta, X, y = configs.problem(name)
    return lambda: fastgrad.backprop(net, theta, X, y, compute=("grad",), backend="numba")


def _median_ms(call, n: int) -> float:
    return 1e3 * _timing.median(_timing.consecutive(call, n))


def child_speed(reps: int) -> dict:
    out = {}
    from fastgrad.tools import configs

    for name in SPEED_CONFIGS:
        call = _problem(name)
        for _ in range(3):
            call()
        out[name] = _median_ms(call, reps if configs.config(name)[1] >= 512 else 20 * reps)
    return out


def child_latency(calls: int) -> dict:
    call = _problem(SMALL)
    for _ in range(20):
        call()
    quiet = _median_ms(call, calls)
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(0.5)  # let it get going
        loaded = _median_ms(call, calls)
    finally:
        busy.kill()
        busy.wait()
    return {"quiet": quiet, "loaded": loaded}


def _in_child(layer: str, job: str, n: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY")}
    env.update(LAYERS[layer], PYTHONPATH=ROOT)
    code = (  # PYTHONPATH=ROOT: the package benchmarks is importable
        "import json; import benchmarks.threading_layers as t, numba; "
        f"r = t.child_{job}({n}); r['running'] = numba.threading_layer(); print(json.dumps(r))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10, help="timed calls per config (x20 for small batches)")
    parser.add_argument("--calls", type=int, default=300, help="small calls per latency phase")
    parser.add_argument("--layers", default="tbb,omp,omp-passive")
    args = parser.parse_args(argv)
    layers = args.layers.split(",")
    import numba
    import numpy

    print(f"{_timing.utc_now()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numba {numba.__version__}, "
          f"numpy {numpy.__version__}; load average before: {_timing.load()}")  # fmt: skip
    speed = {layer: [] for layer in layers}
    latency = {layer: [] for layer in layers}
    for _ in range(args.rounds):
        for layer in layers:
            speed[layer].append(_in_child(layer, "speed", args.reps))
        for layer in layers:
            latency[layer].append(_in_child(layer, "latency", args.calls))
    print(f"load average after: {_timing.load()}\n")

    print("Speed: median ms per call of the mean gradient (median over rounds), and the ratio to tbb\n")
    print("| config | " + " | ".join(layers) + " | " + " | ".join(f"{x} / tbb" for x in layers[1:]) + " |")
    print("|---" * (1 + 2 * len(layers) - 1) + "|")
    for name in SPEED_CONFIGS:
        med = [statistics.median(r[name] for r in speed[layer]) for layer in layers]
        ratios = [
            statistics.median(a[name] / b[name] for a, b in zip(speed[layer], speed[layers[0]]))
            for layer in layers[1:]
        ]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in med) + " | "
              + " | ".join(f"{r:.2f}" for r in ratios) + " |")  # fmt: skip

    print("\nLatency: median ms of back-to-back calls, narrow B=32 mean gradient, quiet vs one busy process")
    print("| layer | quiet | with one busy process | loaded / quiet | per round: quiet → loaded |")
    print("|---|---|---|---|---|")
    for layer in layers:
        q = statistics.median(r["quiet"] for r in latency[layer])
        lo = statistics.median(r["loaded"] for r in latency[layer])
        rounds = ", ".join(f"{r['quiet']:.2f} → {r['loaded']:.2f}" for r in latency[layer])
        running = latency[layer][0]["running"]
        print(f"| {layer} (running: {running}) | {q:.3f} | {lo:.3f} | {lo / q:.1f}x | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

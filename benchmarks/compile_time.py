"""Cold and cached JIT compile time of the compiled backends, each in a fresh subprocess.

Part of the asv suite, whose job is the history across commits (see benchmarks/__init__.py).

Cold: fastgrad's disk cache is off (``FASTGRAD_NUMBA_CACHE=0``) and Numba's cache points
at an empty temporary directory, so everything compiles.
Cached: a first subprocess fills that directory, a second one is timed loading from it.
Timed: the first calls, after import, on a tiny float32 problem, of ``backprop`` with
every quantity and of ``clipped_grad`` — every kernel the backend has for one dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from ._problems import COMPILED_BACKENDS, backend_names, require

FIRST_CALLS = """
import sys, time
import numpy as np
import fastgrad
backend = sys.argv[1]
net = fastgrad.MLP([8, 16, 4], activation="tanh", loss="cross_entropy")
theta = net.init(seed=0, dtype=np.float32)
rng = np.random.default_rng(0)
X = rng.standard_normal((8, 8)).astype(np.float32)
y = rng.integers(0, 4, size=8)
t0 = time.perf_counter()
fastgrad.backprop(net, theta, X, y, compute=fastgrad.QUANTITIES, backend=backend)
fastgrad.clipped_grad(net, theta, X, y, max_norm=1.0, backend=backend)
print(time.perf_counter() - t0)
"""


def first_call_seconds(backend: str, cache_dir: str, use_cache: bool = True) -> float:
    """Seconds of the first calls in a fresh interpreter whose Numba cache is ``cache_dir``.

    ``use_cache=False`` also turns fastgrad's disk cache off (``FASTGRAD_NUMBA_CACHE=0``),
    so nothing is loaded or written; the empty ``cache_dir`` covers commits without that switch.
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, FASTGRAD_NUMBA_CACHE="1" if use_cache else "0")
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALLS, backend], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"first calls on {backend!r} failed:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


class CompileTime:
    """Seconds from the first call to results, without and with Numba's on-disk cache."""

    params = ([b for b in backend_names(COMPILED_BACKENDS) if b != "numpy"],)
    param_names = ("backend",)
    unit = "seconds"
    timeout = 900.0
    number = 1
    repeat = 1

    def setup(self, backend):
        require(backend)

    def track_cold_compile(self, backend):
        with tempfile.TemporaryDirectory(prefix="fastgrad-cold-") as cache_dir:
            return first_call_seconds(backend, cache_dir, use_cache=False)

    def track_cached_compile(self, backend):
        with tempfile.TemporaryDirectory(prefix="fastgrad-cached-") as cache_dir:
            first_call_seconds(backend, cache_dir)
            return first_call_seconds(backend, cache_dir)

"""backend="auto", the default of backprop, clipped_grad and Step: numba for host arrays where it runs,
else numpy; the one line the first compile prints, and its silence on cached loads."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from problems import make_problem

import fastgrad
from fastgrad import api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_default_is_auto_and_auto_is_numba_for_host_arrays(monkeypatch):
    net, theta, X, y = make_problem([5, 8, 3], B=10, dtype=np.float32)
    api._best_host()  # the choice is made once per process
    used = []
    real = api._backend

    def spy(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(api, "_backend", spy)
    default = fastgrad.backprop(net, theta, X, y, compute=("loss", "grad", "norms"))
    numba_ = fastgrad.backprop(net, theta, X, y, compute=("loss", "grad", "norms"), backend="numba")
    assert used == ["numba", "numba"]
    for name in ("grad", "norms"):
        np.testing.assert_array_equal(getattr(default, name), getattr(numba_, name))
    assert default.loss == numba_.loss
    used.clear()
    got = fastgrad.clipped_grad(net, theta, X, y, 0.5, 1.0, seed=3)
    np.testing.assert_array_equal(
        got, fastgrad.clipped_grad(net, theta, X, y, 0.5, 1.0, seed=3, backend="numba")
    )
    assert used == ["numba", "numba"]
    assert fastgrad.Step(net, np.float32).backend == "numba"
    assert fastgrad.resolve_backend("auto", host=True) == "numba"


def test_without_numba_auto_falls_back_to_numpy(monkeypatch):
    api._best_host.cache_clear()
    real = api._backend

    def no_numba(name):
        if name == "numba":
            raise ImportError("No module named 'numba'")
        return real(name)

    monkeypatch.setattr(api, "_backend", no_numba)
    try:
        net, theta, X, y = make_problem([5, 8, 3], B=10, dtype=np.float64)
        assert fastgrad.resolve_backend("auto", host=True) == "numpy"
        got = fastgrad.backprop(net, theta, X, y)
        np.testing.assert_array_equal(got.grad, fastgrad.backprop(net, theta, X, y, backend="numpy").grad)
        assert fastgrad.Step(net, np.float64).backend == "numpy"
    finally:
        api._best_host.cache_clear()


def test_gpu_arrays_send_auto_to_cuda():
    class FakeGPUArray:
        __cuda_array_interface__ = None

    assert api._auto("auto", np.zeros(2), FakeGPUArray()) == "cuda"
    assert api._auto("auto", np.zeros(2), None) == api._best_host()
    assert api._auto("numpy", FakeGPUArray()) == "numpy"


def _event(dtype, dp=False):
    import numba

    theta_type = types.SimpleNamespace(dtype=dtype)
    net_type = types.SimpleNamespace(types=(None, theta_type, None))
    noise_type = numba.types.UniTuple(numba.types.float32, 2) if dp else numba.types.none
    from fastgrad import cpu

    return types.SimpleNamespace(data={"dispatcher": cpu.fused_backprop, "args": (net_type, noise_type)})


def test_a_compile_says_one_line_per_dtype_and_variant(caplog, monkeypatch):
    from fastgrad import cpu

    monkeypatch.setattr(cpu.compile_notice, "told", set())
    with caplog.at_level(logging.WARNING, logger="fastgrad"):
        for dt, dp in (("float32", False), ("float32", False), ("float64", False), ("float32", True)):
            cpu.compile_notice.on_start(_event(dt, dp))
        cpu.compile_notice.on_start(_event("float32", True))
        cpu.compile_notice.on_start(types.SimpleNamespace(data={"dispatcher": object(), "args": ()}))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "fastgrad: compiling the numba kernels for float32 (once, ~20 s; cached on disk after)",
        "fastgrad: compiling the numba kernels for float64 (once, ~20 s; cached on disk after)",
        "fastgrad: compiling the numba kernels with DP noise for float32 (once, ~25 s; cached on disk after)",
    ] or all("not cached" in line for line in lines)


def test_the_notice_listens_to_numbas_compile_event():
    from numba.core import event

    from fastgrad import cpu

    assert cpu.compile_notice in event._registered["numba:compile"]


SCRIPT = """
import numpy as np, fastgrad
net = fastgrad.MLP([5, 8, 3])
theta = net.init(seed=0, dtype=np.float32)
fastgrad.backprop(net, theta, np.zeros((4, 5), np.float32), np.zeros(4, np.int64))
print("done")
"""


def test_a_cached_load_prints_nothing():
    fastgrad.backprop(*make_problem([5, 8, 3], B=4, dtype=np.float32), backend="numba")  # fills the cache
    from fastgrad import cpu

    if not cpu.CACHE:
        pytest.skip("the disk cache is off here")
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "done" in done.stdout
    assert "compiling" not in done.stderr

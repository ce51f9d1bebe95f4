"""benchmarks/ itself, on tiny problems: the asv suite (benchmarks/backprop.py, floors.py,
compile_time.py) and the timing primitives its scripts share (benchmarks/_timing.py). The
configurations and floors are tested in tests/tools/test_configs.py, the peer comparison
(fastgrad.tools.bench) in tests/tools/test_bench.py. Nothing here times anything that is
asserted on."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

import fastgrad
from fastgrad.tools import bench, configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import _problems, backprop, compile_time, floors  # noqa: E402

TINY = ((6, 5, 4, 3), 16)


@pytest.fixture
def tiny(monkeypatch):
    """A tiny configuration in the asv suite, and small floor timers (fastgrad.tools.bench's)."""
    monkeypatch.setitem(configs.CONFIGS, "tiny", TINY)
    monkeypatch.setitem(_problems.CONFIGS, "tiny", TINY)
    monkeypatch.setattr(bench, "SGEMM_SIZE", 64)
    monkeypatch.setattr(bench, "FILL_SHAPE", (8, 16, 16))
    floors.floor_timer.cache_clear()
    yield "tiny"
    floors.floor_timer.cache_clear()


# --------------------------------------------------------------- the asv suite


def test_asv_suite_lists_every_available_backend_but_naive():
    names = _problems.backend_names()
    assert set(fastgrad.available_backends()) - {"naive"} <= set(names)
    assert "naive" not in names and names[:3] == ["numpy", "numba", "cuda"]
    assert backprop.Grad.params == ([*configs.CONFIGS, *configs.SMALL_BATCH_CONFIGS], names)


ASV_CLASSES = [
    backprop.Grad,
    backprop.PerSample,
    backprop.GradNorms,
    backprop.Clipped,
    backprop.GradVariance,
    backprop.CompareShortcut,
]


@pytest.mark.parametrize("cls", ASV_CLASSES, ids=lambda c: c.__name__)
def test_asv_benchmarks_run_and_compute_their_quantity(tiny, cls):
    bm = cls()
    bm.setup(tiny, "numpy")
    methods = [m for m in dir(bm) if m.startswith(("time_", "peakmem_"))]
    assert len(methods) == 2
    for m in methods:
        getattr(bm, m)(tiny, "numpy")
    net, theta, X, y = _problems.problem(tiny)
    got = bm.call()
    if cls is backprop.PerSample:
        want = fastgrad.backprop(net, theta, X, y, ("per_sample",), backend="numpy").per_sample
        np.testing.assert_allclose(got.per_sample, want, rtol=1e-6, atol=1e-7)
    elif cls is backprop.Clipped:
        want = fastgrad.clipped_grad(net, theta, X, y, max_norm=1.0, backend="numpy")
        np.testing.assert_allclose(got, want, rtol=1e-6)
    elif cls is backprop.CompareShortcut:
        assert isinstance(got, fastgrad.ShortcutReport)
    else:
        np.testing.assert_allclose(
            got.grad, fastgrad.backprop(net, theta, X, y, backend="numpy").grad, rtol=1e-6
        )


@pytest.mark.parametrize(
    "backend", [b for b in _problems.KNOWN_BACKENDS if b not in fastgrad.available_backends()]
)
def test_asv_setup_skips_a_backend_that_cannot_run(tiny, backend):
    with pytest.raises(NotImplementedError, match=backend):
        backprop.Grad().setup(tiny, backend)


@pytest.mark.parametrize("quantity", list(floors.FLOOR_OF))
def test_asv_ratio_to_floor_is_a_positive_ratio(tiny, quantity):
    bm = floors.RatioToFloor()
    bm.setup(tiny, "numpy", quantity)
    ratio = bm.track_ratio_to_floor(tiny, "numpy", quantity)
    assert math.isfinite(ratio) and ratio > 0


def test_asv_first_call_seconds_runs_in_a_fresh_interpreter(tmp_path):
    seconds = compile_time.first_call_seconds("numpy", str(tmp_path))
    assert 0 < seconds < 60
    with pytest.raises(RuntimeError, match="first calls on 'fortran' failed"):
        compile_time.first_call_seconds("fortran", str(tmp_path))

"""benchmarks/ itself, on tiny problems: the asv suite (benchmarks/backprop.py, floors.py,
compile_time.py, step.py) and the timing primitives its scripts share (benchmarks/_timing.py). The
configurations and floors are tested in tests/tools/test_configs.py, the peer comparison
(fastgrad.tools.bench) in tests/tools/test_bench.py. Nothing here times anything that is
asserted on."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import fastgrad
from fastgrad.tools import bench, configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import _problems, _timing, backprop, compile_time, floors, step  # noqa: E402

ROOT_PATH = Path(ROOT)
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


def test_asv_prepared_step_runs_plain_and_dp(monkeypatch):
    """benchmarks/step.py on a tiny small-batch configuration: both calls run and compute their step."""
    monkeypatch.setitem(_problems.SMALL_BATCH_CONFIGS, "tiny-B16", TINY)
    _problems.problem.cache_clear()
    try:
        bench_step = step.PreparedStep()
        assert bench_step.params[0] == list(configs.SMALL_BATCH_CONFIGS)
        bench_step.setup("tiny-B16", "numba")
        bench_step.time_step("tiny-B16", "numba")
        bench_step.time_dp_step("tiny-B16", "numba")
        res = bench_step.plain()
        net, theta, X, y = _problems.problem("tiny-B16")
        ref = fastgrad.backprop(net, theta, X, y, ("loss", "grad"), backend="numpy")
        np.testing.assert_allclose(res.grad, ref.grad, rtol=1e-4, atol=1e-7)
        assert bench_step.dp().noise_std == 1.0
    finally:
        _problems.problem.cache_clear()


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


# ------------------------------------------------- benchmarks/_timing.py


class FakeClock:
    """A clock that each call of a fake method advances by that method's cost; logs the calls."""

    def __init__(self):
        self.now, self.log = 0, []

    def __call__(self):
        return self.now

    def method(self, name, costs):
        costs = iter(costs)

        def call():
            self.log.append(name)
            self.now += next(costs)

        return call


def test_timed_rounds_takes_turns_two_untimed_calls_then_one_timed(monkeypatch):
    monkeypatch.setattr(_timing.time, "sleep", lambda s: None)
    clock = FakeClock()
    # a: 2 warm-up, then per turn 2 untimed + 1 timed; the timed calls cost 1, 2, 3 s
    a = clock.method("a", [9, 9, *(9, 9, 1), *(9, 9, 2), *(9, 9, 3)])
    b = clock.method("b", [9, 9, *(9, 9, 4), *(9, 9, 4), *(9, 9, 1)])
    res = _timing.timed_rounds({"a": a, "b": b}, rounds=1, reps=3, clock=clock)
    assert clock.log == ["a", "a", "b", "b"] + (["a"] * 3 + ["b"] * 3) * 3
    med, best, calls = res["a"]
    assert (med, best) == (2000.0, 1000.0) and list(calls) == [1000.0, 2000.0, 3000.0]
    # the median of the paired ratios (1/4, 2/4, 3/1), not the ratio of the medians (2/4)
    assert _timing.median_ratio(res["a"][2], res["b"][2]) == 0.5
    assert _timing.median_ratio([1, 2, 30], [4, 4, 1]) == 0.5
    assert _timing.median([1, 2, 30]) / _timing.median([4, 4, 1]) == 0.5
    assert _timing.median_ratio([3, 1, 8], [1, 1, 1]) == 3.0


def test_paired_ratios_refuse_unpaired_samples():
    with pytest.raises(ValueError, match="3 and 2"):
        _timing.paired_ratios([1, 2, 3], [1, 2])


def test_turns_keeps_each_samplers_own_sample_in_order():
    log = []
    samplers = {"x": lambda: log.append("x") or len(log), "y": lambda: log.append("y") or [len(log)]}
    out = _timing.turns(samplers, 3)
    assert log == ["x", "y"] * 3
    assert out == {"x": [1, 3, 5], "y": [[2], [4], [6]]}


def test_timer_settles_then_times_a_block_per_call():
    clock = FakeClock()
    f = clock.method("f", [100, 1, 2, 3, 4])  # one untimed call, then a block of 4
    assert _timing.timer(f, clock=clock, settle=1, calls=4)() == 2.5
    assert _timing.timer(clock.method("g", [7]), clock=clock)() == 7  # one call: the bare difference


def test_warm_up_order_and_best_of_and_block_steps():
    clock = FakeClock()
    a, b = clock.method("a", [0] * 4), clock.method("b", [0] * 4)
    _timing.warm_up([a, b], rounds=2)
    _timing.warm_up([a, b], each=2)
    assert clock.log == ["a", "b", "a", "b", "a", "a", "b", "b"]
    assert _timing.best_of(clock.method("c", [5, 2, 9]), 3, clock=clock) == 2
    # 3 warm-up calls, then one of 0.01 s: a block of 0.05 s is 5 calls, within 1 ... most
    assert _timing.block_steps(clock.method("d", [1, 1, 1, 0.01]), 0.05, clock=clock) == 5
    assert _timing.block_steps(clock.method("e", [1, 1, 1, 0.0]), 0.05, most=200, clock=clock) == 200
    assert _timing.block_steps(clock.method("f", [1, 1, 1, 1.0]), 0.05, clock=clock) == 1


def test_timing_is_a_helper_asv_does_not_take_for_a_benchmark():
    prefixes = ("time_", "timeraw_", "mem_", "peakmem_", "track_")
    assert not [n for n in dir(_timing) if n.startswith(prefixes)]


def test_no_benchmark_script_puts_a_folder_on_sys_path():
    for path in (ROOT_PATH / "benchmarks").glob("*.py"):
        text = path.read_text()
        assert "sys.path.insert" not in text and "sys.path.append" not in text, path.name

"""``fastgrad.cuda.config.DIRECT_LAUNCH``: the launcher that skips Numba's dispatcher.

Its speed and its bit-identity with the dispatcher on a GPU are measured by
``benchmarks/gpu_check.py`` (the launchers' A/B); here, the plumbing: what it hands the
compiled overload, and that it is off by default and ignored by the simulator.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastgrad import MLP
from fastgrad import cuda as fc
from fastgrad._validation import check_inputs
from fastgrad.cuda import config
from fastgrad.cuda.rows import sum_partials_kernel


class _Recorder:
    def __init__(self):
        self.calls = []

    def launch(self, args, griddim, blockdim, stream, sharedmem):
        self.calls.append((args, griddim, blockdim, stream, sharedmem))


def test_direct_launch_is_off_by_default():
    assert config.DIRECT_LAUNCH is False


def test_direct_launch_hands_the_overload_normalised_dimensions(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(config, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(config, "SIMULATOR", False)
    monkeypatch.setattr(sum_partials_kernel, "resolved", lambda dtype: rec)
    monkeypatch.setattr(sum_partials_kernel, "_direct", {})
    # the compiled overload takes the default stream as numba-cuda's stream object, not an int 0
    # (an int raised TypeError on a real GPU); the simulator has no such object, so a stand-in here
    monkeypatch.setattr(config, "_default_stream", lambda: "default stream")
    config.LAUNCHES.clear()
    args = ("part", 0, 3, 4, np.float32(0.5), "out", 0)
    sum_partials_kernel.launch(np.dtype(np.float32), (5,), (32, 8), *args, shared=96)
    sum_partials_kernel.launch(np.dtype(np.float32), 7, 64, *args)
    assert rec.calls == [
        (args, (5, 1, 1), (32, 8, 1), "default stream", 96),
        (args, (7, 1, 1), (64, 1, 1), "default stream", 0),
    ]
    assert config.LAUNCHES["sum_partials_kernel"] == 2  # still counted
    assert list(sum_partials_kernel._direct) == [np.dtype(np.float32)]  # resolved once per dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_launch_is_ignored_by_the_simulator(monkeypatch, dtype):
    if not config.SIMULATOR:
        pytest.skip("on a GPU the launchers' A/B in benchmarks/gpu_check.py compares the two")
    rng = np.random.default_rng(3)
    net = MLP([4, 5, 3], activation="tanh", loss="cross_entropy")
    theta = (0.3 * rng.standard_normal(net.num_params)).astype(dtype)
    X = rng.standard_normal((6, 4)).astype(dtype)
    y = rng.integers(0, 3, 6)
    inp = check_inputs(net, theta, X, y)
    ref = fc.run(net, inp, frozenset({"grad", "loss"}), None)["grad"]
    monkeypatch.setattr(config, "DIRECT_LAUNCH", True)
    got = fc.run(net, inp, frozenset({"grad", "loss"}), None)["grad"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))

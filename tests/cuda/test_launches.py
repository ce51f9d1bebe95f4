"""Kernel launches per call: the model below is the host cost that issue 14 sets out to cut.

A Numba launch costs tens of µs of host time (64 µs with one array, 190 µs with 12 arrays
and 8 scalars on the H100 of docs/benchmarks.md), more than most kernels here run, so how
many launches a call makes matters as much as what each kernel does. Every launch goes
through ``Kernel.launch``, which counts it in ``fastgrad.cuda.config.LAUNCHES``; these tests
hold the count of every path and quantity to the model, so a change to it is deliberate
(update the model and docs/benchmarks.md's table together).

Model, for a net of L layers and S sums over samples (grad, sq_mean, the clipped sum):

- fused path: 1 fused kernel + S row sums + 1 norm finish when norms are needed;
- tiled path: L forward GEMMs + 1 output-delta kernel + (L - 1) backward GEMMs + S·L
  weight-gradient GEMMs (+ 1 row sum per layer whose batch is split, none here) + (L + 1)
  norm kernels when norms are needed + L per-sample writes.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastgrad import MLP
from fastgrad import cuda as fc
from fastgrad._validation import check_inputs
from fastgrad.cuda.config import LAUNCHES
from fastgrad.quantities import needs_norms, sums_to_make

SIZES = [5, 6, 6, 3]  # L = 3: fits the fused path, and runs the tiled one when asked
BATCH = 6  # small enough that no weight-gradient GEMM splits its batch under the simulator

CALLS = [
    (("grad",), None),
    (("grad", "norms"), None),
    (("grad", "sq_mean"), None),
    (("per_sample",), None),
    (("layer_norms",), None),
    (("grad", "sq_mean", "norms", "per_sample"), None),
    ((), 0.5),  # DP-SGD's clipped sum
]


def expected_launches(path: str, L: int, need: frozenset[str], max_norm) -> int:
    clip = max_norm is not None
    sums = len(sums_to_make(need, clip))
    norms = needs_norms(need, clip) or "layer_norms" in need
    if path == "fused":
        return 1 + sums + int(norms)
    return L + 1 + (L - 1) + sums * L + (L + 1) * int(norms) + L * int("per_sample" in need)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(7)
    net = MLP(SIZES, activation="tanh", loss="cross_entropy")
    theta = (0.3 * rng.standard_normal(net.num_params)).astype(np.float32)
    X = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH)
    return net, check_inputs(net, theta, X, y)


@pytest.mark.parametrize("path", ["fused", "tiled"])
@pytest.mark.parametrize(("names", "max_norm"), CALLS)
def test_launches_per_call_follow_the_model(problem, path, names, max_norm):
    net, inp = problem
    need = frozenset(names)
    LAUNCHES.clear()
    fc.run(net, inp, need, max_norm, None, path=path)
    got = sum(LAUNCHES.values())
    assert got == expected_launches(path, net.num_layers, need, max_norm), dict(LAUNCHES)


def test_every_launch_is_counted():
    """No launcher bypasses ``Kernel.launch`` (which counts): none indexes a compiled kernel itself."""
    import inspect

    from fastgrad.cuda import fused, gemm, rows

    for module in (fused, gemm, rows):
        source = inspect.getsource(module)
        assert ".compiled(" not in source, f"{module.__name__} launches a kernel without Kernel.launch"

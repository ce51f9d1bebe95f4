"""The numba backend over batches longer than one of its chunks (``fastgrad.cpu.chunk_rows``).

A batch longer than the scratch budget is run in chunks of whole tiles, their sums
accumulated in order. A last chunk shorter than the others has fewer tiles: summing the
per-tile partial sums of every tile slot added the previous chunk's stale tiles to grad,
sq_mean and the clipped sum (up to 98 % off; found by fastgrad.dask on 65536-row chunks).
"""

import numpy as np
import pytest

import fastgrad
from fastgrad import cpu


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sums_over_a_batch_longer_than_a_chunk_match_the_reference(dtype):
    net = fastgrad.MLP([5, 7, 3], activation="tanh", loss="cross_entropy")
    chunk = cpu.chunk_rows(net.sizes, dtype)
    B = 2 * chunk + chunk // 2  # three chunks: the last has fewer tiles than the others (asserted below)
    rng = np.random.default_rng(0)
    theta = net.init(seed=0, dtype=dtype)
    X = rng.standard_normal((B, 5)).astype(dtype)
    y = rng.integers(0, 3, B)
    want = ("grad", "sq_mean", "norms")
    first, tile = cpu._chunking(net.sizes, dtype, B)
    assert first % tile == 0 and 2 * first < B < 3 * first and -(-(B - 2 * first) // tile) < first // tile
    got = fastgrad.backprop(net, theta, X, y, want, backend="numba")
    ref = fastgrad.backprop(net, theta, X, y, want, backend="numpy")
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for name in want:
        a, b = getattr(got, name), getattr(ref, name)
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), name
    clipped = fastgrad.clipped_grad(net, theta, X, y, max_norm=0.5, backend="numba")
    clipped_ref = fastgrad.clipped_grad(net, theta, X, y, max_norm=0.5, backend="numpy")
    assert np.linalg.norm(clipped - clipped_ref) <= tol * np.linalg.norm(clipped_ref)

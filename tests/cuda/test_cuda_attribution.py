"""fastgrad.attribution on the CUDA backend against the naive (B, P) matrix.

Tiny sizes, and every activation with one loss, every loss with one activation (both dtypes):
the simulator runs each thread in Python (the full product took 190 s on the shared machine).
"""

from __future__ import annotations

import numpy as np
import pytest
from problems import make_problem, make_targets

import fastgrad
from fastgrad import reference

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _problem(activation, loss, dtype):
    net, theta, X, y = make_problem([3, 5, 4, 3], activation, loss, B=4, dtype=dtype, seed=6)
    rng = np.random.default_rng(7)
    X2 = rng.standard_normal((3, 3)).astype(dtype)
    return net, theta, X, y, X2, make_targets(net, 3, rng, dtype)


def _products_error(got, want, rows1, rows2):
    scale = np.linalg.norm(rows1, axis=1)[:, None] * np.linalg.norm(rows2, axis=1)[None, :]
    return (np.abs(got.astype(np.float64) - want) / scale).max()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
def test_cuda_gram_dot_and_ntk_match_the_definitions(activation, dtype):
    net, theta, X, y, X2, _ = _problem(activation, "cross_entropy", dtype)
    G1 = reference.per_sample_gradients(net, theta, X, y).astype(np.float64)
    gram = fastgrad.gram(net, theta, X, y, backend="cuda")
    assert gram.dtype == dtype and np.array_equal(gram, gram.T)
    assert _products_error(gram, G1 @ G1.T, G1, G1) <= TOL[dtype]
    v = np.random.default_rng(8).standard_normal(net.num_params).astype(dtype)
    dot = fastgrad.grad_dot(net, theta, X, y, v, backend="cuda")
    assert _products_error(dot[:, None], (G1 @ v)[:, None], G1, v[None, :].astype(np.float64)) <= TOL[dtype]
    want = fastgrad.ntk(net, theta, X, X2, backend="numpy")
    got = fastgrad.ntk(net, theta, X, X2, backend="cuda")
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("loss", fastgrad.LOSSES)
def test_cuda_cross_gram_per_layer_and_tracin_match_the_definitions(loss, dtype):
    net, theta, X, y, X2, y2 = _problem("tanh", loss, dtype)
    G1 = reference.per_sample_gradients(net, theta, X, y).astype(np.float64)
    G2 = reference.per_sample_gradients(net, theta, X2, y2).astype(np.float64)
    layers = fastgrad.gram(net, theta, X, y, X2, y2, per_layer=True, backend="cuda")
    assert layers.shape == (3, 4, 3) and layers.dtype == dtype
    for l, s in enumerate(net.layers):
        part1, part2 = G1[:, s.w_start : s.end], G2[:, s.w_start : s.end]
        assert _products_error(layers[l], part1 @ part2.T, G1, G2) <= TOL[dtype]
    tracin = fastgrad.tracin(net, [(theta, 0.5), (theta, 0.25)], X, y, backend="cuda")
    assert _products_error(tracin, 0.75 * G1 @ G1.T, G1, 0.75 * G1) <= 3 * TOL[dtype]

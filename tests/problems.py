"""Random problems shared by the tests: a network, θ, inputs and targets of the right kind."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import fastgrad


def make_targets(net: fastgrad.MLP, B: int, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
    """Targets of the kind ``net.loss`` expects (its registry entry): labels, or floats in its domain."""
    loss = fastgrad.losses.REGISTRY[net.loss]
    y = loss.random_targets(rng, B, net.n_out)
    return y if loss.labels else y.astype(dtype)


def make_problem(sizes, activation="tanh", loss="cross_entropy", B=8, dtype=np.float64, seed=0, scale=1.0):
    """(net, theta, X, y) with random non-zero biases, so no layer is trivially symmetric."""
    net = fastgrad.MLP(sizes, activation=activation, loss=loss)
    rng = np.random.default_rng(seed)
    theta = net.init(seed=seed, dtype=dtype)
    for _, b in net.unpack(theta):
        b[...] = 0.1 * rng.standard_normal(b.shape)
    X = (scale * rng.standard_normal((B, sizes[0]))).astype(dtype)
    return net, theta, X, make_targets(net, B, rng, dtype)


def overflowing_problem(dtype=np.float32, finite_rows=1):
    """(net, theta, X, y) whose last sample's forward pass is NaN: an identity hidden layer of two units
    turns x near the dtype's max into +inf and -inf (2·x and -2·x, one product each), and the output
    layer adds them: inf − inf. Each product overflows on its own, so the NaN does not depend on how a
    BLAS kernel orders or fuses (FMA) the terms of a dot product; the ``finite_rows`` samples before it
    are finite."""
    net = fastgrad.MLP([1, 2, 2], activation="identity", loss="cross_entropy")
    theta = np.zeros(net.num_params, dtype)
    (W1, _), (W2, _) = net.unpack(theta)
    W1[...] = [[2.0], [-2.0]]
    W2[...] = 1.0
    big = np.finfo(dtype).max / 2 * 1.5
    X = np.array([[1.0]] * finite_rows + [[big]], dtype)
    return net, theta, X, np.arange(finite_rows + 1) % 2


@contextmanager
def two_worker_client():
    """A Dask client on two worker processes with one thread each (and one Numba thread), which import
    this source tree's fastgrad. Needs ``distributed``: the Dask test modules skip without it."""
    import distributed

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {"NUMBA_NUM_THREADS": "1", "PYTHONPATH": path}
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", env=env
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c

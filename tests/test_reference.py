"""The NumPy references: finite differences confirm them; naive and batched agree."""

import itertools

import numpy as np
import pytest
from problems import make_problem

import fastgrad
from fastgrad import quantities, reference
from fastgrad._validation import check_inputs

ALL = frozenset(quantities.RAW) - {"clipped_sum"}  # what a backend returns for backprop
COMBOS = list(itertools.product(fastgrad.ACTIVATIONS, fastgrad.LOSSES))


def per_sample_losses(net, theta, X, y):
    inp = check_inputs(net, theta, X, y)
    Zs, _ = reference.forward(net, inp.theta, inp.X)
    return reference.loss_and_delta(net.loss, Zs[-1], inp.labels, inp.targets)[0]


def finite_difference_jacobian(net, theta, X, y, h=1e-6):
    """(B, P): central differences of every per-sample loss w.r.t. every parameter."""
    J = np.empty((len(X), net.num_params))
    for p in range(net.num_params):
        tp, tm = theta.copy(), theta.copy()
        tp[p] += h
        tm[p] -= h
        J[:, p] = (per_sample_losses(net, tp, X, y) - per_sample_losses(net, tm, X, y)) / (2 * h)
    return J


@pytest.mark.parametrize("activation,loss", COMBOS)
@pytest.mark.parametrize("sizes", [[3, 4, 2], [2, 3, 3, 3]])
def test_finite_differences_confirm_grad_and_per_sample_rows(activation, loss, sizes):
    net, theta, X, y = make_problem(sizes, activation, loss, B=4, seed=len(sizes))
    J = finite_difference_jacobian(net, theta, X, y)
    for backend in ("naive", "numpy"):
        res = fastgrad.backprop(net, theta, X, y, ("grad", "per_sample"), backend=backend)
        scale = np.abs(J).max()
        np.testing.assert_allclose(res.per_sample, J, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(res.grad, J.mean(axis=0), rtol=0, atol=1e-6 * scale)


def test_finite_differences_would_catch_a_wrong_derivative():
    # the check above is sensitive: a 1e-4 relative error in one parameter's derivative fails it
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "mse", B=4)
    J = finite_difference_jacobian(net, theta, X, y)
    G = fastgrad.backprop(net, theta, X, y, ("per_sample",), backend="naive").per_sample.copy()
    G[:, 5] *= 1 + 1e-4
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(G, J, rtol=0, atol=1e-6 * np.abs(J).max())


@pytest.mark.parametrize("activation,loss", COMBOS)
def test_naive_and_batched_agree_to_1e12_in_float64(activation, loss):
    net, theta, X, y = make_problem([5, 7, 6, 3], activation, loss, B=16, seed=3)
    inp = check_inputs(net, theta, X, y)
    naive = reference.run_naive(net, inp, ALL, max_norm=0.5)
    batched = reference.run_batched(net, inp, ALL, max_norm=0.5)
    for key in sorted(ALL | {"clipped_sum"}):
        a, b = np.asarray(naive[key]), np.asarray(batched[key])
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * np.abs(a).max(), err_msg=key)
    full = [fastgrad.backprop(net, theta, X, y, fastgrad.QUANTITIES, backend=b) for b in ("naive", "numpy")]
    for key in ("variance", "noise_scale"):
        a, b = np.asarray(getattr(full[0], key)), np.asarray(getattr(full[1], key))
        # variance is a difference of sq_mean and grad² in the batched form: absolute to their scale
        ref_scale = np.abs(full[0].sq_mean).max() if key == "variance" else abs(a)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * ref_scale, err_msg=key)


@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
@pytest.mark.parametrize("backend", ["naive", "numpy"])
def test_float32_agrees_with_float64(activation, backend):
    # float32 runs stay within 2e-5 relative (to each quantity's largest entry) of float64
    net, theta64, X, y = make_problem([6, 8, 5, 4], activation, "cross_entropy", B=12, seed=5)
    r64 = fastgrad.backprop(net, theta64, X, y, fastgrad.QUANTITIES, backend=backend)
    r32 = fastgrad.backprop(
        net, theta64.astype(np.float32), X.astype(np.float32), y, fastgrad.QUANTITIES, backend=backend
    )
    for key in fastgrad.QUANTITIES:
        a, b = np.asarray(getattr(r64, key)), np.asarray(getattr(r32, key))
        if key != "noise_scale" and key != "loss":
            assert b.dtype == np.float32, key
        tol = 2e-5 if key != "noise_scale" else 1e-3  # a ratio of differences: loses digits
        np.testing.assert_allclose(b, a, rtol=0, atol=tol * np.abs(a).max(), err_msg=key)
    c64 = fastgrad.clipped_grad(net, theta64, X, y, max_norm=0.3, backend=backend)
    c32 = fastgrad.clipped_grad(net, theta64.astype(np.float32), X, y, max_norm=0.3, backend=backend)
    assert c32.dtype == np.float32
    np.testing.assert_allclose(c32, c64, rtol=0, atol=2e-5 * np.abs(c64).max())

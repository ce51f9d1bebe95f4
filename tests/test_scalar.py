"""The scalar activation/loss code that the compiled targets share, against the NumPy reference."""

import numba
import numpy as np
import pytest

import fastgrad
from fastgrad import activations, losses, reference


@numba.njit(cache=False)
def _apply_activation(code, z, out_a, out_d):
    # z, out_a, out_d: (n,)
    for i in range(z.shape[0]):
        out_a[i] = activations.activate(code, z[i])
        out_d[i] = activations.activate_grad(code, z[i], out_a[i])


@numba.njit(cache=False)
def _apply_loss(code, Z, labels, targets, delta, loss):
    # Z, delta: (B, n); labels: (B,) or empty; targets: (B, n) or empty; loss: (B,)
    for i in range(Z.shape[0]):
        label = labels[i] if labels.shape[0] > 0 else 0
        target = targets[i] if targets.shape[0] > 0 else Z[i, :0]
        loss[i] = losses.output_delta_row(code, Z[i], target, label, delta[i])


Z_VALUES = np.concatenate([np.linspace(-6, 6, 49), [-1e4, -80.0, -1e-3, 0.0, 1e-3, 80.0, 1e4]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", fastgrad.ACTIVATIONS)
def test_compiled_activation_matches_reference(name, dtype):
    z = Z_VALUES.astype(dtype)
    a, d = np.empty_like(z), np.empty_like(z)
    _apply_activation(activations.activation_code(name), z, a, d)
    tol = 1e-14 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(a, reference.phi(name, z), rtol=tol, atol=tol)
    np.testing.assert_allclose(d, reference.phi_prime(name, z), rtol=tol, atol=tol)
    assert np.isfinite(a).all() and np.isfinite(d).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", fastgrad.LOSSES)
def test_compiled_loss_matches_reference(name, dtype):
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((6, 4)).astype(dtype)
    Z[0] = [1e4, -1e4, 0, 5]
    Z[1] = [-1e4, -1e4, -1e4, -1e4]
    entry = losses.REGISTRY[name]
    y = entry.random_targets(rng, 6, 4)  # labels, or real targets in the loss's domain
    labels = y if entry.labels else np.zeros(0, np.int64)
    targets = np.zeros((0, 4), dtype) if entry.labels else y.astype(dtype)
    delta, loss = np.empty_like(Z), np.empty(6, dtype)
    _apply_loss(losses.loss_code(name), Z, labels, targets, delta, loss)
    ref_loss, ref_delta = reference.loss_and_delta(name, Z, labels, targets)
    tol = 1e-13 if dtype == np.float64 else 3e-6
    np.testing.assert_allclose(loss, ref_loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(delta, ref_delta, rtol=tol, atol=tol)


def test_like_keeps_float32_code_in_float32():
    from fastgrad._scalar import like

    @numba.njit(cache=False)
    def one_minus_square(t):
        return like(t, 1.0) - t * t

    one_minus_square(np.float32(0.5))
    (sig,) = one_minus_square.signatures
    assert one_minus_square.overloads[sig].signature.return_type == numba.float32


def test_every_activation_and_pointwise_loss_branch_keeps_float32_in_float32():
    # the code is a run-time argument, so Numba unifies the return types of all branches: one branch
    # that computed in float64 (a bare 1.0 - a * a) would make the whole function return float64
    @numba.njit(cache=False)
    def branches(code, z):
        a = activations.activate(code, z)
        return a, activations.activate_grad(code, z, a), losses.pointwise_loss(code, z, z)

    branches(0, np.float32(0.5))
    (sig,) = branches.signatures
    assert branches.overloads[sig].signature.return_type == numba.types.UniTuple(numba.float32, 3)

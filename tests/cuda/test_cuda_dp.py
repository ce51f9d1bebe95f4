"""clipped_grad's DP options on the CUDA backend: host arrays get them all, device arrays the defaults."""

from __future__ import annotations

import numpy as np
import pytest
from problems import make_problem

import fastgrad
from fastgrad import cuda as fc
from fastgrad import privacy

cuda = fc.cuda


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_arrays_get_the_stats_and_the_denominator(dtype):
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "cross_entropy", B=5, dtype=dtype, seed=9)
    kw = dict(noise_multiplier=0.8, seed=2, expected_batch_size=7.5, return_stats=True)
    got = fastgrad.clipped_grad(net, theta, X, y, 0.4, backend="cuda", **kw)
    want = fastgrad.clipped_grad(net, theta, X, y, 0.4, backend="numpy", **kw)
    rtol = 1e-12 if dtype == np.float64 else 3e-5
    np.testing.assert_allclose(got.grad, want.grad, rtol=rtol, atol=rtol * np.abs(want.grad).max())
    np.testing.assert_allclose(got.norms, want.norms, rtol=rtol)
    assert got.clip_fraction == want.clip_fraction and 0 < got.clip_fraction < 1
    assert (got.noise_std, got.denominator) == (want.noise_std, 7.5)


@pytest.mark.skipif(fc.SIMULATOR, reason="the simulator's arrays do not reach api.py's device path")
@pytest.mark.parametrize(
    "kwargs", [dict(expected_batch_size=8), dict(secure_noise=True), dict(return_stats=True)]
)
def test_device_arrays_refuse_the_options_they_do_not_have(kwargs):
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "cross_entropy", B=5, seed=9)
    args = (cuda.to_device(theta), cuda.to_device(X), cuda.to_device(y.astype(np.int64)))
    with pytest.raises(NotImplementedError, match="GPU arrays"):
        fastgrad.clipped_grad(net, *args, 0.4, 0.5, backend="cuda", **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_device_step_has_the_host_steps_bits(dtype):
    rng = np.random.default_rng(3)
    P, B = 64, 7
    total = (rng.standard_normal(P) * 3).astype(dtype)
    norms = rng.uniform(0, 2, B).astype(dtype)
    C, sigma = 0.7, 1.3
    host = privacy.dp_step(total, norms, C, sigma, B, seed=8)
    device = privacy.dp_step(cuda.to_device(total), cuda.to_device(norms), C, sigma, B, seed=8)
    np.testing.assert_array_equal(device.copy_to_host(), host)
    dt = np.dtype(dtype)  # the product with 1/B that the device used to form rounds differently
    old = (total + dt.type(sigma * C) * privacy.standard_normal(P, dtype, 8)) * dt.type(1 / B)
    assert not np.array_equal(old, host)
    norms[3] = np.nan
    with pytest.raises(FloatingPointError, match="sample 3"):
        privacy.dp_step(cuda.to_device(total), cuda.to_device(norms), C, sigma, B, seed=8)

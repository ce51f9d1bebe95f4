"""Public API: the network spec, consistency between quantities, DP-SGD clipping, bad input."""

import numpy as np
import pytest
from problems import make_problem

import fastgrad

# ------------------------------------------------------------------ the network


def test_layout_sizes_and_views():
    net = fastgrad.MLP([4, 8, 3], activation="relu", loss="mse")
    assert net.num_layers == 2
    assert net.num_params == 4 * 8 + 8 + 8 * 3 + 3
    theta = net.init(seed=1, dtype=np.float64)
    (W1, b1), (W2, b2) = net.unpack(theta)
    assert W1.shape == (8, 4) and b1.shape == (8,) and W2.shape == (3, 8) and b2.shape == (3,)
    W2[0, 1] = 42.0  # views: writing W writes θ, in row-major order after W1 and b1
    assert theta[4 * 8 + 8 + 1] == 42.0
    np.testing.assert_array_equal(net.pack(net.unpack(theta)), theta)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_he_for_relu_family_glorot_otherwise_zero_biases(dtype):
    for act, expected in [("relu", lambda i, o: np.sqrt(2 / i)), ("tanh", lambda i, o: np.sqrt(2 / (i + o)))]:
        net = fastgrad.MLP([400, 300, 200], activation=act, loss="mse")
        theta = net.init(seed=0, dtype=dtype)
        assert theta.dtype == dtype
        for (W, b), s in zip(net.unpack(theta), net.layers):
            assert np.all(b == 0)
            assert W.std() == pytest.approx(expected(s.n_in, s.n_out), rel=0.03)
    np.testing.assert_array_equal(net.init(seed=3), net.init(seed=3))
    assert not np.array_equal(net.init(seed=3), net.init(seed=4))


@pytest.mark.parametrize(
    "sizes,exc,match",
    [
        ([4], ValueError, "sizes"),
        ([4, 0, 2], ValueError, "sizes"),
        ([4, 2.5], TypeError, "sizes"),
        ("44", TypeError, "sizes"),
        ([4, True], TypeError, "sizes"),
    ],
)
def test_bad_sizes(sizes, exc, match):
    with pytest.raises(exc, match=match):
        fastgrad.MLP(sizes)


def test_unknown_activation_and_loss_list_the_valid_names():
    with pytest.raises(
        ValueError, match="activation.*identity.*relu.*leaky_relu.*tanh.*sigmoid.*gelu.*softplus"
    ):
        fastgrad.MLP([2, 2], activation="swish")
    with pytest.raises(ValueError, match="loss.*mse.*cross_entropy.*binary_cross_entropy.*linear"):
        fastgrad.MLP([2, 2], loss="hinge")
    with pytest.raises(TypeError, match="dtype"):
        fastgrad.MLP([2, 2]).init(dtype=np.float16)


# ------------------------------------------------------------- consistency


@pytest.mark.parametrize("backend", ["naive", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norms_layer_norms_and_variance_are_consistent(backend, dtype):
    net, theta, X, y = make_problem([6, 9, 7, 4], "gelu", "cross_entropy", B=20, dtype=dtype, seed=2)
    r = fastgrad.backprop(net, theta, X, y, fastgrad.QUANTITIES, backend=backend)
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(r.norms, np.linalg.norm(r.per_sample, axis=1), rtol=rtol)
    np.testing.assert_allclose(np.linalg.norm(r.layer_norms, axis=1), r.norms, rtol=rtol)
    for l, s in enumerate(net.layers):
        np.testing.assert_allclose(
            r.layer_norms[:, l], np.linalg.norm(r.per_sample[:, s.w_start : s.end], axis=1), rtol=rtol
        )
    np.testing.assert_allclose(r.grad, r.per_sample.mean(axis=0), rtol=0, atol=rtol * np.abs(r.grad).max())
    assert np.all(r.variance >= 0)
    np.testing.assert_allclose(r.variance, r.per_sample.var(axis=0), rtol=0, atol=10 * rtol * r.sq_mean.max())
    trace = r.per_sample.astype(np.float64).var(axis=0).sum()
    assert r.noise_scale == pytest.approx(
        trace / (r.grad.astype(np.float64) ** 2).sum(), rel=1e-9 if dtype == np.float64 else 1e-3
    )
    for name in fastgrad.QUANTITIES:
        if name not in ("loss", "noise_scale"):
            assert getattr(r, name).dtype == dtype, name


def test_quantities_not_requested_are_none_and_loss_is_the_mean_loss():
    net, theta, X, y = make_problem([3, 4, 2], "tanh", "mse", B=5)
    r = fastgrad.backprop(net, theta, X, y, ("norms",))
    assert r.grad is None and r.per_sample is None and r.variance is None and r.noise_scale is None
    assert r.norms.shape == (5,)
    out = X @ net.unpack(theta)[0][0].T + net.unpack(theta)[0][1]
    Z = np.tanh(out) @ net.unpack(theta)[1][0].T + net.unpack(theta)[1][1]
    assert r.loss == pytest.approx(0.5 * ((Z - y) ** 2).sum(axis=1).mean(), rel=1e-12)
    assert "norms=" in repr(r) and "grad" not in repr(r)


@pytest.mark.parametrize("backend", ["naive", "numpy"])
def test_clipped_grad_with_enormous_max_norm_and_no_noise_is_grad(backend):
    net, theta, X, y = make_problem([5, 6, 3], "softplus", "binary_cross_entropy", B=10, seed=3)
    grad = fastgrad.backprop(net, theta, X, y, backend=backend).grad
    np.testing.assert_allclose(
        fastgrad.clipped_grad(net, theta, X, y, max_norm=1e30, backend=backend), grad, rtol=1e-13
    )


@pytest.mark.parametrize("backend", ["naive", "numpy"])
def test_clipped_grad_clips_each_sample_to_max_norm(backend):
    net, theta, X, y = make_problem([5, 6, 3], "tanh", "cross_entropy", B=16, seed=4)
    G = fastgrad.backprop(net, theta, X, y, ("per_sample",), backend="naive").per_sample
    C = float(np.median(np.linalg.norm(G, axis=1)))  # half the samples are clipped
    c = np.minimum(1, C / np.linalg.norm(G, axis=1))
    expected = (c[:, None] * G).mean(axis=0)
    np.testing.assert_allclose(
        fastgrad.clipped_grad(net, theta, X, y, C, backend=backend), expected, rtol=1e-12, atol=1e-15
    )


def test_clipped_grad_noise_is_reproducible_and_has_the_stated_scale():
    net, theta, X, y = make_problem([20, 30, 10], "relu", "mse", B=8, seed=5)
    C, sigma, B = 0.7, 1.3, len(X)
    clean = fastgrad.clipped_grad(net, theta, X, y, C)
    a = fastgrad.clipped_grad(net, theta, X, y, C, noise_multiplier=sigma, seed=11)
    b = fastgrad.clipped_grad(net, theta, X, y, C, noise_multiplier=sigma, seed=11, backend="naive")
    c = fastgrad.clipped_grad(net, theta, X, y, C, noise_multiplier=sigma, seed=12)
    np.testing.assert_allclose(a, b, rtol=1e-12)  # same seed, same noise, on every backend
    assert not np.allclose(a, c)
    noise = (a - clean) * B / (sigma * C)  # should be ξ ~ N(0, I), P = 940 draws
    assert noise.size == net.num_params
    assert abs(noise.mean()) < 4 / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(1.0, abs=0.1)
    np.testing.assert_allclose(
        noise, fastgrad.privacy.standard_normal(net.num_params, np.float64, 11), rtol=1e-9
    )


def test_out_receives_per_sample_rows(tmp_path):
    net, theta, X, y = make_problem([4, 5, 3], "tanh", "cross_entropy", B=6, seed=6)
    mm = np.lib.format.open_memmap(
        tmp_path / "g.npy", mode="w+", dtype=theta.dtype, shape=(6, net.num_params)
    )
    r = fastgrad.backprop(net, theta, X, y, ("per_sample", "grad"), out=mm)
    assert r.per_sample is mm
    np.testing.assert_allclose(
        np.load(tmp_path / "g.npy"),
        fastgrad.backprop(net, theta, X, y, ("per_sample",), backend="naive").per_sample,
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="out"):
        fastgrad.backprop(net, theta, X, y, ("per_sample",), out=np.empty((6, 3)))
    with pytest.raises(ValueError, match="out.*per_sample"):
        fastgrad.backprop(net, theta, X, y, ("grad",), out=np.empty((6, net.num_params)))


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("loss", fastgrad.LOSSES)
@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_overflow_or_nan_at_huge_logits(loss, activation, dtype):
    # inputs of size 1e4 drive pre-activations and logits to |z| ~ 1e4
    net, theta, X, y = make_problem([3, 4, 3], activation, loss, B=6, dtype=dtype, seed=9, scale=1e4)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        r = fastgrad.backprop(net, theta, X, y, ("grad", "norms", "sq_mean"))
    assert np.isfinite(r.loss) and np.isfinite(r.grad).all() and np.isfinite(r.norms).all()


def test_stable_losses_match_their_closed_forms_far_out():
    from fastgrad.reference import loss_and_delta

    Z = np.array([[1e4, 0.0, -1e4]])
    losses, delta = loss_and_delta("cross_entropy", Z, np.array([1]), None)
    assert losses[0] == pytest.approx(1e4) and delta[0].tolist() == [1.0, -1.0, 0.0]
    losses, delta = loss_and_delta("binary_cross_entropy", Z, None, np.array([[0.0, 1.0, 1.0]]))
    assert losses[0] == pytest.approx(1e4 + np.log(2) + 1e4) and delta[0].tolist() == [1.0, -0.5, -1.0]


# --------------------------------------------------------------- bad input

GOOD = make_problem([3, 4, 2], "tanh", "cross_entropy", B=5)


def _call(net=None, theta=None, X=None, y=None, **kw):
    n, t, x, yy = GOOD
    return fastgrad.backprop(
        net or n, t if theta is None else theta, x if X is None else X, yy if y is None else y, **kw
    )


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(X=np.ones((5, 4))), ValueError, "X.*3 columns"),
        (dict(X=np.ones(5)), ValueError, "X.*2-D"),
        (dict(X=np.ones((0, 3)), y=np.zeros(0, int)), ValueError, "X.*empty"),
        (dict(X=np.array([[np.nan, 0, 0]] * 5)), ValueError, "X.*NaN"),
        (dict(X=np.array([[np.inf, 0, 0]] * 5)), ValueError, "X.*Inf"),
        (dict(X=np.array([["a", "b", "c"]] * 5)), TypeError, "X.*numeric"),
        (dict(y=np.zeros(4, int)), ValueError, "y.*shape"),
        (dict(y=np.zeros(5)), TypeError, "y.*integer"),
        (dict(y=np.array([0, 1, 2, 0, 1])), ValueError, r"y.*\[0, 2\)"),
        (dict(y=np.array([0, -1, 1, 0, 1])), ValueError, "y.*labels"),
        (dict(theta=np.zeros(3)), ValueError, "theta.*shape"),
        (dict(theta=np.full(GOOD[0].num_params, np.nan)), ValueError, "theta.*NaN"),
        (dict(theta=np.zeros(GOOD[0].num_params, dtype=np.int64)), TypeError, "theta.*float32 or float64"),
        (dict(theta=[0.0] * GOOD[0].num_params), TypeError, "theta.*NumPy"),
        (dict(backend="torch"), ValueError, "backend.*naive.*numpy"),
        (dict(compute=("grad", "hessian")), ValueError, "compute.*hessian.*per_sample"),
        (dict(compute=()), ValueError, "compute"),
        (dict(net="mlp"), TypeError, "net"),
    ],
)
def test_bad_input_gets_a_clear_error_naming_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kwargs)


@pytest.mark.parametrize(
    "loss,y,exc,match",
    [
        ("mse", np.zeros((5, 3)), ValueError, r"y.*\(5, 2\)"),
        ("mse", np.full((5, 2), np.nan), ValueError, "y.*NaN"),
        ("binary_cross_entropy", np.full((5, 2), 2.0), ValueError, r"y.*\[0, 1\]"),
        ("linear", np.zeros(5), ValueError, "y.*shape"),
    ],
)
def test_bad_targets_for_float_losses(loss, y, exc, match):
    net = fastgrad.MLP([3, 4, 2], loss=loss)
    with pytest.raises(exc, match=match):
        fastgrad.backprop(net, net.init(), np.ones((5, 3)), y)


def test_one_output_accepts_flat_targets():
    net = fastgrad.MLP([3, 4, 1], loss="mse")
    theta = net.init(dtype=np.float64)
    a = fastgrad.backprop(net, theta, np.ones((5, 3)), np.arange(5.0)).grad
    b = fastgrad.backprop(net, theta, np.ones((5, 3)), np.arange(5.0)[:, None]).grad
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(max_norm=0.0), ValueError, "max_norm"),
        (dict(max_norm=-1.0), ValueError, "max_norm"),
        (dict(max_norm=np.inf), ValueError, "max_norm"),
        (dict(max_norm="1"), TypeError, "max_norm"),
        (dict(max_norm=1.0, noise_multiplier=-0.5), ValueError, "noise_multiplier"),
        (dict(max_norm=1.0, backend="gpu"), ValueError, "backend.*numpy"),
    ],
)
def test_clipped_grad_bad_arguments(kwargs, exc, match):
    net, theta, X, y = GOOD
    with pytest.raises(exc, match=match):
        fastgrad.clipped_grad(net, theta, X, y, **kwargs)

"""docs/design.md §4: the shortcuts, the covariance decomposition, where they are exact and where not."""

import numpy as np
import pytest
from problems import make_problem

import fastgrad
from fastgrad import reference
from fastgrad._validation import check_inputs


@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
@pytest.mark.parametrize("loss", fastgrad.LOSSES)
def test_true_gradient_is_mean_outer_product_plus_covariance_at_every_layer(activation, loss):
    net, theta, X, y = make_problem([5, 7, 6, 3], activation, loss, B=32, seed=1)
    inp = check_inputs(net, theta, X, y)
    Zs, A = reference.forward(net, theta, inp.X)
    _, deltas = reference.backward(net, theta, Zs, inp.labels, inp.targets)
    grad = fastgrad.backprop(net, theta, X, y).grad
    covs = fastgrad.covariance_terms(net, theta, X, y)
    for (gW, _), D, Ain, cov in zip(net.unpack(grad), deltas, A, covs):
        decomposed = np.outer(D.mean(axis=0), Ain.mean(axis=0)) + cov
        np.testing.assert_allclose(decomposed, gW, rtol=0, atol=1e-13 * np.abs(gW).max())


def test_mean_error_misses_exactly_the_covariance_at_the_output_layer():
    net, theta, X, y = make_problem([5, 7, 6, 3], "tanh", "mse", B=64, seed=2)
    true = fastgrad.backprop(net, theta, X, y).grad
    short = fastgrad.shortcut_grad(net, theta, X, y, "mean_error")
    cov_out = fastgrad.covariance_terms(net, theta, X, y)[-1]
    (tW, tb), (sW, sb) = net.unpack(true)[-1], net.unpack(short)[-1]
    np.testing.assert_allclose(tW - sW, cov_out, rtol=0, atol=1e-13)
    np.testing.assert_allclose(sb, tb, rtol=0, atol=1e-14)  # the bias gradient is δ̄ either way


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("method", fastgrad.METHODS)
def test_shortcuts_are_exact_for_identity_network_with_linear_loss(depth, method):
    sizes = [4] + [5] * (depth - 1) + [3]
    net, theta, X, y = make_problem(sizes, "identity", "linear", B=37, seed=depth)
    true = fastgrad.backprop(net, theta, X, y).grad
    short = fastgrad.shortcut_grad(net, theta, X, y, method)
    np.testing.assert_allclose(short, true, rtol=0, atol=1e-12 * np.abs(true).max())


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "sigmoid"])
@pytest.mark.parametrize("loss", fastgrad.LOSSES)
@pytest.mark.parametrize("method", fastgrad.METHODS)
def test_shortcuts_are_exact_for_one_sample_and_for_identical_samples(activation, loss, method):
    net, theta, X, y = make_problem([4, 6, 5, 3], activation, loss, B=1, seed=4)
    true = fastgrad.backprop(net, theta, X, y).grad
    short = fastgrad.shortcut_grad(net, theta, X, y, method)
    np.testing.assert_allclose(short, true, rtol=0, atol=1e-12 * np.abs(true).max())
    X9, y9 = np.repeat(X, 9, axis=0), np.repeat(y, 9, axis=0)
    short9 = fastgrad.shortcut_grad(net, theta, X9, y9, method)
    np.testing.assert_allclose(short9, true, rtol=0, atol=1e-12 * np.abs(true).max())


@pytest.mark.parametrize("method", fastgrad.METHODS)
@pytest.mark.parametrize("seed", range(3))
def test_shortcuts_are_clearly_wrong_for_tanh_with_mse(method, seed):
    net, theta, X, y = make_problem([5, 7, 6, 3], "tanh", "mse", B=64, seed=seed)
    report = fastgrad.compare_shortcut(net, theta, X, y)
    assert report.row(method).rel_error > 1e-2
    assert report.row(method).rel_error > 0.1  # in fact far off, as docs/design.md §4 records


def test_compare_shortcut_report_numbers_and_table():
    net, theta, X, y = make_problem([5, 7, 6, 3], "tanh", "linear", B=64, seed=7)
    report = fastgrad.compare_shortcut(net, theta, X, y)
    true = fastgrad.backprop(net, theta, X, y).grad
    short = fastgrad.shortcut_grad(net, theta, X, y, "mean_input")
    total = report.row("mean_input")
    assert total.rel_error == pytest.approx(np.linalg.norm(short - true) / np.linalg.norm(true), rel=1e-12)
    assert total.norm_ratio == pytest.approx(np.linalg.norm(short) / np.linalg.norm(true), rel=1e-12)
    assert total.cosine == pytest.approx(
        short @ true / np.linalg.norm(short) / np.linalg.norm(true), rel=1e-12
    )
    covs = fastgrad.covariance_terms(net, theta, X, y)
    assert report.row("mean_error", 2).cov_norm == pytest.approx(np.linalg.norm(covs[1]), rel=1e-12)
    # the linear loss has a constant output error: its covariance at the output layer vanishes
    assert report.row("mean_error", 3).cov_norm < 1e-12
    assert report.row("mean_error", 3).rel_error < 1e-12
    text = str(report)
    assert "mean_error" in text and "mean_input" in text and "total" in text
    assert len(text.splitlines()) == 3 + 2 * (net.num_layers + 1)


def test_mean_input_uses_soft_labels_for_cross_entropy():
    net, theta, X, y = make_problem([4, 5, 3], "tanh", "cross_entropy", B=6, seed=8)
    short = fastgrad.shortcut_grad(net, theta, X, y, "mean_input")
    # the same as mse-free hand computation: softmax(z(x̄)) − mean one-hot, backpropagated
    x_bar = X.mean(axis=0)
    (W1, b1), (W2, b2) = net.unpack(theta)
    h = np.tanh(W1 @ x_bar + b1)
    z = W2 @ h + b2
    p = np.exp(z - z.max())
    p /= p.sum()
    delta = p - np.eye(3)[y].mean(axis=0)
    (gW1, _), (gW2, _) = net.unpack(short)
    np.testing.assert_allclose(gW2, np.outer(delta, h), atol=1e-14)
    d1 = (W2.T @ delta) * (1 - h * h)
    np.testing.assert_allclose(gW1, np.outer(d1, x_bar), atol=1e-14)


def test_unknown_method_lists_the_valid_ones():
    net, theta, X, y = make_problem([3, 2], "tanh", "mse", B=2)
    with pytest.raises(ValueError, match="method.*mean_error.*mean_input"):
        fastgrad.shortcut_grad(net, theta, X, y, method="average")
    with pytest.raises(ValueError, match="method"):
        fastgrad.compare_shortcut(net, theta, X, y, methods=("mean_error", "bogus"))

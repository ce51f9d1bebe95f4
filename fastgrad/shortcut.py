"""The "average first, backpropagate once" shortcuts, and how far they are from the truth.

docs/design.md §4. ``mean_input`` backpropagates the loss at one averaged sample (x̄, ȳ);
``mean_error`` forwards the batch, averages the output error and backpropagates
that single vector with batch-mean activations and derivatives. At every layer
the true weight gradient is δ̄ āᵀ + Cov(δ, a); the shortcuts drop the covariance
and, below the output layer, also get δ̄ wrong because mean(φ'(z) ⊙ ·) ≠ φ'·mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import reference
from ._validation import Inputs, check_inputs
from .losses import CROSS_ENTROPY
from .mlp import MLP

METHODS: tuple[str, ...] = ("mean_error", "mean_input")
"""Valid shortcut names."""


def _check_method(method) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: unknown name {method!r}; expected one of {', '.join(METHODS)}")
    return method


def _mean_targets(net: MLP, inp: Inputs) -> np.ndarray:
    """ȳ: the mean target row; for cross-entropy the mean of the one-hot rows."""
    if net.loss_code == CROSS_ENTROPY:
        onehot = np.zeros((inp.batch_size, net.n_out), dtype=inp.dtype)
        onehot[np.arange(inp.batch_size), inp.labels] = 1
        return onehot.mean(axis=0)
    return inp.targets.mean(axis=0)


def _mean_input_grad(net: MLP, inp: Inputs) -> np.ndarray:
    return _grad_at_mean(net, inp.theta, inp.X.mean(axis=0), _mean_targets(net, inp))


def _grad_at_mean(net: MLP, theta, x_bar: np.ndarray, y_bar: np.ndarray) -> np.ndarray:
    """The gradient of ℓ at the one sample (x̄ (n0,), ȳ (n_L,)); ȳ a soft label for cross-entropy."""
    x_bar, y_bar = x_bar[None, :], y_bar[None, :]
    Zs, A = reference.forward(net, theta, x_bar)
    if net.loss_code == CROSS_ENTROPY:
        # soft-label cross-entropy: dℓ/dz = softmax(z) − ȳ
        z = Zs[-1]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        delta = e / e.sum(axis=1, keepdims=True) - y_bar
    else:
        delta = reference.loss_and_delta(net.loss, Zs[-1], None, y_bar)[1]
    return _backprop_one(
        net,
        theta,
        delta[0],
        [a[0] for a in A],
        [reference.phi_prime(net.activation, z[0]) for z in Zs[:-1]],
    )


def _mean_error_grad(net: MLP, inp: Inputs) -> np.ndarray:
    Zs, A = reference.forward(net, inp.theta, inp.X)
    delta = reference.loss_and_delta(net.loss, Zs[-1], inp.labels, inp.targets)[1]
    return _backprop_one(
        net,
        inp.theta,
        delta.mean(axis=0),
        [a.mean(axis=0) for a in A],
        [reference.phi_prime(net.activation, z).mean(axis=0) for z in Zs[:-1]],
    )


def _backprop_one(net: MLP, theta, delta, acts, derivs) -> np.ndarray:
    """Backpropagate one output error ``delta`` with one activation vector and one φ' vector per layer."""
    grad = np.empty_like(theta)
    params = net.unpack(theta)
    for l, (gW, gb) in reversed(list(enumerate(net.unpack(grad)))):
        gW[...] = np.outer(delta, acts[l])
        gb[...] = delta
        if l > 0:
            delta = (params[l][0].T @ delta) * derivs[l - 1]
    return grad


def shortcut_grad(net: MLP, theta, X, y, method: str = "mean_error") -> np.ndarray:
    """The gradient a shortcut would use instead of the true mean gradient.

    Parameters
    ----------
    net, theta, X, y
        As for :func:`fastgrad.backprop`.
    method : {"mean_error", "mean_input"}
        ``mean_error``: average the output error δ_L over the batch and backpropagate
        it with batch-mean activations and activation derivatives.
        ``mean_input``: the gradient of ℓ at the averaged sample (x̄, ȳ); for
        cross-entropy ȳ is the mean one-hot row (a soft label).

    Returns
    -------
    ndarray (P,) in θ's dtype
    """
    method = _check_method(method)
    inp = check_inputs(net, theta, X, y)
    return _mean_error_grad(net, inp) if method == "mean_error" else _mean_input_grad(net, inp)


def covariance_terms(net: MLP, theta, X, y) -> list[np.ndarray]:
    """Cov(δ_l, a_{l-1}) = (1/B) Σ (δ_i − δ̄)(a_i − ā)ᵀ per layer, shape (n_l, n_{l-1}).

    The true weight gradient of layer l is exactly δ̄_l ā_{l-1}ᵀ + Cov(δ_l, a_{l-1}).
    """
    inp = check_inputs(net, theta, X, y)
    Zs, A = reference.forward(net, inp.theta, inp.X)
    _, deltas = reference.backward(net, inp.theta, Zs, inp.labels, inp.targets)
    B = inp.batch_size
    return [
        (D - D.mean(axis=0)).T @ (Ain - Ain.mean(axis=0)) / inp.dtype.type(B) for D, Ain in zip(deltas, A)
    ]


@dataclass(frozen=True)
class ShortcutRow:
    """One line of a :class:`ShortcutReport`; ``layer`` is 1..L or ``"total"``."""

    method: str
    layer: int | str
    rel_error: float  # ‖g_s − g‖ / ‖g‖
    cosine: float  # g_s · g / (‖g_s‖ ‖g‖)
    norm_ratio: float  # ‖g_s‖ / ‖g‖
    cov_norm: float  # ‖Cov(δ_l, a_{l-1})‖_F, the term the shortcut drops
    grad_norm: float  # ‖g‖ of the true gradient


@dataclass(frozen=True)
class ShortcutReport:
    """How far each shortcut is from the true gradient, per layer and in total.

    Prints as a table; ``rows`` holds the numbers, ``row(method, layer)`` finds one.
    """

    rows: tuple[ShortcutRow, ...]
    batch_size: int
    sizes: tuple[int, ...]
    activation: str
    loss: str

    def row(self, method: str, layer: int | str = "total") -> ShortcutRow:
        for r in self.rows:
            if r.method == method and r.layer == layer:
                return r
        raise KeyError((method, layer))

    def __str__(self) -> str:
        head = (
            f"shortcut vs true gradient: sizes {list(self.sizes)}, {self.activation}, "
            f"{self.loss}, B = {self.batch_size}"
        )
        cols = (
            f"{'method':<11} {'layer':>5} {'rel.error':>10} {'cosine':>8} "
            f"{'norm ratio':>10} {'‖Cov‖':>10} {'‖g‖':>10}"
        )
        lines = [head, cols, "-" * len(cols)]
        for r in self.rows:
            lines.append(
                f"{r.method:<11} {r.layer!s:>5} {r.rel_error:>10.4g} {r.cosine:>8.4f} "
                f"{r.norm_ratio:>10.4g} {r.cov_norm:>10.4g} {r.grad_norm:>10.4g}"
            )
        return "\n".join(lines)


def _row(method, layer, g_s, g, cov_norm) -> ShortcutRow:
    g_s, g = g_s.astype(np.float64), g.astype(np.float64)
    gn, sn = np.linalg.norm(g), np.linalg.norm(g_s)
    rel = np.linalg.norm(g_s - g) / gn if gn > 0 else (0.0 if sn == 0 else np.inf)
    cos = float(g_s @ g / (sn * gn)) if gn > 0 and sn > 0 else float("nan")
    ratio = sn / gn if gn > 0 else float("nan")
    return ShortcutRow(method, layer, float(rel), cos, float(ratio), float(cov_norm), float(gn))


def compare_shortcut(net: MLP, theta, X, y, methods=METHODS, backend: str = "numpy") -> ShortcutReport:
    """Compare shortcut gradients with the true mean gradient, layer by layer.

    Parameters
    ----------
    net, theta, X, y
        As for :func:`fastgrad.backprop`.
    methods : sequence of str
        Shortcuts to report (default both).
    backend : str
        Backend that computes the true gradient.

    Returns
    -------
    ShortcutReport
        Per method, per layer and in total: relative error, cosine similarity,
        norm ratio, and the Frobenius norm of the covariance term Cov(δ, a)
        (zero for biases, so per layer it is the weight's term).
    """
    from .api import backprop

    methods = tuple(_check_method(m) for m in ((methods,) if isinstance(methods, str) else methods))
    true = backprop(net, theta, X, y, ("grad",), backend=backend).grad
    covs = [np.linalg.norm(c.astype(np.float64)) for c in covariance_terms(net, theta, X, y)]
    shortcuts = {m: shortcut_grad(net, theta, X, y, m) for m in methods}
    return _report(net, true, shortcuts, covs, len(X))


def _report(net: MLP, true: np.ndarray, shortcuts: dict, covs: list, batch_size: int) -> ShortcutReport:
    """The report of :func:`compare_shortcut` from the true gradient, each method's gradient and
    ‖Cov(δ_l, a_{l-1})‖_F per layer (also :func:`fastgrad.dask.compare_shortcut`'s)."""
    rows = []
    for m, g_s in shortcuts.items():
        for l, s in enumerate(net.layers, start=1):
            rows.append(_row(m, l, g_s[s.w_start : s.end], true[s.w_start : s.end], covs[l - 1]))
        rows.append(_row(m, "total", g_s, true, np.sqrt(np.sum(np.square(covs)))))
    return ShortcutReport(tuple(rows), batch_size, net.sizes, net.activation, net.loss)

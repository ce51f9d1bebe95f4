"""NumPy references: the naive per-sample loop (the definition) and the batched GEMM form.

Every kernel in fastgrad is tested against these. The naive loop backpropagates
one sample at a time and stacks the per-sample gradients; every quantity is then
computed from that (B, P) matrix exactly as docs/design.md §2 defines it. The batched
form computes the same quantities with one GEMM per layer and the tricks of
docs/design.md §3 (norms from deltas, clipped sums from row-scaled deltas, second moments
from squared operands), and builds the (B, P) matrix only when asked to.

Both compute in θ's dtype. The activation and loss formulas here are written
independently of the scalar code the compiled targets share, on purpose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ._validation import Inputs, check_inputs
from .losses import CROSS_ENTROPY
from .mlp import MLP
from .quantities import (
    DELTA,
    DELTA_SQUARED,
    INPUT,
    clip_factor,
    layer_norm_sq,
    needs_norms,
    sums_to_make,
)

# ---------------------------------------------------------------- activations


def _sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def phi(name: str, z: np.ndarray) -> np.ndarray:
    """Hidden activation ``name`` applied element-wise."""
    if name == "identity":
        return z
    if name == "relu":  # NaN stays NaN
        return np.where(z <= 0, 0, z).astype(z.dtype, copy=False)
    if name == "leaky_relu":
        return np.where(z > 0, z, z.dtype.type(0.01) * z)
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "gelu":
        c, k = z.dtype.type(np.sqrt(2 / np.pi)), z.dtype.type(0.044715)
        return z.dtype.type(0.5) * z * (1 + np.tanh(c * (z + k * z**3)))
    if name == "softplus":
        return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))
    if name == "silu":
        return z * _sigmoid(z)
    raise ValueError(name)


def phi_prime(name: str, z: np.ndarray) -> np.ndarray:
    """Derivative of activation ``name`` at ``z``, element-wise."""
    one = z.dtype.type(1)
    if name == "identity":
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "leaky_relu":
        return np.where(z > 0, one, z.dtype.type(0.01))
    if name == "tanh":
        return one - np.tanh(z) ** 2
    if name == "sigmoid":
        s = _sigmoid(z)
        return s * (one - s)
    if name == "gelu":
        c, k = z.dtype.type(np.sqrt(2 / np.pi)), z.dtype.type(0.044715)
        t = np.tanh(c * (z + k * z**3))
        return z.dtype.type(0.5) * (one + t) + z.dtype.type(0.5) * z * (one - t * t) * c * (
            one + 3 * k * z * z
        )
    if name == "softplus":
        return _sigmoid(z)
    if name == "silu":  # d/dz z σ(z) = σ(z) + z σ(z) σ(-z)
        return _sigmoid(z) + z * _sigmoid(z) * _sigmoid(-z)
    raise ValueError(name)


# ---------------------------------------------------------------------- losses


def loss_and_delta(name: str, Z: np.ndarray, labels: np.ndarray, targets: np.ndarray):
    """Per-sample losses (B,) and output deltas dℓ_i/dz_L (B, n_L) for outputs Z (B, n_L)."""
    if name == "cross_entropy":
        zmax = Z.max(axis=1, keepdims=True)
        e = np.exp(Z - zmax)
        s = e.sum(axis=1, keepdims=True)
        lse = (zmax + np.log(s))[:, 0]
        rows = np.arange(Z.shape[0])
        losses = lse - Z[rows, labels]
        delta = e / s
        delta[rows, labels] -= 1
        return losses, delta
    if name == "mse":
        d = Z - targets
        return 0.5 * (d * d).sum(axis=1), d
    if name == "binary_cross_entropy":
        softplus = np.maximum(Z, 0) + np.log1p(np.exp(-np.abs(Z)))
        return (softplus - targets * Z).sum(axis=1), _sigmoid(Z) - targets
    if name == "linear":
        return (targets - Z).sum(axis=1), np.full_like(Z, -1)
    raise ValueError(name)


# ------------------------------------------------------- the naive definition


def sample_gradient(net: MLP, theta: np.ndarray, x: np.ndarray, label: int, target: np.ndarray):
    """Loss ℓ_i and gradient ∇ℓ_i (P,) of one sample, by the chain rule, one layer at a time.

    x: (n0,); label: class index (cross-entropy); target: (n_L,) (other losses).
    """
    params = net.unpack(theta)
    L = net.num_layers
    # forward: keep every pre-activation z_l and activation a_l of this sample
    a = [x]
    zs = []
    for l, (W, b) in enumerate(params):
        z = W @ a[-1] + b
        zs.append(z)
        a.append(phi(net.activation, z) if l < L - 1 else z)
    loss, delta = loss_and_delta(net.loss, zs[-1][None, :], np.array([label]), target[None, :])
    delta = delta[0]  # dℓ/dz_L
    grad = np.zeros_like(theta)
    grad_params = net.unpack(grad)
    # backward: δ_l gives ∇W_l = δ_l a_{l-1}ᵀ and ∇b_l = δ_l, then δ_{l-1} = (W_lᵀ δ_l) ⊙ φ'(z_{l-1})
    for l in reversed(range(L)):
        gW, gb = grad_params[l]
        gW[...] = np.outer(delta, a[l])
        gb[...] = delta
        if l > 0:
            W = params[l][0]
            delta = (W.T @ delta) * phi_prime(net.activation, zs[l - 1])
    return loss[0], grad


def clip_factors(norms: np.ndarray, max_norm: float) -> np.ndarray:
    """c_i = min(1, C / ‖∇ℓ_i‖), 1 where the norm is 0: the definition, written out apart from
    the kernels' :func:`fastgrad.quantities.clip_factor` on purpose."""
    c = np.ones_like(norms)
    big = norms > max_norm
    c[big] = norms.dtype.type(max_norm) / norms[big]
    return c


def _sum_squares(M: np.ndarray) -> np.ndarray:
    """Σ_k M[i, k]² of each row (B,), accumulated in float64."""
    return np.einsum("ij,ij->i", M, M, dtype=np.float64)


def row_norms(G: np.ndarray) -> np.ndarray:
    """‖G_i‖₂ of each row, in G's dtype, with the squares summed in float64: a float32 row whose
    norm is representable neither overflows (entries above ~1.8e19) nor underflows (below ~1e-19)."""
    return np.sqrt(_sum_squares(G)).astype(G.dtype)


ROWS_BYTES = 16 * 2**20
"""The naive loop and the batched form make per-sample rows in blocks of at most this many bytes
(at least one row): with ``out=`` an ``np.memmap``, or without ``per_sample``, no (B, P) matrix
is held in memory (filled through one whole matrix, an 1839 MiB memmap would cost 1670 MiB of RAM)."""


def row_blocks(batch: int, num_params: int, dtype) -> list[tuple[int, int]]:
    """Rows [r0, r1) of each block of per-sample rows, in order; see :data:`ROWS_BYTES`."""
    rows = max(1, ROWS_BYTES // (num_params * np.dtype(dtype).itemsize))
    return [(r0, min(batch, r0 + rows)) for r0 in range(0, batch, rows)]


def _naive_noise_scale(res: dict) -> float:
    # B_simple = tr(Σ) / ‖G‖², with tr(Σ) the sum of the per-parameter variances
    grad_sq = float((res["grad"].astype(np.float64) ** 2).sum())
    trace = float(res["variance"].sum(dtype=np.float64))
    return trace / grad_sq if grad_sq > 0 else np.inf


def _naive_cosine(Gb: np.ndarray, res: dict) -> np.ndarray:
    # cos_i = g_i · ḡ / (‖g_i‖ ‖ḡ‖) of each row, in float64 from the rows themselves; 0 where a norm is 0
    G, g = Gb.astype(np.float64), res["grad"].astype(np.float64)
    dots = np.einsum("ij,j->i", G, g)
    den = np.sqrt(np.einsum("ij,ij->i", G, G)) * np.sqrt(g @ g)
    cos = np.zeros(G.shape[0])
    np.divide(dots, den, out=cos, where=den > 0)
    return cos.astype(Gb.dtype)


class Naive(NamedTuple):
    """The naive definition of one quantity: its kind, the function and the quantities it reads."""

    kind: str
    f: Callable
    reads: tuple[str, ...] = ()


# The definition of every quantity of the registry (fastgrad.quantities) from the stacked per-sample
# gradients G (B, P). G is made in blocks of rows Gb = G[r0:r1] (row_blocks), so each definition
# reads one block: a per-row quantity is its rows of the block ("row": f(net, Gb)); a sum over
# samples adds the blocks' sums in order, divided by B for a mean ("sum", "mean": f(Gb, c); c: the
# block's clip factors). What needs a result of the whole batch first (the mean gradient) is a
# second pass over the blocks: a sum divided by B ("centred": f(Gb, res)), or rows ("rows after":
# f(Gb, res)); a function of the results alone is "result" (f(res)). name -> Naive
NAIVE = {
    "per_sample": Naive("row", lambda net, Gb: Gb),
    "norms": Naive("row", lambda net, Gb: row_norms(Gb)),
    "layer_norms": Naive(
        "row",
        lambda net, Gb: np.stack([row_norms(Gb[:, s.w_start : s.end]) for s in net.layers], 1),
    ),
    "grad": Naive("mean", lambda Gb, c: Gb.sum(axis=0)),
    "sq_mean": Naive("mean", lambda Gb, c: (Gb * Gb).sum(axis=0)),
    "clipped_sum": Naive("sum", lambda Gb, c: (c[:, None] * Gb).sum(axis=0), ("norms",)),
    "variance": Naive("centred", lambda Gb, res: ((Gb - res["grad"]) ** 2).sum(axis=0), ("grad",)),
    "noise_scale": Naive("result", _naive_noise_scale, ("grad", "variance")),
    "grad_cosine": Naive("rows after", _naive_cosine, ("grad",)),
}
SECOND_PASS = ("centred", "rows after")


def _sample_rows(net: MLP, inp: Inputs, r0: int, r1: int, Gb: np.ndarray, losses: np.ndarray) -> None:
    """Rows [r0, r1) of G into Gb (r1 - r0, P) and their losses into losses[r0:r1], one sample at a time."""
    ce = net.loss_code == CROSS_ENTROPY
    for i in range(r0, r1):
        label = int(inp.labels[i]) if ce else 0
        target = inp.targets[i] if not ce else np.zeros(net.n_out, dtype=inp.dtype)
        losses[i], Gb[i - r0] = sample_gradient(net, inp.theta, inp.X[i], label, target)


def run_naive(net: MLP, inp: Inputs, need: frozenset[str], max_norm: float | None = None, out=None):
    """The quantities in ``need`` (and ``clipped_sum`` with ``max_norm``) from the stacked per-sample
    gradients; the definition of docs/design.md §2. G (B, P) is kept (in ``out`` if given) only for
    ``per_sample``; otherwise each block of rows is dropped once read."""
    B, P, dt = inp.batch_size, net.num_params, inp.dtype
    todo = set(need) | ({"clipped_sum"} if max_norm is not None else set())
    todo &= set(NAIVE)
    while True:  # and what each reads
        more = {r for name in todo for r in NAIVE[name].reads} - todo
        if not more:
            break
        todo |= more
    keep = "per_sample" in todo
    blocks = row_blocks(B, P, dt)
    G = (out if out is not None else np.empty((B, P), dtype=dt)) if keep else None
    scratch = None if keep else np.empty((blocks[0][1] - blocks[0][0], P), dtype=dt)
    losses = np.empty(B, dtype=dt)
    parts: dict[str, list] = {name: [] for name in todo if NAIVE[name].kind == "row"}
    sums: dict[str, np.ndarray] = {}
    for r0, r1 in blocks:
        Gb = G[r0:r1] if keep else scratch[: r1 - r0]
        _sample_rows(net, inp, r0, r1, Gb, losses)
        for name in parts:
            parts[name].append(NAIVE[name].f(net, Gb))
        c = clip_factors(parts["norms"][-1], max_norm) if max_norm is not None else None
        for name in todo:
            kind, definition, _ = NAIVE[name]
            if kind in ("sum", "mean"):
                total = definition(Gb, c)
                sums[name] = total if name not in sums else sums[name] + total
    res = {"loss": losses.mean(dtype=dt)}
    for name in parts:
        res[name] = G if name == "per_sample" else np.concatenate(parts[name])
    for name, total in sums.items():
        res[name] = total / dt.type(B) if NAIVE[name].kind == "mean" else total
    later = [name for name in NAIVE if name in todo and NAIVE[name].kind in SECOND_PASS]
    if later:  # G read again (made again if not kept), the last block first: without G, it is in scratch
        totals: dict[str, np.ndarray] = {}
        rows: dict[str, list] = {name: [] for name in later if NAIVE[name].kind == "rows after"}
        for r0, r1 in reversed(blocks):
            if keep:
                Gb = G[r0:r1]
            else:
                Gb = scratch[: r1 - r0]
                if (r0, r1) != blocks[-1]:
                    _sample_rows(net, inp, r0, r1, Gb, losses)
            for name in later:
                part = NAIVE[name].f(Gb, res)
                if NAIVE[name].kind == "rows after":
                    rows[name].append(part)
                else:
                    totals[name] = part if name not in totals else totals[name] + part
        for name in later:
            res[name] = np.concatenate(rows[name][::-1]) if name in rows else totals[name] / dt.type(B)
    for name in NAIVE:
        if name in todo and NAIVE[name].kind == "result":
            res[name] = NAIVE[name].f(res)
    return res


# ------------------------------------------------------------ the batched form


def forward(net: MLP, theta: np.ndarray, X: np.ndarray):
    """Forward the batch: returns pre-activations [Z_1..Z_L] and activations [A_0..A_{L-1}]."""
    L = net.num_layers
    A, Zs = [X], []
    for l, (W, b) in enumerate(net.unpack(theta)):
        Z = A[-1] @ W.T + b
        Zs.append(Z)
        if l < L - 1:
            A.append(phi(net.activation, Z))
    return Zs, A


def backward(net: MLP, theta: np.ndarray, Zs, labels, targets):
    """Per-sample losses (B,) and deltas [Δ_1..Δ_L], Δ_l (B, n_l), for the whole batch."""
    losses, delta = loss_and_delta(net.loss, Zs[-1], labels, targets)
    params = net.unpack(theta)
    deltas = [delta]
    for l in range(net.num_layers - 1, 0, -1):
        delta = (delta @ params[l][0]) * phi_prime(net.activation, Zs[l - 1])
        deltas.append(delta)
    return losses, deltas[::-1]


def operand(kind: int, D: np.ndarray, clip_c: np.ndarray | None) -> np.ndarray:
    """The operand M (B, n_l) of a sum over samples: Δ, Δ ⊙ Δ or c ⊙ Δ (rows scaled by c)."""
    if kind == DELTA:
        return D
    if kind == DELTA_SQUARED:
        return D * D
    return clip_c[:, None] * D  # CLIPPED_DELTA


def source(kind: int, A: np.ndarray) -> np.ndarray:
    """The source S (B, n_{l-1}) of a sum over samples: A or A ⊙ A."""
    return A if kind == INPUT else A * A


def run_batched(net: MLP, inp: Inputs, need: frozenset[str], max_norm: float | None = None, out=None):
    """Every requested quantity with one GEMM per layer and quantity; no (B, P) matrix unless asked."""
    B, dt = inp.batch_size, inp.dtype
    Zs, A = forward(net, inp.theta, inp.X)
    losses, deltas = backward(net, inp.theta, Zs, inp.labels, inp.targets)
    res = {"loss": losses.mean(dtype=dt)}
    P = net.num_params
    clip_c = None
    if needs_norms(need, max_norm is not None):
        # Goodfellow's trick, per layer: ‖δ aᵀ‖²_F + ‖δ‖² = ‖δ‖² (‖a‖² + 1), in float64 so that a float32
        # norm that is representable neither overflows nor underflows on the way
        layer_sq = np.stack(
            [layer_norm_sq(_sum_squares(D), _sum_squares(Ain)) for D, Ain in zip(deltas, A)], axis=1
        )
        res["layer_norms"] = np.sqrt(layer_sq).astype(dt)
        res["norms"] = np.sqrt(layer_sq.sum(axis=1)).astype(dt)
        if max_norm is not None:
            clip_c = clip_factor(res["norms"], dt.type(max_norm))
    for q in sums_to_make(need, max_norm is not None):
        # per layer: W-part Mᵀ S, b-part Σ_i M_i, divided by B for a mean
        total = np.empty(P, dtype=dt)
        for (gW, gb), D, Ain in zip(net.unpack(total), deltas, A):
            M = operand(q.operand, D, clip_c)
            if q.mean:
                gW[...] = M.T @ source(q.source, Ain) / dt.type(B)
                gb[...] = M.sum(axis=0) / dt.type(B)
            else:
                gW[...] = M.T @ source(q.source, Ain)
                gb[...] = M.sum(axis=0)
        res[q.name] = total
    if "per_sample" in need:  # in blocks of rows: out= may be a memmap larger than memory
        G = out if out is not None else np.empty((B, P), dtype=dt)
        for r0, r1 in row_blocks(B, P, dt):
            for s, D, Ain in zip(net.layers, deltas, A):
                G[r0:r1, s.w_start : s.b_start] = (D[r0:r1, :, None] * Ain[r0:r1, None, :]).reshape(
                    r1 - r0, -1
                )
                G[r0:r1, s.b_start : s.end] = D[r0:r1]
        res["per_sample"] = G
    return res


def per_sample_gradients(net: MLP, theta, X, y) -> np.ndarray:
    """The (B, P) matrix of per-sample gradients by the naive loop; a convenience for checks."""
    inp = check_inputs(net, theta, X, y)
    return run_naive(net, inp, frozenset({"per_sample"}))["per_sample"]


# ------------------------------------------- the factors of per-sample inner products


def layer_factors(net: MLP, inp: Inputs) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The factors of every per-sample gradient, g_i = δ_{l,i} ⊗ [a_{l-1,i}; 1] per layer:
    deltas [Δ_1..Δ_L], Δ_l (B, n_l), and layer inputs [A_0..A_{L-1}], A_{l-1} (B, n_{l-1})."""
    Zs, A = forward(net, inp.theta, inp.X)
    return backward(net, inp.theta, Zs, inp.labels, inp.targets)[1], A


def forward_factors(net: MLP, theta: np.ndarray, X: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The forward pass without the loss: layer inputs [A_0..A_{L-1}] (B, n_{l-1}) and the
    hidden layers' derivatives [φ'(z_1)..φ'(z_{L-1})] (B, n_l), for Jacobians of the outputs."""
    Zs, A = forward(net, theta, X)
    return A, [phi_prime(net.activation, Z) for Z in Zs[:-1]]

"""Inner products of per-sample gradients without per-sample gradients: Gram matrices, dots with
a fixed vector, TracIn over checkpoints and the empirical neural tangent kernel.

For a dense layer the gradient of sample i is an outer product, g_{l,i} = δ_{l,i} ⊗ [a_{l-1,i}; 1],
so the inner product of two samples' gradients factorises layer by layer::

    g_i · g'_j = Σ_l (δ_{l,i} · δ'_{l,j}) (a_{l-1,i} · a'_{l-1,j} + 1)
    G          = Σ_l (Δ_l Δ'_lᵀ) ⊙ (A_{l-1} A'_{l-1}ᵀ + 1)            two B × B' GEMMs per layer
    g_i · v    = Σ_l rowsum((A_{l-1} V_lᵀ + v_{b,l}) ⊙ Δ_l)          one GEMM per layer

with Δ_l (B, n_l) and A_{l-1} (B, n_{l-1}) the deltas and layer inputs of one backward pass
(``Δ'``, ``A'`` those of the second batch) and v split per layer like θ into W-part V_l
(n_l, n_{l-1}) and b-part v_{b,l}. No (B, P) matrix is formed. The empirical NTK of the
outputs is the same Gram of "virtual samples", one per output k, whose output delta is the
one-hot e_k backpropagated without the loss: Δ_l becomes (B, K, n_l).

Where this lives: a backend makes the factors (Δ_l, A_{l-1}) of a batch in one pass, each with
its own kernels (``reference.layer_factors``, ``cpu.layer_factors``, ``cuda.layer_factors``; the
forward pass alone, ``forward_factors``, for the NTK); this module is the one reducer that forms
the inner products from them, on the host, in blocks of ``BLOCK_ROWS`` × ``BLOCK_ROWS``
output entries. The registry (``fastgrad.quantities``) holds reducers of one pass whose
results are per-sample rows or sums over samples; these reduce *pairs* of samples, usually of
two passes (train × query, or one pass per checkpoint), so they are not registry entries.

Memory: the factors of both batches (B + B') × Σ_l (n_l + n_{l-1}) numbers, θ, the output and
per worker the temporaries of one block (two BLOCK_ROWS² matrices; for materialised layers
BLOCK_ROWS × n_l (n_{l-1} + 1)): nothing of size B × P.

Determinism: the blocks are fixed by the batch sizes and ``BLOCK_ROWS`` alone; each output
entry is written by one task, from the same GEMMs, and the layers are added in order. With
the ``numba`` and ``cuda`` backends the blocks run on ``numba.get_num_threads()`` Python
threads with BLAS held to one thread, so the bits do not depend on the thread count; the
``numpy`` backend runs the blocks one after the other with BLAS as the user set it.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _validation
from .mlp import MLP

BLOCK_ROWS = 256
"""Rows (and columns) of one output block of a Gram or NTK, and rows per task of ``grad_dot``."""

MATERIALISE_MAX = 0
"""A layer whose per-sample gradient has at most this many entries, n_l (n_{l-1} + 1), is
multiplied as materialised per-sample layer gradients (one GEMM of inner size n_l (n_{l-1} + 1))
instead of the factorised form (two GEMMs of inner sizes n_l and n_{l-1} and two element-wise
passes over the block). For a whole Gram the factorised form always wins: both forms produce
the B × B' block, and only the materialised one multiplies over n_l n_{l-1} instead of
n_l + n_{l-1} (the choice pays off for the diagonal alone, the norms, which the registry has).
The materialised form was slower at every layer size measured, from 2 × 3 up (``benchmarks/attribution.py
--materialise``; docs/benchmarks.md has the figures), so no layer is materialised."""

_FACTORS = {"numpy": "fastgrad.reference", "numba": "fastgrad.cpu", "cuda": "fastgrad.cuda"}
"""The module of each backend that makes the factors (``layer_factors``, ``forward_factors``)."""


# ------------------------------------------------------------------ input checks


def _backend_module(backend):
    from .api import resolve_backend

    name = resolve_backend(backend)
    if name not in _FACTORS:
        raise ValueError(
            f"backend: {name!r} has no inner products (it builds every per-sample gradient); "
            f"expected one of {', '.join(_FACTORS)} or 'auto'"
        )
    return name, importlib.import_module(_FACTORS[name])


def _second_batch(net: MLP, theta: np.ndarray, X2, y2, labelled: bool):
    """The checked second batch, with errors that say it is the second one."""
    try:
        if labelled:
            return _validation.check_inputs(net, theta, X2, y2)
        return _validation.check_X(net, X2, theta.dtype)
    except (TypeError, ValueError) as exc:
        names = "X2, y2 (the second batch, as X and y)" if labelled else "X2 (the second batch, as X)"
        raise type(exc)(f"{names}: {exc}") from None


def _check_pair(X2, y2) -> None:
    if (X2 is None) != (y2 is None):
        given, missing = ("X2", "y2") if y2 is None else ("y2", "X2")
        raise ValueError(f"{missing}: {given} was given without it; pass both X2 and y2, or neither")


def _check_vector(net: MLP, v, dtype: np.dtype) -> np.ndarray:
    if not isinstance(v, np.ndarray):
        raise TypeError(f"v: expected a NumPy array of shape ({net.num_params},), got {type(v).__name__}")
    if v.dtype != dtype:
        raise TypeError(f"v: expected θ's dtype {dtype}, got {v.dtype}")
    if v.shape != (net.num_params,):
        raise ValueError(f"v: expected shape ({net.num_params},) (θ's layout), got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("v: contains NaN or Inf")
    return np.ascontiguousarray(v)


def _check_checkpoints(net: MLP, checkpoints) -> list[tuple[np.ndarray, float]]:
    if isinstance(checkpoints, (str, bytes)) or not isinstance(checkpoints, Sequence):
        raise TypeError(
            f"checkpoints: expected a sequence of (theta_k, eta_k) pairs, got {type(checkpoints).__name__}"
        )
    if len(checkpoints) == 0:
        raise ValueError("checkpoints: empty; TracIn needs at least one (theta_k, eta_k) pair")
    out = []
    for k, item in enumerate(checkpoints):
        if not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(f"checkpoints[{k}]: expected a pair (theta_k, eta_k), got {type(item).__name__}")
        theta, eta = item
        try:
            theta = _validation.check_theta(net, theta)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"checkpoints[{k}]: {exc}") from None
        if out and theta.dtype != out[0][0].dtype:
            raise TypeError(
                f"checkpoints[{k}]: theta has dtype {theta.dtype}, checkpoint 0 has {out[0][0].dtype}"
            )
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
            raise TypeError(f"checkpoints[{k}]: eta must be a finite real number, got {type(eta).__name__}")
        if not math.isfinite(eta):
            raise ValueError(f"checkpoints[{k}]: eta must be a finite real number, got {eta!r}")
        out.append((theta, float(eta)))
    return out


# ------------------------------------------------------------------ the reducer


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(r0, min(n, r0 + BLOCK_ROWS)) for r0 in range(0, n, BLOCK_ROWS)]


def _run_tasks(fn, tasks, parallel: bool) -> None:
    """fn(task) for every task: serially, or on numba's thread count with BLAS held to one thread."""
    if not parallel:
        for task in tasks:
            fn(task)
        return
    import numba

    from ._threading import single_threaded_blas

    with single_threaded_blas(), ThreadPoolExecutor(max(1, numba.get_num_threads())) as pool:
        for _ in pool.map(fn, tasks):  # re-raises a task's exception
            pass


def materialised(net: MLP, deltas: list[np.ndarray]) -> list[bool]:
    """Per layer: multiply materialised per-sample layer gradients (True) or the factors (False).

    deltas: Δ_l (m, V, n) per layer (n = n_l, or K n_l for the trace of the NTK)."""
    return [D.shape[2] * (s.n_in + 1) <= MATERIALISE_MAX for D, s in zip(deltas, net.layers)]


def _layer_rows(D: np.ndarray, A: np.ndarray) -> np.ndarray:
    # D (m, V, n), A (m, n_in) -> (m V, n (n_in + 1)): rows [δ ⊗ a, δ], the per-sample layer gradients
    m, V, n = D.shape
    outer = (D[:, :, :, None] * A[:, None, None, :]).reshape(m * V, n * A.shape[1])
    return np.concatenate([outer, D.reshape(m * V, n)], axis=1)


def _layer_block(D1, A1, D2, A2, same: bool, mat: bool) -> np.ndarray:
    # D (m, V, n), A (m, n_in) of each side -> (m1, V, m2, V): the layer's inner products
    m1, V, n = D1.shape
    m2 = D2.shape[0]
    if mat:
        R1 = _layer_rows(D1, A1)
        R2 = R1 if same else _layer_rows(D2, A2)
        return (R1 @ R2.T).reshape(m1, V, m2, V)
    F1 = D1.reshape(m1 * V, n)
    F2 = F1 if same else D2.reshape(m2 * V, n)
    dd = (F1 @ F2.T).reshape(m1, V, m2, V)
    aa = A1 @ (A1 if same else A2).T
    aa += aa.dtype.type(1)
    dd *= aa[:, None, :, None]
    return dd


def _gram(net: MLP, f1, f2, per_layer: bool, parallel: bool, out_dtype) -> np.ndarray:
    """The reducer: f = (deltas [(m, V, n)], inputs [(m, n_in)]) of each side (f2 None: the same
    batch) -> (L?, B, B', V, V) inner products, in blocks, symmetric blocks mirrored."""
    deltas1, inputs1 = f1
    same = f2 is None
    deltas2, inputs2 = f1 if same else f2
    B1, V = deltas1[0].shape[:2]
    B2 = deltas2[0].shape[0]
    L = net.num_layers
    mat = materialised(net, deltas1)
    out = np.empty(((L,) if per_layer else ()) + (B1, B2, V, V), out_dtype)
    rows1, rows2 = _blocks(B1), _blocks(B2)
    tasks = [(i, j) for i in range(len(rows1)) for j in range(len(rows2)) if not same or j >= i]

    def block(task):
        (r0, r1), (c0, c1) = rows1[task[0]], rows2[task[1]]
        diag = same and task[0] == task[1]
        total = None
        for l in range(L):
            D1, A1 = deltas1[l][r0:r1], inputs1[l][r0:r1]
            D2, A2 = deltas2[l][c0:c1], inputs2[l][c0:c1]
            term = _layer_block(D1, A1, D2, A2, diag, mat[l]).transpose(0, 2, 1, 3)
            if per_layer:
                out[l, r0:r1, c0:c1] = term
                if same and not diag:
                    out[l, c0:c1, r0:r1] = term.transpose(1, 0, 3, 2)
            elif total is None:
                total = np.ascontiguousarray(term)
            else:
                total += term
        if not per_layer:
            out[r0:r1, c0:c1] = total
            if same and not diag:
                out[c0:c1, r0:r1] = total.transpose(1, 0, 3, 2)

    _run_tasks(block, tasks, parallel)
    return out


def _loss_factors(module, net: MLP, inp):
    """(deltas [(B, 1, n_l)], inputs [(B, n_{l-1})]) of the loss gradients, from the backend's pass."""
    deltas, inputs = module.layer_factors(net, inp)
    return [D[:, None, :] for D in deltas], inputs


def _output_factors(module, net: MLP, theta: np.ndarray, X: np.ndarray, trace: bool, parallel: bool):
    """(deltas, inputs) of the outputs' Jacobians: the backend's forward pass, then the virtual samples'
    backward, Δ_L = e_k and Δ_{l-1} = (Δ_l W_l) ⊙ φ'(z_{l-1}), as (B, K, n_l) (trace: (B, 1, K n_l))."""
    inputs, derivs = module.forward_factors(net, theta, X)
    B, K, L = X.shape[0], net.n_out, net.num_layers
    params = net.unpack(theta)
    deltas = [np.empty((B, K, s.n_out), theta.dtype) for s in net.layers]
    deltas[-1][:] = np.eye(K, dtype=theta.dtype)

    def block(rows):
        r0, r1 = rows
        for l in range(L - 1, 0, -1):
            D = deltas[l][r0:r1]
            np.matmul(D, params[l][0], out=deltas[l - 1][r0:r1])
            deltas[l - 1][r0:r1] *= derivs[l - 1][r0:r1, None, :]

    _run_tasks(block, _blocks(B), parallel)
    if trace:
        deltas = [D.reshape(B, 1, K * D.shape[2]) for D in deltas]
    return deltas, inputs


def _squeeze(G: np.ndarray) -> np.ndarray:
    return G.reshape(G.shape[:-2])


# ------------------------------------------------------------------ public API


def gram(net: MLP, theta, X, y, X2=None, y2=None, *, per_layer: bool = False, backend: str = "numpy"):
    """Inner products of per-sample loss gradients, ∇ℓ_i · ∇ℓ'_j, without per-sample gradients.

    G = Σ_l (Δ_l Δ'_lᵀ) ⊙ (A_{l-1} A'_{l-1}ᵀ + 1), from one backward pass of each batch.

    Parameters
    ----------
    net : MLP
    theta : ndarray (P,), float32 or float64
    X : array (B, n0); y : labels (B,) or targets (B, n_L), as for :func:`fastgrad.backprop`
    X2, y2 : optional second batch (B', n0) and its labels or targets; both or neither.
        Without them, the Gram of the batch with itself (exactly symmetric).
    per_layer : bool
        Return each layer's term, ∇_{W_l,b_l} ℓ_i · ∇_{W_l,b_l} ℓ'_j, instead of their sum.
    backend : {"numpy", "numba", "cuda", "auto"}
        Which backend makes the deltas and layer inputs; the products are GEMMs on the host.

    Returns
    -------
    ndarray (B, B'), or (L, B, B') with ``per_layer``, in θ's dtype. B' = B without X2.
    """
    _check_pair(X2, y2)
    name, module = _backend_module(backend)
    inp = _validation.check_inputs(net, theta, X, y)
    inp2 = None if X2 is None else _second_batch(net, inp.theta, X2, y2, labelled=True)
    f1 = _loss_factors(module, net, inp)
    f2 = None if inp2 is None else _loss_factors(module, net, inp2)
    return _squeeze(_gram(net, f1, f2, per_layer, name != "numpy", inp.dtype))


def grad_dot(net: MLP, theta, X, y, v, *, backend: str = "numpy") -> np.ndarray:
    """∇ℓ_i · v for every sample, without per-sample gradients: Σ_l rowsum((A_{l-1} V_lᵀ + v_{b,l}) ⊙ Δ_l).

    Parameters
    ----------
    net, theta, X, y : as for :func:`gram`
    v : ndarray (P,), θ's dtype, in θ's layout (a gradient, a test sample's gradient, an update)
    backend : {"numpy", "numba", "cuda", "auto"}

    Returns
    -------
    ndarray (B,), θ's dtype.
    """
    name, module = _backend_module(backend)
    inp = _validation.check_inputs(net, theta, X, y)
    v = _check_vector(net, v, inp.dtype)
    deltas, inputs = module.layer_factors(net, inp)
    out = np.empty(inp.batch_size, inp.dtype)
    parts = net.unpack(v)

    def block(rows):
        r0, r1 = rows
        total = None
        for (V, vb), D, A in zip(parts, deltas, inputs):
            t = A[r0:r1] @ V.T
            t += vb
            t *= D[r0:r1]
            s = t.sum(axis=1)
            total = s if total is None else total + s
        out[r0:r1] = total

    _run_tasks(block, _blocks(inp.batch_size), name != "numpy")
    return out


def tracin(net: MLP, checkpoints, X, y, X2=None, y2=None, *, backend: str = "numpy") -> np.ndarray:
    """TracIn: Σ_k η_k ∇ℓ(z_i; θ_k) · ∇ℓ(z'_j; θ_k) over checkpoints, exact, without per-sample gradients.

    Parameters
    ----------
    net : MLP
    checkpoints : sequence of (theta_k, eta_k)
        Parameters (P,) of one dtype, and the finite learning rate (weight) of each.
    X, y, X2, y2 : as for :func:`gram` (without X2, y2: the batch against itself; its diagonal
        is the self-influence Σ_k η_k ‖∇ℓ_i(θ_k)‖²).
    backend : {"numpy", "numba", "cuda", "auto"}

    Returns
    -------
    ndarray (B, B'), the checkpoints' dtype; the checkpoints are added in order.
    """
    _check_pair(X2, y2)
    name, module = _backend_module(backend)
    cps = _check_checkpoints(net, checkpoints)
    theta0 = cps[0][0]
    inp = _validation.check_inputs(net, theta0, X, y)
    inp2 = None if X2 is None else _second_batch(net, theta0, X2, y2, labelled=True)
    dt = inp.dtype
    total = None
    for theta, eta in cps:
        a = _validation.Inputs(theta, inp.X, inp.labels, inp.targets)
        b = None if inp2 is None else _validation.Inputs(theta, inp2.X, inp2.labels, inp2.targets)
        f1 = _loss_factors(module, net, a)
        f2 = None if b is None else _loss_factors(module, net, b)
        G = _squeeze(_gram(net, f1, f2, False, name != "numpy", dt))
        G *= dt.type(eta)
        total = G if total is None else total + G
    return total


def ntk(net: MLP, theta, X, X2=None, *, trace: bool = False, backend: str = "numpy") -> np.ndarray:
    """The empirical neural tangent kernel of the outputs, Θ_ij^{kk'} = ∂f_k(x_i)/∂θ · ∂f_k'(x'_j)/∂θ.

    Each output k is a "virtual sample" whose output delta is e_k, backpropagated without the
    loss; the kernel is their Gram in the factorised form. The outputs f are z_L, before the
    loss's own nonlinearity (softmax, sigmoid).

    Parameters
    ----------
    net : MLP
    theta : ndarray (P,), float32 or float64
    X : array (B, n0); X2 : optional array (B', n0) (default: X itself)
    trace : bool
        Return Σ_k Θ_ij^{kk} (B, B') instead of the whole kernel.
    backend : {"numpy", "numba", "cuda", "auto"}
        Which backend runs the forward pass; the K backward Jacobian passes and the products
        are GEMMs on the host.

    Returns
    -------
    ndarray (B, B', K, K), or (B, B') with ``trace``; θ's dtype; K = sizes[-1].
    """
    name, module = _backend_module(backend)
    net = _validation.check_net(net)
    theta = _validation.check_theta(net, theta)
    X = _validation.check_X(net, X, theta.dtype)
    X2 = None if X2 is None else _second_batch(net, theta, X2, None, labelled=False)
    parallel = name != "numpy"
    f1 = _output_factors(module, net, theta, X, trace, parallel)
    f2 = None if X2 is None else _output_factors(module, net, theta, X2, trace, parallel)
    G = _gram(net, f1, f2, False, parallel, theta.dtype)
    return _squeeze(G) if trace else G


__all__ = ["BLOCK_ROWS", "MATERIALISE_MAX", "grad_dot", "gram", "materialised", "ntk", "tracin"]

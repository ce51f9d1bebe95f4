"""Numba CPU backend (``backend="numba"``): fused per-sample backprop on CPU threads.

One compiled kernel per dtype serves every activation × loss (run-time codes) and
every combination of quantities (run-time flags). It works in two phases over a
chunk of samples (as many whole tiles as fit in ``WORKSPACE_BYTES``):

1. ``prange`` over fixed tiles of ``TILE`` samples: each tile goes forward through
   the whole network and back, keeping its activations A_l and deltas Δ_l in the
   workspace; the per-row reducers (loss, layer norms, clip factors, per-sample
   rows written straight into the flat layout) run on the tile while it is hot,
   and so do the tile's sums Mᵀ A per layer, with M = Δ plain (grad), squared
   (sq_mean, against A²) or row-scaled by the clip factors (DP-SGD's clipped sum,
   DESIGN §3: one backward pass, never two), while tiles × P fits in
   ``PARTIALS_BYTES``; the tiles' sums are then added in tile order.
2. For a quantity whose per-tile sums do not fit: ``prange`` over fixed blocks of
   ``BLOCK`` rows of every layer's weight gradient, one GEMM over the whole chunk
   per block, Δ_l[:, rows]ᵀ A_{l-1} with the same three kinds of M.

Determinism: tiles, blocks and chunks are fixed sizes, independent of the thread
count; every output element is written by exactly one task, sums over samples run
in a fixed order (tile sums in tile order, inside one single-threaded GEMM, or
serially), and chunks are
accumulated in order. Repeated calls and any ``numba.set_num_threads`` give the
same bits.

BLAS: the GEMMs are Numba's ``np.dot`` (SciPy's OpenBLAS) called inside ``prange``,
so BLAS is held to one thread for the duration of a call (threadpoolctl), and the
threads come from Numba alone. Measured on the 2-core machine, alternating Numba's
OpenMP pool with a 2-thread OpenBLAS pool made each side wait for the other's
spinning threads (a 2.6 ms GEMM took 20 ms), so the GEMMs are not run outside ``prange``.

Threading layer: on import, unless the user chose one, Numba's threading layer is
set to ``"threadsafe"`` (TBB if installed, else OpenMP), because two Python threads
calling the backend at once abort the ``workqueue`` layer.

Disk cache: compiled kernels are cached (``cache=True``) next to this file;
set ``FASTGRAD_NUMBA_CACHE=0`` before importing fastgrad to turn it off.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ._scalar import like
from .activations import TANH, activate, activate_grad
from .losses import CROSS_ENTROPY, output_delta_row
from .mlp import MLP

CACHE = os.environ.get("FASTGRAD_NUMBA_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")
"""Whether compiled kernels are cached on disk; ``FASTGRAD_NUMBA_CACHE=0`` turns it off."""

TILE = 128
"""Samples per forward/backward tile (phase 1). Measured (1 thread, float32): 64 → 128 made
mnist's forward+backward 15 % and wide's 15 % faster, narrow unchanged; 256 gained no more."""
BLOCK = 128
"""Weight-gradient rows per GEMM task (phase 2). Measured on mnist (1 thread): 32 rows took
16 ms for the gradient, 128 rows 11.6 ms (small GEMMs repack the other operand every call)."""
PARTIALS_BYTES = 32 * 2**20
"""While per-tile sums (tiles × P each, for grad, then sq_mean, then the clipped sum) fit in
this, those quantities are summed per tile inside phase 1 and the tiles' sums added in order;
the others are made in phase 2 with GEMMs over the chunk. Measured (float32): phase 2's
64×64 GEMM over K = 4096 samples ran at 54 GFLOP/s (625 µs, 1 thread), and per-tile sums took
narrow's gradient from 2.37 to 2.05 ms and mnist's (8.6 MB of sums) from 7.9 to 6.9 ms on
2 threads; wide's (17 MB) gained nothing."""
SMALL_LAYER = 128 * 128
"""Layers with at most this many weights are forwarded with a transposed copy of W."""
WORKSPACE_BYTES = 32 * 2**20
"""Scratch budget that sets the chunk: batches longer than fits are done in chunks of whole
tiles, accumulated in order (the chunk depends on the network and dtype, never on threads)."""

if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "threadsafe"
# OMP_WAIT_POLICY is left to the user. PASSIVE helped a lot on an oversubscribed machine (narrow
# forward passes, B = 512-4096: 9-15 ms with GOMP's default spin, 0.2-1.9 ms passive) and cost
# nothing on a quiet one, but setting it here would also reach any OpenMP runtime loaded later:
# PyTorch's mnist gradient took 10.7 ms instead of 6.3 ms with it (2 threads, same run).


def check_available() -> None:
    """Raise ``RuntimeError`` if the backend cannot run here (Numba's ``np.dot`` needs SciPy)."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError as exc:  # pragma: no cover - scipy is a core dependency
        raise RuntimeError("backend 'numba': SciPy is required (Numba's np.dot calls its BLAS)") from exc


# ------------------------------------------------------------------- kernels


def _lambert_tanh_coefficients(levels: int = 13) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Lambert's continued fraction tanh x = x / (1 + x²/(3 + x²/(5 + ...))), cut after
    ``levels`` levels and collapsed into x · P(x²) / Q(x²); returns (P, Q) lowest degree first,
    scaled so that Q(0) = 1. Every coefficient is positive, so Horner's rule has no cancellation."""
    num, den = [float(2 * levels + 1)], [1.0]
    for k in range(levels - 1, -1, -1):
        # num/den ← ((2k+1)·num + x²·den) / num
        times_t = [0.0, *den]
        scaled = [(2 * k + 1) * c for c in num]
        width = max(len(scaled), len(times_t))
        scaled += [0.0] * (width - len(scaled))
        times_t += [0.0] * (width - len(times_t))
        num, den = [u + v for u, v in zip(scaled, times_t)], num
    scale = num[0]
    return tuple(c / scale for c in den), tuple(c / scale for c in num)


(_P0, _P1, _P2, _P3, _P4, _P5, _P6), (_Q0, _Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7) = _lambert_tanh_coefficients()


def tanh_vectorizable(z):
    """tanh(z); in float32 kernels a form LLVM can vectorize (see the overload)."""
    return math.tanh(z)


@overload(tanh_vectorizable, jit_options={"cache": CACHE, "error_model": "numpy"})
def _tanh_vectorizable_overload(z):
    # Numba calls libm's scalar tanhf (no SVML in pip's llvmlite): 8-30 ns per element here,
    # 85 % of narrow's forward pass. In float32 we use Lambert's continued fraction, 13 levels,
    # as one ratio of polynomials with positive coefficients, on |x| ≤ 9 (tanh rounds to ±1
    # beyond): within 6 ulp of tanh on [-9, 9] (tests/test_cpu.py). float64 keeps libm's tanh.
    if z == types.float32:

        def impl(z):
            x = z if z < np.float32(9.0) else np.float32(9.0)
            x = x if x > np.float32(-9.0) else np.float32(-9.0)
            t = x * x
            p = ((((((np.float32(_P6) * t + np.float32(_P5)) * t + np.float32(_P4)) * t + np.float32(_P3))
                   * t + np.float32(_P2)) * t + np.float32(_P1)) * t + np.float32(_P0))  # fmt: skip
            q = (((((((np.float32(_Q7) * t + np.float32(_Q6)) * t + np.float32(_Q5)) * t + np.float32(_Q4))
                    * t + np.float32(_Q3)) * t + np.float32(_Q2)) * t + np.float32(_Q1)) * t
                 + np.float32(_Q0))  # fmt: skip
            y = x * p / q  # may round a hair past ±1 near the clamp
            y = y if y < np.float32(1.0) else np.float32(1.0)
            return y if y > np.float32(-1.0) else np.float32(-1.0)

        return impl
    return lambda z: math.tanh(z)


@njit(cache=CACHE)
def _rows(buf, off, n_rows, width, r0, r1):
    # buf flat; returns rows [r0, r1) of the (n_rows, width) matrix stored at buf[off:]
    return buf[off + r0 * width : off + r1 * width].reshape((r1 - r0, width))


@njit(cache=CACHE, fastmath={"reassoc", "contract"})
def sum_squares(v):
    # v (n,) -> Σ v²; reassociation lets LLVM keep vector partial sums (a serial sum was
    # latency-bound: most of the norms' cost on narrow). The order is fixed by the compiled
    # code, not by threads, so results stay bit-identical.
    s = like(v[0], 0.0)  # widths are ≥ 1
    for k in range(v.shape[0]):
        s += v[k] * v[k]
    return s


@njit(parallel=True, cache=CACHE, error_model="numpy")
def fused_backprop(
    sizes, w_off, b_off, theta, X, labels, targets, act, loss,
    backward, per_row, clip_norm, want_grad, want_sq,
    acts, dphi, deltas, sqa, losses, layer_sq, norms, clip_c, rows_out,
    grad, sq, clipped, accumulate, tasks, tile, w_t, small_layer, partial, slots,
):  # fmt: skip
    # sizes (L+1,); theta (P,); X (R, n0); labels (R,) or (0,); targets (R, nL) or (0, nL);
    # acts, dphi: flat (R, n_l) for l = 1..L-1; deltas: flat (R, n_l) for l = 1..L;
    # sqa: flat (R, n_l) for l = 0..L-1 (squared inputs, when want_sq); losses, norms, clip_c (R,);
    # layer_sq (R, L); rows_out (R, P) or (0, 0); grad, sq, clipped (P,) or (0,); tasks (T, 3);
    # w_t (P,) scratch: Wᵀ of the layers with at most small_layer weights;
    # partial (n_slots, n_tiles, P): per-tile sums for the kinds (grad, sq, clipped) whose slots[kind]
    # is ≥ 0; the other kinds are made in phase 2
    L = sizes.shape[0] - 1
    R = X.shape[0]
    # offsets of each layer's (R, n) block in the flat buffers
    a_off = np.zeros(L + 1, np.int64)  # a_1..a_{L-1} in acts and dphi (index: layer)
    d_off = np.zeros(L + 1, np.int64)  # δ_1..δ_L in deltas
    s_off = np.zeros(L + 1, np.int64)  # a_0²..a_{L-1}² in sqa
    for j in range(2, L + 1):
        a_off[j] = a_off[j - 1] + R * sizes[j - 1]
        d_off[j] = d_off[j - 1] + R * sizes[j - 1]
    for j in range(1, L + 1):
        s_off[j] = s_off[j - 1] + R * sizes[j - 1]
    zero = like(theta[0], 0.0)
    one = like(theta[0], 1.0)
    ce = loss == CROSS_ENTROPY
    want_rows = rows_out.shape[0] > 0
    n_slots = partial.shape[0]
    n_tiles = (R + tile - 1) // tile
    # small GEMMs ran 1.8x faster here with Wᵀ stored than with W read transposed (128x64x64)
    for j in range(L):
        n_in, n_out = sizes[j], sizes[j + 1]
        if n_in * n_out <= small_layer:
            W = theta[w_off[j] : b_off[j]].reshape((n_out, n_in))
            WT = w_t[w_off[j] : b_off[j]].reshape((n_in, n_out))
            for k in range(n_in):
                for o in range(n_out):
                    WT[k, o] = W[o, k]
    # phase 1: every tile forward and back through the whole network, per-row reducers on it
    for t in prange(n_tiles):
        r0 = t * tile
        r1 = min(R, r0 + tile)
        m = r1 - r0
        for j in range(L):
            n_in, n_out = sizes[j], sizes[j + 1]
            W = theta[w_off[j] : b_off[j]].reshape((n_out, n_in))
            b = theta[b_off[j] : b_off[j] + n_out]
            a_in = X[r0:r1] if j == 0 else _rows(acts, a_off[j], R, n_in, r0, r1)
            if want_sq:
                a_sq = _rows(sqa, s_off[j], R, n_in, r0, r1)
                for i in range(m):
                    for k in range(n_in):
                        a_sq[i, k] = a_in[i, k] * a_in[i, k]
            if j < L - 1:
                z = _rows(acts, a_off[j + 1], R, n_out, r0, r1)
                g = _rows(dphi, a_off[j + 1], R, n_out, r0, r1)
                if n_in * n_out <= small_layer:
                    np.dot(a_in, w_t[w_off[j] : b_off[j]].reshape((n_in, n_out)), z)
                else:
                    np.dot(a_in, W.T, z)
                if act == TANH:  # its own loop, so that it vectorizes
                    for i in range(m):
                        for k in range(n_out):
                            aa = tanh_vectorizable(z[i, k] + b[k])
                            g[i, k] = one - aa * aa
                            z[i, k] = aa
                else:
                    for i in range(m):
                        for k in range(n_out):
                            zz = z[i, k] + b[k]
                            aa = activate(act, zz)
                            g[i, k] = activate_grad(act, zz, aa)
                            z[i, k] = aa
            else:
                z_out = np.empty((m, n_out), X.dtype)
                if n_in * n_out <= small_layer:
                    np.dot(a_in, w_t[w_off[j] : b_off[j]].reshape((n_in, n_out)), z_out)
                else:
                    np.dot(a_in, W.T, z_out)
                d_out = _rows(deltas, d_off[L], R, n_out, r0, r1)
                for i in range(m):
                    for k in range(n_out):
                        z_out[i, k] += b[k]
                    label = labels[r0 + i] if ce else 0
                    target = z_out[i] if ce else targets[r0 + i]
                    losses[r0 + i] = output_delta_row(loss, z_out[i], target, label, d_out[i])
        if not backward:
            continue
        # δ_{l-1} = (δ_l W_l) ⊙ φ'(z_{l-1})
        for j in range(L - 1, 0, -1):
            n_mid, n_out = sizes[j], sizes[j + 1]
            W = theta[w_off[j] : b_off[j]].reshape((n_out, n_mid))
            d_next = _rows(deltas, d_off[j + 1], R, n_out, r0, r1)
            d_here = _rows(deltas, d_off[j], R, n_mid, r0, r1)
            np.dot(d_next, W, d_here)
            g = _rows(dphi, a_off[j], R, n_mid, r0, r1)
            for i in range(m):
                for k in range(n_mid):
                    d_here[i, k] *= g[i, k]
        for i in range(r0, r1):
            if per_row:
                # Goodfellow: ‖∇_{W_l, b_l} ℓ_i‖² = ‖δ_l‖² (‖a_{l-1}‖² + 1)
                total = zero
                for j in range(L):
                    n_in, n_out = sizes[j], sizes[j + 1]
                    dsq = sum_squares(deltas[d_off[j + 1] + i * n_out : d_off[j + 1] + (i + 1) * n_out])
                    a_row = X[i] if j == 0 else acts[a_off[j] + i * n_in : a_off[j] + (i + 1) * n_in]
                    asq = one + sum_squares(a_row)
                    layer_sq[i, j] = dsq * asq
                    total += dsq * asq
                norms[i] = math.sqrt(total)
                if clip_norm > 0:
                    c = one
                    if norms[i] > clip_norm:
                        c = like(theta[0], clip_norm) / norms[i]
                    clip_c[i] = c
            if want_rows:
                # row i of the (R, P) per-sample matrix, written once, in θ's layout
                out_row = rows_out[i]
                for j in range(L):
                    n_in, n_out = sizes[j], sizes[j + 1]
                    a_row = X[i] if j == 0 else acts[a_off[j] + i * n_in : a_off[j] + (i + 1) * n_in]
                    for r in range(n_out):
                        d = deltas[d_off[j + 1] + i * n_out + r]
                        w_row = out_row[w_off[j] + r * n_in : w_off[j] + (r + 1) * n_in]
                        for k in range(n_in):
                            w_row[k] = d * a_row[k]
                        out_row[b_off[j] + r] = d
        if n_slots > 0:
            # this tile's sums, per layer Mᵀ A with M = Δ_t, Δ_t² (A²) or c ⊙ Δ_t, while the tile
            # is hot (the clip factors of its rows are known: the norms loop above ran); summed below
            for j in range(L):
                n_in, n_out = sizes[j], sizes[j + 1]
                a_in = X[r0:r1] if j == 0 else _rows(acts, a_off[j], R, n_in, r0, r1)
                d = _rows(deltas, d_off[j + 1], R, n_out, r0, r1)
                for kind in range(3):
                    if slots[kind] < 0:
                        continue
                    if kind == 0:
                        m_blk = d
                        src = a_in
                    elif kind == 1:
                        m_blk = np.empty((m, n_out), X.dtype)
                        for i in range(m):
                            for r in range(n_out):
                                m_blk[i, r] = d[i, r] * d[i, r]
                        src = _rows(sqa, s_off[j], R, n_in, r0, r1)
                    else:
                        m_blk = np.empty((m, n_out), X.dtype)
                        for i in range(m):
                            c = clip_c[r0 + i]
                            for r in range(n_out):
                                m_blk[i, r] = c * d[i, r]
                        src = a_in
                    p_row = partial[slots[kind], t]
                    np.dot(m_blk.T, src, p_row[w_off[j] : b_off[j]].reshape((n_out, n_in)))
                    p_b = p_row[b_off[j] : b_off[j] + n_out]
                    for r in range(n_out):
                        p_b[r] = zero
                    for i in range(m):
                        for r in range(n_out):
                            p_b[r] += m_blk[i, r]
    if not (want_grad or want_sq or clip_norm > 0):
        return
    for kind in range(3):
        if slots[kind] < 0:
            continue
        # the tiles' sums added in tile order, over fixed chunks of parameters
        target_vec = grad if kind == 0 else (sq if kind == 1 else clipped)
        part_k = partial[slots[kind]]
        n_par = part_k.shape[1]
        for c in prange((n_par + 4095) // 4096):
            k0 = c * 4096
            k1 = min(n_par, k0 + 4096)
            for k in range(k0, k1):
                if accumulate:
                    target_vec[k] += part_k[0, k]
                else:
                    target_vec[k] = part_k[0, k]
            for u in range(1, n_tiles):
                for k in range(k0, k1):
                    target_vec[k] += part_k[u, k]
    if not ((want_grad and slots[0] < 0) or (want_sq and slots[1] < 0) or (clip_norm > 0 and slots[2] < 0)):
        return
    # phase 2: rows [q0, q1) of each layer's weight gradient, one GEMM over the chunk per task:
    # M (R, nr) is Δ's columns [q0, q1), plain, squared or row-scaled by the clip factors, and
    # BLAS reads it transposed: W-rows = Mᵀ A (A squared for sq), b-rows = column sums of M
    for t in prange(tasks.shape[0]):
        j, q0, q1 = tasks[t, 0], tasks[t, 1], tasks[t, 2]
        n_in, n_out = sizes[j], sizes[j + 1]
        nr = q1 - q0
        a_in = X if j == 0 else _rows(acts, a_off[j], R, n_in, 0, R)
        d = _rows(deltas, d_off[j + 1], R, n_out, 0, R)
        blk = np.empty((R, nr), X.dtype)
        part = np.empty((nr, n_in), X.dtype)
        col = np.empty(nr, X.dtype)
        for kind in range(3):
            if kind == 0:
                if not want_grad or slots[0] >= 0:
                    continue
                target_vec = grad
                src = a_in
                if nr == n_out:
                    m_blk = d  # the whole layer: no copy
                else:
                    for i in range(R):
                        for r in range(nr):
                            blk[i, r] = d[i, q0 + r]
                    m_blk = blk
            elif kind == 1:
                if not want_sq or slots[1] >= 0:
                    continue
                target_vec = sq
                src = _rows(sqa, s_off[j], R, n_in, 0, R)
                for i in range(R):
                    for r in range(nr):
                        blk[i, r] = d[i, q0 + r] * d[i, q0 + r]
                m_blk = blk
            else:
                if not clip_norm > 0 or slots[2] >= 0:
                    continue
                target_vec = clipped
                src = a_in
                for i in range(R):
                    c = clip_c[i]
                    for r in range(nr):
                        blk[i, r] = c * d[i, q0 + r]
                m_blk = blk
            w_part = target_vec[w_off[j] + q0 * n_in : w_off[j] + q1 * n_in]
            if accumulate:
                np.dot(m_blk.T, src, part)
                flat = part.reshape(nr * n_in)
                for k in range(nr * n_in):
                    w_part[k] += flat[k]
            else:
                np.dot(m_blk.T, src, w_part.reshape((nr, n_in)))
            for r in range(nr):
                col[r] = zero
            for i in range(R):  # column sums, each in sample order
                for r in range(nr):
                    col[r] += m_blk[i, r]
            for r in range(nr):
                if accumulate:
                    target_vec[b_off[j] + q0 + r] += col[r]
                else:
                    target_vec[b_off[j] + q0 + r] = col[r]


@njit(parallel=True, cache=CACHE)
def variance_from_moments(grad, sq, var):
    # grad, sq, var (P,): var = max(sq - grad², 0), one pass (NumPy's took three, with temporaries)
    n = grad.shape[0]
    for c in prange((n + 65535) // 65536):
        for k in range(c * 65536, min(n, (c + 1) * 65536)):
            v = sq[k] - grad[k] * grad[k]
            var[k] = v if v > like(v, 0.0) else like(v, 0.0)


# ------------------------------------------------------------------ host side


class Workspace:
    """Scratch buffers of the Numba backend, reused across calls.

    Pass one to :func:`fastgrad.backprop` / :func:`fastgrad.clipped_grad`
    (``workspace=``) so a training loop allocates nothing of size B × widths per
    step. Without one, each Python thread keeps its own. Not shareable between
    threads that call at the same time.
    """

    def __init__(self):
        self._key = None
        self._bufs = None

    def buffers(self, sizes: tuple[int, ...], rows: int, dtype: np.dtype, want_sq: bool):
        """Flat buffers (acts, dphi, deltas, sqa) and the task list for ``rows`` samples."""
        key = (tuple(sizes), rows, np.dtype(dtype), want_sq)
        if self._key != key:
            hidden = sum(sizes[1:-1])
            self._bufs = (
                np.empty(rows * hidden, dtype),
                np.empty(rows * hidden, dtype),
                np.empty(rows * sum(sizes[1:]), dtype),
                np.empty(rows * sum(sizes[:-1]) if want_sq else 0, dtype),
                _tasks(sizes),
                np.empty(sum(a * b for a, b in itertools.pairwise(sizes)) + sum(sizes[1:]), dtype),
            )
            self._key = key
        return self._bufs

    def partials(self, n_slots: int, n_tiles: int, num_params: int, dtype: np.dtype) -> np.ndarray:
        """The (slots, tiles, P) buffer of per-tile sums."""
        buf = getattr(self, "_partials", None)
        shape = (n_slots, n_tiles, num_params)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._partials = np.empty(shape, dtype)
        return buf


def chunk_rows(sizes: tuple[int, ...], dtype) -> int:
    """Samples per kernel call: the whole tiles whose scratch fits in ``WORKSPACE_BYTES``."""
    per_row = np.dtype(dtype).itemsize * (2 * sum(sizes[1:-1]) + sum(sizes[1:]) + sum(sizes[:-1]))
    return max(TILE, WORKSPACE_BYTES // per_row // TILE * TILE)


def _tasks(sizes) -> np.ndarray:
    """(layer, first row, end row) of every phase-2 GEMM block, costliest first (for balance)."""
    tasks = []
    for j in range(len(sizes) - 1):
        for q0 in range(0, sizes[j + 1], BLOCK):
            tasks.append((j, q0, min(sizes[j + 1], q0 + BLOCK)))
    tasks.sort(key=lambda t: -(t[2] - t[1]) * sizes[t[0]])
    return np.array(tasks, dtype=np.int64).reshape(-1, 3)


_local = threading.local()


def _thread_workspace() -> Workspace:
    ws = getattr(_local, "workspace", None)
    if ws is None:
        ws = _local.workspace = Workspace()
    return ws


class _SingleThreadedBLAS:
    """Holds every loaded BLAS to one thread while any call is inside a kernel.

    A counter under a lock makes nested and concurrent calls (two Python threads)
    restore the user's setting exactly once, when the last one leaves.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._inside = 0
        self._saved = None
        self._controllers = None

    def _blas(self):
        if self._controllers is None:
            import scipy.linalg.cython_blas  # noqa: F401  (load the BLAS Numba calls)
            from threadpoolctl import ThreadpoolController

            self._controllers = ThreadpoolController().select(user_api="blas").lib_controllers
        return self._controllers

    @contextmanager
    def __call__(self):
        with self._lock:
            if self._inside == 0:
                libs = self._blas()
                self._saved = [lib.get_num_threads() for lib in libs]
                for lib in libs:
                    lib.set_num_threads(1)
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    for lib, n in zip(self._blas(), self._saved):
                        lib.set_num_threads(n)


single_threaded_blas = _SingleThreadedBLAS()


def _writeable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable else a.copy()


def _layout(net: MLP):
    sizes = np.array(net.sizes, dtype=np.int64)
    w_off = np.array([s.w_start for s in net.layers], dtype=np.int64)
    b_off = np.array([s.b_start for s in net.layers], dtype=np.int64)
    return sizes, w_off, b_off


def run(net: MLP, inp, need: frozenset, max_norm: float | None, out: np.ndarray | None,
        workspace: Workspace | None = None) -> dict:  # fmt: skip
    """The backend contract of :mod:`fastgrad.api` (see ``api._BACKENDS``), on CPU threads."""
    dt = inp.dtype
    B, P, L = inp.batch_size, net.num_params, net.num_layers
    want_grad = "grad" in need
    want_sq = "sq_mean" in need
    want_rows = "per_sample" in need
    clip = max_norm is not None
    per_row = bool(need & {"norms", "layer_norms"}) or clip
    backward = want_grad or want_sq or want_rows or per_row
    ws = workspace if workspace is not None else _thread_workspace()
    chunk = min(B, chunk_rows(net.sizes, dt))
    acts, dphi, deltas, sqa, tasks, w_t = ws.buffers(net.sizes, chunk, dt, want_sq)
    sizes, w_off, b_off = _layout(net)
    # Numba types read-only arrays apart: copy them rather than compile the kernel a second time
    theta, X, labels, targets = (_writeable(a) for a in (inp.theta, inp.X, inp.labels, inp.targets))
    empty1 = np.empty(0, dt)
    grad = np.empty(P, dt) if want_grad else empty1
    sq = np.empty(P, dt) if want_sq else empty1
    clipped = np.empty(P, dt) if clip else empty1
    losses = np.empty(B, dt)
    layer_sq = np.empty((B, L), dt)
    norms = np.empty(B, dt)
    clip_c = np.empty(B, dt)
    G = None
    if want_rows:
        G = out if out is not None else np.empty((B, P), dt)
    no_rows = np.empty((0, 0), dt)
    # per-tile sums for grad, then sq, then clipped, while they fit in PARTIALS_BYTES
    n_tiles = -(-chunk // TILE)
    slots = np.full(3, -1, np.int64)
    n_slots = 0
    for kind, wanted in enumerate((want_grad, want_sq, clip)):
        if wanted and (n_slots + 1) * n_tiles * P * dt.itemsize <= PARTIALS_BYTES:
            slots[kind] = n_slots
            n_slots += 1
    partial = ws.partials(n_slots, n_tiles, P, dt) if n_slots else np.empty((0, 0, 0), dt)
    ce = net.loss_code == CROSS_ENTROPY
    clip_norm = float(max_norm) if clip else -1.0
    # chunk size 1: tiles and phase-2 tasks are handed out one at a time, as they differ in cost
    with single_threaded_blas(), numba.parallel_chunksize(1):
        for c0 in range(0, B, chunk):
            c1 = min(B, c0 + chunk)
            R = c1 - c0
            fused_backprop(
                sizes, w_off, b_off, theta, X[c0:c1],
                labels[c0:c1] if ce else labels,
                targets if ce else targets[c0:c1],
                net.activation_code, net.loss_code,
                backward, per_row, clip_norm, want_grad, want_sq,
                acts[: R * sum(net.sizes[1:-1])], dphi[: R * sum(net.sizes[1:-1])],
                deltas[: R * sum(net.sizes[1:])], sqa[: R * sum(net.sizes[:-1])] if want_sq else sqa,
                losses[c0:c1], layer_sq[c0:c1], norms[c0:c1], clip_c[c0:c1],
                np.asarray(G[c0:c1]) if want_rows else no_rows,
                grad, sq, clipped, c0 > 0, tasks, TILE, w_t, SMALL_LAYER, partial, slots,
            )  # fmt: skip
    res = {"loss": losses.mean(dtype=dt)}
    if want_grad:
        grad /= dt.type(B)
        res["grad"] = grad
    if want_sq:
        sq /= dt.type(B)
        res["sq_mean"] = sq
    if want_grad and want_sq and "variance" in need:
        res["variance"] = np.empty(P, dt)
        with numba.parallel_chunksize(1):
            variance_from_moments(grad, sq, res["variance"])
    if per_row:
        res["norms"] = norms
        res["layer_norms"] = np.sqrt(layer_sq)
    if clip:
        res["clipped_sum"] = clipped
    if want_rows:
        res["per_sample"] = G
    return res


def compile_all(dtypes=(np.float32, np.float64)) -> None:
    """Compile (or load from the disk cache) every kernel for ``dtypes``: one tiny call each."""
    from ._validation import check_inputs

    net = MLP([2, 3, 2], activation="tanh", loss="cross_entropy")
    for dt in dtypes:
        theta = net.init(seed=0, dtype=dt)
        inp = check_inputs(net, theta, np.zeros((1, 2), dt), np.zeros(1, np.int64))
        run(net, inp, frozenset({"loss", "grad", "sq_mean", "norms", "per_sample"}), 1.0, None)


__all__ = [
    "BLOCK",
    "CACHE",
    "PARTIALS_BYTES",
    "SMALL_LAYER",
    "TILE",
    "WORKSPACE_BYTES",
    "Workspace",
    "check_available",
    "chunk_rows",
    "compile_all",
    "run",
]

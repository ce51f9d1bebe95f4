"""The numba backend's compiled kernels: the per-tile steps, the two-phase driver
:func:`fused_backprop` and the whole-batch call :func:`batch_backprop` (see :mod:`fastgrad.cpu`).

Each kernel opens with a one-line shape comment. A step has the name it has on the CUDA paths
(the vocabulary table of docs/architecture.md): ``dense_forward``, ``output_forward``,
``dense_backward``, ``norms_from_deltas``, ``write_rows``, ``layer_sums`` (with ``sum_operand``
and ``sum_source``), ``sum_partials``.
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .._scalar import like
from ..activations import TANH, activate, activate_grad
from ..losses import CROSS_ENTROPY, output_delta_row
from ..quantities import DELTA, DELTA_SQUARED, INPUT, clip_factor, layer_norm_sq, variance_from_moments
from .config import CACHE
from ..noise import BLOCK as NOISE_BLOCK, noised_block
from ..update import ROW, Update, update_block


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
            # the clamps test "beyond the bound", so a NaN falls through both and propagates (tested)
            x = np.float32(9.0) if z > np.float32(9.0) else z
            x = np.float32(-9.0) if x < np.float32(-9.0) else x
            t = x * x
            p = ((((((np.float32(_P6) * t + np.float32(_P5)) * t + np.float32(_P4)) * t + np.float32(_P3))
                   * t + np.float32(_P2)) * t + np.float32(_P1)) * t + np.float32(_P0))  # fmt: skip
            q = (((((((np.float32(_Q7) * t + np.float32(_Q6)) * t + np.float32(_Q5)) * t + np.float32(_Q4))
                    * t + np.float32(_Q3)) * t + np.float32(_Q2)) * t + np.float32(_Q1)) * t
                 + np.float32(_Q0))  # fmt: skip
            y = x * p / q  # may round a hair past ±1 near the clamp
            y = np.float32(1.0) if y > np.float32(1.0) else y
            return np.float32(-1.0) if y < np.float32(-1.0) else y

        return impl
    return lambda z: math.tanh(z)


# Every kernel below works on m rows of a tile (m ≤ TILE) or the R rows of a chunk. Layers are
# numbered l = 1..L as in docs/design.md §2; layer l maps n_{l-1} inputs to n_l outputs. The arguments travel
# in named packs (Numba compiles namedtuples, attribute access included), so that none takes a long
# argument list; the plan is an array, (n_sums, 4) int64: one row per sum over samples to make.
# The kernel each call enters from Python, batch_backprop, takes the packs as plain tuples in the
# fields' order and names them on entry: Numba's dispatcher types a namedtuple argument about 2 µs
# slower than a plain tuple (8 packs: +16 µs, 1.4× the time of a 42 µs Step call).

Net = namedtuple("Net", "layout theta w_t")
"""The network: ``layout`` (L, 5) int64 (columns :data:`N_IN`, ...), θ (P,), and ``w_t`` (P,): the stored
W_lᵀ of the layers forwarded with it, at W_l's place."""
Data = namedtuple("Data", "X labels targets")
"""The samples: X (R, n_0); ``labels`` (R,) int64 (cross-entropy) or (0,); ``targets`` (R, n_L) (the other
losses) or (0, n_L)."""
Codes = namedtuple("Codes", "activation loss tile")
"""Run-time codes: the activation's and the loss's (:mod:`fastgrad.activations`, :mod:`fastgrad.losses`),
and the samples per tile."""
Flags = namedtuple("Flags", "backward per_row squares accumulate")
"""What a pass does: go backward at all; make the per-row norms; keep A_{l-1} ⊙ A_{l-1} (for the squared
sums); add the sums to what ``sums`` holds (every chunk but a batch's first)."""
Scalars = namedtuple("Scalars", "max_norm count")
"""C of the clip factors in θ's dtype (≤ 0: no clipping), and the count B in θ's dtype by which the batch's
last chunk divides the mean sums at its end (≤ 0: no division)."""
Buffers = namedtuple("Buffers", "acts dphi deltas sqa")
"""The workspace's flat scratch: A_l and φ'(z_l) as (R, n_l) blocks for l = 1..L-1, Δ_l for l = 1..L, and
A_l ⊙ A_l for l = 0..L-1 when squares (else empty); also, per buffer, its elements per sample
(:func:`fastgrad.cpu.workspace.scratch_per_row`)."""
RowOut = namedtuple("RowOut", "losses layer_sq norms clip_c rows")
"""The per-row outputs: ``losses`` (R,), ``layer_sq`` (R, L) float64, ``norms`` (R,), ``clip_c`` (R,), and
``rows`` (R, P) (the per-sample gradients) or (0, 0)."""
Chunk = namedtuple("Chunk", "X acts dphi deltas sqa offsets")
"""A chunk's inputs and scratch, as the per-tile kernels read them: X (R, n_0), the :class:`Buffers`, and
``offsets`` (L+1, 3) int64 (columns :data:`A_AT`, ...) from :func:`chunk_offsets`."""
Check = namedtuple("Check", "on lo hi")
"""The values' check of :func:`batch_backprop`: whether to run it, and the targets' domain [lo, hi]."""
Noise = namedtuple("Noise", "out row std denominator k0 k1 c3 wide norms")
"""DP-SGD's noised step, made in the last pass of a batch's last chunk (:func:`noise_block`): ``out`` (P,)
receives (sums[row] + std·ξ) / denominator (std = 0: sums[row] / denominator), ξ from the seed words
(k0, k1, c3) (uint64, :func:`fastgrad.noise.seed_words`), std and denominator in θ's dtype, wide: θ is
float64; ``norms`` (B,) the batch's per-sample norms: one NaN or Inf among them and nothing is made."""

N_IN, N_OUT, W_AT, B_AT, FORWARD = range(5)
"""Columns of ``layout``, row l-1 for layer l: n_{l-1}, n_l, where W_l and b_l start in θ, and how the
layer's forward GEMM runs (:data:`READ_WT`, :data:`STORED_WT` or :data:`PRODUCT_T`)."""
READ_WT, STORED_WT, PRODUCT_T = range(3)
"""The forward GEMMs A_{l-1} W_lᵀ: with W_l read transposed; with a stored copy of W_lᵀ (layers of at most
``SMALL_LAYER`` weights); or as the transposed product (W_l A_{l-1}ᵀ)ᵀ (bigger layers on tiles of at most
``TRANSPOSED_ROWS`` rows)."""
A_AT, D_AT, S_AT = range(3)
"""Columns of a chunk's ``offsets``, row l: where the (R, n_l) block of A_l (and of φ'(z_l)) starts
in acts (and dphi), l = 1..L-1; of Δ_l in deltas, l = 1..L; of A_l ⊙ A_l in sqa, l = 0..L-1."""
OPERAND, SOURCE, SLOT, MEAN = range(4)
"""Columns of ``plan``: the operand kind M (quantities.DELTA, ...), the source kind S
(quantities.INPUT, ...), the sum's row of per-tile partial sums (-1: made in phase 2), and 1 when the
sum is a mean (divided by the batch size at the end of the last chunk)."""
FINISH_BLOCK = 4096
"""Parameters per task of a chunk's last pass (:func:`fused_backprop`): the partial sums added and the means
divided block by block, while the block is in cache. Element-wise, so any split gives the same bits (the
noise's too: its blocks need only start at a multiple of 4 and hold at most ``noise.BLOCK`` values)."""
assert FINISH_BLOCK % 4 == 0 and FINISH_BLOCK <= NOISE_BLOCK
FIRST = np.int64(0)
"""Row or column 0 as an int64: a literal 0 argument would make Numba compile the callee once more
per dtype (so would ``prange``'s index, unsigned inside the loop: it is passed as ``np.int64(t)``)."""


@njit(cache=CACHE)
def _rows(buf, off, n_rows, width, r0, r1):
    # buf flat; returns rows [r0, r1) of the (n_rows, width) matrix stored at buf[off:]
    return buf[off + r0 * width : off + r1 * width].reshape((r1 - r0, width))


@njit(cache=CACHE)
def chunk_offsets(layout, R):
    # layout (L, 5), R rows -> offsets (L+1, 3): where each layer's (R, n) blocks start in the workspace
    L = layout.shape[0]
    offsets = np.zeros((L + 1, 3), np.int64)
    for l in range(2, L + 1):  # A_l, φ'(z_l) and Δ_l follow A_{l-1}, φ'(z_{l-1}) and Δ_{l-1}
        offsets[l, A_AT] = offsets[l - 1, A_AT] + R * layout[l - 2, N_OUT]
        offsets[l, D_AT] = offsets[l - 1, D_AT] + R * layout[l - 2, N_OUT]
    for l in range(1, L + 1):
        offsets[l, S_AT] = offsets[l - 1, S_AT] + R * layout[l - 1, N_IN]
    return offsets


@njit(cache=CACHE)
def layer_params(net, l):
    # θ (P,) -> W_l (n_l, n_{l-1}), its stored transpose (n_{l-1}, n_l; valid when STORED_WT), b_l (n_l,)
    layout, theta, w_t = net.layout, net.theta, net.w_t
    n_in, n_out = layout[l - 1, N_IN], layout[l - 1, N_OUT]
    w0, b0 = layout[l - 1, W_AT], layout[l - 1, B_AT]
    return (theta[w0:b0].reshape((n_out, n_in)), w_t[w0:b0].reshape((n_in, n_out)), theta[b0 : b0 + n_out])


@njit(cache=CACHE)
def layer_input(net, chunk, l, r0, r1):
    # rows [r0, r1) of A_{l-1} (m, n_{l-1}); A_0 = X
    X = chunk.X
    if l == 1:
        return X[r0:r1]
    return _rows(chunk.acts, chunk.offsets[l - 1, A_AT], X.shape[0], net.layout[l - 1, N_IN], r0, r1)


@njit(cache=CACHE)
def layer_input_squared(net, chunk, l, r0, r1):
    # rows [r0, r1) of A_{l-1} ⊙ A_{l-1} (m, n_{l-1}), kept in sqa
    return _rows(chunk.sqa, chunk.offsets[l - 1, S_AT], chunk.X.shape[0], net.layout[l - 1, N_IN], r0, r1)


@njit(cache=CACHE)
def sum_source(net, chunk, source, l, r0, r1):
    # rows [r0, r1) of the source S (m, n_{l-1}) of a sum: A_{l-1} (INPUT) or A_{l-1} ⊙ A_{l-1}
    if source == INPUT:
        return layer_input(net, chunk, l, r0, r1)
    return layer_input_squared(net, chunk, l, r0, r1)


@njit(cache=CACHE)
def layer_output(net, chunk, l, r0, r1):
    # rows [r0, r1) of A_l and of φ'(z_l), both (m, n_l), for a hidden layer l < L
    R, off, n_out = chunk.X.shape[0], chunk.offsets[l, A_AT], net.layout[l - 1, N_OUT]
    return _rows(chunk.acts, off, R, n_out, r0, r1), _rows(chunk.dphi, off, R, n_out, r0, r1)


@njit(cache=CACHE)
def layer_delta(net, chunk, l, r0, r1):
    # rows [r0, r1) of Δ_l (m, n_l)
    return _rows(chunk.deltas, chunk.offsets[l, D_AT], chunk.X.shape[0], net.layout[l - 1, N_OUT], r0, r1)


@njit(cache=CACHE)
def store_transposed(net):
    # w_t (P,) gets W_lᵀ (n_{l-1}, n_l) at W_l's place, for every layer forwarded with it
    layout = net.layout
    for l in range(1, layout.shape[0] + 1):
        if layout[l - 1, FORWARD] == STORED_WT:
            W, WT, _ = layer_params(net, l)
            for k in range(WT.shape[0]):
                for o in range(WT.shape[1]):
                    WT[k, o] = W[o, k]


@njit(cache=CACHE, error_model="numpy")
def forward_gemm(net, l, a_in, out):
    # A_{l-1} (m, n_{l-1}) -> out (m, n_l) = A_{l-1} W_lᵀ, as the layout's FORWARD column says: small GEMMs
    # ran 1.8x faster with Wᵀ stored than with W read transposed (128x64x64); for a big layer on a tile of
    # m ≤ 64 rows, W A_{l-1}ᵀ (n_l, m) then transposed took 0.6-0.8x the time of A_{l-1} Wᵀ (OpenBLAS
    # packs the small operand A_{l-1} rather than all of W; docs/benchmarks.md, the CPU tunables)
    W, WT, _ = layer_params(net, l)
    how = net.layout[l - 1, FORWARD]
    if how == STORED_WT:
        np.dot(a_in, WT, out)
    elif how == PRODUCT_T:
        out_t = np.empty((out.shape[1], out.shape[0]), out.dtype)
        np.dot(W, a_in.T, out_t)
        for i in range(out.shape[0]):
            row = out[i]
            for k in range(row.shape[0]):
                row[k] = out_t[k, i]
    else:
        np.dot(a_in, W.T, out)


@njit(cache=CACHE, error_model="numpy")
def square_into(a, out):
    # a (m, n) -> out (m, n) = a ⊙ a: the source A_{l-1} ⊙ A_{l-1} of the squared sums
    for i in range(a.shape[0]):
        for k in range(a.shape[1]):
            out[i, k] = a[i, k] * a[i, k]


@njit(cache=CACHE, error_model="numpy")
def dense_forward(net, l, a_in, act, z, g):
    # A_{l-1} (m, n_{l-1}) -> z: A_l = φ(A_{l-1} W_lᵀ + b_l) (m, n_l), g: φ'(z_l) (m, n_l); l < L
    forward_gemm(net, l, a_in, z)
    b = layer_params(net, l)[2]
    one = like(b[0], 1.0)
    if act == TANH:  # its own loop, so that it vectorizes
        for i in range(z.shape[0]):
            for k in range(z.shape[1]):
                aa = tanh_vectorizable(z[i, k] + b[k])
                g[i, k] = one - aa * aa
                z[i, k] = aa
    else:
        for i in range(z.shape[0]):
            for k in range(z.shape[1]):
                zz = z[i, k] + b[k]
                aa = activate(act, zz)
                g[i, k] = activate_grad(act, zz, aa)
                z[i, k] = aa


@njit(cache=CACHE, error_model="numpy")
def dense_backward(net, l, d_out, g, d_in):
    # Δ_l (m, n_l), g = φ'(z_{l-1}) (m, n_{l-1}) -> d_in: Δ_{l-1} = (Δ_l W_l) ⊙ φ'(z_{l-1}) (m, n_{l-1})
    np.dot(d_out, layer_params(net, l)[0], d_in)
    for i in range(d_in.shape[0]):
        for k in range(d_in.shape[1]):
            d_in[i, k] *= g[i, k]


@njit(cache=CACHE, error_model="numpy")
def output_forward(net, a_in, loss, labels, targets, r0, losses, d_out):
    # A_{L-1} (m, n_{L-1}) -> losses[r0 + i] = ℓ_i, d_out: Δ_L = ∂ℓ/∂z_L (m, n_L), z_L = A_{L-1} W_Lᵀ + b_L;
    # labels (R,) (cross-entropy) and targets (R, n_L) (the other losses) are the chunk's
    L = net.layout.shape[0]
    z_out = np.empty(d_out.shape, d_out.dtype)
    forward_gemm(net, L, a_in, z_out)
    b = layer_params(net, L)[2]
    ce = loss == CROSS_ENTROPY
    for i in range(z_out.shape[0]):
        for k in range(z_out.shape[1]):
            z_out[i, k] += b[k]
        label = labels[r0 + i] if ce else 0
        target = z_out[i] if ce else targets[r0 + i]
        losses[r0 + i] = output_delta_row(loss, z_out[i], target, label, d_out[i])


@njit(cache=CACHE, fastmath={"reassoc", "contract"})
def sum_squares(v):
    # v (n,) -> Σ v² in float64: float32 squares overflow above ~1.8e19 and underflow below ~1e-19, so a
    # representable norm would come out NaN or 0. Reassociation lets LLVM keep vector partial
    # sums (a serial sum is latency-bound: most of the norms' cost on narrow). The order is fixed by
    # the compiled code, not by threads, so results stay bit-identical.
    s = 0.0
    for k in range(v.shape[0]):
        x = np.float64(v[k])
        s += x * x
    return s


@njit(cache=CACHE, error_model="numpy")
def norms_from_deltas(net, chunk, r0, r1, max_norm, row_out):
    # rows [r0, r1) of A_{l-1}, Δ_l -> layer_sq[i, l-1] = ‖∇_{W_l,b_l} ℓ_i‖² (R, L; float64),
    # norms[i] = ‖∇ℓ_i‖ (R,), and when max_norm > 0 the clip factors clip_c[i] = min(1, C/‖∇ℓ_i‖) (R,);
    # row_out as the driver's
    layout, X, acts, deltas, offsets = net.layout, chunk.X, chunk.acts, chunk.deltas, chunk.offsets
    layer_sq, norms, clip_c = row_out.layer_sq, row_out.norms, row_out.clip_c
    for i in range(r0, r1):
        total = 0.0  # float64, as the terms
        for l in range(1, layout.shape[0] + 1):
            n_in, n_out, d0 = layout[l - 1, N_IN], layout[l - 1, N_OUT], offsets[l, D_AT]
            dsq = sum_squares(deltas[d0 + i * n_out : d0 + (i + 1) * n_out])
            a0 = offsets[l - 1, A_AT]
            a_row = X[i] if l == 1 else acts[a0 + i * n_in : a0 + (i + 1) * n_in]
            term = layer_norm_sq(dsq, sum_squares(a_row))
            layer_sq[i, l - 1] = term
            total += term
        norms[i] = math.sqrt(total)
        if max_norm > 0:
            clip_c[i] = clip_factor(norms[i], max_norm)


@njit(cache=CACHE, error_model="numpy")
def write_rows(net, chunk, r0, r1, rows_out):
    # rows [r0, r1) of A_{l-1}, Δ_l -> rows_out[i] (P,) = ∇ℓ_i in θ's layout:
    # per layer δ_{l,i} a_{l-1,i}ᵀ, then δ_{l,i}
    layout, X, acts, deltas, offsets = net.layout, chunk.X, chunk.acts, chunk.deltas, chunk.offsets
    for i in range(r0, r1):
        out_row = rows_out[i]
        for l in range(1, layout.shape[0] + 1):
            n_in, n_out = layout[l - 1, N_IN], layout[l - 1, N_OUT]
            w0, b0, d0, a0 = (
                layout[l - 1, W_AT],
                layout[l - 1, B_AT],
                offsets[l, D_AT],
                offsets[l - 1, A_AT],
            )
            a_row = X[i] if l == 1 else acts[a0 + i * n_in : a0 + (i + 1) * n_in]
            for r in range(n_out):
                d = deltas[d0 + i * n_out + r]
                w_row = out_row[w0 + r * n_in : w0 + (r + 1) * n_in]
                for k in range(n_in):
                    w_row[k] = d * a_row[k]
                out_row[b0 + r] = d


@njit(cache=CACHE, error_model="numpy")
def sum_operand(operand, d, q0, c, blk):
    # Δ_l (m, n_l), clip factors c (m,) -> columns [q0, q0 + nr) of the operand M = Δ_l, Δ_l ⊙ Δ_l or
    # c ⊙ Δ_l, written into blk (m, nr), or Δ_l itself when that is all of it. Rows are read through
    # a view d[i, q0:q0 + nr]: indexing d[i, q0 + r] kept Numba's negative-index check on q0 + r and
    # the loop did not vectorize (3.5x slower; clipped_grad on narrow 3 % slower in all)
    m, nr = blk.shape
    if operand == DELTA and nr == d.shape[1]:
        return d
    for i in range(m):
        src = d[i, q0 : q0 + nr]
        if operand == DELTA:
            for r in range(nr):
                blk[i, r] = src[r]
        elif operand == DELTA_SQUARED:
            for r in range(nr):
                blk[i, r] = src[r] * src[r]
        else:  # CLIPPED_DELTA
            ci = c[i]
            for r in range(nr):
                blk[i, r] = ci * src[r]
    return blk


@njit(cache=CACHE, error_model="numpy")
def outer_sum(M, S, w_out, b_out):
    # M (m, nr), S (m, n_{l-1}) -> w_out (nr, n_{l-1}) = Mᵀ S (BLAS reads M transposed), b_out (nr,) = Σ_i M_i
    np.dot(M.T, S, w_out)
    b_out[:] = 0
    for i in range(M.shape[0]):  # in sample order
        for r in range(M.shape[1]):
            b_out[r] += M[i, r]


@njit(cache=CACHE, error_model="numpy")
def layer_sums(plan, net, chunk, r0, r1, clip_c, partial, t, sums, accumulate):
    # rows [r0, r1) (tile t) -> partial[slot, t] (P,): per layer Mᵀ S and Σ_i M_i, for the planned sums
    # that have a slot; tile 0 writes sums[s] (P,) itself unless the chunk's sums are added to earlier ones
    # (sum_partials then starts at tile 1: the same bits as copying tile 0's, one pass over P fewer)
    layout = net.layout
    for l in range(1, layout.shape[0] + 1):
        n_in, n_out = layout[l - 1, N_IN], layout[l - 1, N_OUT]
        w0, b0 = layout[l - 1, W_AT], layout[l - 1, B_AT]
        d = layer_delta(net, chunk, l, r0, r1)
        for s in range(plan.shape[0]):
            slot, operand = plan[s, SLOT], plan[s, OPERAND]
            if slot < 0:
                continue
            M = sum_operand(operand, d, FIRST, clip_c[r0:r1], d if operand == DELTA else np.empty_like(d))
            S = sum_source(net, chunk, plan[s, SOURCE], l, r0, r1)
            p = sums[s] if t == 0 and not accumulate else partial[slot, t]
            outer_sum(M, S, p[w0:b0].reshape((n_out, n_in)), p[b0 : b0 + n_out])


@njit(cache=CACHE, error_model="numpy")
def sum_partials(part, k0, k1, out, accumulate):
    # part (n_tiles, P) -> out[k0:k1] = Σ_t part[t, k0:k1] in tile order; when accumulate, added to out,
    # else out holds tile 0's sum already (layer_sums wrote it there). The loops run over views from 0:
    # indexing out[k] for k in range(k0, k1) kept Numba's negative-index check and did not vectorize
    # (7.7x slower, docs/benchmarks.md "Loops over views")
    dst = out[k0:k1]
    for u in range(0 if accumulate else 1, part.shape[0]):
        src = part[u, k0:k1]
        for k in range(dst.shape[0]):
            dst[k] += src[k]


@njit(cache=CACHE, error_model="numpy")
def gemm_block(plan, net, chunk, task, clip_c, sums, accumulate):
    # task = (l, q0, q1) -> rows [q0, q1) of W_l's and b_l's part of sums[s] (P,), one GEMM over the chunk's
    # R samples each, for the planned sums without a slot; M (R, nr) = Δ_l[:, q0:q1] plain, squared or scaled
    layout, R = net.layout, chunk.X.shape[0]
    l, q0, q1 = task[0], task[1], task[2]
    n_in, w0, b0 = layout[l - 1, N_IN], layout[l - 1, W_AT], layout[l - 1, B_AT]
    nr = q1 - q0
    d = layer_delta(net, chunk, l, FIRST, R)
    blk = np.empty((R, nr), d.dtype)
    part = np.empty((nr, n_in), d.dtype)
    col = np.empty(nr, d.dtype)
    for s in range(plan.shape[0]):
        if plan[s, SLOT] >= 0:
            continue
        M = sum_operand(plan[s, OPERAND], d, q0, clip_c, blk)
        S = sum_source(net, chunk, plan[s, SOURCE], l, FIRST, R)
        out = sums[s]
        w_part = out[w0 + q0 * n_in : w0 + q1 * n_in]
        if accumulate:
            outer_sum(M, S, part, col)
            flat = part.reshape(nr * n_in)
            for k in range(nr * n_in):
                w_part[k] += flat[k]
            for r in range(nr):
                out[b0 + q0 + r] += col[r]
        else:
            outer_sum(M, S, w_part.reshape((nr, n_in)), col)
            for r in range(nr):
                out[b0 + q0 + r] = col[r]


@njit(parallel=True, cache=CACHE, error_model="numpy")
def fused_backprop(
    net, data, codes, flags, plan, scalars, bufs, row_out, sums, partial, tasks, update, noise_t
):
    # one chunk of R samples: the packs Net, Data (R rows), Codes, Flags, Scalars, Buffers (for R rows),
    # RowOut (R rows) above; plan (n_sums, 4); sums (n_sums, P); partial (n_slots, n_tiles, P): per-tile
    # sums of the plan's rows with a slot; tasks (T, 3): (l, q0, q1) of every phase-2 GEMM block;
    # update (update.Update): on the last chunk, θ updated from the gradient sums[modes[ROW]] block by block
    # in the last pass (an empty buf: no update); noise_t: None, or a Noise pack as a plain tuple: then on the
    # last chunk the last pass makes the noised step into noise.out, and the update is made from it. (Numba
    # compiles a None noise_t apart, with the noise's branches pruned: a call without DP compiles no noise)
    X, labels, targets = data.X, data.labels, data.targets
    act, loss, tile = codes.activation, codes.loss, codes.tile
    backward, per_row, squares, accumulate = flags.backward, flags.per_row, flags.squares, flags.accumulate
    max_norm, count = scalars.max_norm, scalars.count
    losses, rows_out, clip_c = row_out.losses, row_out.rows, row_out.clip_c
    L, R = net.layout.shape[0], X.shape[0]
    chunk = Chunk(X, bufs.acts, bufs.dphi, bufs.deltas, bufs.sqa, chunk_offsets(net.layout, R))
    n_tiles = (R + tile - 1) // tile
    P = sums.shape[1]
    store_transposed(net)
    # phase 1: every tile forward and back through the whole network, per-row reducers on it while hot
    for t in prange(n_tiles):
        r0 = t * tile
        r1 = min(R, r0 + tile)
        for l in range(1, L + 1):  # forward: A_l = φ(A_{l-1} W_lᵀ + b_l), then ℓ_i and Δ_L
            a_in = layer_input(net, chunk, l, r0, r1)
            if squares:
                square_into(a_in, layer_input_squared(net, chunk, l, r0, r1))
            if l < L:
                z, g = layer_output(net, chunk, l, r0, r1)
                dense_forward(net, l, a_in, act, z, g)
            else:
                d_out = layer_delta(net, chunk, L, r0, r1)
                output_forward(net, a_in, loss, labels, targets, r0, losses, d_out)
        if not backward:
            continue
        for l in range(L, 1, -1):  # backward: Δ_{l-1} = (Δ_l W_l) ⊙ φ'(z_{l-1})
            d_out, d_in = layer_delta(net, chunk, l, r0, r1), layer_delta(net, chunk, l - 1, r0, r1)
            dense_backward(net, l, d_out, layer_output(net, chunk, l - 1, r0, r1)[1], d_in)
        if per_row:
            norms_from_deltas(net, chunk, r0, r1, max_norm, row_out)
        if rows_out.shape[0] > 0:
            write_rows(net, chunk, r0, r1, rows_out)
        if partial.shape[0] > 0:  # the clip factors of the tile's rows are known: norms_from_deltas ran
            layer_sums(plan, net, chunk, r0, r1, clip_c, partial, np.int64(t), sums, accumulate)
    # phase 2: rows [q0, q1) of each layer's sums without a slot, one GEMM over the chunk per task
    slotted = 0
    for s in range(plan.shape[0]):
        slotted += plan[s, SLOT] >= 0
    if slotted < plan.shape[0]:
        for t in prange(tasks.shape[0]):
            gemm_block(plan, net, chunk, tasks[t], clip_c, sums, accumulate)
    # then one pass over fixed blocks of parameters: the tiles' sums added in tile order (the slotted sums),
    # and on the last chunk the means divided (each element once: the bits of NumPy's sums / B) and the
    # update made, each block while it is in the core's cache
    updating = update.buf.shape[0] > 0
    noising = False
    if noise_t is not None:  # every sample's norm is known: its clip factor was a bound, or nothing is made
        noising = count > 0 and all_finite(Noise(*noise_t).norms)
    if slotted > 0 or count > 0:
        for c in prange((P + FINISH_BLOCK - 1) // FINISH_BLOCK):
            k0, k1 = c * FINISH_BLOCK, min(P, c * FINISH_BLOCK + FINISH_BLOCK)
            for s in range(plan.shape[0]):
                if plan[s, SLOT] >= 0:  # a last, shorter chunk has fewer tiles
                    sum_partials(partial[plan[s, SLOT], :n_tiles], k0, k1, sums[s], accumulate)
            if count > 0:
                divide_means(plan, sums, k0, k1, count)
                if noise_t is None:
                    if updating:
                        update_block(update, sums[update.modes[ROW]], net.theta, k0, k1)
                elif noising:
                    step = noise_block(noise_t, sums, k0, k1)
                    if updating:
                        update_block(update, step, net.theta, k0, k1)


@njit(cache=CACHE, error_model="numpy")
def noise_block(noise_t, sums, k0, k1):
    # noise_t (a Noise pack as a plain tuple), sums (n_sums, P) -> noise.out (P), its [k0, k1) made:
    # (sums[row] + std·ξ) / denominator (noise.noised_block), or sums[row] / denominator when std = 0
    noise = Noise(*noise_t)
    total = sums[noise.row]
    if noise.std > 0:
        noised_block(noise.out, total, noise.std, noise.denominator, noise.k0, noise.k1, noise.c3, noise.wide,
                     k0, k1 - k0)  # fmt: skip
    else:  # the bits of NumPy's division (no noise term: a −0 sum stays −0)
        dst, src = noise.out[k0:k1], total[k0:k1]
        for k in range(dst.shape[0]):
            dst[k] = src[k] / noise.denominator
    return noise.out


@njit(cache=CACHE, error_model="numpy")
def divide_means(plan, sums, k0, k1, count):
    # sums (n_sums, P) -> sums[s, k0:k1] /= count for the plan's means
    for s in range(plan.shape[0]):
        if plan[s, MEAN]:
            out = sums[s, k0:k1]  # a view from 0, so the loop vectorizes (as sum_partials')
            for k in range(out.shape[0]):
                out[k] /= count


@njit(cache=CACHE, fastmath={"reassoc"})
def all_finite(v):
    # v (n,), n ≥ 1 -> whether every element is finite: x − x is 0 for a finite x and NaN for a NaN or ±Inf,
    # and one NaN term makes the sum NaN in any order (reassociation only, so LLVM keeps vector partial
    # sums in v's dtype: 5 µs for 10⁵ float32, where NumPy's isfinite(v).all() took 16 µs)
    s = v[0] - v[0]
    for k in range(1, v.shape[0]):
        s += v[k] - v[k]
    return s == 0


@njit(cache=CACHE)
def check_values(theta, x, targets, labels, n_out, lo, hi):
    # θ (P,), X (B·n_0,), targets (B·n_L,) or (0,), labels (B,) or (0,); lo ≤ hi the targets' domain
    # -> 0 when θ and X are finite, the targets lie in [lo, hi] (and are finite) and the labels in
    # [0, n_out); else 1 (θ), 2 (X), 3 (targets) or 4 (labels): one call checks a prepared call's arrays
    if not all_finite(theta):
        return 1
    if not all_finite(x):
        return 2
    if targets.shape[0] > 0:
        if not all_finite(targets):
            return 3
        inside = True
        for k in range(targets.shape[0]):
            inside &= (targets[k] >= lo) & (targets[k] <= hi)
        if not inside:
            return 3
    ok = True
    for k in range(labels.shape[0]):
        ok &= (labels[k] >= 0) & (labels[k] < n_out)
    return 0 if ok else 4


@njit(cache=CACHE)
def block_sum(a, i0, n):
    # a[i0 : i0 + n], 0 ≤ n ≤ 128 -> NumPy's sum of one block: 8 running sums, then the rest in order
    if n < 8:
        res = a.dtype.type(0)
        for i in range(n):
            res += a[i0 + i]
        return res
    r0, r1, r2, r3 = a[i0], a[i0 + 1], a[i0 + 2], a[i0 + 3]
    r4, r5, r6, r7 = a[i0 + 4], a[i0 + 5], a[i0 + 6], a[i0 + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[i0 + i]
        r1 += a[i0 + i + 1]
        r2 += a[i0 + i + 2]
        r3 += a[i0 + i + 3]
        r4 += a[i0 + i + 4]
        r5 += a[i0 + i + 5]
        r6 += a[i0 + i + 6]
        r7 += a[i0 + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for k in range(i, n):
        res += a[i0 + k]
    return res


@njit(cache=CACHE)
def pairwise_sum(a, n):
    # a (≥ n,) -> the sum of a[:n] in a's dtype with NumPy's pairwise summation, the bits of
    # np.add.reduce(a[:n]): blocks of ≤ 128 (block_sum), a longer range split in halves at a multiple of 8
    # and the halves' sums added. The recursion runs on an explicit stack (Numba's cache cannot load a
    # recursive function): frames (start, length, stage), stage 0 → left half next, 1 → right, 2 → add
    if n <= 128:
        return block_sum(a, 0, n)
    start, length, stage = np.empty(64, np.int64), np.empty(64, np.int64), np.zeros(64, np.int64)
    values = np.empty(64, a.dtype)
    start[0], length[0], top, nv = 0, n, 1, 0
    while top > 0:
        f = top - 1
        m = length[f]
        if m <= 128:
            values[nv] = block_sum(a, start[f], m)
            nv += 1
            top -= 1
        elif stage[f] < 2:
            half = m // 2
            half -= half % 8
            start[top] = start[f] if stage[f] == 0 else start[f] + half
            length[top] = half if stage[f] == 0 else m - half
            stage[top] = 0
            stage[f] += 1
            top += 1
        else:
            values[nv - 2] = values[nv - 2] + values[nv - 1]
            nv -= 1
            top -= 1
    return values[0]


@njit(cache=CACHE)
def batch_backprop(check_t, net_t, data_t, codes_t, flags_t, plan, scalars_t, bufs_t, scratch_t, row_out_t,
                   sums, partial, tasks, chunk, update_t, noise_t):  # fmt: skip
    # The whole batch of B samples, chunk by chunk, in one compiled call (no Python between the chunks);
    # the packs come as plain tuples (…_t) and are named here: check (Check): with on, check_values' code
    # first (nonzero: nothing runs); data (Data) and row_out (RowOut) for B rows; scalars (Scalars) = (C, B);
    # bufs (Buffers) for `chunk` rows, scratch (Buffers) their elements per sample; flags.accumulate unused;
    # update (update.Update) and noise_t (None, or a Noise pack as a plain tuple), made on the last chunk (the
    # one with a count)
    # -> 0, after fused_backprop ran on each chunk of `chunk` rows in order (accumulate set after the first,
    # count B, the noise and the update on the last only), and the sum of the B losses (pairwise_sum); or a
    # nonzero check code and 0 (nothing run, θ as it was); or NORMS_NOT_FINITE and the sum (a norm is NaN or
    # Inf: the kernels ran, the noised step and the update were not made)
    check, net, data, codes = Check(*check_t), Net(*net_t), Data(*data_t), Codes(*codes_t)
    flags, scalars, row_out = Flags(*flags_t), Scalars(*scalars_t), RowOut(*row_out_t)
    bufs, scratch, update = Buffers(*bufs_t), Buffers(*scratch_t), Update(*update_t)
    X, labels, targets = data.X, data.labels, data.targets
    losses = row_out.losses
    if check.on:
        code = check_values(net.theta, X.reshape(-1), targets.reshape(-1), labels, targets.shape[1], check.lo,
                            check.hi)  # fmt: skip
        if code != 0:
            return code, losses.dtype.type(0)
    acts, dphi, deltas, sqa = bufs.acts, bufs.dphi, bufs.deltas, bufs.sqa
    c_max, batch = scalars.max_norm, scalars.count
    layer_sq, norms, clip_c, rows = row_out.layer_sq, row_out.norms, row_out.clip_c, row_out.rows
    B = X.shape[0]
    ce = labels.shape[0] > 0
    for c0 in range(0, B, chunk):
        c1 = min(B, c0 + chunk)
        R = c1 - c0
        chunk_bufs = Buffers(acts[: R * scratch.acts], dphi[: R * scratch.dphi], deltas[: R * scratch.deltas],
                             sqa[: R * scratch.sqa] if flags.squares else sqa[:0])  # fmt: skip
        chunk_rows_out = RowOut(losses[c0:c1], layer_sq[c0:c1], norms[c0:c1], clip_c[c0:c1],
                                rows[c0:c1] if rows.shape[0] > 0 else rows)  # fmt: skip
        chunk_data = Data(X[c0:c1], labels[c0:c1] if ce else labels, targets if ce else targets[c0:c1])
        chunk_flags = Flags(flags.backward, flags.per_row, flags.squares, c0 > 0)
        count = batch if c1 == B else batch - batch  # the last chunk divides the means
        fused_backprop(net, chunk_data, codes, chunk_flags, plan, Scalars(c_max, count), chunk_bufs,
                       chunk_rows_out, sums, partial, tasks, update, noise_t)  # fmt: skip
    code = 0
    if noise_t is not None:
        code = 0 if all_finite(Noise(*noise_t).norms) else NORMS_NOT_FINITE
    return code, pairwise_sum(losses, B)


NORMS_NOT_FINITE = 5
""":func:`batch_backprop`'s code when a DP call's per-sample norm is NaN or Inf (after codes 1-4 of
:func:`check_values`)."""


@njit(parallel=True, cache=CACHE)
def variance_into(grad, sq_mean, var):
    # grad, sq_mean, var (P,): var = sq_mean − grad² clamped at 0, in one pass
    # (NumPy's took three, with temporaries)
    n = grad.shape[0]
    for c in prange((n + 65535) // 65536):
        k0, k1 = c * 65536, min(n, (c + 1) * 65536)
        v, s, g = var[k0:k1], sq_mean[k0:k1], grad[k0:k1]  # views from 0, so the loop vectorizes
        for k in range(v.shape[0]):
            v[k] = variance_from_moments(s[k], g[k])

"""The tiled GEMM with fused epilogues, then the dense-layer launchers built on it.

One register-blocked shared-memory kernel serves a layer's forward (bias + activation
epilogue), the backward to its input (activation-derivative epilogue) and its weight
gradients (a GEMM over the batch written straight into θ's layout, with the reducer's
operand M = Δ, Δ⊙Δ or c⊙Δ (``sum_operand``) and source S = A or A⊙A (``sum_source``) of
:mod:`fastgrad.quantities`). Kernels and launchers are named as the CPU kernels' steps
(docs/architecture.md, "One vocabulary across the backends").
Layer indices are 1-based (docs/design.md §2): layer l has W_l (n_l, n_{l-1}) and b_l (n_l,).
"""

from __future__ import annotations

from .._scalar import like
from ..activations import activate, activate_grad
from ..quantities import CLIPPED_DELTA, DELTA, DELTA_SQUARED, INPUT, INPUT_SQUARED
from . import config
from .config import GEMM_BK, GEMM_REG, GEMM_THREADS, GEMM_TILE, cdiv, cuda, device_function, ints, kernel, vec
from .memory import scratch
from .rows import sum_partials

# epilogues of tiled_gemm
FWD_HIDDEN, FWD_OUTPUT, BWD_INPUT, WEIGHT_GRAD = range(4)
PLAIN = (DELTA, INPUT)  # operand and source kinds of the forward and backward products

# ------------------------------------------------------------------- kernels


@device_function
def sum_operand(a, a_layout, operand, rowscale, m, k, M, k_end):
    # opA(m, k) of the (M, K) operand a (strides in a_layout), 0 outside: a, a², or a · rowscale[k] by operand
    # kind: a sum's operand M = Δ, Δ⊙Δ or c⊙Δ (the plain kind for the forward and backward products)
    a_off, a_sm, a_sk = a_layout
    v = like(rowscale[0], 0.0)
    if m < M and k < k_end:
        v = a[a_off + m * a_sm + k * a_sk]
        if operand == CLIPPED_DELTA:
            v *= rowscale[k]
        elif operand == DELTA_SQUARED:
            v *= v
    return v


@device_function
def sum_source(b, b_layout, source, k, n, N, k_end):
    # opB(k, n) of the (K, n_real) operand b, then a column of ones up to N (the bias), 0 outside: b or b² by
    # source kind: a sum's source S = A or A⊙A (the plain kind for the forward and backward products)
    b_off, b_sk, b_sn, n_real = b_layout
    v = like(b[0], 0.0)
    if k < k_end:
        if n < n_real:
            v = b[b_off + k * b_sk + n * b_sn]
            if source == INPUT_SQUARED:
                v *= v
        elif n < N:
            v = like(v, 1.0)
    return v


@device_function
def epilogue_store(v, m, n, M, N, b, epilogue, out1, out2, scale):
    # C[m, n] = v -> out1 (and out2) by the epilogue's mode: bias + φ and φ', bias, ⊙ φ' in place, θ's layout
    mode, act, e_off, ld_out = epilogue
    if mode == FWD_HIDDEN:
        z = v + b[e_off + n]
        h = activate(act, z)
        out1[m * ld_out + n] = h
        out2[m * ld_out + n] = activate_grad(act, z, h)
    elif mode == FWD_OUTPUT:
        out1[m * ld_out + n] = v + b[e_off + n]
    elif mode == BWD_INPUT:
        out1[m * ld_out + n] = v * out1[m * ld_out + n]
    else:  # WEIGHT_GRAD: row m = output unit, column n = input unit or the bias
        seg = M * (N - 1)
        idx = m * (N - 1) + n if n < N - 1 else seg + m
        out1[e_off + cuda.blockIdx.z * (seg + M) + idx] = v * scale


@kernel(lambda F: (ints(4), vec(F), ints(3), vec(F), ints(4), ints(2), vec(F), ints(4), vec(F), vec(F), F))
def tiled_gemm_kernel(F):
    zero = F(0.0)
    TB, RB, BK, TT = GEMM_THREADS, GEMM_REG, GEMM_BK, GEMM_TILE
    NTHR = TB * TB

    def tiled_gemm(shape, a, a_layout, b, b_layout, kinds, rowscale, epilogue, out1, out2, scale):
        # C (M, N) = Σ_k opA(m, k) opB(k, n) over this block's K chunk, opB(k, n ≥ n_real) = 1; then epilogue
        # shape (M, N, K, k_chunk); a_layout (offset, m stride, k stride); b_layout (offset, k stride,
        # n stride, n_real); kinds (operand, source): opA = a, a², or a·rowscale[k]; opB = b or b²;
        # epilogue (mode, activation, offset of b_l in b or of the output in out1, row stride of out1)
        M, N, K, k_chunk = shape
        operand, source = kinds
        As = cuda.shared.array((BK, TT), F)
        Bs = cuda.shared.array((BK, TT), F)
        acc = cuda.local.array((RB, RB), F)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TB + tx
        m0 = cuda.blockIdx.y * TT
        n0 = cuda.blockIdx.x * TT
        k_begin = cuda.blockIdx.z * k_chunk
        k_end = min(K, k_begin + k_chunk)
        for r in range(RB):
            for c in range(RB):
                acc[r, c] = zero
        for kt in range(k_begin, k_end, BK):
            # stage the tiles; the contiguous index runs fastest across threads, so loads coalesce
            for e in range(tid, BK * TT, NTHR):
                if a_layout[2] == 1:
                    kk = e % BK
                    mm = e // BK
                else:
                    mm = e % TT
                    kk = e // TT
                As[kk, mm] = sum_operand(a, a_layout, operand, rowscale, m0 + mm, kt + kk, M, k_end)
                if b_layout[2] == 1:
                    nn = e % TT
                    kk = e // TT
                else:
                    kk = e % BK
                    nn = e // BK
                Bs[kk, nn] = sum_source(b, b_layout, source, kt + kk, n0 + nn, N, k_end)
            cuda.syncthreads()
            for kk in range(BK):
                for r in range(RB):
                    av = As[kk, ty + r * TB]
                    for c in range(RB):
                        acc[r, c] += av * Bs[kk, tx + c * TB]
            cuda.syncthreads()
        for r in range(RB):
            m = m0 + ty + r * TB
            if m < M:
                for c in range(RB):
                    n = n0 + tx + c * TB
                    if n < N:
                        epilogue_store(acc[r, c], m, n, M, N, b, epilogue, out1, out2, scale)

    return tiled_gemm


# ----------------------------------------------------------------- launchers


def dense_forward(*, batch: int, inputs, theta, layer, act: int, out, deriv=None) -> None:
    """Layer l's forward Z_l = A_{l-1} W_lᵀ + b_l, for flat (row-major) activations.

    inputs: A_{l-1} (B·n_{l-1},); out: A_l = φ(Z_l) and deriv: φ'(Z_l) (B·n_l,) each for a
    hidden layer, or out = Z_L when ``deriv`` is None (the output layer is linear).
    """
    dummy = scratch("dummy", (1,), theta.dtype)
    n_in, n_out = layer.n_in, layer.n_out
    grid = (cdiv(n_out, GEMM_TILE), cdiv(batch, GEMM_TILE), 1)
    # a = A (B, n_in), k-contiguous; opB(k, n) = W[n, k]
    tiled_gemm_kernel.launch(
        theta.dtype, grid, (GEMM_THREADS, GEMM_THREADS),
        (batch, n_out, n_in, n_in), inputs, (0, n_in, 1),
        theta, (layer.w_start, 1, n_in, n_out), PLAIN, dummy,
        (FWD_OUTPUT if deriv is None else FWD_HIDDEN, act, layer.b_start, n_out),
        out, dummy if deriv is None else deriv, theta.dtype.type(1.0),
    )  # fmt: skip


def dense_backward(*, batch: int, delta, theta, layer, deriv) -> None:
    """Layer l's backward to its input: Δ_{l-1} = (Δ_l W_l) ⊙ φ'(Z_{l-1}), written over φ'.

    delta: Δ_l (B·n_l,); deriv: φ'(Z_{l-1}) (B·n_{l-1},) in, Δ_{l-1} out.
    """
    dummy = scratch("dummy", (1,), theta.dtype)
    n_in, n_out = layer.n_in, layer.n_out
    grid = (cdiv(n_in, GEMM_TILE), cdiv(batch, GEMM_TILE), 1)
    # a = Δ_l (B, n_out), k-contiguous; opB(k, n) = W[k, n]
    tiled_gemm_kernel.launch(
        theta.dtype, grid, (GEMM_THREADS, GEMM_THREADS),
        (batch, n_in, n_out, n_out), delta, (0, n_out, 1),
        theta, (layer.w_start, n_in, 1, n_in), PLAIN, dummy,
        (BWD_INPUT, 0, 0, n_in),
        deriv, dummy, theta.dtype.type(1.0),
    )  # fmt: skip


def layer_sums(*, batch: int, delta, inputs, layer, operand: int, source: int, rowscale, scale, out) -> None:
    """Layer l's block of a sum over samples: out[w_start:end] = scale · (Mᵀ S, then Σ_i M_i).

    delta: Δ_l (B·n_l,); inputs: A_{l-1} (B·n_{l-1},); operand M of Δ_l and source S of A_{l-1}
    as in :mod:`fastgrad.quantities`; rowscale: the clip factors c (B,) of M = c⊙Δ.

    Enough output tiles: one GEMM writes θ's layout directly. Too few (a narrow layer, a big
    batch): the batch is split into K chunks, each block writes a partial, and sum_partials adds
    them in a fixed order. A launch costs more than a small GEMM, so splitting is the exception.
    """
    dt = out.dtype
    M, N = layer.n_out, layer.n_in + 1
    blocks_mn = cdiv(M, GEMM_TILE) * cdiv(N, GEMM_TILE)
    nsplit = 1
    if blocks_mn < config.GRAD_MIN_BLOCKS:
        nsplit = max(1, min(cdiv(config.TARGET_BLOCKS, blocks_mn), cdiv(batch, 4 * GEMM_BK)))
    k_chunk = cdiv(cdiv(batch, nsplit), GEMM_BK) * GEMM_BK
    nsplit = cdiv(batch, k_chunk)
    seg = M * N
    dummy = scratch("dummy", (1,), dt)
    if nsplit == 1:
        part, part_off, part_scale = out, layer.w_start, scale
    else:
        part, part_off, part_scale = scratch("grad_split", (nsplit * seg,), dt), 0, dt.type(1.0)
    # C[o, j] = Σ_i M[i, o] S[i, j]: opA(o, i) = Δ[i·M + o], opB(i, j) = A[i·n_in + j], 1 for the bias
    grid = (cdiv(N, GEMM_TILE), cdiv(M, GEMM_TILE), nsplit)
    tiled_gemm_kernel.launch(
        dt, grid, (GEMM_THREADS, GEMM_THREADS),
        (M, N, batch, k_chunk), delta, (0, 1, M),
        inputs, (0, layer.n_in, 1, layer.n_in), (operand, source), rowscale,
        (WEIGHT_GRAD, 0, part_off, 0),
        part, dummy, part_scale,
    )  # fmt: skip
    if nsplit > 1:
        sum_partials(
            part=part, offset=0, nrows=nsplit, ncols=seg, scale=scale, out=out, out_offset=layer.w_start
        )

"""The fused narrow kernel: a tile of samples through the whole pass in one block, then its launcher.

One block takes T samples through every layer's forward and backward with activations and
deltas in shared memory, then reduces the tile into one partial row (P,) per requested sum
of :mod:`fastgrad.quantities` (the clip factor is known in-block, since the block holds
every layer of its samples), writes its per-sample gradient rows and Goodfellow's per-row
terms, and checks the device inputs it reads. One launch per pass, as in tiny-cuda-nn
(without tensor cores). The kernel is a sequence of device functions (inlined by NVVM:
see ``config.device_function``), one per step, named as the CPU kernels' steps (docs/architecture.md,
"One vocabulary across the backends"). Layer indices are 1-based (docs/design.md §2).
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from .._scalar import like
from ..activations import activate, activate_grad
from ..losses import CROSS_ENTROPY, output_delta_row
from ..losses import REGISTRY as LOSS_REGISTRY
from ..mlp import MLP
from ..quantities import (
    CLIPPED_DELTA,
    DELTA,
    DELTA_SQUARED,
    INPUT,
    INPUT_SQUARED,
    SUMS,
    add_square,
    clip_factor,
    layer_norm,
    scaled_norm,
)
from . import config
from .config import (
    FLAG_RANGE,
    FLAG_THETA,
    FLAG_X,
    FLAG_Y,
    FUSED_MAX_LAYERS,
    FUSED_SAMPLES_PER_THREAD,
    FUSED_THREADS,
    N_FLAGS,
    cdiv,
    cuda,
    device_function,
    floats,
    ints,
    kernel,
    mat,
    nbt,
    vec,
)
from .memory import layout

RS = FUSED_SAMPLES_PER_THREAD
MAXL = FUSED_MAX_LAYERS + 1
NSUMS = len(SUMS)
SUM_OPERANDS = tuple(q.operand for q in SUMS)
"""Operand kind of each sum over samples, in the registry's order (the order of the partials)."""
for _q in SUMS:  # sum_operand forms (δ a)² for the squared operand: it must come with the squared source
    assert (_q.operand == DELTA_SQUARED) == (_q.source == INPUT_SQUARED), _q
    assert _q.operand in (DELTA, DELTA_SQUARED, CLIPPED_DELTA) and _q.source in (INPUT, INPUT_SQUARED), _q

Dims = namedtuple("Dims", "activation loss batch tile num_params norms_at want_rows sum_offsets")
"""The fused kernel's integers: activation and loss codes, B, the tile T, P, where the layer norms (B, L)
start in ws, 1 when the per-sample rows are wanted, and ``sum_offsets`` (NSUMS,): where each sum's
partials (nblk, P) start in ws, -1 when it is not wanted. The launch passes it as a plain tuple in the
fields' order and the kernel names it on entry (as the CPU's packs: a plain tuple types faster)."""
Limits = namedtuple("Limits", "max_norm lo hi")
"""The fused kernel's floats: the clipping norm (0: no clipping) and the targets' domain [lo, hi]."""


# ------------------------------------------------------------ device functions


@device_function
def stage_inputs(sh, X, theta, B, i0, T, ws, fl):
    # X rows i0..i0+T-1 (B, n0) -> A_0 (T, n0 + 1) at sh[0] (zeros past B); flags ws[fl + FLAG_X] for
    # non-finite X, ws[fl + FLAG_THETA] for non-finite θ in this block's slice: the inputs are checked as read
    tid = cuda.threadIdx.x
    NT = cuda.blockDim.x
    n0 = X.shape[1]
    for e in range(tid, T * n0, NT):
        s = e // n0
        j = e - s * n0
        i = i0 + s
        v = X[i, j] if i < B else like(sh[0], 0.0)
        if not math.isfinite(v):
            ws[fl + FLAG_X] = like(v, 1.0)
        sh[s * (n0 + 1) + j] = v
    P = theta.shape[0]
    nblk = cuda.gridDim.x
    chunk = (P + nblk - 1) // nblk
    lo = cuda.blockIdx.x * chunk
    for p in range(lo + tid, min(P, lo + chunk), NT):
        if not math.isfinite(theta[p]):
            ws[fl + FLAG_THETA] = like(sh[0], 1.0)


@device_function
def dense_forward(sh, theta, ain, nin, nout, w, aout, dout, act, T, acc, rows):
    # A_{l-1} (T, nin + 1) at sh[ain] -> z = W_l a + b_l; A_l = φ(z) at sh[aout] and φ'(z) at sh[dout]
    # (it becomes Δ_l), or Z_L at sh[aout] when dout < 0. acc, rows (RS,): the thread's register block
    tid = cuda.threadIdx.x
    NT = cuda.blockDim.x
    TG = (T + RS - 1) // RS  # sample groups of the products
    bo = w + nout * nin
    # a thread takes unit o for RS samples sg, sg + TG, ...: one weight load feeds RS FMAs
    for e in range(tid, TG * nout, NT):
        o = e // TG
        sg = e - o * TG
        wrow = w + o * nin
        for q in range(RS):
            acc[q] = theta[bo + o]
            rows[q] = ain + min(sg + q * TG, T - 1) * (nin + 1)
        for j in range(nin):
            wv = theta[wrow + j]
            for q in range(RS):
                acc[q] += wv * sh[rows[q] + j]
        for q in range(RS):
            s = sg + q * TG
            if s < T:
                z = acc[q]
                if dout >= 0:
                    h = activate(act, z)
                    sh[aout + s * (nout + 1) + o] = h
                    sh[dout + s * (nout + 1) + o] = activate_grad(act, z, h)
                else:
                    sh[aout + s * (nout + 1) + o] = z


@device_function
def output_forward(zrow, drow, labels, targets, loss, i, B, lo, hi, ws, fl):
    # z_L (n_L,) of sample i -> δ_L (n_L,) into drow, returns ℓ_i (0 and δ = 0 past B); flags
    # ws[fl + FLAG_Y] for non-finite targets, ws[fl + FLAG_RANGE] for labels or targets out of range
    nL = zrow.shape[0]
    zero = like(zrow[0], 0.0)
    if i >= B:
        for k in range(nL):
            drow[k] = zero
        return zero
    label = labels[i % labels.shape[0]]
    target = targets[i % targets.shape[0]]
    if loss == CROSS_ENTROPY:
        if label < 0 or label >= nL:
            ws[fl + FLAG_RANGE] = like(zero, 1.0)
            label = 0
    else:
        for k in range(nL):
            v = target[k]
            if not math.isfinite(v):
                ws[fl + FLAG_Y] = like(zero, 1.0)
            elif v < lo or v > hi:
                ws[fl + FLAG_RANGE] = like(zero, 1.0)
    return output_delta_row(loss, zrow, target, label, drow)


@device_function
def dense_backward(sh, theta, w, nin, nout, dl, dprev, T, acc, rows):
    # Δ_l (T, nout + 1) at sh[dl] -> Δ_{l-1} = (W_lᵀ δ_l) ⊙ φ'(z_{l-1}) over φ' at sh[dprev] (T, nin + 1)
    tid = cuda.threadIdx.x
    NT = cuda.blockDim.x
    TG = (T + RS - 1) // RS
    for e in range(tid, TG * nin, NT):
        j = e // TG
        sg = e - j * TG
        for q in range(RS):
            acc[q] = like(sh[dl], 0.0)
            rows[q] = dl + min(sg + q * TG, T - 1) * (nout + 1)
        for o in range(nout):
            wv = theta[w + o * nin + j]
            for q in range(RS):
                acc[q] += wv * sh[rows[q] + o]
        for q in range(RS):
            s = sg + q * TG
            if s < T:
                p = dprev + s * (nin + 1) + j
                sh[p] = acc[q] * sh[p]


@device_function
def row_norm(sh, start, n):
    # sh[start:start + n] -> its Euclidean norm, in order, scaled (add_square): no square over- or underflows
    scale = like(sh[start], 0.0)
    ssq = scale
    for k in range(n):
        scale, ssq = add_square(scale, ssq, sh[start + k])
    return scaled_norm(scale, ssq)


@device_function
def norms_from_deltas(sh, sizes, aoff, doff, s, out, out_off):
    # sample s of the tile -> ‖∇ℓ_s‖; ‖∇_{W_l,b_l} ℓ_s‖ (Goodfellow) to out[out_off + l - 1] if out_off ≥ 0
    L = sizes.shape[0] - 1
    scale = like(sh[0], 0.0)
    ssq = scale
    for l in range(1, L + 1):
        dn = row_norm(sh, doff[l] + s * (sizes[l] + 1), sizes[l])
        an = row_norm(sh, aoff[l - 1] + s * (sizes[l - 1] + 1), sizes[l - 1])
        v = layer_norm(dn, an)
        if out_off >= 0:
            out[out_off + l - 1] = v
        scale, ssq = add_square(scale, ssq, v)
    return scaled_norm(scale, ssq)


@device_function
def sum_operand(operand, da, clip, s):
    # one sample's term of a sum for operand kind M, from the product δ a (a from sum_source): δ a,
    # (δ a)² = δ² a² (M = Δ⊙Δ comes with S = A⊙A, whose square is this one), or c_s δ a (clip (T,): the
    # tile's clip factors)
    if operand == DELTA_SQUARED:
        return da * da
    if operand == CLIPPED_DELTA:
        return clip[s] * da
    return da


@device_function
def sum_source(sh, ain, nin, s, j):
    # A_{l-1} (T, nin + 1) at sh[ain] -> a_s[j], or 1 for the bias (j < 0): the source of every sum, plain
    # (the S = A⊙A source is squared with its operand in sum_operand, as (δ a)²)
    return sh[ain + s * (nin + 1) + j] if j >= 0 else like(sh[ain], 1.0)


@device_function
def layer_sums(sh, ain, dl, nin, nout, T, clip, offs, ws, part, tot):
    # layer l of the tile, A_{l-1} (T, nin + 1) at sh[ain], Δ_l (T, nout + 1) at sh[dl] -> for each sum r with
    # offs[r] ≥ 0, Σ_s sum_operand(δ_s sum_source) into ws[offs[r] + part + k], k over the layer's θ layout
    # (W, then b); tot (NSUMS,)
    tid = cuda.threadIdx.x
    NT = cuda.blockDim.x
    nw = nout * nin
    for k in range(tid, nw + nout, NT):  # one thread per parameter
        if k < nw:
            o = k // nin
            j = k - o * nin
        else:
            o = k - nw
            j = -1
        for r in range(NSUMS):
            tot[r] = like(sh[dl], 0.0)
        for s in range(T):
            da = sh[dl + s * (nout + 1) + o] * sum_source(sh, ain, nin, s, j)
            for r in range(NSUMS):
                if offs[r] >= 0:
                    tot[r] += sum_operand(SUM_OPERANDS[r], da, clip, s)
        for r in range(NSUMS):
            if offs[r] >= 0:
                ws[offs[r] + part + k] = tot[r]


@device_function
def write_rows(sh, ain, dl, nin, nout, ns, G, i0, w):
    # layer l's block of the tile's per-sample rows: G[i0 + s, w + o·nin + j] = δ_s[o] a_s[j], then b: δ_s[o]
    tid = cuda.threadIdx.x
    NT = cuda.blockDim.x
    nw = nout * nin
    for k in range(tid, nw + nout, NT):  # for fixed s, consecutive threads write consecutive addresses
        if k < nw:
            o = k // nin
            j = k - o * nin
            for s in range(ns):
                d = sh[dl + s * (nout + 1) + o]
                G[i0 + s, w + k] = d * sh[ain + s * (nin + 1) + j]
        else:
            for s in range(ns):
                G[i0 + s, w + k] = sh[dl + s * (nout + 1) + k - nw]


# -------------------------------------------------------------------- kernel


@kernel(
    lambda F: (
        vec(F),
        mat(F),
        vec(nbt.int64),
        mat(F),
        vec(nbt.int64),
        nbt.Tuple((nbt.int64,) * (len(Dims._fields) - 1) + (ints(NSUMS),)),
        floats(F, len(Limits._fields)),
        vec(F),
        mat(F),
    )
)
def fused_narrow_kernel(F):
    zero = F(0.0)
    one = F(1.0)

    def fused_narrow(theta, X, labels, targets, layout, dims_t, limits_t, ws, G):
        # θ (P,), X (B, n0), labels (B,), targets (B, n_L) -> ws: tile losses (nblk) | input flags (4) |
        # layer norms (B, L) | a partial (nblk, P) per requested sum at dims.sum_offsets[r] (-1: not wanted);
        # G (B, P)
        # layout: the L + 1 widths, then each layer's offset in θ; dims_t (Dims), limits_t (Limits)
        dims, limits = Dims(*dims_t), Limits(*limits_t)
        act, loss, B, T, P = dims.activation, dims.loss, dims.batch, dims.tile, dims.num_params
        off_lsq, want_rows, offs = dims.norms_at, dims.want_rows, dims.sum_offsets
        max_norm, lo, hi = limits.max_norm, limits.lo, limits.hi
        sh = cuda.shared.array(0, F)
        aoff = cuda.local.array((MAXL,), nbt.int64)
        doff = cuda.local.array((MAXL,), nbt.int64)
        acc = cuda.local.array((RS,), F)
        rows = cuda.local.array((RS,), nbt.int64)
        tot = cuda.local.array((NSUMS,), F)
        L = (layout.shape[0] - 1) // 2
        sizes = layout[: L + 1]
        w_starts = layout[L + 1 :]
        tid = cuda.threadIdx.x
        blk = cuda.blockIdx.x
        fl = cuda.gridDim.x  # the input flags in ws: at fl + FLAG_THETA, ..., fl + FLAG_RANGE
        i0 = blk * T
        # shared layout, rows padded to n + 1 so a warp walking the samples hits distinct banks:
        # A_0..A_{L-1} (T, n_l + 1) | Δ_1..Δ_L (T, n_l + 1) | Z_L (T, n_L + 1) | clip c (T) | loss (T)
        # (inline: a device function returning these offsets took float64 from 96 to 125 registers, sm_90)
        pos = 0
        for l in range(L):
            aoff[l] = pos
            pos += T * (sizes[l] + 1)
        for l in range(1, L + 1):
            doff[l] = pos
            pos += T * (sizes[l] + 1)
        zoff = pos
        pos += T * (sizes[L] + 1)
        coff = pos
        loff = pos + T
        stage_inputs(sh, X, theta, B, i0, T, ws, fl)
        cuda.syncthreads()
        for l in range(1, L + 1):  # forward
            last = l == L
            aout = zoff if last else aoff[l]
            dout = -1 if last else doff[l]
            dense_forward(
                sh, theta, aoff[l - 1], sizes[l - 1], sizes[l], w_starts[l - 1], aout, dout, act, T, acc, rows
            )
            cuda.syncthreads()
        nL = sizes[L]
        if tid < T:
            zrow = sh[zoff + tid * (nL + 1) : zoff + tid * (nL + 1) + nL]
            drow = sh[doff[L] + tid * (nL + 1) : doff[L] + tid * (nL + 1) + nL]
            sh[loff + tid] = output_forward(zrow, drow, labels, targets, loss, i0 + tid, B, lo, hi, ws, fl)
        cuda.syncthreads()
        if tid == 0:
            t = zero
            for s in range(T):
                t += sh[loff + s]
            ws[blk] = t
        for l in range(L, 1, -1):  # backward
            dense_backward(
                sh, theta, w_starts[l - 1], sizes[l - 1], sizes[l], doff[l], doff[l - 1], T, acc, rows
            )
            cuda.syncthreads()
        if tid < T:  # norms_from_deltas (Goodfellow's layer terms and the norm), then the clip factor
            i = i0 + tid
            nrm = norms_from_deltas(sh, sizes, aoff, doff, tid, ws, off_lsq + i * L if i < B else -1)
            sh[coff + tid] = clip_factor(nrm, max_norm) if max_norm > zero else one
        cuda.syncthreads()
        clip = sh[coff : coff + T]
        any_sum = False
        for r in range(NSUMS):
            any_sum = any_sum or offs[r] >= 0
        for l in range(1, L + 1):  # the tile's layer_sums, then the per-sample rows
            nin, nout, w = sizes[l - 1], sizes[l], w_starts[l - 1]
            if any_sum:
                layer_sums(sh, aoff[l - 1], doff[l], nin, nout, T, clip, offs, ws, blk * P + w, tot)
            if want_rows:
                write_rows(sh, aoff[l - 1], doff[l], nin, nout, min(T, B - i0), G, i0, w)

    return fused_narrow


# ------------------------------------------------------------------- launcher


def fused_tile(net: MLP, batch: int, dtype) -> int:
    """Samples per block of the fused path (0 when the network does not fit it)."""
    if max(net.sizes) > config.FUSED_MAX_WIDTH or net.num_layers > FUSED_MAX_LAYERS:
        return 0
    t_max = config.SHARED_BYTES // (shared_floats(net) * np.dtype(dtype).itemsize)
    tile = config.FUSED_MAX_TILE
    while tile > 1 and (tile > t_max or cdiv(batch, tile) < config.TARGET_BLOCKS):
        tile //= 2
    return tile if tile <= t_max else 0


def shared_floats(net: MLP) -> int:
    """Shared-memory numbers per sample of the tile (the layout in the kernel)."""
    return sum(n + 1 for n in net.sizes[:-1]) + sum(n + 1 for n in net.sizes[1:]) + net.n_out + 1 + 2


def shared_bytes(net: MLP, tile: int, dtype) -> int:
    return tile * shared_floats(net) * np.dtype(dtype).itemsize


def workspace_size(nblk: int, batch: int, net: MLP, want: tuple[bool, ...]) -> tuple[int, tuple[int, ...]]:
    """The fused workspace: tile losses | input flags | layer norms (B, L) | one partial per wanted sum.

    Returns its length and each sum's offset (-1 for a sum not wanted).
    """
    end = nblk + N_FLAGS + batch * net.num_layers
    offs = []
    for wanted in want:
        offs.append(end if wanted else -1)
        end += nblk * net.num_params if wanted else 0
    return end, tuple(offs)


def fused_backprop(*, net: MLP, d, tile: int, ws, sum_offsets, per_sample: bool, max_norm, G) -> None:
    """The whole pass for device inputs ``d`` in one launch of blocks of ``tile`` samples.

    ws: the workspace of :func:`workspace_size` (its flags zero); sum_offsets: each sum's
    partials in ws, -1 when not wanted; G (B, P): the per-sample rows when ``per_sample``.
    """
    F = d.dtype.type
    B = d.batch_size
    nblk = cdiv(B, tile)
    lo, hi = target_range(net, d.dtype)
    dims = Dims(
        activation=net.activation_code,
        loss=net.loss_code,
        batch=B,
        tile=tile,
        num_params=net.num_params,
        norms_at=nblk + N_FLAGS,
        want_rows=int(per_sample),
        sum_offsets=tuple(sum_offsets),
    )
    limits = Limits(max_norm=F(max_norm if max_norm is not None else 0.0), lo=lo, hi=hi)
    fused_narrow_kernel.launch(
        d.dtype,
        nblk,
        FUSED_THREADS,
        d.theta,
        d.X,
        d.labels,
        d.targets,
        layout(net.sizes),
        tuple(dims),
        tuple(limits),
        ws,
        G,
        shared=shared_bytes(net, tile, d.dtype),
    )


def target_range(net: MLP, dt: np.dtype):
    """The range the targets must lie in, in θ's dtype: the loss's ``domain`` (its registry entry)."""
    lo, hi = LOSS_REGISTRY[net.loss].domain
    return dt.type(lo), dt.type(hi)

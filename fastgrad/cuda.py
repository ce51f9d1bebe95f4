"""CUDA backend (numba-cuda): every quantity of DESIGN §2 computed on the GPU.

The only module that imports ``numba.cuda``. Two paths share the reducers' maths
(DESIGN §3) and the scalar activation/loss code of the CPU kernels:

- **fused** (every width ≤ ``FUSED_MAX_WIDTH``): one block takes a tile of T
  samples through the whole forward and backward pass with activations and deltas
  in shared memory, then reduces the tile into per-tile partial sums of the
  gradient, the second moment and the clipped gradient (the clip factor is known
  in-block, since the block holds every layer of its samples), writes its
  per-sample gradient rows and norms, and checks the device inputs it reads.
  One launch per pass, as in tiny-cuda-nn (without tensor cores).
- **tiled** (wider networks): a register-blocked shared-memory GEMM with fused
  epilogues (bias + activation forward, activation derivative backward), the
  weight gradients as GEMMs over the batch written straight into θ's layout
  (row-scaled deltas for the clipped sum, squared operands for the second
  moment; split over the batch only when a layer has too few output tiles), and a
  coalesced per-sample outer-product write.

Reductions are deterministic: every block writes its own partial row and a second
kernel sums the rows in a fixed order; there are no floating-point atomics, so
the same inputs give the same bits on every run. Tile sizes are constants, not
read from the card.

Inputs are NumPy arrays (copied in, results copied out) or device arrays (numba,
CuPy, PyTorch through ``__cuda_array_interface__``), used in place; results then
stay on the device.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import _validation, activations, losses
from .losses import CROSS_ENTROPY, BINARY_CROSS_ENTROPY
from .mlp import FLOAT_DTYPES, MLP
from .quantities import dp_noise, noise_scale

if not hasattr(np, "row_stack"):
    # NumPy 2.5 removed np.row_stack, but numba-cuda 0.30.4 registers an overload of it when it
    # first compiles a kernel (AttributeError); the alias it had since NumPy 2.0 keeps it working.
    np.row_stack = np.vstack

try:  # numba-cuda is an optional dependency: without it the backend reports itself unavailable
    import numba
    from numba import cuda
    from numba import types as nbt

    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the installation
    cuda = None
    _IMPORT_ERROR = exc
try:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
except Exception:  # the simulator, or no numba-cuda
    DeviceNDArray = ()

SIMULATOR = bool(cuda is not None and numba.config.ENABLE_CUDASIM)

# ------------------------------------------------------------------ tunables
# The simulator runs every thread as a Python thread (about 1-3 ms each), so it
# gets the same kernels with tiny blocks; the GPU gets blocks sized for an SM.
if SIMULATOR:
    GEMM_THREADS, GEMM_REG, GEMM_BK = 2, 2, 2  # 4x4 output tile, 4 threads
    FUSED_THREADS, FUSED_MAX_TILE = 4, 4
    SUM_X, SUM_Y, ROW_THREADS, WRITE_THREADS = 2, 2, 4, 4
    TARGET_BLOCKS = 2  # aim for at least this many fused blocks
    GRAD_MIN_BLOCKS = 4  # fewer weight-gradient output tiles than this: split the batch
else:
    # 32x32 output tiles of 64 threads, 4x4 outputs each: the batches here are small (B = 256 gives
    # only 64 blocks of 64x64 for a 1024-wide layer on 132 SMs), so more, smaller blocks fill the GPU
    GEMM_THREADS, GEMM_REG, GEMM_BK = 8, 4, 16
    FUSED_THREADS, FUSED_MAX_TILE = 128, 32
    SUM_X, SUM_Y, ROW_THREADS, WRITE_THREADS = 32, 8, 128, 256
    TARGET_BLOCKS = 512  # fixed, not read from the card: results must not depend on it
    GRAD_MIN_BLOCKS = 96
GEMM_TILE = GEMM_THREADS * GEMM_REG

FUSED_MAX_WIDTH = 128  # the fused path is used when every width is at most this
FUSED_SAMPLES_PER_THREAD = 4  # register blocking of the fused kernel's products
FUSED_MAX_LAYERS = 16
SHARED_BYTES = 48 * 1024  # dynamic shared memory available without an opt-in

# epilogues of tiled_gemm
FWD_HIDDEN, FWD_OUTPUT, BWD_INPUT, GRAD_PARTIAL = range(4)


def check_available() -> None:
    """Raise ``RuntimeError`` saying why the CUDA backend cannot run here."""
    if cuda is None:
        raise RuntimeError(
            "backend 'cuda': numba-cuda is not installed or failed to import "
            f"({_IMPORT_ERROR}); install it with: pip install 'fastgrad[cuda]'"
        )
    global _GPU_OK
    if SIMULATOR or _GPU_OK:
        return
    try:
        ok = cuda.is_available()
    except Exception as exc:  # pragma: no cover - depends on the driver
        raise RuntimeError(f"backend 'cuda': the CUDA driver could not be initialised ({exc})") from None
    if not ok:
        raise RuntimeError(
            "backend 'cuda': no CUDA GPU or driver found (numba.cuda.is_available() is False); "
            "use backend='numba' for the CPU, or set NUMBA_ENABLE_CUDASIM=1 to run the kernels "
            "slowly in the CUDA simulator"
        )
    _GPU_OK = True


_GPU_OK = False  # a GPU was found once: later calls skip the driver query


# ------------------------------------------------------- shared scalar code
# activate, activate_grad and output_delta_row are the register_jitable definitions that the CPU
# kernels compile too: one definition, two targets. (They are registered without inline="always":
# numba-cuda 0.30 cannot inline numba-core IR into CUDA code; LLVM and NVVM inline them anyway.)
activate = activations.activate
activate_grad = activations.activate_grad
output_delta_row = losses.output_delta_row

# ------------------------------------------------------------------- kernels


@functools.cache
def kernels(dtype) -> dict:
    """The compiled kernels for float dtype ``dtype`` (compiled lazily, once per process)."""
    dtype = np.dtype(dtype)
    F = numba.from_dtype(dtype)
    return {name: cuda.jit(func) for name, func in kernel_functions(F).items()}


def kernel_functions(F) -> dict:
    """The Python functions of every kernel for float type ``F`` (for ``cuda.jit`` or ``compile_ptx``)."""
    zero = F(0.0)
    one = F(1.0)
    TB, RB, BK, TT = GEMM_THREADS, GEMM_REG, GEMM_BK, GEMM_TILE
    NTHR = TB * TB
    MAXL = FUSED_MAX_LAYERS + 1
    RS = FUSED_SAMPLES_PER_THREAD

    def tiled_gemm(M, N, K, k_chunk, a, a_off, a_sm, a_sk, b, b_off, b_sk, b_sn, n_real,
                   rowscale, use_scale, square, mode, act, theta, bias_off, out1, out2, ld_out, part, scale):
        # C (M, N) = sum_k opA(m, k) opB(k, n) over this block's K chunk; opB(k, n >= n_real) = 1
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
                if a_sk == 1:
                    kk = e % BK
                    mm = e // BK
                else:
                    mm = e % TT
                    kk = e // TT
                m = m0 + mm
                k = kt + kk
                v = zero
                if m < M and k < k_end:
                    v = a[a_off + m * a_sm + k * a_sk]
                    if use_scale:
                        v *= rowscale[k]
                    if square:
                        v *= v
                As[kk, mm] = v
                if b_sn == 1:
                    nn = e % TT
                    kk = e // TT
                else:
                    kk = e % BK
                    nn = e // BK
                n = n0 + nn
                k = kt + kk
                v = zero
                if k < k_end:
                    if n < n_real:
                        v = b[b_off + k * b_sk + n * b_sn]
                        if square:
                            v *= v
                    elif n < N:
                        v = one
                Bs[kk, nn] = v
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
                        v = acc[r, c]
                        if mode == FWD_HIDDEN:
                            z = v + theta[bias_off + n]
                            h = activate(act, z)
                            out1[m * ld_out + n] = h
                            out2[m * ld_out + n] = activate_grad(act, z, h)
                        elif mode == FWD_OUTPUT:
                            out1[m * ld_out + n] = v + theta[bias_off + n]
                        elif mode == BWD_INPUT:
                            out1[m * ld_out + n] = v * out1[m * ld_out + n]
                        else:  # GRAD_PARTIAL: row m = output unit, column n = input unit or the bias
                            seg = M * (N - 1)
                            idx = m * (N - 1) + n if n < N - 1 else seg + m
                            part[bias_off + cuda.blockIdx.z * (seg + M) + idx] = v * scale

    def output_deltas(act_out, labels, targets, loss, B, deltas, losses):
        # act_out, deltas (B, nL); losses (B,): d loss_i / d z_L and loss_i, one thread per sample
        i = cuda.grid(1)
        if i < B:
            losses[i] = output_delta_row(
                loss, act_out[i], targets[i % targets.shape[0]], labels[i % labels.shape[0]], deltas[i]
            )

    def layer_sq_rows(D, A, layer_sq, l):
        # D (B, n_out), A (B, n_in), layer_sq (B, L): ||delta_i||^2 (||a_i||^2 + 1) of layer l
        i = cuda.grid(1)
        if i < D.shape[0]:
            dd = zero
            for o in range(D.shape[1]):
                dd += D[i, o] * D[i, o]
            aa = one
            for j in range(A.shape[1]):
                aa += A[i, j] * A[i, j]
            layer_sq[i, l] = dd * aa

    def finish_norms(layer_sq, norms, want_layer_norms, layer_norms, max_norm, clip_c):
        # layer_sq (B, L) -> norms (B,), layer_norms (B, L) if asked, clip factors (B,) when max_norm > 0
        i = cuda.grid(1)
        if i < layer_sq.shape[0]:
            t = zero
            for l in range(layer_sq.shape[1]):
                t += layer_sq[i, l]
                if want_layer_norms:
                    layer_norms[i, l] = math.sqrt(layer_sq[i, l])
            nrm = math.sqrt(t)
            norms[i] = nrm
            if max_norm > zero:
                clip_c[i] = max_norm / nrm if nrm > max_norm else one

    def sum_rows(part, part_off, nrows, ncols, scale, out, out_off):
        # part[part_off:] (nrows, ncols) -> out[out_off + c] = scale * sum_r part[r, c], in a fixed order
        sh = cuda.shared.array((SUM_Y, SUM_X), F)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        c = cuda.blockIdx.x * SUM_X + tx
        acc = zero
        if c < ncols:
            for r in range(ty, nrows, SUM_Y):
                acc += part[part_off + r * ncols + c]
        sh[ty, tx] = acc
        cuda.syncthreads()
        if ty == 0 and c < ncols:
            t = zero
            for y in range(SUM_Y):
                t += sh[y, tx]
            out[out_off + c] = t * scale

    def outer_into(D, A, G, w_start):
        # D (B, n_out), A (B, n_in), G (B, P): G[i, w_start + o*n_in + j] = D[i,o] A[i,j], then b: D[i,o]
        n_out = D.shape[1]
        n_in = A.shape[1]
        nw = n_out * n_in
        k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if k < nw + n_out:
            for i in range(cuda.blockIdx.y, D.shape[0], cuda.gridDim.y):
                if k < nw:
                    G[i, w_start + k] = D[i, k // n_in] * A[i, k % n_in]
                else:
                    G[i, w_start + k] = D[i, k - nw]

    def variance_from_moments(sq_mean, grad, var):
        # (P,) each: var = max(sq_mean - grad^2, 0)
        p = cuda.grid(1)
        if p < var.shape[0]:
            v = sq_mean[p] - grad[p] * grad[p]
            var[p] = v if v > zero else zero

    def noised_mean(total, noise, sigma_c, inv_b, out):
        # (P,) each: out = (total + sigma C xi) / B
        p = cuda.grid(1)
        if p < out.shape[0]:
            out[p] = (total[p] + sigma_c * noise[p]) * inv_b

    def check_inputs(theta, X, targets, labels, lo, hi, n_classes, flags):
        # theta (P,), X (B*n0,), targets (B*nL,), labels (B,): flags = non-finite theta, X, y; y out of range
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for k in range(start, theta.shape[0], stride):
            if not math.isfinite(theta[k]):
                flags[0] = 1
        for k in range(start, X.shape[0], stride):
            if not math.isfinite(X[k]):
                flags[1] = 1
        for k in range(start, targets.shape[0], stride):
            v = targets[k]
            if not math.isfinite(v):
                flags[2] = 1
            elif v < lo or v > hi:
                flags[3] = 1
        for k in range(start, labels.shape[0], stride):
            if labels[k] < 0 or labels[k] >= n_classes:
                flags[3] = 1

    def fused_narrow(theta, layout, act, loss, X, labels, targets, B, T, need_ps, need_grad, need_sq,
                     max_norm, lo, hi, ws, P, off_lsq, off_grad, off_sq, off_clip, G):
        # X (B, n0) -> ws: tile losses, input flags (4,), layer_sq (B, L), partials (nblk, P); G (B, P)
        sh = cuda.shared.array(0, F)
        aoff = cuda.local.array((MAXL,), nbt.int64)
        doff = cuda.local.array((MAXL,), nbt.int64)
        L = (layout.shape[0] - 1) // 2  # layout: the L + 1 widths, then each layer's offset in theta
        sizes = layout[: L + 1]
        w_starts = layout[L + 1:]
        tid = cuda.threadIdx.x
        NT = cuda.blockDim.x
        blk = cuda.blockIdx.x
        nblk = cuda.gridDim.x
        fl = nblk  # flags in ws: non-finite theta, X, y; y out of range
        i0 = blk * T
        TG = (T + RS - 1) // RS  # sample groups of the forward and backward products
        acc = cuda.local.array((RS,), F)
        rows = cuda.local.array((RS,), nbt.int64)
        # shared layout, rows padded to n + 1 so a warp walking the samples hits distinct banks:
        # A_0..A_{L-1} (T, n_l + 1) | D_1..D_L (T, n_l + 1) | Z_L (T, n_L + 1) | clip c (T) | loss (T)
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
        n0 = sizes[0]
        # the inputs are checked as they are read: each block its samples and a slice of theta
        for e in range(tid, T * n0, NT):
            s = e // n0
            j = e - s * n0
            i = i0 + s
            v = X[i, j] if i < B else zero
            if not math.isfinite(v):
                ws[fl + 1] = one
            sh[s * (n0 + 1) + j] = v
        chunk = (P + nblk - 1) // nblk
        for p in range(blk * chunk + tid, min(P, blk * chunk + chunk), NT):
            if not math.isfinite(theta[p]):
                ws[fl] = one
        cuda.syncthreads()
        # forward: z = W a + b; hidden layers keep a = phi(z) and phi'(z) (the latter becomes delta)
        for l in range(1, L + 1):
            nin = sizes[l - 1]
            nout = sizes[l]
            w = w_starts[l - 1]
            bo = w + nout * nin
            ain = aoff[l - 1]
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
                        if l < L:
                            h = activate(act, z)
                            sh[aoff[l] + s * (nout + 1) + o] = h
                            sh[doff[l] + s * (nout + 1) + o] = activate_grad(act, z, h)
                        else:
                            sh[zoff + s * (nout + 1) + o] = z
            cuda.syncthreads()
        nL = sizes[L]
        if tid < T:
            s = tid
            i = i0 + s
            zrow = sh[zoff + s * (nL + 1): zoff + s * (nL + 1) + nL]
            drow = sh[doff[L] + s * (nL + 1): doff[L] + s * (nL + 1) + nL]
            if i < B:
                label = labels[i % labels.shape[0]]
                target = targets[i % targets.shape[0]]
                if loss == CROSS_ENTROPY:
                    if label < 0 or label >= nL:
                        ws[fl + 3] = one
                        label = 0
                else:
                    for k in range(nL):
                        v = target[k]
                        if not math.isfinite(v):
                            ws[fl + 2] = one
                        elif v < lo or v > hi:
                            ws[fl + 3] = one
                sh[loff + s] = output_delta_row(loss, zrow, target, label, drow)
            else:
                sh[loff + s] = zero
                for k in range(nL):
                    drow[k] = zero
        cuda.syncthreads()
        if tid == 0:
            t = zero
            for s in range(T):
                t += sh[loff + s]
            ws[blk] = t
        # backward: delta_{l-1} = (W_l^T delta_l) * phi'(z_{l-1}), written over phi'
        for l in range(L, 1, -1):
            nout = sizes[l]
            nin = sizes[l - 1]
            w = w_starts[l - 1]
            for e in range(tid, TG * nin, NT):
                j = e // TG
                sg = e - j * TG
                for q in range(RS):
                    acc[q] = zero
                    rows[q] = doff[l] + min(sg + q * TG, T - 1) * (nout + 1)
                for o in range(nout):
                    wv = theta[w + o * nin + j]
                    for q in range(RS):
                        acc[q] += wv * sh[rows[q] + o]
                for q in range(RS):
                    s = sg + q * TG
                    if s < T:
                        p = doff[l - 1] + s * (nin + 1) + j
                        sh[p] = acc[q] * sh[p]
            cuda.syncthreads()
        # norms from the deltas (Goodfellow): ||grad_l||^2 = ||delta_l||^2 (||a_{l-1}||^2 + 1); clip factor
        if tid < T:
            s = tid
            i = i0 + s
            tot = zero
            for l in range(1, L + 1):
                dd = zero
                for o in range(sizes[l]):
                    d = sh[doff[l] + s * (sizes[l] + 1) + o]
                    dd += d * d
                aa = one
                for j in range(sizes[l - 1]):
                    av = sh[aoff[l - 1] + s * (sizes[l - 1] + 1) + j]
                    aa += av * av
                v = dd * aa
                if i < B:
                    ws[off_lsq + i * L + l - 1] = v
                tot += v
            c = one
            nrm = math.sqrt(tot)
            if max_norm > zero and nrm > max_norm:
                c = max_norm / nrm
            sh[coff + s] = c
        cuda.syncthreads()
        # reducers over the tile, one thread per parameter of layer l; theta's layout is W then b
        for l in range(1, L + 1):
            nout = sizes[l]
            nin = sizes[l - 1]
            w = w_starts[l - 1]
            nw = nout * nin
            if need_grad or need_sq or max_norm > zero:
                for k in range(tid, nw + nout, NT):
                    if k < nw:
                        o = k // nin
                        j = k - o * nin
                    else:
                        o = k - nw
                        j = -1
                    g = zero
                    q = zero
                    cg = zero
                    for s in range(T):
                        d = sh[doff[l] + s * (nout + 1) + o]
                        av = sh[aoff[l - 1] + s * (nin + 1) + j] if j >= 0 else one
                        da = d * av
                        if need_grad:
                            g += da
                        if need_sq:
                            q += da * da
                        if max_norm > zero:
                            cg += sh[coff + s] * da
                    if need_grad:
                        ws[off_grad + blk * P + w + k] = g
                    if need_sq:
                        ws[off_sq + blk * P + w + k] = q
                    if max_norm > zero:
                        ws[off_clip + blk * P + w + k] = cg
            if need_ps:  # for fixed s, consecutive threads write consecutive addresses of row i
                ns = min(T, B - i0)
                for k in range(tid, nw + nout, NT):
                    if k < nw:
                        o = k // nin
                        j = k - o * nin
                        for s in range(ns):
                            d = sh[doff[l] + s * (nout + 1) + o]
                            G[i0 + s, w + k] = d * sh[aoff[l - 1] + s * (nin + 1) + j]
                    else:
                        for s in range(ns):
                            G[i0 + s, w + k] = sh[doff[l] + s * (nout + 1) + k - nw]

    return {
        "tiled_gemm": tiled_gemm,
        "output_deltas": output_deltas,
        "layer_sq_rows": layer_sq_rows,
        "finish_norms": finish_norms,
        "sum_rows": sum_rows,
        "outer_into": outer_into,
        "variance_from_moments": variance_from_moments,
        "noised_mean": noised_mean,
        "check_inputs": check_inputs,
        "fused_narrow": fused_narrow,
    }


def kernel_signatures(F) -> dict:
    """Argument types of every kernel for float type ``F`` (C-contiguous arrays), for ``compile_ptx``."""
    i64 = nbt.int64
    v = nbt.Array(F, 1, "C")
    m = nbt.Array(F, 2, "C")
    vi = nbt.Array(i64, 1, "C")
    return {
        "tiled_gemm": (i64, i64, i64, i64, v, i64, i64, i64, v, i64, i64, i64, i64,
                       v, i64, i64, i64, i64, v, i64, v, v, i64, v, F),
        "output_deltas": (m, vi, m, i64, i64, m, v),
        "layer_sq_rows": (m, m, m, i64),
        "finish_norms": (m, v, i64, m, F, v),
        "sum_rows": (v, i64, i64, i64, F, v, i64),
        "outer_into": (m, m, m, i64),
        "variance_from_moments": (v, v, v),
        "noised_mean": (v, v, F, F, v),
        "check_inputs": (v, v, v, vi, F, F, i64, nbt.Array(nbt.int32, 1, "C")),
        "fused_narrow": (v, vi, i64, i64, m, vi, m, i64, i64, i64, i64, i64, F, F, F,
                         v, i64, i64, i64, i64, i64, m),
    }


# -------------------------------------------------------------- orchestration


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fused_tile(net: MLP, batch: int, dtype) -> int:
    """Samples per block of the fused path (0 when the network does not fit it)."""
    if max(net.sizes) > FUSED_MAX_WIDTH or net.num_layers > FUSED_MAX_LAYERS:
        return 0
    per_sample = sum(n + 1 for n in net.sizes[:-1]) + sum(n + 1 for n in net.sizes[1:]) + net.n_out + 3
    t_max = SHARED_BYTES // (per_sample * np.dtype(dtype).itemsize)
    tile = FUSED_MAX_TILE
    while tile > 1 and (tile > t_max or _cdiv(batch, tile) < TARGET_BLOCKS):
        tile //= 2
    return tile if tile <= t_max else 0


def _fused_shared_bytes(net: MLP, tile: int, dtype) -> int:
    n = sum(x + 1 for x in net.sizes[:-1]) + sum(x + 1 for x in net.sizes[1:]) + net.n_out + 1 + 2
    return tile * n * np.dtype(dtype).itemsize


class _Device:
    """Device inputs: θ (P,), X (B, n0), labels (B,) int64, targets (B, nL); one unused dummy.

    Shapes and dtypes are checked; ``values_checked`` says whether the values are too (host
    inputs were checked on the host; device inputs are checked by the kernels that read them).
    """

    def __init__(self, theta, X, labels, targets, batch, dtype, values_checked):
        self.theta, self.X, self.labels, self.targets = theta, X, labels, targets
        self.batch_size, self.dtype = batch, np.dtype(dtype)
        self.values_checked = values_checked


_SCRATCH: dict = {}
_FLAT: dict = {}
_SCRATCH_MAX = 64


def _scratch(tag: str, shape: tuple, dtype, zero: bool = False, on_create=None):
    """A device buffer for intermediates that never leave this module, reused across calls.

    numba allocates with cudaMalloc/cudaFree, which cost more than the small kernels
    here; every kernel runs on the default stream, so reuse by the next call is ordered.
    """
    key = (tag, tuple(int(x) for x in shape), np.dtype(dtype).str, zero)
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) >= _SCRATCH_MAX:
            _FLAT.pop(next(iter(_SCRATCH)), None)
            _SCRATCH.pop(next(iter(_SCRATCH)))
        if zero:
            buf = _SCRATCH[key] = cuda.to_device(np.zeros(key[1], dtype=dtype))
        else:
            buf = _SCRATCH[key] = cuda.device_array(key[1], dtype=dtype)
        _FLAT[key] = buf.reshape(buf.size)
        if on_create is not None:
            on_create(buf)
    return buf


def _scratch_flat(tag: str, shape: tuple, dtype):
    """``_scratch`` and a cached flat view of it (a reshape costs tens of µs of Python per call)."""
    buf = _scratch(tag, shape, dtype)
    return buf, _FLAT[(tag, tuple(int(x) for x in shape), np.dtype(dtype).str, False)]


@functools.cache
def _layout(sizes: tuple[int, ...]):
    """The widths, then each layer's offset in θ, on the device (the fused kernel's ``layout``)."""
    w_starts = [s.w_start for s in MLP(sizes).layers]
    return cuda.to_device(np.asarray(list(sizes) + w_starts, dtype=np.int64))


@functools.cache
def _pinned(n: int, dtype: str):
    """A page-locked host buffer: small device-to-host copies into it are several times cheaper."""
    return cuda.pinned_array(n, dtype=np.dtype(dtype))


def _raise_input_error(flags, net: MLP) -> None:
    """Turn the device checks' flags (non-finite θ, X, y; y out of range) into the host checks' errors."""
    for name, bad in (("theta", flags[0]), ("X", flags[1]), ("y", flags[2])):
        if bad:
            raise ValueError(f"{name}: contains NaN or Inf")
    if net.loss_code == CROSS_ENTROPY:
        raise ValueError(f"y: labels must lie in [0, {net.n_out}) (sizes[-1] = {net.n_out})")
    raise ValueError("y: binary_cross_entropy targets must lie in [0, 1]")


def _target_range(net: MLP, dt: np.dtype):
    if net.loss_code == BINARY_CROSS_ENTROPY:
        return dt.type(0), dt.type(1)
    return dt.type(-np.inf), dt.type(np.inf)


def _sum_partials(K, part, part_off, nrows, ncols, scale, out, out_off=0):
    K["sum_rows"][(_cdiv(ncols, SUM_X),), (SUM_X, SUM_Y)](part, part_off, nrows, ncols, scale, out, out_off)


def _run_device(net: MLP, d: _Device, need: frozenset[str], max_norm: float | None, G=None,
                path: str = "auto", host_loss: bool = True) -> dict:
    """Every quantity in ``need`` (and ``clipped_sum`` with ``max_norm``) as device arrays; loss a float.

    With ``host_loss=False`` nothing waits for the GPU: the loss stays as its device partial
    sums (``loss_partials``), which is how the benchmarks time the launches alone.
    """
    K = kernels(d.dtype)
    F = d.dtype.type
    B, P, L = d.batch_size, net.num_params, net.num_layers
    clip = max_norm is not None
    need_norms = bool(need & {"norms", "layer_norms"}) or clip
    tile = fused_tile(net, B, d.dtype) if path in ("auto", "fused") else 0
    if path == "fused" and tile == 0:
        raise ValueError(f"path: the fused path does not fit sizes {list(net.sizes)}")
    if "per_sample" in need and G is None:
        G = cuda.device_array((B, P), dtype=d.dtype)
    dummy2 = _scratch("dummy2", (1, 1), d.dtype)
    layer_norms = cuda.device_array((B, L), dtype=d.dtype) if "layer_norms" in need else dummy2
    res: dict = {}
    act, loss = net.activation_code, net.loss_code
    scale_b = F(1.0 / B)
    if not tile and not d.values_checked:
        _check_values(K, net, d)
    if tile:
        # one workspace: tile losses | input flags | layer_sq | grad, sq_mean, clipped partials
        nblk = _cdiv(B, tile)
        off_lsq = nblk + 4
        offs, end = {}, off_lsq + B * L
        for name, wanted in (("grad", "grad" in need), ("sq_mean", "sq_mean" in need),
                             ("clipped_sum", clip)):
            offs[name] = end
            end += nblk * P if wanted else 0
        zero_flags = np.zeros(4, dtype=d.dtype)
        ws = _scratch("fused_ws", (end,), d.dtype,
                      on_create=lambda buf: buf[nblk: nblk + 4].copy_to_device(zero_flags))
        lo, hi = _target_range(net, d.dtype)
        K["fused_narrow"][nblk, FUSED_THREADS, 0, _fused_shared_bytes(net, tile, d.dtype)](
            d.theta, _layout(net.sizes), act, loss, d.X, d.labels, d.targets, B, tile,
            int("per_sample" in need), int("grad" in need), int("sq_mean" in need),
            F(max_norm if clip else 0.0), lo, hi,
            ws, P, off_lsq, offs["grad"], offs["sq_mean"], offs["clipped_sum"],
            G if G is not None else dummy2,
        )
        for name, scale in (("grad", scale_b), ("sq_mean", scale_b), ("clipped_sum", F(1.0))):
            if (name == "clipped_sum" and clip) or (name != "clipped_sum" and name in need):
                res[name] = cuda.device_array(P, dtype=d.dtype)
                _sum_partials(K, ws, offs[name], nblk, P, scale, res[name])
        if need_norms:
            res["norms"] = cuda.device_array(B, dtype=d.dtype)
            K["finish_norms"][_cdiv(B, ROW_THREADS), ROW_THREADS](
                ws[off_lsq: off_lsq + B * L].reshape(B, L), res["norms"], int("layer_norms" in need),
                layer_norms, F(0.0), dummy2.reshape(1),
            )
        if not host_loss:
            res["loss_partials"] = ws[:nblk]
        else:
            # the tile losses and the input flags in one small copy; the losses summed here in a fixed order
            head = ws[: nblk + 4].copy_to_host(_pinned(nblk + 4, d.dtype.str))
            if head[nblk:].any():
                ws[nblk: nblk + 4].copy_to_device(np.zeros(4, dtype=d.dtype))
                _raise_input_error(head[nblk:], net)
            res["loss"] = head[:nblk].sum(dtype=d.dtype) / F(B)
    else:
        layer_sq = _scratch("layer_sq", (B, L), d.dtype)
        losses, deltas, acts = _tiled_backward(K, net, d, layer_sq if need_norms else None)
        clip_c = _scratch("clip_c", (B if clip else 1,), d.dtype)
        if need_norms:
            norms = cuda.device_array(B, dtype=d.dtype)
            K["finish_norms"][_cdiv(B, ROW_THREADS), ROW_THREADS](
                layer_sq, norms, int("layer_norms" in need), layer_norms, F(max_norm if clip else 0.0),
                clip_c,
            )
            res["norms"] = norms
        for name, square, use_scale, scale in (("grad", 0, 0, scale_b), ("sq_mean", 1, 0, scale_b),
                                               ("clipped_sum", 0, 1, F(1.0))):
            if (name == "clipped_sum" and clip) or (name != "clipped_sum" and name in need):
                out = cuda.device_array(P, dtype=d.dtype)
                for l, s in enumerate(net.layers):
                    _weight_grad(K, d, deltas[l], acts[l], s, square, use_scale, clip_c, scale, out)
                res[name] = out
        if "per_sample" in need:
            for l, s in enumerate(net.layers):
                seg = s.end - s.w_start
                K["outer_into"][(_cdiv(seg, WRITE_THREADS), min(B, 65535)), WRITE_THREADS](
                    deltas[l][0], acts[l][0], G, s.w_start
                )
        if host_loss:  # per-sample losses summed here in a fixed order
            res["loss"] = losses.copy_to_host(_pinned(B, d.dtype.str)).sum(dtype=d.dtype) / F(B)
        else:
            res["loss_partials"] = losses
    if "layer_norms" in need:
        res["layer_norms"] = layer_norms
    if "per_sample" in need:
        res["per_sample"] = G
    return res


def _check_values(K, net: MLP, d: _Device) -> None:
    """The value checks of device inputs for the tiled path: one kernel, one flag copy."""
    flags = _scratch("flags", (4,), np.int32, zero=True)  # stays zero unless a check fails
    lo, hi = _target_range(net, d.dtype)
    n = max(d.theta.size, d.X.size, d.targets.size, d.labels.size)
    K["check_inputs"][min(_cdiv(n, ROW_THREADS), 1024), ROW_THREADS](
        d.theta, d.X.reshape(d.X.size), d.targets.reshape(d.targets.size), d.labels, lo, hi, net.n_out,
        flags,
    )
    f = flags.copy_to_host()
    if f.any():
        flags.copy_to_device(np.zeros(4, dtype=np.int32))
        _raise_input_error(f, net)
    d.values_checked = True


def _tiled_backward(K, net: MLP, d: _Device, layer_sq):
    """Forward and backward by tiled GEMMs: losses (B,), deltas [Δ_1..Δ_L], layer inputs [A_0..A_{L-1}]."""
    B, L = d.batch_size, net.num_layers
    acts = [d.X]
    flats = [d.X.reshape(d.X.size)]  # flat views of acts
    derivs = []
    theta = d.theta
    dummy = _scratch("dummy", (1,), d.dtype)
    one = d.dtype.type(1.0)
    for l, s in enumerate(net.layers):
        grid = (_cdiv(s.n_out, GEMM_TILE), _cdiv(B, GEMM_TILE), 1)
        last = l == L - 1
        out1, out1_flat = _scratch_flat(f"act{l}", (B, s.n_out), d.dtype)
        out2, out2_flat = (dummy, dummy) if last else _scratch_flat(f"deriv{l}", (B, s.n_out), d.dtype)
        # Z = A W^T + b: a (B, n_in) k-contiguous, opB(k, n) = W[n, k]
        K["tiled_gemm"][grid, (GEMM_THREADS, GEMM_THREADS)](
            B, s.n_out, s.n_in, s.n_in, flats[-1], 0, s.n_in, 1,
            theta, s.w_start, 1, s.n_in, s.n_out,
            dummy, 0, 0, FWD_OUTPUT if last else FWD_HIDDEN, net.activation_code, theta, s.b_start,
            out1_flat, out2_flat, s.n_out, dummy, one,
        )
        if last:
            z_out = out1
        else:
            acts.append(out1)
            flats.append(out1_flat)
            derivs.append((out2, out2_flat))
    n_out = net.n_out
    D, D_flat = _scratch_flat("delta_out", (B, n_out), d.dtype)
    losses = _scratch("losses", (B,), d.dtype)
    K["output_deltas"][_cdiv(B, ROW_THREADS), ROW_THREADS](
        z_out, d.labels, d.targets, net.loss_code, B, D, losses
    )
    deltas = [None] * L
    deltas[L - 1] = (D, D_flat)
    for l in range(L - 1, 0, -1):
        s = net.layers[l]
        Dp, Dp_flat = derivs[l - 1]  # phi'(z_{l-1}), overwritten with delta_{l-1}
        grid = (_cdiv(s.n_in, GEMM_TILE), _cdiv(B, GEMM_TILE), 1)
        # delta_{l-1} = (delta_l W) * phi': a (B, n_out) k-contiguous, opB(k, n) = W[k, n]
        K["tiled_gemm"][grid, (GEMM_THREADS, GEMM_THREADS)](
            B, s.n_in, s.n_out, s.n_out, deltas[l][1], 0, s.n_out, 1,
            theta, s.w_start, s.n_in, 1, s.n_in,
            dummy, 0, 0, BWD_INPUT, 0, theta, 0, Dp_flat, dummy, s.n_in, dummy, one,
        )
        deltas[l - 1] = (Dp, Dp_flat)
    if layer_sq is not None:
        for l in range(L):
            K["layer_sq_rows"][_cdiv(B, ROW_THREADS), ROW_THREADS](deltas[l][0], acts[l], layer_sq, l)
    return losses, deltas, list(zip(acts, flats))


def _weight_grad(K, d: _Device, D, A, s, square: int, use_scale: int, rowscale, scale, out):
    """out[s.w_start:s.end] = scale * sum_i opD_i opA_i^T (W part, then bias); D, A are (array, flat view).

    Enough output tiles: one GEMM writes θ's layout directly. Too few (a narrow layer, a big
    batch): the batch is split into K chunks, each block writes a partial, and sum_rows adds
    them in a fixed order. A launch costs more than a small GEMM, so splitting is the exception.
    """
    B = d.batch_size
    M, N = s.n_out, s.n_in + 1
    blocks_mn = _cdiv(M, GEMM_TILE) * _cdiv(N, GEMM_TILE)
    nsplit = 1
    if blocks_mn < GRAD_MIN_BLOCKS:
        nsplit = max(1, min(_cdiv(TARGET_BLOCKS, blocks_mn), _cdiv(B, 4 * GEMM_BK)))
    k_chunk = _cdiv(_cdiv(B, nsplit), GEMM_BK) * GEMM_BK
    nsplit = _cdiv(B, k_chunk)
    seg = M * N
    dummy = _scratch("dummy", (1,), d.dtype)
    if nsplit == 1:
        part, part_off, part_scale = out, s.w_start, scale
    else:
        part, part_off, part_scale = _scratch("grad_split", (nsplit * seg,), d.dtype), 0, d.dtype.type(1.0)
    # C[o, j] = sum_i D[i, o] A[i, j]: opA(o, i) = D[i*M + o], opB(i, j) = A[i*n_in + j], 1 for the bias
    K["tiled_gemm"][(_cdiv(N, GEMM_TILE), _cdiv(M, GEMM_TILE), nsplit), (GEMM_THREADS, GEMM_THREADS)](
        M, N, B, k_chunk, D[1], 0, 1, M, A[1], 0, s.n_in, 1, s.n_in,
        rowscale, use_scale, square, GRAD_PARTIAL, 0, d.theta, part_off, dummy, dummy, 0, part, part_scale,
    )
    if nsplit > 1:
        _sum_partials(K, part, 0, nsplit, seg, scale, out, s.w_start)


# ---------------------------------------------------------------- entry points


def run(net: MLP, inp: _validation.Inputs, need: frozenset[str], max_norm: float | None, out=None,
        path: str = "auto") -> dict:
    """The backend contract of :mod:`fastgrad.api`: validated host arrays in, host arrays out."""
    check_available()
    dt = inp.dtype
    d = _Device(
        cuda.to_device(inp.theta),
        cuda.to_device(inp.X),
        cuda.to_device(inp.labels if inp.labels.shape[0] else np.zeros(1, dtype=np.int64)),
        cuda.to_device(inp.targets if inp.targets.shape[0] else np.zeros((1, net.n_out), dtype=dt)),
        inp.batch_size,
        dt,
        values_checked=True,
    )
    raw = _run_device(net, d, need, max_norm, None, path)
    res = {"loss": raw.pop("loss")}
    for name, arr in raw.items():
        if name == "per_sample" and out is not None:
            arr.copy_to_host(out)
            res[name] = out
        else:
            res[name] = arr.copy_to_host()
    return res


def is_device_array(a) -> bool:
    """True for arrays that live on the GPU (``__cuda_array_interface__``, or the simulator's arrays)."""
    if cuda is None:
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    return SIMULATOR and type(a).__name__ == "FakeCUDAArray"


def _as_device(name: str, a):
    if not is_device_array(a):
        raise TypeError(
            f"{name}: expected a device array like the other inputs (θ, X and y must all be on the GPU, "
            f"or all on the host), got {type(a).__name__}"
        )
    if isinstance(a, DeviceNDArray) or (SIMULATOR and not hasattr(a, "__cuda_array_interface__")):
        return a  # numba's own arrays need no wrapping (as_cuda_array would also synchronise)
    return cuda.as_cuda_array(a)


def check_device_inputs(net: MLP, theta, X, y, values: bool = True) -> _Device:
    """The checks of :func:`fastgrad._validation.check_inputs` for device arrays, used in place.

    Shapes and dtypes are read from the array interface. The values (finite, labels and
    targets in range) are checked on the device: by one kernel here (``values=True``), or,
    with ``values=False``, by the kernels of the pass itself, whose verdict comes back with
    the loss; either way a bad input raises the host checks' error and returns nothing.
    """
    check_available()
    _validation.check_net(net)
    theta, X, y = _as_device("theta", theta), _as_device("X", X), _as_device("y", y)
    if np.dtype(theta.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"theta: expected dtype float32 or float64, got {theta.dtype}")
    dt = np.dtype(theta.dtype)
    if theta.ndim != 1 or theta.shape[0] != net.num_params:
        raise ValueError(
            f"theta: expected shape ({net.num_params},) for sizes {list(net.sizes)}, got {tuple(theta.shape)}"
        )
    if X.ndim != 2 or X.shape[1] != net.n_in:
        raise ValueError(f"X: expected a 2-D array (B, {net.n_in}), got shape {tuple(X.shape)}")
    B = X.shape[0]
    if B == 0:
        raise ValueError("X: the batch is empty (B = 0); need at least one sample")
    if np.dtype(X.dtype) != dt:
        raise TypeError(f"X: device inputs are used in place, so X must have θ's dtype {dt}, got {X.dtype}")
    ce = net.loss_code == CROSS_ENTROPY
    if ce:
        if np.dtype(y.dtype) != np.int64:
            raise TypeError(f"y: cross_entropy on the device expects int64 labels, got dtype {y.dtype}")
        if tuple(y.shape) != (B,):
            raise ValueError(f"y: cross_entropy expects labels of shape ({B},), got {tuple(y.shape)}")
    else:
        if y.ndim == 1 and net.n_out == 1 and y.shape[0] == B:
            y = y.reshape(B, 1)
        if tuple(y.shape) != (B, net.n_out):
            raise ValueError(
                f"y: {net.loss} expects targets of shape ({B}, {net.n_out}), got {tuple(y.shape)}"
            )
        if np.dtype(y.dtype) != dt:
            raise TypeError(f"y: device targets are used in place, need θ's dtype {dt}, not {y.dtype}")
    for name, a in (("theta", theta), ("X", X), ("y", y)):
        if not a.is_c_contiguous():
            raise ValueError(f"{name}: device inputs must be C-contiguous")
    labels = y if ce else _scratch("no_labels", (1,), np.int64, zero=True)
    targets = _scratch("no_targets", (1, net.n_out), dt, zero=True) if ce else y
    d = _Device(theta, X, labels, targets, B, dt, values_checked=False)
    if values:
        _check_values(kernels(dt), net, d)
    return d


def backprop_device(net: MLP, theta, X, y, need: frozenset[str], out=None, path: str = "auto") -> dict:
    """Raw quantities for device inputs, as device arrays (plus ``variance`` and ``noise_scale``)."""
    d = check_device_inputs(net, theta, X, y, values=False)
    if out is not None:
        out = _as_device("out", out)
        if tuple(out.shape) != (d.batch_size, net.num_params) or np.dtype(out.dtype) != d.dtype:
            raise ValueError(
                f"out: expected shape {(d.batch_size, net.num_params)} and dtype {d.dtype}, "
                f"got {tuple(out.shape)} and {out.dtype}"
            )
    raw = _run_device(net, d, need, None, out, path)
    K = kernels(d.dtype)
    if "sq_mean" in raw and "grad" in raw:
        var = cuda.device_array(net.num_params, dtype=d.dtype)
        K["variance_from_moments"][_cdiv(net.num_params, ROW_THREADS), ROW_THREADS](
            raw["sq_mean"], raw["grad"], var
        )
        raw["variance"] = var
    if "grad" in raw and "norms" in raw:
        # the one definition, on host copies (P + B numbers)
        raw["noise_scale"] = noise_scale(raw["grad"].copy_to_host(), raw["norms"].copy_to_host())
    return raw


def clipped_grad_device(net: MLP, theta, X, y, max_norm: float, noise_multiplier: float, seed,
                        path: str = "auto"):
    """DP-SGD's clipped, noised mean gradient for device inputs, as a device array (P,)."""
    d = check_device_inputs(net, theta, X, y, values=False)
    raw = _run_device(net, d, frozenset({"loss"}), max_norm, None, path)
    P = net.num_params
    xi = dp_noise(P, seed, d.dtype) if noise_multiplier > 0 else np.zeros(P, dtype=d.dtype)
    noise = cuda.to_device(xi)
    out = cuda.device_array(P, dtype=d.dtype)
    F = d.dtype.type
    kernels(d.dtype)["noised_mean"][_cdiv(P, ROW_THREADS), ROW_THREADS](
        raw["clipped_sum"], noise, F(noise_multiplier * max_norm), F(1.0 / d.batch_size), out
    )
    return out


__all__ = ["backprop_device", "check_available", "clipped_grad_device", "is_device_array", "run"]

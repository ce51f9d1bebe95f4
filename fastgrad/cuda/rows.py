"""Per-row kernels (one thread per sample, per parameter, or per output column), then their launchers.

The per-row maths is the registry's (:mod:`fastgrad.quantities`): the ``clip_factor`` and
``variance_from_moments`` are the functions the CPU kernels and the NumPy reference run too;
Goodfellow's layer term is taken as norms (``layer_norm``) with scaled sums of squares
(``add_square``), as float32 squares over- and underflow and float32 kernels keep to float32.
Layer indices in comments are 1-based (docs/design.md §2): layer l maps A_{l-1} (B, n_{l-1}) to Δ_l,
A_l (B, n_l). The kernels are named as the CPU kernels' steps (docs/architecture.md, "One vocabulary
across the backends"); the norms step is two kernels, as the layers' terms come one layer a launch:
``norms_from_deltas`` (layer l's terms) and ``finish_norms`` (the norms and clip factors, also the
fused path's).
"""

from __future__ import annotations

import math

from ..losses import output_delta_row
from ..quantities import add_square, clip_factor, layer_norm, scaled_norm, variance_from_moments
from .config import (
    FLAG_RANGE,
    FLAG_THETA,
    FLAG_X,
    FLAG_Y,
    ROW_THREADS,
    SIMULATOR,
    SUM_X,
    SUM_Y,
    WRITE_THREADS,
    cdiv,
    cuda,
    kernel,
    mat,
    nbt,
    vec,
)


def exact_multiply(F):
    """a·b rounded once, for float type F, never contracted with a following add: NVVM fuses
    ``a * b + c`` into one FMA by default (``-fma=1``), which the host's NumPy never does; libdevice's
    ``__nv_fmul_rn`` / ``__nv_dmul_rn`` are products it may not fuse. The simulator runs NumPy
    scalars, which round each operation."""
    if SIMULATOR:
        return _product
    from numba.cuda import libdevice

    return libdevice.fmul_rn if F == nbt.float32 else libdevice.dmul_rn


def _product(a, b):
    return a * b


# ------------------------------------------------------------------- kernels


@kernel(lambda F: (mat(F), vec(nbt.int64), mat(F), nbt.int64, nbt.int64, mat(F), vec(F)))
def output_forward_kernel(F):
    def output_forward(z_out, labels, targets, loss, B, deltas, losses):
        # z_out = Z_L (from gemm.dense_forward), deltas (B, n_L); losses (B,): Δ_L = ∂ℓ_i/∂z_L and ℓ_i,
        # one thread per sample
        i = cuda.grid(1)
        if i < B:
            losses[i] = output_delta_row(
                loss, z_out[i], targets[i % targets.shape[0]], labels[i % labels.shape[0]], deltas[i]
            )

    return output_forward


@kernel(lambda F: (mat(F), mat(F), mat(F), nbt.int64))
def norms_from_deltas_kernel(F):
    zero = F(0.0)

    def norms_from_deltas(D, A, per_layer, col):
        # D = Δ_l (B, n_l), A = A_{l-1} (B, n_{l-1}) -> per_layer[:, col = l - 1] (B,): ‖∇_{W_l,b_l} ℓ_i‖
        i = cuda.grid(1)
        if i < D.shape[0]:
            scale, ssq = zero, zero
            for o in range(D.shape[1]):
                scale, ssq = add_square(scale, ssq, D[i, o])
            dn = scaled_norm(scale, ssq)
            scale, ssq = zero, zero
            for j in range(A.shape[1]):
                scale, ssq = add_square(scale, ssq, A[i, j])
            per_layer[i, col] = layer_norm(dn, scaled_norm(scale, ssq))

    return norms_from_deltas


@kernel(lambda F: (mat(F), vec(F), nbt.int64, mat(F), F, vec(F)))
def finish_norms_kernel(F):
    zero = F(0.0)

    def finish_norms(per_layer, norms, want_layer_norms, layer_norms, max_norm, clip_c):
        # per_layer (B, L): the layer norms -> norms (B,), layer_norms (B, L) if asked, clip factors (B,)
        # when max_norm > 0
        i = cuda.grid(1)
        if i < per_layer.shape[0]:
            scale, ssq = zero, zero
            for l in range(per_layer.shape[1]):
                scale, ssq = add_square(scale, ssq, per_layer[i, l])
                if want_layer_norms:
                    layer_norms[i, l] = per_layer[i, l]
            nrm = scaled_norm(scale, ssq)
            norms[i] = nrm
            if max_norm > zero:
                clip_c[i] = clip_factor(nrm, max_norm)

    return finish_norms


@kernel(lambda F: (vec(F), nbt.int64, nbt.int64, nbt.int64, F, vec(F), nbt.int64))
def sum_partials_kernel(F):
    zero = F(0.0)

    def sum_partials(part, part_off, nrows, ncols, scale, out, out_off):
        # part[part_off:] (nrows, ncols) -> out[out_off + c] = scale * Σ_r part[r, c], in a fixed order
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

    return sum_partials


@kernel(lambda F: (mat(F), mat(F), mat(F), nbt.int64))
def write_rows_kernel(F):
    def write_rows(D, A, G, w_start):
        # D = Δ_l (B, n_l), A = A_{l-1} (B, n_{l-1}), G (B, P): layer l's block of row i is
        # D[i, o] A[i, j] at w_start + o·n_{l-1} + j, then the bias part D[i, o]
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

    return write_rows


@kernel(lambda F: (vec(F), vec(F), vec(F)))
def variance_into_kernel(F):
    def variance_into(sq_mean, grad, var):
        # (P,) each: var = max(sq_mean - grad², 0)
        p = cuda.grid(1)
        if p < var.shape[0]:
            var[p] = variance_from_moments(sq_mean[p], grad[p])

    return variance_into


@kernel(lambda F: (mat(F), vec(F), vec(F)))
def row_dot_kernel(F):
    zero = F(0.0)

    def row_dot(M, v, out):
        # M (B, P), v (P,) -> out (B,): M_i · v, one thread per row, in order, in F with Neumaier's
        # compensation (float32 kernels keep to float32; the error does not grow with P)
        i = cuda.grid(1)
        if i < M.shape[0]:
            s, c = zero, zero
            for k in range(M.shape[1]):
                x = M[i, k] * v[k]
                t = s + x
                if abs(s) >= abs(x):
                    c += (s - t) + x
                else:
                    c += (x - t) + s
                s = t
            out[i] = s + c

    return row_dot


@kernel(lambda F: (vec(F), vec(F), F, F, vec(F)))
def noised_mean_kernel(F):
    mul = exact_multiply(F)

    def noised_mean(total, noise, sigma_c, denominator, out):
        # (P,) each: out = (total + σC·ξ) / D, rounded as the host rounds (privacy.dp_step): a product
        # that NVVM cannot contract into a fused multiply-add, then an IEEE add and division
        p = cuda.grid(1)
        if p < out.shape[0]:
            out[p] = (total[p] + mul(sigma_c, noise[p])) / denominator

    return noised_mean


@kernel(lambda F: (vec(F), vec(F), vec(F), vec(nbt.int64), F, F, nbt.int64, vec(nbt.int32)))
def check_values_kernel(F):
    def check_values(theta, X, targets, labels, lo, hi, n_classes, flags):
        # θ (P,), X (B·n0,), targets (B·n_L,), labels (B,) -> flags (N_FLAGS,), config's order
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for k in range(start, theta.shape[0], stride):
            if not math.isfinite(theta[k]):
                flags[FLAG_THETA] = 1
        for k in range(start, X.shape[0], stride):
            if not math.isfinite(X[k]):
                flags[FLAG_X] = 1
        for k in range(start, targets.shape[0], stride):
            v = targets[k]
            if not math.isfinite(v):
                flags[FLAG_Y] = 1
            elif v < lo or v > hi:
                flags[FLAG_RANGE] = 1
        for k in range(start, labels.shape[0], stride):
            if labels[k] < 0 or labels[k] >= n_classes:
                flags[FLAG_RANGE] = 1

    return check_values


# ----------------------------------------------------------------- launchers


def output_forward(*, z_out, labels, targets, loss: int, deltas, losses) -> None:
    """Δ_L (B, n_L) into ``deltas`` and the per-sample losses (B,) into ``losses``, from Z_L."""
    B = z_out.shape[0]
    output_forward_kernel.launch(
        z_out.dtype, cdiv(B, ROW_THREADS), ROW_THREADS, z_out, labels, targets, loss, B, deltas, losses
    )


def norms_from_deltas(*, delta, inputs, per_layer, col: int) -> None:
    """Column ``col`` of per_layer (B, L): Goodfellow's ‖Δ_{l,i}‖ √(‖A_{l-1,i}‖² + 1), layer l = col + 1."""
    B = delta.shape[0]
    grid = cdiv(B, ROW_THREADS)
    norms_from_deltas_kernel.launch(delta.dtype, grid, ROW_THREADS, delta, inputs, per_layer, col)


def finish_norms(*, per_layer, norms, layer_norms=None, max_norm=None, clip=None) -> None:
    """norms (B,) from the layer norms per_layer (B, L); layer_norms (B, L) when given; clip factors (B,)
    when ``max_norm``."""
    dt = per_layer.dtype
    F = dt.type
    B = per_layer.shape[0]
    finish_norms_kernel.launch(
        dt,
        cdiv(B, ROW_THREADS),
        ROW_THREADS,
        per_layer,
        norms,
        int(layer_norms is not None),
        per_layer if layer_norms is None else layer_norms,
        F(max_norm if max_norm is not None else 0.0),
        norms if clip is None else clip,
    )


def sum_partials(*, part, offset: int, nrows: int, ncols: int, scale, out, out_offset: int = 0) -> None:
    """out[out_offset:out_offset + ncols] = scale · the column sums of part[offset:] (nrows, ncols)."""
    sum_partials_kernel.launch(
        part.dtype, (cdiv(ncols, SUM_X),), (SUM_X, SUM_Y), part, offset, nrows, ncols, scale, out, out_offset
    )


def write_rows(*, delta, inputs, out, layer) -> None:
    """Layer l's block of the per-sample rows out (B, P): Δ_l,i A_{l-1,i}ᵀ then Δ_l,i, in θ's layout."""
    B = delta.shape[0]
    seg = layer.end - layer.w_start
    write_rows_kernel.launch(
        delta.dtype,
        (cdiv(seg, WRITE_THREADS), min(B, 65535)),
        WRITE_THREADS,
        delta,
        inputs,
        out,
        layer.w_start,
    )


def variance_into(grad, sq_mean, out) -> None:
    """The population variance (P,) into ``out`` from the mean gradient and the second moment, on the
    device: the registry's ``made_in_pass`` of the CUDA backend for it (needs (grad, sq_mean), then out)."""
    P = grad.shape[0]
    variance_into_kernel.launch(grad.dtype, cdiv(P, ROW_THREADS), ROW_THREADS, sq_mean, grad, out)


def row_dot(M, v):
    """M_i · v of each row (B,), M (B, P) and v (P,) on the device, in their dtype (compensated)."""
    B = M.shape[0]
    out = cuda.device_array(B, dtype=M.dtype)
    row_dot_kernel.launch(M.dtype, cdiv(B, ROW_THREADS), ROW_THREADS, M, v, out)
    return out


def noised_mean(*, total, noise, noise_std: float, denominator: float):
    """DP-SGD's (clipped sum + σC·ξ) / D (P,), on the device, with the host's roundings
    (:func:`fastgrad.privacy.dp_step`, which calls it); ``noise_std`` = σC."""
    P = total.shape[0]
    F = total.dtype.type
    out = cuda.device_array(P, dtype=total.dtype)
    noised_mean_kernel.launch(
        total.dtype, cdiv(P, ROW_THREADS), ROW_THREADS, total, noise, F(noise_std), F(denominator), out
    )
    return out


def check_values(*, theta, X, targets, labels, lo, hi, n_classes: int, flags) -> None:
    """Set flags (N_FLAGS,) int32 for non-finite θ, X, y and for y out of range (they stay 0 otherwise)."""
    n = max(theta.size, X.size, targets.size, labels.size)
    check_values_kernel.launch(
        theta.dtype,
        min(cdiv(n, ROW_THREADS), 1024),
        ROW_THREADS,
        theta,
        X.reshape(X.size),
        targets.reshape(targets.size),
        labels,
        lo,
        hi,
        n_classes,
        flags,
    )

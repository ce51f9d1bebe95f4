"""Numba CPU backend (``backend="numba"``): fused per-sample backprop on CPU threads.

One compiled driver per dtype, :func:`fused_backprop`, serves every activation × loss
(run-time codes) and every combination of quantities: the host turns the requested sums
over samples of :data:`fastgrad.quantities.SUMS` into a ``plan``, one row of (operand kind,
source kind, partial-sum slot) per sum, and the kernels know those kinds, never quantity
names. The driver works in two phases over a chunk of samples (whole tiles that fit in
``WORKSPACE_BYTES``; a long batch in chunks as equal as whole tiles allow):

1. ``prange`` over tiles of ``TILE`` samples (fewer for small batches: :func:`tile_rows`): each
   tile goes forward through the whole network (:func:`dense_forward` per hidden layer,
   :func:`output_forward` for the loss and Δ_L) and back (:func:`dense_backward`), keeping its
   activations A_l and deltas Δ_l in the workspace; the per-row reducers run on the tile while it is hot
   (:func:`tile_norms`: Goodfellow's layer terms and the clip factors; :func:`tile_write_rows`:
   per-sample rows straight into the flat layout), and so do the tile's sums
   (:func:`tile_sums`: per layer Mᵀ S with M = Δ, Δ⊙Δ or c⊙Δ and S = A or A⊙A, DESIGN §3:
   one backward pass, never two), while tiles × P fits in ``PARTIALS_BYTES``; the tiles'
   sums are then added in tile order (:func:`sum_partials`).
2. For a sum whose per-tile sums do not fit: ``prange`` over fixed blocks of ``BLOCK``
   rows of every layer's weights, one GEMM over the whole chunk per block
   (:func:`gemm_block`), with the same operands (:func:`reducer_operand`, :func:`outer_sum`).

The per-row math (clip factor, layer norm term, variance) is ``quantities``' shared
``register_jitable`` code. Each kernel opens with a one-line shape comment; helpers are
called once per tile (or per layer of a tile), never per sample, and the ``prange`` bodies
share no arrays beyond the inputs, outputs, workspace and the small layout and offsets tables:
a split that ignored both was 10-24 % slower on narrow.

Determinism: tiles, blocks and chunks have sizes set by the network, dtype and batch size,
independent of the thread count; every output element is written by exactly one task, sums over samples run
in a fixed order (tile sums in tile order, inside one single-threaded GEMM, or
serially), and chunks are accumulated in order. Repeated calls, any
``numba.set_num_threads``, any Python thread and concurrent calls from several give the
same bits (tests/test_processes.py).

BLAS: the GEMMs are Numba's ``np.dot`` (SciPy's OpenBLAS) called inside ``prange``,
so BLAS is held to one thread for the duration of a call, and the threads come from
Numba alone. OpenBLAS partitions a multi-threaded GEMM differently, with other bits, so
the hold must work from every Python thread: pip's OpenBLAS (pthreads) is set through its
own ``openblas_set_num_threads``, because threadpoolctl 3.8 ignores a limit set by any
thread but the first one that set one (:class:`_BLASThreads`); other BLAS libraries go
through threadpoolctl. The kernels hold only the libraries Numba's GEMMs can call
(:data:`kernel_blas`: SciPy's LP64 interface, not NumPy's ILP64 OpenBLAS). The hold is
process-wide: BLAS calls of other Python threads run on one thread while a fastgrad call
is inside the kernels. Measured on the 2-core machine,
alternating Numba's OpenMP pool with a 2-thread OpenBLAS pool made each side wait for the
other's spinning threads (a 2.6 ms GEMM took 20 ms), so the GEMMs are not run outside ``prange``.

Threading layer: on ``import fastgrad``, unless the user chose one (``NUMBA_THREADING_LAYER``),
Numba's layer is set to TBB (pip's ``tbb``, a dependency on Linux and Windows x86_64,
loaded by :mod:`fastgrad._threading` since pip puts it off the loader's path), else to
``"threadsafe"`` (OpenMP): TBB works in forked children and its idle workers sleep, where
GNU OpenMP aborts a forked child and spins against other busy processes; two Python
threads calling at once abort the ``workqueue`` layer. A child forked from a process
running GNU OpenMP gets a clear ``RuntimeError`` instead of the abort.

Disk cache: compiled kernels are cached (``cache=True``) with the key of the package's
source (:mod:`fastgrad._cache`), so an edit to any module the kernels call (``quantities``,
``activations``, ``losses``) or an upgrade recompiles them; they live in
``fastgrad/__pycache__/`` (or ``$NUMBA_CACHE_DIR``, or Numba's user-wide cache folder).
Without a writable folder the kernels compile in each process, with one warning;
``FASTGRAD_NUMBA_CACHE=0`` before importing fastgrad turns the cache off.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import threading
from contextlib import contextmanager

import numba
import numba.core.event
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import _cache, _threading, quantities
from ._scalar import like
from .activations import TANH, activate, activate_grad
from .losses import CROSS_ENTROPY, output_delta_row
from .mlp import MLP
from .quantities import (
    CLIPPED_DELTA,
    DELTA,
    DELTA_SQUARED,
    INPUT,
    INPUT_SQUARED,
    clip_factor,
    layer_norm_sq,
    variance_from_moments,
)

CACHE = _cache.configure()
"""Whether compiled kernels are cached on disk, keyed on the package's source (:mod:`fastgrad._cache`):
False with ``FASTGRAD_NUMBA_CACHE=0``, or (with one warning) when no cache folder is writable."""

TILE = 256
"""Samples per forward/backward tile (phase 1) of batches of at least 2 × ``TILE`` (smaller batches:
:func:`tile_rows`). Measured (1 thread, float32): 64 → 128 made mnist's forward+backward 15 % and
wide's 15 % faster, narrow unchanged, 256 no faster; on 2 threads (paired A/B, 2026-11-28) 256 took
0.88-0.95× the time of 128 on nine shapes from [256]×3 to wide, float32 and float64: bigger GEMMs and
fewer per-tile sums. Wide at B = 1024 was then 1.12× slower until chunks were balanced (:func:`_chunking`)."""
SMALL_TILE = 32
"""The smallest tile: smaller batches are cut into halved tiles (see :func:`tile_rows`) down to this."""
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


def check_kernels_current() -> None:
    """Raise ``RuntimeError`` when fastgrad's source changed after this process imported it: the
    kernels compiled here (and the disk cache, keyed on the source at import) are then not what
    is on disk. ``fastgrad validate`` calls it, so that it cannot pass on kernels older than the source."""
    if _cache.source_key() != _cache.SOURCE_KEY:
        raise RuntimeError(
            "the fastgrad package's source changed after it was imported, so the numba kernels in "
            "this process are not the ones on disk; run again in a new process"
        )


def cache_description() -> str:
    """One line: where the compiled kernels are cached (or that they are not), and the source key."""
    return _cache.describe()


THREADING_LAYER = _threading.choose_layer()
"""Numba's threading layer as configured on import: ``"tbb"`` unless the user chose one or TBB is
missing (then ``"threadsafe"``, i.e. OpenMP); see :mod:`fastgrad._threading`."""
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
# numbered l = 1..L as in DESIGN; layer l maps n_{l-1} inputs to n_l outputs. The kernels share
# three packs, so that none takes a long argument list:
#   net   = (layout (L, 5) int64, θ (P,), w_t (P,): the stored W_lᵀ of small layers)
#   chunk = (X (R, n_0), acts, dphi, deltas, sqa (flat workspace), offsets (L+1, 3) int64)
#   plan  (n_sums, 3) int64: one row per sum over samples to make (see quantities.SUMS)

N_IN, N_OUT, W_AT, B_AT, STORED_WT = range(5)
"""Columns of ``layout``, row l-1 for layer l: n_{l-1}, n_l, where W_l and b_l start in θ, and
1 when the layer is forwarded with a stored W_lᵀ (at most ``SMALL_LAYER`` weights)."""
A_AT, D_AT, S_AT = range(3)
"""Columns of a chunk's ``offsets``, row l: where the (R, n_l) block of A_l (and of φ'(z_l)) starts
in acts (and dphi), l = 1..L-1; of Δ_l in deltas, l = 1..L; of A_l ⊙ A_l in sqa, l = 0..L-1."""
OPERAND, SOURCE, SLOT, MEAN = range(4)
"""Columns of ``plan``: the operand kind M (quantities.DELTA, ...), the source kind S
(quantities.INPUT, ...), the sum's row of per-tile partial sums (-1: made in phase 2), and 1 when the
sum is a mean (divided by the batch size at the end of the last chunk)."""
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
    layout, theta, w_t = net
    n_in, n_out = layout[l - 1, N_IN], layout[l - 1, N_OUT]
    w0, b0 = layout[l - 1, W_AT], layout[l - 1, B_AT]
    return theta[w0:b0].reshape((n_out, n_in)), w_t[w0:b0].reshape((n_in, n_out)), theta[b0 : b0 + n_out]


@njit(cache=CACHE)
def layer_input(net, chunk, l, r0, r1):
    # rows [r0, r1) of A_{l-1} (m, n_{l-1}); A_0 = X
    X, acts, offsets = chunk[0], chunk[1], chunk[5]
    if l == 1:
        return X[r0:r1]
    return _rows(acts, offsets[l - 1, A_AT], X.shape[0], net[0][l - 1, N_IN], r0, r1)


@njit(cache=CACHE)
def layer_input_squared(net, chunk, l, r0, r1):
    # rows [r0, r1) of A_{l-1} ⊙ A_{l-1} (m, n_{l-1}), kept in sqa
    return _rows(chunk[4], chunk[5][l - 1, S_AT], chunk[0].shape[0], net[0][l - 1, N_IN], r0, r1)


@njit(cache=CACHE)
def layer_source(net, chunk, source, l, r0, r1):
    # rows [r0, r1) of the source S (m, n_{l-1}) of a sum: A_{l-1} (INPUT) or A_{l-1} ⊙ A_{l-1}
    if source == INPUT:
        return layer_input(net, chunk, l, r0, r1)
    return layer_input_squared(net, chunk, l, r0, r1)


@njit(cache=CACHE)
def layer_output(net, chunk, l, r0, r1):
    # rows [r0, r1) of A_l and of φ'(z_l), both (m, n_l), for a hidden layer l < L
    R, off, n_out = chunk[0].shape[0], chunk[5][l, A_AT], net[0][l - 1, N_OUT]
    return _rows(chunk[1], off, R, n_out, r0, r1), _rows(chunk[2], off, R, n_out, r0, r1)


@njit(cache=CACHE)
def layer_delta(net, chunk, l, r0, r1):
    # rows [r0, r1) of Δ_l (m, n_l)
    return _rows(chunk[3], chunk[5][l, D_AT], chunk[0].shape[0], net[0][l - 1, N_OUT], r0, r1)


@njit(cache=CACHE)
def store_transposed(net):
    # w_t (P,) gets W_lᵀ (n_{l-1}, n_l) at W_l's place, for every layer forwarded with it
    layout = net[0]
    for l in range(1, layout.shape[0] + 1):
        if layout[l - 1, STORED_WT]:
            W, WT, _ = layer_params(net, l)
            for k in range(WT.shape[0]):
                for o in range(WT.shape[1]):
                    WT[k, o] = W[o, k]


@njit(cache=CACHE, error_model="numpy")
def forward_gemm(net, l, a_in, out):
    # A_{l-1} (m, n_{l-1}) -> out (m, n_l) = A_{l-1} W_lᵀ
    # small GEMMs ran 1.8x faster here with Wᵀ stored than with W read transposed (128x64x64)
    W, WT, _ = layer_params(net, l)
    if net[0][l - 1, STORED_WT]:
        np.dot(a_in, WT, out)
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
    L = net[0].shape[0]
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
    # representable norm came out NaN or 0 (issue 10.7). Reassociation lets LLVM keep vector partial
    # sums (a serial sum was latency-bound: most of the norms' cost on narrow). The order is fixed by
    # the compiled code, not by threads, so results stay bit-identical.
    s = 0.0
    for k in range(v.shape[0]):
        x = np.float64(v[k])
        s += x * x
    return s


@njit(cache=CACHE, error_model="numpy")
def tile_norms(net, chunk, r0, r1, max_norm, row_out):
    # rows [r0, r1) of A_{l-1}, Δ_l -> layer_sq[i, l-1] = ‖∇_{W_l,b_l} ℓ_i‖² (R, L; float64),
    # norms[i] = ‖∇ℓ_i‖ (R,), and when max_norm > 0 the clip factors clip_c[i] = min(1, C/‖∇ℓ_i‖) (R,);
    # row_out as the driver's
    layout, X, acts, deltas, offsets = net[0], chunk[0], chunk[1], chunk[3], chunk[5]
    layer_sq, norms, clip_c = row_out[1], row_out[2], row_out[3]
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
def tile_write_rows(net, chunk, r0, r1, rows_out):
    # rows [r0, r1) of A_{l-1}, Δ_l -> rows_out[i] (P,) = ∇ℓ_i in θ's layout:
    # per layer δ_{l,i} a_{l-1,i}ᵀ, then δ_{l,i}
    layout, X, acts, deltas, offsets = net[0], chunk[0], chunk[1], chunk[3], chunk[5]
    for i in range(r0, r1):
        out_row = rows_out[i]
        for l in range(1, layout.shape[0] + 1):
            n_in, n_out = layout[l - 1, N_IN], layout[l - 1, N_OUT]
            w0, b0, d0, a0 = layout[l - 1, W_AT], layout[l - 1, B_AT], offsets[l, D_AT], offsets[l - 1, A_AT]
            a_row = X[i] if l == 1 else acts[a0 + i * n_in : a0 + (i + 1) * n_in]
            for r in range(n_out):
                d = deltas[d0 + i * n_out + r]
                w_row = out_row[w0 + r * n_in : w0 + (r + 1) * n_in]
                for k in range(n_in):
                    w_row[k] = d * a_row[k]
                out_row[b0 + r] = d


@njit(cache=CACHE, error_model="numpy")
def reducer_operand(operand, d, q0, c, blk):
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
def tile_sums(plan, net, chunk, r0, r1, clip_c, partial, t, sums, accumulate):
    # rows [r0, r1) (tile t) -> partial[slot, t] (P,): per layer Mᵀ S and Σ_i M_i, for the planned sums
    # that have a slot; tile 0 writes sums[s] (P,) itself unless the chunk's sums are added to earlier ones
    # (sum_partials then starts at tile 1: the same bits as copying tile 0's, one pass over P fewer)
    layout = net[0]
    for l in range(1, layout.shape[0] + 1):
        n_in, n_out = layout[l - 1, N_IN], layout[l - 1, N_OUT]
        w0, b0 = layout[l - 1, W_AT], layout[l - 1, B_AT]
        d = layer_delta(net, chunk, l, r0, r1)
        for s in range(plan.shape[0]):
            slot, operand = plan[s, SLOT], plan[s, OPERAND]
            if slot < 0:
                continue
            M = reducer_operand(operand, d, FIRST, clip_c[r0:r1], d if operand == DELTA else np.empty_like(d))
            S = layer_source(net, chunk, plan[s, SOURCE], l, r0, r1)
            p = sums[s] if t == 0 and not accumulate else partial[slot, t]
            outer_sum(M, S, p[w0:b0].reshape((n_out, n_in)), p[b0 : b0 + n_out])


@njit(cache=CACHE, error_model="numpy")
def sum_partials(part, k0, k1, out, accumulate):
    # part (n_tiles, P) -> out[k0:k1] = Σ_t part[t, k0:k1] in tile order; when accumulate, added to out,
    # else out holds tile 0's sum already (tile_sums wrote it there)
    if accumulate:
        for k in range(k0, k1):
            out[k] += part[0, k]
    for u in range(1, part.shape[0]):
        for k in range(k0, k1):
            out[k] += part[u, k]


@njit(cache=CACHE, error_model="numpy")
def gemm_block(plan, net, chunk, task, clip_c, sums, accumulate):
    # task = (l, q0, q1) -> rows [q0, q1) of W_l's and b_l's part of sums[s] (P,), one GEMM over the chunk's
    # R samples each, for the planned sums without a slot; M (R, nr) = Δ_l[:, q0:q1] plain, squared or scaled
    layout, R = net[0], chunk[0].shape[0]
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
        M = reducer_operand(plan[s, OPERAND], d, q0, clip_c, blk)
        S = layer_source(net, chunk, plan[s, SOURCE], l, FIRST, R)
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
def fused_backprop(net, data, codes, flags, plan, scalars, bufs, row_out, sums, partial, tasks):
    # net = (layout, θ, w_t) as above; data = (X (R, n_0), labels (R,) or (0,), targets (R, n_L) or (0, n_L));
    # codes = (activation, loss, tile); flags = (backward, per_row, squares, accumulate); plan (n_sums, 4);
    # scalars = (max_norm: C in θ's dtype (≤ 0: no clipping), count: B in θ's dtype on the batch's last
    # chunk, whose end divides the mean sums by it (≤ 0: no division)); bufs = (acts, dphi: flat (R, n_l) for
    # l = 1..L-1, deltas: flat (R, n_l) for l = 1..L, sqa: flat (R, n_l) for l = 0..L-1 when squares);
    # row_out = (losses (R,), layer_sq (R, L) float64, norms (R,), clip_c (R,), rows_out (R, P) or (0, 0));
    # sums (n_sums, P); partial (n_slots, n_tiles, P): per-tile sums of the plan's rows with a slot;
    # tasks (T, 3): (l, q0, q1) of every phase-2 GEMM block
    X, labels, targets = data
    act, loss, tile = codes
    backward, per_row, squares, accumulate = flags
    max_norm, count = scalars
    losses, rows_out, clip_c = row_out[0], row_out[4], row_out[3]
    L, R = net[0].shape[0], X.shape[0]
    chunk = (X, bufs[0], bufs[1], bufs[2], bufs[3], chunk_offsets(net[0], R))
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
            tile_norms(net, chunk, r0, r1, max_norm, row_out)
        if rows_out.shape[0] > 0:
            tile_write_rows(net, chunk, r0, r1, rows_out)
        if partial.shape[0] > 0:  # the clip factors of the tile's rows are known: tile_norms ran
            tile_sums(plan, net, chunk, r0, r1, clip_c, partial, np.int64(t), sums, accumulate)
    # the tiles' sums added in tile order, over fixed chunks of parameters
    in_phase_2 = 0
    for s in range(plan.shape[0]):
        if plan[s, SLOT] < 0:
            in_phase_2 += 1
            continue
        part, out = partial[plan[s, SLOT], :n_tiles], sums[s]  # a last, shorter chunk has fewer tiles
        for c in prange((P + 4095) // 4096):
            sum_partials(part, c * 4096, min(P, c * 4096 + 4096), out, accumulate)
    # phase 2: rows [q0, q1) of each layer's sums, one GEMM over the chunk per task
    if in_phase_2 > 0:
        for t in prange(tasks.shape[0]):
            gemm_block(plan, net, chunk, tasks[t], clip_c, sums, accumulate)
    if count > 0:  # the means: each element divided once (the bits of NumPy's sums / B)
        for c in prange((P + 4095) // 4096):
            divide_means(plan, sums, c * 4096, min(P, c * 4096 + 4096), count)


@njit(cache=CACHE, error_model="numpy")
def divide_means(plan, sums, k0, k1, count):
    # sums (n_sums, P) -> sums[s, k0:k1] /= count for the plan's means
    for s in range(plan.shape[0]):
        if plan[s, MEAN]:
            out = sums[s]
            for k in range(k0, k1):
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
def bad_input(theta, x, targets, labels, n_out, lo, hi):
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
def batch_backprop(check, net, data, codes, flags, plan, scalars, bufs, row_out, sums, partial, tasks, chunk):
    # The whole batch, chunk by chunk, in one compiled call (no Python between the chunks):
    # check = (on, lo, hi): with on, bad_input's code first (nonzero: nothing runs); net = (layout, θ, w_t);
    # data = (X (B, n_0), labels (B,) or (0,), targets (B, n_L) or (0, n_L)); flags = (backward, per_row,
    # squares); scalars = (C, B) in θ's dtype; bufs as fused_backprop's for `chunk` rows; row_out as its,
    # for B rows -> 0, after fused_backprop ran on each chunk of `chunk` rows in order (its accumulate flag
    # set after the first, its count B on the last only), and the sum of the B losses (pairwise_sum);
    # or a nonzero check code and 0
    X, labels, targets = data
    losses = row_out[0]
    on, lo, hi = check
    if on:
        code = bad_input(net[1], X.reshape(-1), targets.reshape(-1), labels, targets.shape[1], lo, hi)
        if code != 0:
            return code, losses.dtype.type(0)
    backward, per_row, squares = flags
    c_max, batch = scalars
    acts, dphi, deltas, sqa = bufs
    _, layer_sq, norms, clip_c, rows = row_out
    layout = net[0]
    hidden = width = inputs = 0
    for l in range(layout.shape[0]):
        inputs += layout[l, 0]
        width += layout[l, 1]
        if l < layout.shape[0] - 1:
            hidden += layout[l, 1]
    B = X.shape[0]
    ce = labels.shape[0] > 0
    for c0 in range(0, B, chunk):
        c1 = min(B, c0 + chunk)
        R = c1 - c0
        chunk_bufs = (acts[: R * hidden], dphi[: R * hidden], deltas[: R * width],
                      sqa[: R * inputs] if squares else sqa[:0])  # fmt: skip
        chunk_rows_out = (losses[c0:c1], layer_sq[c0:c1], norms[c0:c1], clip_c[c0:c1],
                          rows[c0:c1] if rows.shape[0] > 0 else rows)  # fmt: skip
        chunk_data = (X[c0:c1], labels[c0:c1] if ce else labels, targets if ce else targets[c0:c1])
        chunk_flags = (backward, per_row, squares, c0 > 0)
        count = batch if c1 == B else batch - batch  # the last chunk divides the means
        fused_backprop(net, chunk_data, codes, chunk_flags, plan, (c_max, count), chunk_bufs, chunk_rows_out,
                       sums, partial, tasks)  # fmt: skip
    return 0, pairwise_sum(losses, B)


@njit(parallel=True, cache=CACHE)
def variance_into(grad, sq_mean, var):
    # grad, sq_mean, var (P,): var = sq_mean − grad² clamped at 0, in one pass
    # (NumPy's took three, with temporaries)
    n = grad.shape[0]
    for c in prange((n + 65535) // 65536):
        for k in range(c * 65536, min(n, (c + 1) * 65536)):
            var[k] = variance_from_moments(sq_mean[k], grad[k])


# ------------------------------------------------------------------ host side

log = logging.getLogger("fastgrad")


class _CompileNotice(numba.core.event.Listener):
    """Says, once per dtype and process, that the kernels are being compiled: the ~20 s of the first
    call would otherwise look like a hang. Numba's "numba:compile" event starts only after its disk
    cache missed, so a cached load says nothing.

    The line goes to the ``fastgrad`` logger at WARNING: with no logging set up, Python's last-resort
    handler writes it to stderr; an application's logging configuration routes or silences it
    (``logging.getLogger("fastgrad").setLevel(logging.ERROR)``). Not a ``warnings`` warning, which
    ``-W error`` would turn into an exception."""

    def __init__(self):
        self.told: set[str] = set()

    def on_start(self, event) -> None:
        data = event.data or {}
        if data.get("dispatcher") is not fused_backprop:
            return
        try:
            dtype = str(data["args"][0].types[1].dtype)  # net = (layout, θ, w_t)
        except (AttributeError, IndexError, KeyError, TypeError):
            dtype = "a new type"
        if dtype not in self.told:
            self.told.add(dtype)
            log.warning(
                "fastgrad: compiling the numba kernels for %s (once, ~20 s; %s)",
                dtype,
                "cached on disk after"
                if CACHE
                else "not cached: FASTGRAD_NUMBA_CACHE=0 or no writable folder",
            )

    def on_end(self, event) -> None:
        pass


compile_notice = _CompileNotice()
numba.core.event.register("numba:compile", compile_notice)


class Workspace:
    """Scratch buffers of the Numba backend, reused across calls.

    Pass one to :func:`fastgrad.backprop` / :func:`fastgrad.clipped_grad`
    (``workspace=``) so a training loop allocates nothing of size B × widths per
    step. Without one, each Python thread keeps its own. One workspace serves one
    call at a time: a call that finds it in use by another (a second Python thread
    sharing it) raises ``RuntimeError`` rather than overwrite its buffers.
    """

    def __init__(self):
        self._key = None
        self._bufs = None
        self._busy = threading.Lock()

    @contextmanager
    def claimed(self):
        """Hold the workspace for the duration of one call; raise if another call holds it."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "workspace: this Workspace is in use by another call (a second Python thread?); "
                "give each thread its own fastgrad.cpu.Workspace(), or pass none (each thread then "
                "gets its own)"
            )
        try:
            yield self
        finally:
            self._busy.release()

    def buffers(self, sizes: tuple[int, ...], rows: int, dtype: np.dtype, want_sq: bool):
        """Flat buffers (acts, dphi, deltas, sqa) for at least ``rows`` samples, the task list and w_t.

        Buffers made for more rows (or with sqa) serve smaller requests as they are: the kernels read
        only the leading part of each, so a step whose batch size varies allocates once."""
        sizes, dtype = tuple(sizes), np.dtype(dtype)
        key = self._key
        if key is None or key[0] != sizes or key[2] != dtype or key[1] < rows or (want_sq and not key[3]):
            hidden = sum(sizes[1:-1])
            self._bufs = (
                np.empty(rows * hidden, dtype),
                np.empty(rows * hidden, dtype),
                np.empty(rows * sum(sizes[1:]), dtype),
                np.empty(rows * sum(sizes[:-1]) if want_sq else 0, dtype),
                _tasks(sizes),
                np.empty(sum(a * b for a, b in itertools.pairwise(sizes)) + sum(sizes[1:]), dtype),
            )
            self._key = (sizes, rows, dtype, want_sq)
        return self._bufs

    def partials(self, n_slots: int, n_tiles: int, num_params: int, dtype: np.dtype) -> np.ndarray:
        """The (n_slots, n_tiles, P) buffer of per-tile sums: a C-contiguous view of a flat buffer that is
        kept while big enough (a strided view would be another type to Numba: another compile)."""
        buf = getattr(self, "_partials", None)
        size = n_slots * n_tiles * num_params
        if buf is None or buf.shape[0] < size or buf.dtype != dtype:
            buf = self._partials = np.empty(size, dtype)
        return buf[:size].reshape(n_slots, n_tiles, num_params)


def tile_rows(batch_size: int) -> int:
    """Samples per tile for a batch of ``batch_size``: ``TILE``, halved while the batch would have fewer
    than two tiles, down to ``SMALL_TILE``. A batch of one tile ran on one thread; the tile depends on the
    batch size alone, never on the thread count, so results stay bit-identical across thread counts.
    Measured (2 threads, float32, paired A/B against one tile of 128, 2026-11-28): [784, 128, 10]
    B = 64 in tiles of 32 took 0.91× the time, B = 128 in tiles of 64 0.77×; [64, 64, 64, 10] B = 128
    in tiles of 64 0.93×, B ≤ 64 the same (tiles of 16 were slower everywhere)."""
    tile = TILE
    while tile > SMALL_TILE and batch_size < 2 * tile:
        tile //= 2
    return tile


def _rows_that_fit(sizes: tuple[int, ...], dtype) -> int:
    """Samples whose scratch (A_l, φ'(z_l), Δ_l and A_l ⊙ A_l) fits in ``WORKSPACE_BYTES``."""
    per_row = np.dtype(dtype).itemsize * (2 * sum(sizes[1:-1]) + sum(sizes[1:]) + sum(sizes[:-1]))
    return WORKSPACE_BYTES // per_row


def chunk_rows(sizes: tuple[int, ...], dtype, tile: int | None = None) -> int:
    """The most samples per kernel call: whole tiles of ``tile`` (default ``TILE``) whose scratch fits in
    ``WORKSPACE_BYTES``, at least one."""
    tile = TILE if tile is None else tile
    return max(tile, _rows_that_fit(sizes, dtype) // tile * tile)


def _chunking(sizes: tuple[int, ...], dtype, batch_size: int) -> tuple[int, int]:
    """(chunk, tile): samples per kernel call and per tile for a batch of ``batch_size``.

    The tile is :func:`tile_rows`', halved (down to ``SMALL_TILE``) while two tiles' scratch would not fit
    in ``WORKSPACE_BYTES``: very wide networks keep to the budget and a chunk still has two tiles for two
    threads. As few chunks as :func:`chunk_rows` allows, of equal length rounded up to whole tiles (the
    last may be shorter): a full chunk then a short one left threads idle on the short one (wide,
    B = 1024: 3 tiles of 256 and then 1, two threads). Both depend on the network, dtype and batch size,
    never on threads."""
    tile, fit = tile_rows(batch_size), _rows_that_fit(sizes, dtype)
    while tile > SMALL_TILE and 2 * tile > fit:
        tile //= 2
    most = chunk_rows(sizes, dtype, tile)
    n_chunks = -(-batch_size // most)
    chunk = -(-batch_size // n_chunks)
    return min(most, -(-chunk // tile) * tile), tile


def _tasks(sizes) -> np.ndarray:
    """(layer l, first row, end row) of every phase-2 GEMM block, l = 1..L, costliest first (for balance)."""
    tasks = []
    for l in range(1, len(sizes)):
        for q0 in range(0, sizes[l], BLOCK):
            tasks.append((l, q0, min(sizes[l], q0 + BLOCK)))
    tasks.sort(key=lambda t: -(t[2] - t[1]) * sizes[t[0] - 1])
    return np.array(tasks, dtype=np.int64).reshape(-1, 3)


_local = threading.local()


def _thread_workspace() -> Workspace:
    ws = getattr(_local, "workspace", None)
    if ws is None:
        ws = _local.workspace = Workspace()
    return ws


class _BLASThreads:
    """Get and set one BLAS library's thread count, process-wide, from any Python thread.

    OpenBLAS built with pthreads (NumPy's and SciPy's wheels) has one process-wide count, but
    threadpoolctl (3.8) lets only the first Python thread that set it change it and silently
    ignores the others: a call from a second thread then ran its GEMMs with OpenBLAS's threads,
    which partition a GEMM differently, and got other bits (73k of 164k gradient entries on a
    [32, 700, 200, 5] net). So for that library the count is set through OpenBLAS's own
    ``openblas_set_num_threads``; other libraries go through threadpoolctl."""

    def __init__(self, lib):
        self._lib = lib
        self._get = self._set = None
        self.ilp64 = False
        """An OpenBLAS with 64-bit integers (symbols suffixed ``64_``, as NumPy's wheels ship)."""
        if lib.internal_api == "openblas" and lib.threading_layer != "openmp":
            dynlib = ctypes.CDLL(lib.filepath)
            for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
                get = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
                set_ = getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    self._get, self._set = get, set_
                    self.ilp64 = "64" in suffix
                    break

    def get(self) -> int:
        return int(self._get()) if self._get is not None else self._lib.get_num_threads()

    def set(self, n: int) -> None:
        if self._set is not None:
            self._set(int(n))
        else:
            self._lib.set_num_threads(n)


class _BLASHolds:
    """The process's BLAS libraries and, per library, how many calls hold it at one thread: a library's
    setting is saved when its first hold begins and restored when its last one ends, under one lock, so
    nested and concurrent holds (two Python threads) restore the user's setting exactly once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inside: dict = {}
        self.saved: dict = {}
        self._controllers = None

    def libraries(self) -> list[_BLASThreads]:
        if self._controllers is None:
            import scipy.linalg.cython_blas  # noqa: F401  (load the BLAS Numba calls)
            from threadpoolctl import ThreadpoolController

            libs = ThreadpoolController().select(user_api="blas").lib_controllers
            self._controllers = [_BLASThreads(lib) for lib in libs]
        return self._controllers


_blas_holds = _BLASHolds()


class _SingleThreadedBLAS:
    """Holds BLAS libraries to one thread while a call is inside a kernel: every loaded one, or with
    ``kernels_only`` those Numba's GEMMs can call. ``with single_threaded_blas:`` (or ``...()``).

    Numba's ``np.dot`` calls SciPy's LP64 interface (``int *`` dimensions), never an ILP64 library such
    as NumPy's own OpenBLAS (symbols suffixed ``64_``), so the kernels' hold leaves that one alone:
    holding it as well cost two ctypes calls more a call (3 µs on [784, 128, 10] B = 64, 2026-12-04).
    NumPy's GEMMs run on threads (:mod:`fastgrad.attribution`) need the hold of every library.
    A library already at one thread is left alone."""

    def __init__(self, kernels_only: bool = False):
        self._kernels_only = kernels_only
        self._libs = None

    def _blas(self) -> list[_BLASThreads]:
        if self._libs is None:
            libs = _blas_holds.libraries()
            self._libs = [lib for lib in libs if not lib.ilp64] if self._kernels_only else libs
        return self._libs

    def __call__(self):
        return self

    def __enter__(self):
        holds = _blas_holds
        with holds.lock:
            for lib in self._blas():
                k = holds.inside.get(lib, 0)
                if k == 0:
                    n = holds.saved[lib] = lib.get()
                    if n != 1:
                        lib.set(1)
                holds.inside[lib] = k + 1
        return self

    def __exit__(self, *exc):
        holds = _blas_holds
        with holds.lock:
            for lib in self._blas():
                k = holds.inside[lib] = holds.inside[lib] - 1
                if k == 0 and holds.saved[lib] != 1:
                    lib.set(holds.saved[lib])


single_threaded_blas = _SingleThreadedBLAS()
kernel_blas = _SingleThreadedBLAS(kernels_only=True)
"""The hold around the Numba kernels: the BLAS libraries their GEMMs call."""


NO_CHECK = (False, 0.0, 0.0)
"""``check`` of :meth:`PreparedCall.launch` for arrays checked already."""


def _set_chunksize(n: int) -> int:
    """``numba.set_parallel_chunksize(n)`` (the calling thread's chunk size of ``prange``; returns the
    previous one), through Numba's ctypes setter once its threads are up: ``numba.parallel_chunksize``'s
    context manager cost 7 µs a call, this 0.3 µs (numba 0.68; the public function where it is missing)."""
    global _set_chunksize
    before = numba.set_parallel_chunksize(n)  # starts Numba's threads, so the setter exists
    raw = getattr(numba.np.ufunc.parallel, "_set_parallel_chunksize", None)
    if callable(raw):
        _set_chunksize = raw
    return before


def _writeable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable else a.copy()


def _layout(net: MLP) -> np.ndarray:
    """The kernels' ``layout`` (L, 5): per layer n_{l-1}, n_l, W_l's and b_l's start in θ, and whether
    it is forwarded with a stored W_lᵀ (read at call time: ``SMALL_LAYER``)."""
    rows = [(s.n_in, s.n_out, s.w_start, s.b_start, s.n_in * s.n_out <= SMALL_LAYER) for s in net.layers]
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def _plan(sums: list, n_tiles: int, num_params: int, itemsize: int) -> tuple[np.ndarray, int]:
    """The kernels' ``plan`` (n_sums, 4): operand, source, slot and mean flag of each sum, and the
    number of slots.

    Sums get a slot of per-tile partial sums, in order, while slots × tiles × P fit in
    ``PARTIALS_BYTES`` (read at call time); the others are made in phase 2."""
    plan = np.empty((len(sums), 4), np.int64)
    n_slots = 0
    for s, q in enumerate(sums):
        if q.operand not in (DELTA, DELTA_SQUARED, CLIPPED_DELTA) or q.source not in (INPUT, INPUT_SQUARED):
            raise NotImplementedError(f"backend 'numba': no kernel for the operand or source of {q.name!r}")
        slot = -1
        if (n_slots + 1) * n_tiles * num_params * itemsize <= PARTIALS_BYTES:
            slot, n_slots = n_slots, n_slots + 1
        plan[s] = (q.operand, q.source, slot, q.mean)
    return plan, n_slots


def run(net: MLP, inp, need: frozenset, max_norm: float | None, out: np.ndarray | None,
        workspace: Workspace | None = None) -> dict:  # fmt: skip
    """The backend contract of :mod:`fastgrad.api` (see ``api._BACKENDS``), on CPU threads.

    Raises ``RuntimeError`` before any work when ``workspace`` is in use by another call, or in a
    child forked from a process running Numba's GNU OpenMP threads (see :mod:`fastgrad._threading`).
    """
    _threading.check_fork_safe()
    ws = workspace if workspace is not None else _thread_workspace()
    with ws.claimed(), kernel_blas():
        results = Results(net, inp.dtype, need, max_norm is not None, inp.batch_size, out)
        call = PreparedCall(net, inp.dtype, need, max_norm, inp.batch_size, ws, results)
        theta, X, labels, targets = (_writeable(a) for a in (inp.theta, inp.X, inp.labels, inp.targets))
        return call(theta, X, labels, targets)


class Results:
    """The arrays a call writes its results into, for batches of up to ``rows`` samples.

    :func:`run` makes new ones per call; :class:`fastgrad.Step` keeps one set for all its calls.
    ``out`` (rows, P), when given, receives the per-sample rows; ``sums`` (n_sums, P), when given, is the
    sums' array (a step's, kept when its buffers grow for a bigger batch)."""

    def __init__(self, net: MLP, dtype, need: frozenset, clip: bool, rows: int, out=None, sums=None):
        dt = np.dtype(dtype)
        P = net.num_params
        self.rows = rows
        made = quantities.sums_to_make(need, clip)
        self.sums = np.empty((len(made), P), dt) if sums is None else sums
        self.losses = np.empty(rows, dt)
        # float64: squares of float32 norms may overflow float32
        self.layer_sq = np.empty((rows, net.num_layers), np.float64)
        self.norms = np.empty(rows, dt)
        self.clip_c = np.empty(rows, dt)
        per_row = quantities.needs_norms(need, clip)
        self.layer_norms = np.empty((rows, net.num_layers), dt) if per_row else None
        self.variance = np.empty(P, dt) if "variance" in need else None
        self.G = None
        if "per_sample" in need:
            self.G = out if out is not None else np.empty((rows, P), dt)


class PreparedCall:
    """One numba call's set-up for a batch of ``batch_size`` samples, made once: the chunking, the plan
    of sums, the kernels' argument packs over the workspace's buffers and the ``results``' arrays.

    Calling it runs the kernels on validated (C-contiguous, writeable, θ's dtype) arrays and returns
    the backend's dict of raw quantities, views of ``results``; the caller holds the workspace and
    :data:`kernel_blas` (:func:`run` does). :meth:`launch` runs every chunk in one compiled call
    (:func:`batch_backprop`), with the values' check first when asked (:class:`fastgrad.Step`)."""

    def __init__(self, net: MLP, dtype, need: frozenset, max_norm: float | None, batch_size: int,
                 ws: Workspace, results: Results):  # fmt: skip
        dt = self.dtype = np.dtype(dtype)
        self.batch_size = B = batch_size
        P = net.num_params
        clip = max_norm is not None
        self.made = made = quantities.sums_to_make(need, clip)
        self.need = need
        want_rows = "per_sample" in need
        self.per_row = per_row = quantities.needs_norms(need, clip)
        backward = bool(made) or want_rows or per_row
        squares = any(q.source == INPUT_SQUARED for q in made)
        chunk, tile = _chunking(net.sizes, dt, B)
        chunk = min(B, chunk)
        acts, dphi, deltas, sqa, self.tasks, self.w_t = ws.buffers(net.sizes, chunk, dt, squares)
        n_tiles = -(-chunk // tile)
        self.plan, n_slots = _plan(made, n_tiles, P, dt.itemsize)
        self.partial = ws.partials(n_slots, n_tiles, P, dt) if n_slots else np.empty((0, 0, 0), dt)
        self.ce = net.loss_code == CROSS_ENTROPY
        self.layout = _layout(net)
        self.codes = (net.activation_code, net.loss_code, tile)
        self.c_max = dt.type(max_norm if clip else -1.0)  # the clip factor's C, in θ's dtype
        r = self.results = results
        self.sums = r.sums
        self.losses, self.norms = r.losses[:B], r.norms[:B]
        self.layer_sq = r.layer_sq[:B]
        self.layer_norms = r.layer_norms[:B] if per_row else None
        self.G = (r.G if r.G.shape[0] == B else r.G[:B]) if want_rows else None
        self.chunk = chunk
        self.flags = (backward, per_row, squares)
        self.scalars = (self.c_max, dt.type(B))
        self.bufs = (acts, dphi, deltas, sqa if squares else sqa[:0])
        rows = np.asarray(r.G[:B]) if want_rows else np.empty((0, 0), dt)
        self.row_out = (r.losses[:B], r.layer_sq[:B], r.norms[:B], r.clip_c[:B], rows)

    def __call__(self, theta: np.ndarray, X: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> dict:
        self.launch(theta, X, labels, targets)
        return self.finish()

    def launch(self, theta: np.ndarray, X: np.ndarray, labels: np.ndarray, targets: np.ndarray,
               check: tuple = NO_CHECK) -> int:  # fmt: skip
        """Run the kernels over every chunk, leaving the sums and per-row results in ``results``.

        ``check`` = (True, lo, hi) first checks the arrays in the same compiled call (:func:`bad_input`,
        targets in [lo, hi]) and returns its nonzero code without running anything; else 0."""
        # chunk size 1: tiles and phase-2 tasks are handed out one at a time, as they differ in cost
        before = _set_chunksize(1)
        try:
            code, self.loss_sum = batch_backprop(
                check, (self.layout, theta, self.w_t), (X, labels, targets), self.codes, self.flags,
                self.plan, self.scalars, self.bufs, self.row_out, self.sums, self.partial, self.tasks,
                self.chunk,
            )  # fmt: skip
        finally:
            _set_chunksize(before)
        return code

    def finish(self) -> dict:
        """The raw quantities from the kernels' outputs: the loss and the sums' means, the variance
        from the moments, the layer norms from their squares."""
        dt, need = self.dtype, self.need
        # the bits of losses.mean(dtype=dt): NumPy's pairwise sum in θ's dtype (made by the compiled call),
        # divided by B in float64 (NumPy divides by the count as an intp) and rounded to θ's dtype
        res = {"loss": dt.type(float(self.loss_sum) / self.batch_size)}
        for s, q in enumerate(self.made):
            res[q.name] = self.sums[s]
        if "variance" in need and "grad" in res and "sq_mean" in res:
            res["variance"] = self.results.variance
            with numba.parallel_chunksize(1):
                variance_into(res["grad"], res["sq_mean"], res["variance"])
        if self.per_row:
            res["norms"] = self.norms
            np.sqrt(self.layer_sq, out=self.layer_sq)  # float64, then rounded once to θ's dtype
            self.layer_norms[...] = self.layer_sq
            res["layer_norms"] = self.layer_norms
        if self.G is not None:
            res["per_sample"] = self.G
        return res


def layer_factors(net: MLP, inp, workspace: Workspace | None = None) -> tuple[list, list]:
    """The factors of every per-sample gradient from one pass of :func:`fused_backprop`: deltas
    [Δ_1..Δ_L], Δ_l (B, n_l), and layer inputs [A_0..A_{L-1}], A_{l-1} (B, n_{l-1}), copied out of the
    workspace chunk by chunk (no sum is planned, so the pass is the forward and backward GEMMs alone).
    ``fastgrad.attribution`` forms the inner products of per-sample gradients from them."""
    return _factors(net, inp, True, workspace)


def forward_factors(net: MLP, theta: np.ndarray, X: np.ndarray, workspace: Workspace | None = None):
    """The forward pass of :func:`fused_backprop` alone: layer inputs [A_0..A_{L-1}] (B, n_{l-1}) and
    the hidden layers' derivatives [φ'(z_1)..φ'(z_{L-1})] (B, n_l), for the Jacobians of the outputs."""
    from ._validation import Inputs

    B, dt = X.shape[0], theta.dtype
    if net.loss_code == CROSS_ENTROPY:  # the pass's loss is computed and dropped: any valid y
        inp = Inputs(theta, X, np.zeros(B, np.int64), np.zeros((0, net.n_out), dt))
    else:
        inp = Inputs(theta, X, np.zeros(0, np.int64), np.zeros((B, net.n_out), dt))
    return _factors(net, inp, False, workspace)


def _factors(net: MLP, inp, backward: bool, workspace: Workspace | None):
    _threading.check_fork_safe()
    ws = workspace if workspace is not None else _thread_workspace()
    dt, B, sizes = inp.dtype, inp.batch_size, net.sizes
    L = len(sizes) - 1
    hidden, width = sum(sizes[1:-1]), sum(sizes[1:])
    acts_out = [np.empty((B, n), dt) for n in sizes[1:-1]]
    second = [np.empty((B, n), dt) for n in (sizes[1:] if backward else sizes[1:-1])]  # Δ_l or φ'(z_l)
    theta, X, labels, targets = (_writeable(a) for a in (inp.theta, inp.X, inp.labels, inp.targets))
    ce = net.loss_code == CROSS_ENTROPY
    with ws.claimed(), kernel_blas():
        chunk, tile = _chunking(sizes, dt, B)
        chunk = min(B, chunk)
        acts, dphi, deltas, sqa, tasks, w_t = ws.buffers(sizes, chunk, dt, False)
        net_pack = (_layout(net), theta, w_t)
        codes = (net.activation_code, net.loss_code, tile)
        plan, sums, partial = (
            np.empty((0, 4), np.int64),
            np.empty((0, net.num_params), dt),
            np.empty((0, 0, 0), dt),
        )
        losses, layer_sq = np.empty(chunk, dt), np.empty((chunk, L), np.float64)
        norms, clip_c, no_rows = np.empty(chunk, dt), np.empty(chunk, dt), np.empty((0, 0), dt)
        with numba.parallel_chunksize(1):
            for c0 in range(0, B, chunk):
                c1 = min(B, c0 + chunk)
                R = c1 - c0
                data = (X[c0:c1], labels[c0:c1] if ce else labels, targets if ce else targets[c0:c1])
                bufs = (acts[: R * hidden], dphi[: R * hidden], deltas[: R * width], sqa[:0])
                row_out = (losses[:R], layer_sq[:R], norms[:R], clip_c[:R], no_rows)
                flags = (backward, False, False, False)
                fused_backprop(
                    net_pack,
                    data,
                    codes,
                    flags,
                    plan,
                    (dt.type(-1.0), dt.type(0.0)),
                    bufs,
                    row_out,
                    sums,
                    partial,
                    tasks,
                )
                # each layer's (R, n_l) block lies after the previous layers' in acts, dphi and deltas
                at = 0
                for k, n in enumerate(sizes[1:-1]):
                    acts_out[k][c0:c1] = acts[at : at + R * n].reshape(R, n)
                    if not backward:
                        second[k][c0:c1] = dphi[at : at + R * n].reshape(R, n)
                    at += R * n
                at = 0
                for k, n in enumerate(sizes[1:] if backward else ()):
                    second[k][c0:c1] = deltas[at : at + R * n].reshape(R, n)
                    at += R * n
    inputs = [inp.X, *acts_out]
    return (second, inputs) if backward else (inputs, second)


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
    "SMALL_TILE",
    "TILE",
    "WORKSPACE_BYTES",
    "PreparedCall",
    "Results",
    "Workspace",
    "cache_description",
    "check_available",
    "check_kernels_current",
    "chunk_rows",
    "compile_all",
    "forward_factors",
    "layer_factors",
    "run",
    "tile_rows",
]

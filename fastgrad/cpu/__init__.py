"""Numba CPU backend (``backend="numba"``): fused per-sample backprop on CPU threads.

One compiled driver per dtype, :func:`fused_backprop`, serves every activation × loss
(run-time codes) and every combination of quantities: the host turns the requested sums
over samples of :data:`fastgrad.quantities.SUMS` into a ``plan``, one row of (operand kind,
source kind, partial-sum slot) per sum, and the kernels know those kinds, never quantity
names. The driver works in two phases over a chunk of samples (whole tiles that fit in
``WORKSPACE_BYTES``; a long batch in chunks as equal as whole tiles allow):

1. ``prange`` over tiles of about ``config.TILE`` samples (an even number of near-equal tiles, at
   least two: :func:`tile_rows`): each
   tile goes forward through the whole network (:func:`dense_forward` per hidden layer,
   :func:`output_forward` for the loss and Δ_L) and back (:func:`dense_backward`), keeping its
   activations A_l and deltas Δ_l in the workspace; the per-row reducers run on the tile while it is hot
   (:func:`norms_from_deltas`: Goodfellow's layer terms and the clip factors; :func:`write_rows`:
   per-sample rows straight into the flat layout), and so do the tile's sums
   (:func:`layer_sums`: per layer Mᵀ S with M = Δ, Δ⊙Δ or c⊙Δ and S = A or A⊙A, docs/design.md §3:
   one backward pass, never two), while tiles × P fits in ``PARTIALS_BYTES``.
2. For a sum whose per-tile sums do not fit: ``prange`` over fixed blocks of ``BLOCK``
   rows of every layer's weights, one GEMM over the whole chunk per block
   (:func:`gemm_block`), with the same operands (:func:`sum_operand`, :func:`outer_sum`).
3. One ``prange`` over blocks of ``FINISH_BLOCK`` parameters: the tiles' sums added in tile
   order (:func:`sum_partials`) and, on a batch's last chunk, the means divided
   (:func:`divide_means`), DP-SGD's noised step made when a ``Noise`` pack is given
   (:func:`~fastgrad.cpu.kernels.noise_block`) and an optimizer's update, the block still in
   cache between them.

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

BLAS: the GEMMs are Numba's ``np.dot`` (SciPy's OpenBLAS) called inside ``prange``, so BLAS is
held to one thread for the duration of a call (:data:`fastgrad._threading.kernel_blas`, which says
how), and the threads come from Numba alone. Measured on the 2-core machine, alternating Numba's
OpenMP pool with a 2-thread OpenBLAS pool made each side wait for the other's spinning threads
(a 2.6 ms GEMM took 20 ms), so the GEMMs are not run outside ``prange``.

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
``fastgrad/cpu/__pycache__/`` (or ``$NUMBA_CACHE_DIR``, or Numba's user-wide cache folder).
Without a writable folder the kernels compile in each process, with one warning;
``FASTGRAD_NUMBA_CACHE=0`` before importing fastgrad turns the cache off.

The package, as :mod:`fastgrad.cuda`: :mod:`.config` (the disk cache, the threading layer and the
tunables, each with the measurement that chose it), :mod:`.kernels` (the compiled kernels),
:mod:`.workspace` (scratch buffers, result arrays, the chunk and tile rules) and :mod:`.driver`
(the host side: :func:`run`, :class:`PreparedCall`, the factors of per-sample gradients). BLAS
thread control is :mod:`fastgrad._threading`'s.
"""

from __future__ import annotations

from .. import _threading
from .._threading import kernel_blas, single_threaded_blas
from . import config, driver, kernels, workspace
from .config import CACHE, THREADING_LAYER
from .driver import (
    NO_CHECK,
    PreparedCall,
    _set_chunksize,
    _writeable,
    cache_description,
    check_available,
    check_kernels_current,
    clipped_step,
    compile_all,
    compile_notice,
    forward_factors,
    layer_factors,
    run,
)
from .kernels import (
    NORMS_NOT_FINITE,
    batch_backprop,
    check_values,
    fused_backprop,
    pairwise_sum,
    tanh_vectorizable,
    variance_into,
)
from .workspace import Results, Workspace, _chunking, _thread_workspace, chunk_rows, tile_rows

__all__ = [
    "CACHE",
    "NORMS_NOT_FINITE",
    "NO_CHECK",
    "THREADING_LAYER",
    "PreparedCall",
    "Results",
    "Workspace",
    "_chunking",
    "_set_chunksize",
    "_thread_workspace",
    "_threading",
    "_writeable",
    "batch_backprop",
    "cache_description",
    "check_available",
    "check_kernels_current",
    "check_values",
    "chunk_rows",
    "clipped_step",
    "compile_all",
    "compile_notice",
    "config",
    "driver",
    "forward_factors",
    "fused_backprop",
    "kernel_blas",
    "kernels",
    "layer_factors",
    "pairwise_sum",
    "run",
    "single_threaded_blas",
    "tanh_vectorizable",
    "tile_rows",
    "variance_into",
    "workspace",
]

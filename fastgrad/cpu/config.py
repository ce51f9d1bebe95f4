"""The numba backend's settings: the disk cache, the threading layer and the tunables.

The tunables (``TILE``, ``SMALL_TILE``, ``BLOCK``, ``PARTIALS_BYTES``, ``SMALL_LAYER``,
``TRANSPOSED_ROWS``, ``WORKSPACE_BYTES``) are read at call time through this module, so a test or a
benchmark changes them here (``fastgrad.cpu.config.TILE = ...``); each carries the measurement that
chose it.
"""

from __future__ import annotations

from .. import _cache, _threading

CACHE = _cache.configure()
"""Whether compiled kernels are cached on disk, keyed on the package's source (:mod:`fastgrad._cache`):
False with ``FASTGRAD_NUMBA_CACHE=0``, or (with one warning) when no cache folder is writable."""

TILE = 256
"""About the samples per forward/backward tile (phase 1): a batch is cut into an even number of
near-equal tiles of about this many samples (:func:`tile_rows`). On 2 threads (paired A/B, float32
and float64) tiles of 256 took 0.88-0.95× the time of tiles of 128 on nine shapes from [256]×3 to
wide: bigger GEMMs and fewer per-tile sums; the chunks are balanced over the tiles
(:func:`_chunking`). The measurements are in docs/benchmarks.md ("The CPU tunables and the
measurements that chose them")."""
SMALL_TILE = 32
"""The smallest tile (:func:`tile_rows`): tiles of 16 were slower on every shape measured, so a batch
of fewer than 64 samples is one tile of 32 and the rest."""
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
TRANSPOSED_ROWS = 64
"""Bigger layers on tiles of at most this many rows are forwarded as the transposed product
(W_l A_{l-1}ᵀ)ᵀ. Measured (float32, OpenBLAS, 1 thread): 0.60-0.61x the time of A_{l-1} W_lᵀ on tiles
of 32 rows and 0.77-0.79x on 64 for layers of 784x128 to 1024x1024; 0.85-0.99x on 128 and 0.95-1.09x
on 256."""
WORKSPACE_BYTES = 32 * 2**20
"""Scratch budget that sets the chunk: batches longer than fits are done in chunks of whole
tiles, accumulated in order (the chunk depends on the network and dtype, never on threads)."""


THREADING_LAYER = _threading.choose_layer()
"""Numba's threading layer as configured on import: ``"tbb"`` unless the user chose one or TBB is
missing (then ``"threadsafe"``, i.e. OpenMP); see :mod:`fastgrad._threading`."""
# OMP_WAIT_POLICY is left to the user. PASSIVE helped a lot on an oversubscribed machine (narrow
# forward passes, B = 512-4096: 9-15 ms with GOMP's default spin, 0.2-1.9 ms passive) and cost
# nothing on a quiet one, but setting it here would also reach any OpenMP runtime loaded later:
# PyTorch's mnist gradient took 10.7 ms instead of 6.3 ms with it (2 threads, same run).

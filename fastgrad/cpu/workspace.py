"""The numba backend's memory: the workspace of scratch buffers, the result arrays, and the rules
that cut a batch into chunks and tiles (they read the tunables of :mod:`.config` at call time)."""

from __future__ import annotations

import functools
import itertools
import threading
from contextlib import contextmanager

import numpy as np

from .. import quantities
from ..mlp import MLP
from . import config
from .kernels import Buffers


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
        """The flat :class:`~fastgrad.cpu.kernels.Buffers` (acts, dphi, deltas, sqa) for at least ``rows``
        samples (sqa empty unless ``want_sq``), the task list and w_t.

        Buffers made for more rows (or with sqa) serve smaller requests as they are: the kernels read
        only the leading part of each, so a step whose batch size varies allocates once."""
        sizes, dtype = tuple(sizes), np.dtype(dtype)
        key = self._key
        if key is None or key[0] != sizes or key[2] != dtype or key[1] < rows or (want_sq and not key[3]):
            per_row = scratch_per_row(tuple(sizes))
            if not want_sq:
                per_row = per_row._replace(sqa=0)
            self._bufs = (
                Buffers(*(np.empty(rows * n, dtype) for n in per_row)),
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
    """Samples per tile for a batch of ``batch_size``: the batch cut into an even number of near-equal
    tiles of about ``TILE`` (the count rounded to the nearest even number, at least two), none smaller
    than ``SMALL_TILE``. The tile depends on the batch size alone, never on the thread count, so results
    stay bit-identical across thread counts.

    Near-equal tiles, not ``TILE``-sized ones and a remainder: a tile's fixed costs (its partial sums of
    P numbers, its GEMMs' packing) are paid per tile, and on two threads a third, short tile costs more
    than it saves, so batches that are not a power of two ran 0.83-1.00x the time of the earlier rule
    (halved powers of two; docs/benchmarks.md, "The CPU tunables and the measurements that chose them").
    Powers of two from 64 on get the tiles they had: B/2 up to 512, ``TILE`` above."""
    n_tiles = max(2, 2 * ((batch_size + config.TILE) // (2 * config.TILE)))
    return max(config.SMALL_TILE, -(-batch_size // n_tiles))


@functools.cache  # per network shape: a call's set-up reads it twice
def scratch_per_row(sizes: tuple[int, ...]) -> Buffers:
    """Elements per sample of each scratch buffer, for a network of layer widths ``sizes`` (n_0..n_L):
    acts and dphi hold A_l and φ'(z_l) of the hidden layers (n_1 + ... + n_{L-1}), deltas Δ_l of every
    layer (n_1 + ... + n_L), sqa A_l ⊙ A_l of every layer's input (n_0 + ... + n_{L-1}). The one rule
    the workspace's size, the chunk's length and the kernels' views of a chunk all follow."""
    hidden = sum(sizes[1:-1])
    return Buffers(acts=hidden, dphi=hidden, deltas=sum(sizes[1:]), sqa=sum(sizes[:-1]))


def _rows_that_fit(sizes: tuple[int, ...], dtype) -> int:
    """Samples whose scratch (every buffer of :func:`scratch_per_row`, sqa included) fits in
    ``WORKSPACE_BYTES``."""
    return config.WORKSPACE_BYTES // (np.dtype(dtype).itemsize * sum(scratch_per_row(tuple(sizes))))


def chunk_rows(sizes: tuple[int, ...], dtype, tile: int | None = None) -> int:
    """The most samples per kernel call: whole tiles of ``tile`` (default ``TILE``) whose scratch fits in
    ``WORKSPACE_BYTES``, at least one."""
    tile = config.TILE if tile is None else tile
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
    while tile > config.SMALL_TILE and 2 * tile > fit:
        tile = max(config.SMALL_TILE, tile // 2)
    most = chunk_rows(sizes, dtype, tile)
    n_chunks = -(-batch_size // most)
    chunk = -(-batch_size // n_chunks)
    return min(most, -(-chunk // tile) * tile), tile


def _tasks(sizes) -> np.ndarray:
    """(layer l, first row, end row) of every phase-2 GEMM block, l = 1..L, costliest first (for balance)."""
    tasks = []
    for l in range(1, len(sizes)):
        for q0 in range(0, sizes[l], config.BLOCK):
            tasks.append((l, q0, min(sizes[l], q0 + config.BLOCK)))
    tasks.sort(key=lambda t: -(t[2] - t[1]) * sizes[t[0] - 1])
    return np.array(tasks, dtype=np.int64).reshape(-1, 3)


_local = threading.local()


def _thread_workspace() -> Workspace:
    ws = getattr(_local, "workspace", None)
    if ws is None:
        ws = _local.workspace = Workspace()
    return ws


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
        self.derived = {q.name: np.empty(P, dt) for q, _ in quantities.made_in_pass("numba", need)}
        self.G = None
        if "per_sample" in need:
            self.G = out if out is not None else np.empty((rows, P), dt)

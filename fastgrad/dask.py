"""Dataset-scale gradient statistics on Dask: the core API over row-chunked Dask arrays.

Every quantity of the registry (:mod:`fastgrad.quantities`) is a sum over samples, a
per-sample map, or a function of those finished on the host. So a dataset split into
row chunks is done exactly: each chunk runs a fastgrad backend on a worker and returns
its *sums* (never means); the sums are added in a fixed tree over the chunks; the
derived quantities are finished once, at the end, by :func:`fastgrad.quantities.finish`;
the per-sample maps stay Dask arrays with X's row chunks, to be written to zarr or
``.npy`` without ever being in memory together.

Requires the ``dask`` extra (``pip install "fastgrad[dask]"``: ``dask[array]``,
``distributed``, ``zarr``); importing this module without it raises
:class:`fastgrad.extras.MissingExtraError` naming the extra.

>>> import dask.array as da, fastgrad, fastgrad.dask
>>> X = da.from_array(np.load("X.npy", mmap_mode="r"), chunks=(65536, -1))   # doctest: +SKIP
>>> res = fastgrad.dask.backprop(net, theta, X, y, compute=("grad", "noise_scale", "norms"))  # doctest: +SKIP
>>> res.noise_scale                       # a float: the whole dataset's  # doctest: +SKIP
>>> res.norms.to_zarr("norms.zarr")       # a Dask array, chunked like X  # doctest: +SKIP

The per-sample gradient inner products (:func:`gram`, :func:`tracin`, :func:`grad_dot`) are
not sums over samples but N × M matrices: they come back as lazy Dask arrays made one block per
task, block (i, j) the in-memory function (:mod:`fastgrad.attribution`) on X's row chunk i
against X2's row chunk j, so a worker holds two chunks and one block at a time.

Any Dask scheduler runs it: the default (threads), ``scheduler="processes"``, or a
``dask.distributed`` cluster (an active ``Client``, or ``scheduler=client``).

**Bits.** The result is determined by the data, θ, the backend and X's row chunking,
and by nothing else: not the scheduler, the number of workers or threads, nor the
order in which chunks finish. Each chunk's backend call is deterministic (the numba
backend gives the same bits on any thread count; docs/design.md §3); its sums are taken to
float64 (a mean times the chunk's rows: the backends return means, so this is the
chunk's sum to within one rounding); and the chunks' sums are added in a fixed binary
tree over chunk indices: level by level, chunk 2k with chunk 2k+1, an odd last one moved
up unchanged. Rechunking X changes the tree, so it may change the last bits.

**θ** is one key of the graph (``dask.delayed(theta)``), which every chunk's task reads:
a distributed cluster ships it to each worker once per call, not once per chunk.

**Accuracy.** Partial sums are float64 whatever θ's dtype; the results come back in
θ's dtype. In float64 every quantity agrees with :func:`fastgrad.backprop` on the
concatenated rows to about 1e-15 relative (tests/test_dask.py asserts 1e-12); in
float32 this is more accurate than one :func:`fastgrad.backprop` call over all rows,
which accumulates in float32.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .extras import require

require("dask.array", "dask", "fastgrad.dask")

import dask  # noqa: E402  (after the check that names the extra)
import dask.array as da  # noqa: E402

from . import attribution, privacy, quantities, reference, shortcut  # noqa: E402
from ._validation import (  # noqa: E402
    check_compute,
    check_inputs,
    check_max_norm,
    check_net,
    check_noise_multiplier,
    check_theta,
    check_X_shape,
    check_y_shape,
)
from .api import BackpropResult, resolve_backend, run_backend  # noqa: E402
from .losses import CROSS_ENTROPY  # noqa: E402
from .mlp import MLP  # noqa: E402
from .quantities import REGISTRY, Derived, PerSample, Sum  # noqa: E402

MAPS: tuple[str, ...] = tuple(
    n for n, q in REGISTRY.items() if isinstance(q, PerSample) and q.shape != "scalar"
)
"""The per-sample maps of the registry (one row per sample): Dask arrays in a result."""


def _sum_of_squares(rows: np.ndarray) -> float:
    return float(np.sum(np.square(rows, dtype=np.float64)))


ROW_SUMS: dict[str, Callable[[np.ndarray], float]] = {"norms": _sum_of_squares}
"""Per-sample map -> the sum over its rows that a derived quantity's ``from_sums`` reads (float64):
the dataset's value from the chunks' sums, where the map itself may not fit in memory."""


def _over_chunks(q) -> bool:
    return not (isinstance(q, Derived) and q.from_sums is None and set(q.needs) & set(MAPS))


QUANTITIES: tuple[str, ...] = tuple(n for n in quantities.QUANTITIES if _over_chunks(REGISTRY[n]))
"""The names ``compute`` takes here: every one of :data:`fastgrad.QUANTITIES` but a derived quantity that
reads a per-sample map and has no form from sums (``Derived.from_sums``), as each sample's row would be
needed against the whole dataset's sums."""


def _check_over_chunks(want: frozenset) -> None:
    for name in want:
        if name not in QUANTITIES:
            raise ValueError(
                f"compute: {name!r} is not available over chunks (it reads every sample's row against "
                f"sums over the whole dataset); compute it per batch with fastgrad.backprop"
            )


# --------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Problem:
    """Validated inputs: θ (host), X and y (Dask, the same row chunks), what to compute."""

    net: MLP
    theta: np.ndarray
    X: da.Array
    y: da.Array
    backend: str
    max_norm: float | None

    @property
    def rows(self) -> tuple[int, ...]:
        return self.X.chunks[0]

    @property
    def num_samples(self) -> int:
        return self.X.shape[0]


def _check(net, theta, X, y, backend, max_norm=None) -> _Problem:
    """Every check that needs no data: types, shapes, dtypes and chunks, before any task runs."""
    net = check_net(net)
    theta = check_theta(net, theta)
    if not isinstance(X, da.Array):
        raise TypeError(
            f"X: expected a dask.array.Array chunked by rows, got {type(X).__name__} "
            "(wrap it: dask.array.from_array(X, chunks=(rows, -1)))"
        )
    if any(np.isnan(c) for dim in X.chunks for c in dim):
        raise ValueError("X: unknown chunk sizes; call X.compute_chunk_sizes() first")
    check_X_shape(net, X.shape)
    if X.dtype.kind not in "biuf":
        raise TypeError(f"X: expected a real numeric dtype, got {X.dtype}")
    if len(X.chunks[1]) != 1:
        raise ValueError(
            f"X: chunked along columns (column chunks {X.chunks[1]}); each chunk must hold whole "
            "rows: X.rechunk({1: -1})"
        )
    if isinstance(y, np.ndarray):
        check_y_shape(net, y.shape, X.shape[0])
        y = da.from_array(y, chunks=(X.chunks[0], *tuple((s,) for s in y.shape[1:])))
    if not isinstance(y, da.Array):
        raise TypeError(f"y: expected a dask.array.Array or a NumPy array, got {type(y).__name__}")
    if any(np.isnan(c) for dim in y.chunks for c in dim):
        raise ValueError("y: unknown chunk sizes; call y.compute_chunk_sizes() first")
    check_y_shape(net, y.shape, X.shape[0])
    if net.loss_code == CROSS_ENTROPY and y.dtype.kind not in "iu":
        raise TypeError(f"y: cross_entropy expects integer class labels, got dtype {y.dtype}")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"y: expected a real numeric dtype, got {y.dtype}")
    if y.ndim == 2 and len(y.chunks[1]) != 1:
        raise ValueError(f"y: chunked along columns (column chunks {y.chunks[1]}): y.rechunk({{1: -1}})")
    if y.chunks[0] != X.chunks[0]:
        raise ValueError(
            f"y: row chunks {y.chunks[0]} do not line up with X's {X.chunks[0]}; "
            "rechunk one like the other: y.rechunk({0: X.chunks[0]})"
        )
    return _Problem(net, theta, X, y, resolve_backend(backend), max_norm)


def _check_second(p: _Problem, X2, y2) -> _Problem:
    """The second batch (X2, y2) of a cross-Gram, checked like (X, y), its errors naming X2 and y2."""
    attribution._check_pair(X2, y2)
    try:
        return _check(p.net, p.theta, X2, y2, p.backend)
    except (TypeError, ValueError) as exc:
        raise type(exc)(_renamed(str(exc))) from None


def _renamed(message: str) -> str:
    """An input check's message about X or y, reworded about X2 or y2."""
    return re.sub(r"\b([Xy])\b", r"\g<1>2", message)


# --------------------------------------------------------------- one chunk


def _rows_of(blocks: np.ndarray) -> list:
    """The Delayed blocks of a Dask array, one per row chunk, in order."""
    return list(blocks.reshape(blocks.shape[0], -1)[:, 0])


def run_chunk(net: MLP, theta, X, y, r0: int, need: frozenset, max_norm, backend: str, maps: frozenset):
    """One chunk, rows r0 : r0 + len(X): ``(sums, rows)`` with ``sums`` the chunk's sums over
    samples in float64 (``loss`` and every sum of ``need``; the :data:`ROW_SUMS` of the maps in
    ``need``) and ``rows`` the per-sample maps named in ``maps``, in θ's dtype.

    A bad chunk (NaN, a label out of range) raises the input check's error with the chunk's
    rows in front, so a worker's failure says where the data is wrong; so does a sample whose
    gradient norm is NaN or Inf when clipping (``FloatingPointError``, as the core's).
    """
    B = X.shape[0]
    sums_made = quantities.sums_to_make(need, max_norm is not None)
    if B == 0:  # an empty chunk (e.g. from slicing) adds nothing
        sums = {"loss": 0.0, **{q.name: np.zeros(net.num_params) for q in sums_made}}
        sums.update({n: 0.0 for n in ROW_SUMS if n in need})
        rows = {n: np.empty((0, *_map_width(net, n)), theta.dtype) for n in maps}
        return sums, rows
    inp = _checked_chunk(net, theta, X, y, r0)
    raw = run_backend(backend, net, inp, need, max_norm)
    if max_norm is not None:  # as fastgrad.clipped_grad: a NaN or Inf norm would go unclipped
        try:
            privacy.check_clip_norms(raw["norms"])  # every backend returns the norms it clipped with
        except FloatingPointError as exc:
            raise FloatingPointError(f"rows {r0}:{r0 + B} (a chunk of X, y): {exc}") from None
    sums = {"loss": float(np.float64(raw["loss"]) * B)}  # the backends' loss is the mean
    for q in sums_made:
        s = raw[q.name].astype(np.float64)
        sums[q.name] = s * B if q.mean else s
    for name, row_sum in ROW_SUMS.items():
        if name in need:
            sums[name] = row_sum(raw[name])
    return sums, {n: raw[n] for n in maps}


def _checked_chunk(net: MLP, theta, X, y, r0: int):
    """``check_inputs`` on one chunk; its error says which rows are wrong."""
    try:
        return check_inputs(net, theta, np.asarray(X), np.asarray(y))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"rows {r0}:{r0 + X.shape[0]} (a chunk of X, y): {exc}") from None


def _map_width(net: MLP, name: str) -> tuple[int, ...]:
    """The shape of one row of per-sample map ``name``, read from the registry's shape ("(B, P)" -> (P,))."""
    dims = {"L": net.num_layers, "P": net.num_params}
    return tuple(dims[d.strip()] for d in REGISTRY[name].shape.strip("()").split(",")[1:] if d.strip())


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def tree_sum(parts: list) -> object:
    """Add Delayed dicts of partial sums in a fixed binary tree over their order: level by
    level, part 2k + part 2k+1, an odd last part moved up unchanged. The tree depends only
    on ``len(parts)``, so the bits do not depend on which part finishes first."""
    if not parts:
        raise ValueError("parts: nothing to add")
    add = dask.delayed(_add, pure=True)
    while len(parts) > 1:
        paired = [add(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = paired + parts[len(paired) * 2 :]
    return parts[0]


def _chunk_tasks(p: _Problem, need: frozenset, maps: frozenset) -> list:
    """One Delayed ``run_chunk`` per row chunk, all reading θ from one key."""
    theta = dask.delayed(p.theta, pure=True)  # one key, shipped to each worker once
    task = dask.delayed(run_chunk, pure=True, nout=2)
    return [
        task(p.net, theta, xb, yb, int(r0), need, p.max_norm, p.backend, maps)
        for xb, yb, r0 in zip(_rows_of(p.X.to_delayed()), _rows_of(p.y.to_delayed()), _starts(p.rows))
    ]


def _starts(rows: tuple[int, ...]) -> list[int]:
    """The first row of each chunk."""
    return [0, *np.cumsum(rows)[:-1].tolist()]


def _raw_need(want: frozenset, clipping: bool) -> frozenset:
    """What each chunk's backend computes: the registry's raw needs, derived ones left to the end."""
    return frozenset(n for n in quantities.needed(want, clipping) if not isinstance(REGISTRY[n], Derived))


def _finish(want: frozenset, total: dict, n: int, dtype: np.dtype) -> dict:
    """The dataset's values of ``want`` (maps excluded) from the summed chunks: means divided by N
    (in float64, then θ's dtype), derived ones finished once."""
    raw = {"loss": total["loss"] / n}
    row_sums = {name: total[name] for name in ROW_SUMS if name in total}
    for name, value in total.items():
        q = REGISTRY[name]
        if isinstance(q, Sum):
            raw[name] = ((value / n) if q.mean else value).astype(dtype)
    for name in want:
        q = REGISTRY[name]
        if isinstance(q, Derived) and q.from_sums is not None:
            raw[name] = q.from_sums(raw, row_sums, n)
    scalars = want - set(MAPS)
    out = quantities.finish(scalars - {"loss"}, raw, n)
    out["loss"] = float(raw["loss"])
    return out


def _map_arrays(p: _Problem, tasks: list, names) -> dict:
    """Per-sample map name -> Dask array with X's row chunks, from the chunks' ``rows``."""
    dt = p.theta.dtype
    out = {}
    for name in names:
        width = _map_width(p.net, name)
        blocks = [
            da.from_delayed(operator.getitem(t[1], name), shape=(r, *width), dtype=dt)
            for t, r in zip(tasks, p.rows)
        ]
        out[name] = da.concatenate(blocks, axis=0)
    return out


# --------------------------------------------------------------- .npy files


class NpyRows:
    """A ``.npy`` file as an array-like for ``dask.array.from_array``: it pickles as its path, and
    reads the rows a chunk asks for from the file where the chunk runs.

    ``da.from_array(np.load(path, mmap_mode="r"))`` would pickle the memory map as a full
    in-memory copy for a distributed scheduler, and a memory map keeps the pages it has read
    in the process's resident memory; this reads each chunk's rows (a C-ordered file) with one
    ``readinto``, so a worker holds only the chunks it is working on.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        mapped = np.load(self.path, mmap_mode="r")  # reads the header only
        shape, dtype, self.offset = mapped.shape, mapped.dtype, mapped.offset
        fortran = mapped.ndim > 1 and not mapped.flags.c_contiguous
        del mapped
        if fortran or dtype.hasobject:
            raise ValueError(
                f"{self.path}: a C-ordered numeric .npy file is needed (Fortran order or objects)"
            )
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rows = key[0] if key else slice(None)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            return np.load(self.path, mmap_mode="r")[key].copy()
        r0, r1, _ = rows.indices(self.shape[0])
        r1 = max(r0, r1)
        row_shape = self.shape[1:]
        out = np.empty((r1 - r0, *row_shape), self.dtype)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + r0 * out[:1].nbytes if r1 > r0 else self.offset)
            fh.readinto(memoryview(out).cast("B"))
        return out[(slice(None), *key[1:])]


def from_npy(path, chunk_rows: int = 65536) -> da.Array:
    """A ``.npy`` file as a Dask array of ``chunk_rows`` rows per chunk, read where each chunk runs
    (see :class:`NpyRows`); any scheduler, a distributed one included, if the workers see ``path``."""
    rows = NpyRows(path)
    return da.from_array(rows, chunks=(chunk_rows, *rows.shape[1:]), asarray=True, fancy=False)


# --------------------------------------------------------------- public API


def delayed_backprop(
    net: MLP,
    theta: np.ndarray,
    X,
    y,
    compute: Sequence[str] = ("grad",),
    backend: str = "numba",
) -> BackpropResult:
    """:func:`backprop`, lazily: every field a Dask object, all from one pass over the chunks.

    Scalars and sums (and derived quantities) are ``dask.delayed`` values, per-sample maps
    Dask arrays; computing any of them together (``dask.compute(res.grad, res.norms)``, or
    ``dask.compute(res.noise_scale, res.per_sample.to_zarr(path, compute=False))``) runs
    each chunk once. Arguments as for :func:`backprop`.
    """
    want = check_compute(compute)
    _check_over_chunks(want)
    p = _check(net, theta, X, y, backend)
    maps = frozenset(want & set(MAPS))
    tasks = _chunk_tasks(p, _raw_need(want, False), maps)
    total = tree_sum([t[0] for t in tasks])
    done = dask.delayed(_finish, pure=True)(want, total, p.num_samples, p.theta.dtype)
    fields = {name: done[name] for name in (want - maps) | {"loss"}}
    fields.update(_map_arrays(p, tasks, maps))
    return BackpropResult(**fields)


def backprop(
    net: MLP,
    theta: np.ndarray,
    X,
    y,
    compute: Sequence[str] = ("grad",),
    backend: str = "numba",
    *,
    scheduler=None,
) -> BackpropResult:
    """Per-sample backpropagation over a whole dataset held as row-chunked Dask arrays.

    Parameters
    ----------
    net : MLP
    theta : ndarray (P,), float32 or float64
        Flat parameters; results come back in its dtype.
    X : dask.array.Array (N, n0)
        Inputs, chunked along rows only (from a memmapped ``.npy``, zarr, NumPy, ...).
    y : dask.array.Array or ndarray
        Labels (N,) or targets (N, n_L) as for :func:`fastgrad.backprop`; a Dask array must
        have X's row chunks, a NumPy one is split like X.
    compute : sequence of str
        Any of :data:`QUANTITIES` (all of :data:`fastgrad.QUANTITIES` that have a form over chunks).
    backend : str
        The backend each chunk runs on its worker (``"numba"`` by default).
    scheduler : str or distributed.Client, optional
        Passed to ``dask.compute`` for the sums (default: Dask's current scheduler, e.g. the
        active ``Client``).

    Returns
    -------
    BackpropResult
        ``loss``, ``grad``, ``sq_mean``, ``variance``, ``noise_scale``: NumPy values (float
        for scalars), computed now, over all N rows. ``norms``, ``layer_norms``,
        ``per_sample``: Dask arrays with X's row chunks, lazy; computing one runs the
        backend over the chunks again for the maps only (holding them from the first pass
        would cost memory ∝ N). For one pass over everything, see :func:`delayed_backprop`.

    Raises
    ------
    TypeError, ValueError
        For bad arguments or chunks, before any task runs (a ``ValueError`` for a derived
        quantity that reads each sample's row against the whole dataset's sums and so has no
        form over chunks: its registry entry has no ``from_sums``); from a task, the check
        that failed on one chunk (NaN, a label out of range) with that chunk's rows.
    """
    want = check_compute(compute)
    _check_over_chunks(want)
    p = _check(net, theta, X, y, backend)
    maps = frozenset(want & set(MAPS))
    if want - maps:  # the sums: one pass that makes no per-sample rows it need not keep
        tasks = _chunk_tasks(p, _raw_need(want - maps, False), frozenset())
        total = tree_sum([t[0] for t in tasks])
        (total,) = dask.compute(total, scheduler=scheduler)
        fields = _finish(want - maps, total, p.num_samples, p.theta.dtype)
    else:  # maps only: no pass now, so no loss either
        fields = {"loss": None}
    if maps:
        tasks = _chunk_tasks(p, _raw_need(maps, False), maps)
        fields.update(_map_arrays(p, tasks, maps))
    return BackpropResult(**fields)


def clipped_grad(
    net: MLP,
    theta: np.ndarray,
    X,
    y,
    max_norm: float,
    noise_multiplier: float = 0.0,
    seed: int | None = None,
    backend: str = "numba",
    *,
    scheduler=None,
) -> np.ndarray:
    """DP-SGD's clipped (and optionally noised) mean gradient over a whole dataset.

    (1/N) [Σ_i min(1, C/‖∇ℓ_i‖) ∇ℓ_i + σ C ξ]: the clipped sum is a sum over samples, so
    chunks add exactly (in float64); it is rounded to θ's dtype and finished on the client by
    :func:`fastgrad.privacy.dp_step`, as :func:`fastgrad.clipped_grad` finishes its own sum
    (the same noise for the same seed, the same roundings).

    Parameters
    ----------
    net, theta, X, y, backend, scheduler
        As for :func:`backprop`.
    max_norm, noise_multiplier, seed
        As for :func:`fastgrad.clipped_grad`.

    Returns
    -------
    ndarray (P,) in θ's dtype
    """
    max_norm = check_max_norm(max_norm)
    noise_multiplier = check_noise_multiplier(noise_multiplier)
    p = _check(net, theta, X, y, backend, max_norm)
    tasks = _chunk_tasks(p, _raw_need(frozenset(), True), frozenset())
    (total,) = dask.compute(tree_sum([t[0] for t in tasks]), scheduler=scheduler)
    clipped_sum = total["clipped_sum"].astype(p.theta.dtype)
    no_norms = np.zeros(0)  # each chunk's norms were refused where they were made (_chunk_sums)
    return privacy.dp_step(clipped_sum, no_norms, max_norm, noise_multiplier, p.num_samples, seed)


# ------------------------------------------------- per-sample inner products


def _core(name: str) -> Callable:
    """The in-memory function (:func:`fastgrad.gram`, ``grad_dot``, ``tracin``) that a block runs."""
    return getattr(attribution, name)


def inner_block(
    func: str, net: MLP, operand, Xi, yi, r0: int, Xj, yj, s0: int, kw: dict, same: bool = False
) -> np.ndarray:
    """Block (i, j) of a tiled Gram: ``fastgrad.<func>(net, operand, X_i, y_i, X_j, y_j, **kw)``, with
    X_i = rows r0 : r0 + len(Xi) of X and X_j = rows s0 : s0 + len(Xj) of X2; ``Xj`` None for a
    diagonal block of X against itself; ``same`` when X_j is a chunk of X too (the Gram of X
    against itself). ``operand`` is θ (gram) or the checkpoints (tracin).

    A bad chunk raises the in-memory function's error with the rows of both chunks in front.
    """
    rows_i, rows_j = Xi.shape[0], (Xi if Xj is None else Xj).shape[0]
    if rows_i == 0 or rows_j == 0:  # an empty chunk (e.g. from slicing): an empty block
        lead = (net.num_layers,) if kw.get("per_layer") else ()
        return np.zeros((*lead, rows_i, rows_j), _operand_dtype(operand))
    second = () if Xj is None else (np.asarray(Xj), np.asarray(yj))
    try:
        return np.asarray(_core(func)(net, operand, np.asarray(Xi), np.asarray(yi), *second, **kw))
    except (TypeError, ValueError) as exc:
        where = f"rows {r0}:{r0 + rows_i} of X, y"
        if Xj is not None:
            where += f" against rows {s0}:{s0 + rows_j} of {'X, y' if same else 'X2, y2'}"
        raise type(exc)(f"{where} (a block of the Gram): {exc}") from None


def dot_chunk(net: MLP, theta, X, y, v, r0: int, backend: str) -> np.ndarray:
    """One chunk of :func:`grad_dot`: ``fastgrad.grad_dot`` on rows r0 : r0 + len(X), (rows,)."""
    if X.shape[0] == 0:
        return np.zeros(0, theta.dtype)
    try:
        return np.asarray(_core("grad_dot")(net, theta, np.asarray(X), np.asarray(y), v, backend=backend))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"rows {r0}:{r0 + X.shape[0]} (a chunk of X, y): {exc}") from None


def _operand_dtype(operand) -> np.dtype:
    return operand.dtype if isinstance(operand, np.ndarray) else operand[0][0].dtype


def _transposed(block: np.ndarray) -> np.ndarray:
    """Block (j, i) of a symmetric Gram from block (i, j)."""
    return np.ascontiguousarray(np.swapaxes(block, -1, -2))


def _tiled(func: str, p: _Problem, p2: _Problem | None, operand, kw: dict) -> da.Array:
    """The N × M (or L × N × M) Dask array whose block (i, j) is chunk i of ``p`` against chunk j of
    ``p2`` (of ``p`` itself when ``p2`` is None: then the blocks below the diagonal are the
    transposes of those above, so each pair of chunks is computed once)."""
    key = dask.delayed(operand, pure=True)  # one key, shipped to each worker once
    task = dask.delayed(inner_block, pure=True)
    flip = dask.delayed(_transposed, pure=True)
    lead = (p.net.num_layers,) if kw.get("per_layer") else ()
    dt = _operand_dtype(operand)
    left = list(zip(_rows_of(p.X.to_delayed()), _rows_of(p.y.to_delayed()), _starts(p.rows), p.rows))
    right = (
        left
        if p2 is None
        else list(zip(_rows_of(p2.X.to_delayed()), _rows_of(p2.y.to_delayed()), _starts(p2.rows), p2.rows))
    )
    done: dict[tuple[int, int], object] = {}
    grid = []
    for i, (xi, yi, r0, ri) in enumerate(left):
        row = []
        for j, (xj, yj, s0, rj) in enumerate(right):
            if p2 is None and j < i:
                block = flip(done[j, i])
            elif p2 is None and j == i:
                block = task(func, p.net, key, xi, yi, int(r0), None, None, int(s0), kw)
            else:
                block = task(func, p.net, key, xi, yi, int(r0), xj, yj, int(s0), kw, p2 is None)
            done[i, j] = block
            row.append(da.from_delayed(block, shape=(*lead, ri, rj), dtype=dt))
        grid.append(row)
    return da.block(grid)


def gram(
    net: MLP,
    theta: np.ndarray,
    X,
    y,
    X2=None,
    y2=None,
    *,
    per_layer: bool = False,
    backend: str = "numba",
) -> da.Array:
    """:func:`fastgrad.gram` over whole datasets: the N × M matrix ∇ℓ_i · ∇ℓ'_j in tiles.

    Block (i, j) is ``fastgrad.gram`` of X's row chunk i against X2's row chunk j, one task
    each, so a worker holds one block (and the two chunks' passes) at a time; the result is
    lazy, to be written to zarr (``G.to_zarr(path)``) or reduced (``G.sum(axis=1)``) without
    ever being in memory whole. Without X2, the Gram of X against itself: the blocks below
    the diagonal are the transposes of those above.

    Parameters
    ----------
    net : MLP
    theta : ndarray (P,), float32 or float64
    X : dask.array.Array (N, n0)
        Chunked along rows only.
    y : dask.array.Array or ndarray
        Labels (N,) or targets (N, n_L); a NumPy array is split like X.
    X2, y2 : as X and y, (M, n0) and (M,) or (M, n_L), optional
        The second dataset; both or neither.
    per_layer : bool
        The per-layer terms instead of their sum: (L, N, M).
    backend : str
        The backend each block runs on its worker.

    Returns
    -------
    dask.array.Array (N, M), or (L, N, M) with ``per_layer``, in θ's dtype
        Row chunks X's, column chunks X2's (X's without X2). Each block is one call of the
        in-memory function, so the bits do not depend on the scheduler or the number of
        workers; they may depend on the chunking.

    Raises
    ------
    TypeError, ValueError
        For bad arguments or chunks, before any task runs; from a task, the in-memory
        function's error on a bad chunk (NaN, a label out of range) with the rows of both chunks.
    """
    p = _check(net, theta, X, y, backend)
    if not isinstance(per_layer, (bool, np.bool_)):
        raise TypeError(f"per_layer: expected a bool, got {type(per_layer).__name__}")
    p2 = None if X2 is None and y2 is None else _check_second(p, X2, y2)
    return _tiled("gram", p, p2, p.theta, {"per_layer": bool(per_layer), "backend": p.backend})


def grad_dot(net: MLP, theta: np.ndarray, X, y, v, *, backend: str = "numba") -> da.Array:
    """:func:`fastgrad.grad_dot` over a whole dataset: ∇ℓ_i · v for every row, (N,).

    Parameters
    ----------
    net, theta, X, y, backend
        As for :func:`gram`.
    v : ndarray (P,) in θ's dtype
        A vector in θ's layout (a gradient, a direction); one key of the graph, shipped to each
        worker once.

    Returns
    -------
    dask.array.Array (N,) in θ's dtype, with X's row chunks; lazy.
    """
    p = _check(net, theta, X, y, backend)
    v = attribution._check_vector(net, v, p.theta.dtype)
    theta_key, v_key = dask.delayed(p.theta, pure=True), dask.delayed(v, pure=True)
    task = dask.delayed(dot_chunk, pure=True)
    blocks = [
        da.from_delayed(
            task(p.net, theta_key, xb, yb, v_key, int(r0), p.backend), shape=(r,), dtype=p.theta.dtype
        )
        for xb, yb, r0, r in zip(
            _rows_of(p.X.to_delayed()), _rows_of(p.y.to_delayed()), _starts(p.rows), p.rows
        )
    ]
    return da.concatenate(blocks, axis=0)


def tracin(net: MLP, checkpoints, X, y, X2=None, y2=None, *, backend: str = "numba") -> da.Array:
    """:func:`fastgrad.tracin` over whole datasets: Σ_k η_k ∇ℓ_i(θ_k) · ∇ℓ'_j(θ_k), N × M in tiles.

    Tiled as :func:`gram`: block (i, j) is ``fastgrad.tracin`` of X's chunk i against X2's
    chunk j over every checkpoint, one task each.

    Parameters
    ----------
    net, X, y, X2, y2, backend
        As for :func:`gram`.
    checkpoints : sequence of (θ_k, η_k)
        Parameters (P,) (one dtype for all) and the step size η_k that weights each; one key
        of the graph.

    Returns
    -------
    dask.array.Array (N, M) in the checkpoints' dtype, chunked as :func:`gram`'s; lazy.
    """
    ckpts = attribution._check_checkpoints(check_net(net), checkpoints)
    p = _check(net, ckpts[0][0], X, y, backend)
    p2 = None if X2 is None and y2 is None else _check_second(p, X2, y2)
    return _tiled("tracin", p, p2, ckpts, {"backend": p.backend})


# --------------------------------------------------------- compare_shortcut


def shortcut_chunk(net: MLP, theta, X, y, r0: int, backend: str) -> dict:
    """One chunk's sums for :func:`compare_shortcut`, in float64: the gradient (Σ_i ∇ℓ_i, whose
    parts are Σ δ_l a_{l-1}ᵀ and Σ δ_l), the activations Σ a_l (l = 0..L-1, flat), the
    derivatives Σ φ'(z_l) (hidden layers, flat) and the targets (Σ one-hot rows for
    cross-entropy)."""
    B = X.shape[0]
    sizes = net.sizes
    if B == 0:
        return {
            "grad": np.zeros(net.num_params),
            "acts": np.zeros(sum(sizes[:-1])),
            "derivs": np.zeros(sum(sizes[1:-1])),
            "targets": np.zeros(sizes[-1]),
        }
    inp = _checked_chunk(net, theta, X, y, r0)
    grad = run_backend(backend, net, inp, frozenset({"loss", "grad"}), None)["grad"]
    Zs, A = reference.forward(net, inp.theta, inp.X)
    f64 = np.float64
    derivs = [reference.phi_prime(net.activation, z).sum(axis=0, dtype=f64) for z in Zs[:-1]]
    if net.loss_code == CROSS_ENTROPY:
        targets = np.bincount(inp.labels, minlength=sizes[-1]).astype(f64)
    else:
        targets = inp.targets.sum(axis=0, dtype=f64)
    return {
        "grad": grad.astype(f64) * B,
        "acts": np.concatenate([a.sum(axis=0, dtype=f64) for a in A]),
        "derivs": np.concatenate(derivs) if derivs else np.zeros(0),
        "targets": targets,
    }


def compare_shortcut(
    net: MLP,
    theta: np.ndarray,
    X,
    y,
    methods=shortcut.METHODS,
    backend: str = "numba",
    *,
    scheduler=None,
) -> shortcut.ShortcutReport:
    """:func:`fastgrad.compare_shortcut` over a whole dataset: each shortcut's gradient against the
    true full-dataset gradient, per layer.

    Everything the shortcuts and the covariance terms need is a sum over samples (the mean
    activations, derivatives, output error and targets; Cov(δ_l, a_{l-1}) = mean δ_l a_{l-1}ᵀ
    − δ̄_l ā_{l-1}ᵀ, its first term the true gradient's), so one pass over the chunks makes
    them, added in the fixed tree of :func:`tree_sum`. The covariance is taken in float64 from
    those sums (one pass), where :func:`fastgrad.compare_shortcut` centres the rows first
    (two passes): they agree to rounding unless the means dwarf the covariance.

    Parameters
    ----------
    net, theta, X, y, backend, scheduler
        As for :func:`backprop`.
    methods : sequence of str
        As for :func:`fastgrad.compare_shortcut`.

    Returns
    -------
    fastgrad.ShortcutReport
    """
    methods = tuple(shortcut._check_method(m) for m in ((methods,) if isinstance(methods, str) else methods))
    p = _check(net, theta, X, y, backend)
    task = dask.delayed(shortcut_chunk, pure=True)
    theta_key = dask.delayed(p.theta, pure=True)
    parts = [
        task(p.net, theta_key, xb, yb, int(r0), p.backend)
        for xb, yb, r0 in zip(_rows_of(p.X.to_delayed()), _rows_of(p.y.to_delayed()), _starts(p.rows))
    ]
    (total,) = dask.compute(tree_sum(parts), scheduler=scheduler)
    n, dt, sizes = p.num_samples, p.theta.dtype, net.sizes
    mean = {k: v / n for k, v in total.items()}
    true = mean["grad"].astype(dt)
    acts = np.split(mean["acts"], np.cumsum(sizes[:-1])[:-1])
    derivs = np.split(mean["derivs"], np.cumsum(sizes[1:-1])[:-1]) if len(sizes) > 2 else []
    # Cov(δ_l, a_{l-1}) = mean δ aᵀ − δ̄ āᵀ, with mean δ aᵀ and δ̄ the true gradient's W and b parts
    covs = [np.linalg.norm(gW - np.outer(gb, a)) for (gW, gb), a in zip(net.unpack(mean["grad"]), acts)]
    shortcuts = {}
    for m in methods:
        if m == "mean_input":
            shortcuts[m] = shortcut._grad_at_mean(
                net, p.theta, acts[0].astype(dt), mean["targets"].astype(dt)
            )
        else:  # mean_error: δ̄_L (the last bias gradient), with mean activations and derivatives
            delta_out = true[net.layers[-1].b_start : net.layers[-1].end]
            shortcuts[m] = shortcut._backprop_one(
                net, p.theta, delta_out, [a.astype(dt) for a in acts], [d.astype(dt) for d in derivs]
            )
    return shortcut._report(net, true, shortcuts, covs, n)


__all__ = [
    "MAPS",
    "QUANTITIES",
    "ROW_SUMS",
    "NpyRows",
    "backprop",
    "clipped_grad",
    "compare_shortcut",
    "delayed_backprop",
    "dot_chunk",
    "from_npy",
    "grad_dot",
    "gram",
    "inner_block",
    "run_chunk",
    "shortcut_chunk",
    "tracin",
    "tree_sum",
]

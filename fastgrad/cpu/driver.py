"""The numba backend's host side: the backend contract (:func:`run`), one call's set-up
(:class:`PreparedCall`), the factors of per-sample gradients, and the compile notice."""

from __future__ import annotations

import logging

import numba
import numba.core.event
import numpy as np

from .. import _cache, _threading, quantities
from .._threading import kernel_blas
from ..losses import CROSS_ENTROPY
from ..mlp import MLP
from ..quantities import INPUT_SQUARED
from . import config
from .config import CACHE
from .kernels import (
    NORMS_NOT_FINITE,
    Buffers,
    Codes,
    Data,
    PRODUCT_T,
    READ_WT,
    STORED_WT,
    Flags,
    Net,
    RowOut,
    Scalars,
    batch_backprop,
    fused_backprop,
)
from ..update import Update, no_update
from .workspace import Results, Workspace, _chunking, _thread_workspace, scratch_per_row


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


def check_available() -> None:
    """Raise ``RuntimeError`` if the backend cannot run here (Numba's ``np.dot`` needs SciPy)."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError as exc:  # pragma: no cover - scipy is a core dependency
        raise RuntimeError("backend 'numba': SciPy is required (Numba's np.dot calls its BLAS)") from exc


log = logging.getLogger("fastgrad")


class _CompileNotice(numba.core.event.Listener):
    """Says, once per dtype, variant (plain, or with DP noise: a :class:`~fastgrad.cpu.kernels.Noise` pack)
    and process, that the kernels are being compiled: the ~20 s of the first call would otherwise look
    like a hang. Numba's "numba:compile" event starts only after its disk
    cache missed, so a cached load says nothing.

    The line goes to the ``fastgrad`` logger at WARNING: with no logging set up, Python's last-resort
    handler writes it to stderr; an application's logging configuration routes or silences it
    (``logging.getLogger("fastgrad").setLevel(logging.ERROR)``). Not a ``warnings`` warning, which
    ``-W error`` would turn into an exception."""

    def __init__(self):
        self.told: set[tuple[str, bool]] = set()

    def on_start(self, event) -> None:
        data = event.data or {}
        if data.get("dispatcher") is not fused_backprop:
            return
        args = data.get("args") or ()
        try:
            dtype = str(args[0].types[1].dtype)  # net = (layout, θ, w_t)
        except (AttributeError, IndexError, KeyError, TypeError):
            dtype = "a new type"
        dp = isinstance(args[-1], numba.types.BaseTuple) if args else False  # a Noise pack, not None
        if (dtype, dp) not in self.told:
            self.told.add((dtype, dp))
            log.warning(
                "fastgrad: compiling the numba kernels %sfor %s (once, ~%d s; %s)",
                "with DP noise " if dp else "",
                dtype,
                25 if dp else 20,
                "cached on disk after"
                if CACHE
                else "not cached: FASTGRAD_NUMBA_CACHE=0 or no writable folder",
            )

    def on_end(self, event) -> None:
        pass


compile_notice = _CompileNotice()
numba.core.event.register("numba:compile", compile_notice)

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


def _forward_how(n_in: int, n_out: int, tile: int) -> int:
    """How the kernels run a layer's forward GEMM on tiles of ``tile`` rows (``kernels.FORWARD``): with a
    stored W_lᵀ up to ``SMALL_LAYER`` weights, else as the transposed product on tiles of at most
    ``TRANSPOSED_ROWS`` rows, else with W_l read transposed (the tunables read at call time)."""
    if n_in * n_out <= config.SMALL_LAYER:
        return STORED_WT
    return PRODUCT_T if tile <= config.TRANSPOSED_ROWS else READ_WT


def _layout(net: MLP, tile: int) -> np.ndarray:
    """The kernels' ``layout`` (L, 5) for tiles of ``tile`` rows: per layer n_{l-1}, n_l, W_l's and b_l's
    start in θ, and how it is forwarded (:func:`_forward_how`)."""
    rows = [(s.n_in, s.n_out, s.w_start, s.b_start, _forward_how(s.n_in, s.n_out, tile)) for s in net.layers]
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def _plan(sums: list, n_tiles: int, num_params: int, itemsize: int) -> tuple[np.ndarray, int]:
    """The kernels' ``plan`` (n_sums, 4): operand, source, slot and mean flag of each sum, and the
    number of slots.

    Sums get a slot of per-tile partial sums, in order, while slots × tiles × P fit in
    ``PARTIALS_BYTES`` (read at call time); the others are made in phase 2."""
    plan = np.empty((len(sums), 4), np.int64)
    n_slots = 0
    for s, q in enumerate(sums):
        if q.operand not in range(len(quantities.OPERANDS)) or q.source not in range(len(quantities.SOURCES)):
            raise NotImplementedError(f"backend 'numba': no kernel for the operand or source of {q.name!r}")
        slot = -1
        if (n_slots + 1) * n_tiles * num_params * itemsize <= config.PARTIALS_BYTES:
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
        call, arrays = _one_call(net, inp, need, max_norm, out, ws)
        return call(*arrays)


def _one_call(net: MLP, inp, need: frozenset, max_norm: float | None, out: np.ndarray | None,
              ws: Workspace) -> tuple[PreparedCall, tuple]:  # fmt: skip
    """An unprepared call's :class:`PreparedCall`, over new :class:`Results` (``out``: the per-sample rows'
    array, or ``None``), and θ, X, labels and targets as its kernels take them; inside the caller's claim of
    ``ws`` and BLAS hold."""
    results = Results(net, inp.dtype, need, max_norm is not None, inp.batch_size, out)
    call = PreparedCall(net, inp.dtype, need, max_norm, inp.batch_size, ws, results)
    return call, tuple(_writeable(a) for a in (inp.theta, inp.X, inp.labels, inp.targets))


def clipped_step(net: MLP, inp, max_norm: float, noise_multiplier: float, denominator: float, seed,
                 workspace: Workspace | None = None) -> tuple[np.ndarray, dict]:  # fmt: skip
    """:func:`fastgrad.clipped_grad`'s step on CPU threads: the kernels, with DP-SGD's noised step made in
    their last pass (:meth:`PreparedCall.noise_pack`; seeded noise only, the seed checked by the caller);
    returns (the step (P,), :func:`run`'s raw dict). Raises ``FloatingPointError`` (:func:`fastgrad.privacy.
    check_clip_norms`) when a sample's norm is NaN or Inf: the step is then not made."""
    from ..noise import seed_words
    from ..privacy import check_clip_norms

    _threading.check_fork_safe()
    ws = workspace if workspace is not None else _thread_workspace()
    need = quantities.needed(("norms",), clipping=True)
    words = seed_words(seed) if noise_multiplier * max_norm > 0 else (0, 0, 0)
    with ws.claimed(), kernel_blas():
        call, arrays = _one_call(net, inp, need, max_norm, None, ws)
        step = np.empty(net.num_params, inp.dtype)
        noise = call.noise_pack(step, max_norm, noise_multiplier, denominator, words)
        code = call.launch(*arrays, NO_CHECK, None, noise)
        raw = call.finish()
    if code == NORMS_NOT_FINITE:
        check_clip_norms(raw["norms"])  # raises, naming the sample
    return step, raw


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
        bufs, self.tasks, self.w_t = ws.buffers(net.sizes, chunk, dt, squares)
        n_tiles = -(-chunk // tile)
        self.plan, n_slots = _plan(made, n_tiles, P, dt.itemsize)
        self.partial = ws.partials(n_slots, n_tiles, P, dt) if n_slots else np.empty((0, 0, 0), dt)
        self.ce = net.loss_code == CROSS_ENTROPY
        self.layout = _layout(net, tile)
        # the packs of batch_backprop, as plain tuples in the fields' order of kernels.Codes, Flags, ...
        self.codes = (net.activation_code, net.loss_code, tile)
        self.c_max = dt.type(max_norm if clip else -1.0)  # the clip factor's C, in θ's dtype
        r = self.results = results
        self.sums = r.sums
        self.losses, self.norms = r.losses[:B], r.norms[:B]
        self.layer_sq = r.layer_sq[:B]
        self.layer_norms = r.layer_norms[:B] if per_row else None
        self.G = (r.G if r.G.shape[0] == B else r.G[:B]) if want_rows else None
        self.chunk = chunk
        self.flags = (backward, per_row, squares, False)
        self.scalars = (self.c_max, dt.type(B))
        self.bufs = (bufs.acts, bufs.dphi, bufs.deltas, bufs.sqa if squares else bufs.sqa[:0])
        self.scratch = tuple(scratch_per_row(net.sizes))
        rows = np.asarray(r.G[:B]) if want_rows else np.empty((0, 0), dt)
        self.row_out = (r.losses[:B], r.layer_sq[:B], r.norms[:B], r.clip_c[:B], rows)
        self.no_update = no_update(dt)

    def __call__(self, theta: np.ndarray, X: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> dict:
        self.launch(theta, X, labels, targets)
        return self.finish()

    def noise_pack(self, out: np.ndarray, max_norm: float, noise_multiplier: float, denominator: float,
                   words: tuple[int, int, int]) -> tuple:  # fmt: skip
        """The :class:`~fastgrad.cpu.kernels.Noise` pack (a plain tuple) of a clipped call: its last pass
        makes (clipped sum + dt(σC)·ξ) / dt(D) into ``out`` (P,) of θ's dtype, ξ of the seed words
        (k0, k1, c3) (unused when σC = 0), after checking this call's norms: the bits of
        :func:`fastgrad.privacy.dp_step` on the clipped sum."""
        dt, u64 = self.dtype, np.uint64
        row = [q.name for q in self.made].index("clipped_sum")
        k0, k1, c3 = words
        std, D = dt.type(noise_multiplier * max_norm), dt.type(denominator)
        return out, row, std, D, u64(k0), u64(k1), u64(c3), dt == np.float64, self.norms

    def launch(self, theta: np.ndarray, X: np.ndarray, labels: np.ndarray, targets: np.ndarray,
               check: tuple = NO_CHECK, update: tuple | None = None,
               noise: tuple | None = None) -> int:  # fmt: skip
        """Run the kernels over every chunk, leaving the sums and per-row results in ``results``.

        ``check`` = (True, lo, hi) (a :class:`~fastgrad.cpu.kernels.Check`'s fields) first checks the arrays
        in the same compiled call (:func:`check_values`, targets in [lo, hi]) and returns its nonzero code
        without running anything; else 0. ``update``: an :class:`~fastgrad.update.Update` pack (a plain
        tuple) made in the kernels' last pass, which leaves θ updated from the sums' row ``modes[ROW]``, or
        from the noised step when ``noise`` (a :class:`~fastgrad.cpu.kernels.Noise` pack as a plain tuple) is
        given: the kernels' last pass then makes DP-SGD's noised step too, or returns
        :data:`~fastgrad.cpu.kernels.NORMS_NOT_FINITE` without making either."""
        # chunk size 1: tiles and phase-2 tasks are handed out one at a time, as they differ in cost
        before = _set_chunksize(1)
        try:
            code, self.loss_sum = batch_backprop(
                check, (self.layout, theta, self.w_t), (X, labels, targets), self.codes, self.flags,
                self.plan, self.scalars, self.bufs, self.scratch, self.row_out, self.sums, self.partial,
                self.tasks, self.chunk, self.no_update if update is None else update, noise,
            )  # fmt: skip
        finally:
            _set_chunksize(before)
        return code

    def finish(self) -> dict:
        """The raw quantities from the kernels' outputs: the loss and the sums' means, the derived
        quantities the registry says this backend makes in its own sweep, the layer norms from their
        squares."""
        dt, need = self.dtype, self.need
        # the bits of losses.mean(dtype=dt): NumPy's pairwise sum in θ's dtype (made by the compiled call),
        # divided by B in float64 (NumPy divides by the count as an intp) and rounded to θ's dtype
        res = {"loss": dt.type(float(self.loss_sum) / self.batch_size)}
        for s, q in enumerate(self.made):
            res[q.name] = self.sums[s]
        for q, make in quantities.made_in_pass("numba", need):  # the registry's: f(*needs, out)
            if all(n in res for n in q.needs):
                with numba.parallel_chunksize(1):
                    make(*(res[n] for n in q.needs), self.results.derived[q.name])
                res[q.name] = self.results.derived[q.name]
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
    from .._validation import Inputs

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
    per_row = scratch_per_row(sizes)
    acts_out = [np.empty((B, n), dt) for n in sizes[1:-1]]
    second = [np.empty((B, n), dt) for n in (sizes[1:] if backward else sizes[1:-1])]  # Δ_l or φ'(z_l)
    theta, X, labels, targets = (_writeable(a) for a in (inp.theta, inp.X, inp.labels, inp.targets))
    ce = net.loss_code == CROSS_ENTROPY
    with ws.claimed(), kernel_blas():
        chunk, tile = _chunking(sizes, dt, B)
        chunk = min(B, chunk)
        (acts, dphi, deltas, sqa), tasks, w_t = ws.buffers(sizes, chunk, dt, False)
        net_pack = Net(_layout(net, tile), theta, w_t)
        codes = Codes(net.activation_code, net.loss_code, tile)
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
                data = Data(X[c0:c1], labels[c0:c1] if ce else labels, targets if ce else targets[c0:c1])
                n_acts, n_deltas = R * per_row.acts, R * per_row.deltas  # acts and dphi: the same count
                bufs = Buffers(acts[:n_acts], dphi[:n_acts], deltas[:n_deltas], sqa[:0])
                row_out = RowOut(losses[:R], layer_sq[:R], norms[:R], clip_c[:R], no_rows)
                flags = Flags(backward, False, False, False)
                fused_backprop(
                    net_pack,
                    data,
                    codes,
                    flags,
                    plan,
                    Scalars(dt.type(-1.0), dt.type(0.0)),
                    bufs,
                    row_out,
                    sums,
                    partial,
                    tasks,
                    Update(*no_update(dt)),
                    None,
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
    """Compile (or load from the disk cache) every kernel for ``dtypes``, both variants (plain, and with
    DP-SGD's noised step: :func:`clipped_step`): tiny calls."""
    from .._validation import check_inputs

    net = MLP([2, 3, 2], activation="tanh", loss="cross_entropy")
    for dt in dtypes:
        theta = net.init(seed=0, dtype=dt)
        inp = check_inputs(net, theta, np.zeros((1, 2), dt), np.zeros(1, np.int64))
        run(net, inp, frozenset({"loss", "grad", "sq_mean", "norms", "per_sample"}), 1.0, None)
        clipped_step(net, inp, 1.0, 1.0, 1.0, 0)

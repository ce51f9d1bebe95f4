"""A prepared training step: :class:`Step`, built once per network, dtype and quantities, called per batch.

What does not change from one call to the next is checked and built once: the network, the
quantities and clipping options, the backend, the numba backend's chunking, plan of sums,
workspace and result arrays (per batch size, over buffers sized for the largest batch seen or
``max_batch_size``), and the DP noise's seed sequence. A call checks only what a new array can get
wrong (type, dtype, shape, C-contiguity, finiteness, label range or target domain) and runs the
same code as :func:`fastgrad.backprop` / :func:`fastgrad.clipped_grad`, so the bits are theirs (on the
numba backend a DP step's noised step is made in the kernels' last pass, by the same compiled expression
that :func:`fastgrad.privacy.dp_step` uses).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from ._validation import (
    Inputs,
    check_compute,
    check_max_norm,
    check_net,
    check_noise_multiplier,
    check_per_sample_fits,
    check_positive,
    check_theta,
    check_X,
    check_y,
)
from .api import BackpropResult, ClippedGrad, _backend, resolve_backend
from .losses import REGISTRY as LOSS_REGISTRY
from .mlp import FLOAT_DTYPES, MLP
from .noise import seed_words
from .privacy import check_clip_norms, check_seed, dp_step
from .quantities import finish, needed, sums_to_make
from .update import ROW

HOST_BACKENDS: tuple[str, ...] = ("naive", "numpy", "numba")
"""Backends a :class:`Step` runs on (host arrays)."""

MAX_PREPARED = 256
"""Batch sizes whose prepared numba call a step keeps (Poisson batches vary in size); past this
many the oldest is dropped (the buffers are shared, so a prepared call is small)."""


def _all_finite(a: np.ndarray) -> bool:
    """Whether every element of ``a`` is finite (NumPy: one boolean temporary)."""
    return bool(np.isfinite(a).all())


_INT64 = np.dtype(np.int64)


def _seed_sequence(seed) -> np.random.SeedSequence:
    """The step's own seed sequence from a checked ``seed`` (a Generator gives 4 words of its output)."""
    if isinstance(seed, np.random.SeedSequence):  # a copy: spawning advances the user's object otherwise
        return np.random.SeedSequence(
            seed.entropy,
            spawn_key=seed.spawn_key,
            pool_size=seed.pool_size,
            n_children_spawned=seed.n_children_spawned,
        )
    if isinstance(seed, np.random.Generator):
        return np.random.SeedSequence(seed.integers(0, 2**63, size=4, dtype=np.uint64).tolist())
    return np.random.SeedSequence(seed)


class Step:
    """A prepared call of :func:`fastgrad.backprop` (or, with ``max_norm``, of
    :func:`fastgrad.clipped_grad`) for one network, dtype and set of quantities.

    >>> step = fastgrad.Step(net, np.float32, compute=("loss", "grad"))
    >>> for X, y in batches:
    ...     res = step(theta, X, y)          # res.grad is the step's buffer, overwritten next call
    ...     theta -= lr * res.grad

    Parameters
    ----------
    net : MLP
        The network spec.
    dtype : float32 or float64
        θ's dtype; every call's θ must have it (X and y of other real dtypes are converted, as
        :func:`fastgrad.backprop` does).
    compute : sequence of str
        As for :func:`fastgrad.backprop`. With ``max_norm`` leave it at its default: the step then
        returns :func:`fastgrad.clipped_grad`'s :class:`ClippedGrad`.
    backend : str
        ``"auto"`` (the fastest host backend here: numba, else numpy), ``"numba"``, ``"numpy"`` or
        ``"naive"``. GPU arrays go to :func:`fastgrad.backprop` with ``backend="cuda"``.
    max_norm : float, optional
        C > 0: the step is DP-SGD's clipped (and with ``noise_multiplier`` > 0 noised) mean gradient.
    noise_multiplier : float
        σ ≥ 0, with ``max_norm``.
    seed : int, sequence of int, numpy SeedSequence or Generator, or None
        Seed of the noise. Call k (counting from 0) adds the noise that
        ``clipped_grad(..., seed=np.random.SeedSequence(seed).spawn(k + 1)[k])`` adds (a
        SeedSequence seed is copied and spawned from where it stands; a Generator gives the
        entropy of a new SeedSequence once, at construction; ``None``: fresh OS entropy, kept in
        :attr:`seed_sequence`). So a seed gives a reproducible sequence of steps.
    expected_batch_size : float, optional
        The denominator D of the clipped mean (Poisson sampling: q·N), with ``max_norm``.
    max_batch_size : int, optional
        The largest batch: result buffers are made for it at once, and a bigger batch is refused.
        By default they grow to the largest batch seen.

    Notes
    -----
    The arrays of a result are the step's own buffers (numba backend), overwritten by the next
    call; ``copy=True`` returns copies. One step serves one call at a time: a call from a second
    Python thread while another runs raises ``RuntimeError``; give each thread its own step.
    """

    def __init__(
        self,
        net: MLP,
        dtype=np.float32,
        compute: Sequence[str] = ("loss", "grad"),
        backend: str = "auto",
        max_norm: float | None = None,
        noise_multiplier: float = 0.0,
        seed=None,
        expected_batch_size: float | None = None,
        max_batch_size: int | None = None,
    ):
        self.net = check_net(net)
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from None
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dt}")
        self.dtype = dt
        self.want = want = check_compute(compute)
        self._rest = want - {"loss"}
        self.max_norm = None if max_norm is None else check_max_norm(max_norm)
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        if self.max_norm is None:
            if self.noise_multiplier > 0 or seed is not None or expected_batch_size is not None:
                raise ValueError(
                    "max_norm: noise_multiplier, seed and expected_batch_size need max_norm (DP-SGD's C)"
                )
        elif want != frozenset({"loss", "grad"}):
            raise ValueError(
                "compute: with max_norm the step returns a ClippedGrad (grad, norms, loss, clip_fraction); "
                "leave compute at its default"
            )
        check_seed(seed)
        self.seed_sequence = _seed_sequence(seed)
        """The noise's seed sequence; call k's noise has seed its child n + k (n: its children spawned
        before the step was made)."""
        self._first_child = self.seed_sequence.n_children_spawned
        self.expected_batch_size = (
            None
            if expected_batch_size is None
            else check_positive("expected_batch_size", expected_batch_size)
        )
        if max_batch_size is not None:
            if isinstance(max_batch_size, (bool, np.bool_)) or not isinstance(
                max_batch_size, (int, np.integer)
            ):
                raise TypeError(
                    f"max_batch_size: expected a positive integer, got {type(max_batch_size).__name__}"
                )
            if max_batch_size < 1:
                raise ValueError(f"max_batch_size: expected a positive integer, got {max_batch_size}")
            max_batch_size = int(max_batch_size)
        self.max_batch_size = max_batch_size
        self.backend = resolve_backend(backend, host=True)
        if self.backend not in HOST_BACKENDS:
            raise ValueError(
                f"backend: a Step runs on host backends ({', '.join(HOST_BACKENDS)}), got {self.backend!r}; "
                "for GPU arrays call fastgrad.backprop / clipped_grad with backend='cuda'"
            )
        self._run = _backend(self.backend)
        clip = self.max_norm is not None
        self.need = needed(("norms",), clipping=True) if clip else needed(want)
        self.calls = 0
        """Calls made so far (the index k of the next call's noise)."""
        self._busy = threading.Lock()
        P = net.num_params
        self._no_labels = np.zeros(0, np.int64)
        self._no_targets = np.zeros((0, net.n_out), dt)
        # the gradient's buffer, the same array for the step's life (grad_buffer); on numba without
        # clipping it is the kernels' own output row, so nothing is copied
        self._grad = np.empty(P, dt) if clip or "grad" in want else None
        self._prepared: dict[int, object] = {}
        self._loss = LOSS_REGISTRY[net.loss]
        self._labels = self._loss.labels
        self._theta_shape = (P,)
        self._domain = self._loss.domain
        self._check = (True, *self._domain)  # the numba call's check: on, the targets' domain
        self._results = None
        self._grad_row = -1  # the gradient's row among the kernels' sums (numba, without clipping)
        if self.backend == "numba":
            from . import cpu

            self._cpu = cpu
            self._ws = cpu.Workspace()
            self._grow(max_batch_size or 1)
            if not clip and "grad" in want:
                made = [q.name for q in sums_to_make(self.need, False)]
                self._grad_row = made.index("grad")
                self._grad = self._results.sums[self._grad_row]

    @property
    def grad_buffer(self) -> np.ndarray | None:
        """The (P,) array every call's gradient (``res.grad``) is written into, the same array for the
        step's life (``None`` when the step does not compute ``grad``): a training loop may keep views of
        it, as :class:`fastgrad.torch.GradStep` does for every ``p.grad``."""
        return self._grad

    # ------------------------------------------------------------ set-up

    def _grow(self, rows: int) -> None:
        """Result buffers for batches of up to ``rows`` samples (the prepared calls are rebuilt)."""
        if "per_sample" in self.need:
            check_per_sample_fits(rows, self.net.num_params, self.dtype)
        sums = None if self._results is None else self._results.sums  # kept: grad_buffer is a view of it
        clip = self.max_norm is not None
        self._results = self._cpu.Results(self.net, self.dtype, self.need, clip, rows, sums=sums)
        self._prepared.clear()

    def _prepared_call(self, batch: int):
        call = self._prepared.get(batch)
        if call is None:
            if self._results is None or self._results.rows < batch:
                # a quarter more rows than asked (not for per-sample rows, B × P each): batches that vary
                # in size (Poisson) then grow the buffers, and drop the prepared calls, a few times, not
                # at every new largest batch. (With max_batch_size the buffers were made that size at
                # construction and a larger batch is refused, so this never runs.)
                rows = 0 if self._results is None or "per_sample" in self.need else self._results.rows
                self._grow(max(batch, rows * 5 // 4))
            if len(self._prepared) >= MAX_PREPARED:
                del self._prepared[next(iter(self._prepared))]
            call = self._prepared[batch] = self._cpu.PreparedCall(
                self.net, self.dtype, self.need, self.max_norm, batch, self._ws, self._results
            )
        return call

    @contextmanager
    def _claimed(self):
        """Hold the step for one call; raise if another call (thread) holds it."""
        self._claim()
        try:
            yield
        finally:
            self._busy.release()

    def _claim(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "step: this Step is in use by another call (a second Python thread?); "
                "give each thread its own fastgrad.Step"
            )

    # ------------------------------------------------------------ per call

    def _ready_theta(self, theta) -> bool:
        """Whether ``theta`` is a C-contiguous (P,) ndarray of the step's dtype: used as it is, not copied."""
        return (
            type(theta) is np.ndarray
            and theta.dtype is self.dtype
            and theta.shape == self._theta_shape
            and theta.flags.c_contiguous
        )

    def _inputs(self, theta, X, y) -> Inputs:
        """The call's arrays, checked as :func:`fastgrad.api.check_inputs` would (values aside), fast when
        they are C-contiguous ndarrays of the step's dtype already (then nothing is copied); any other
        array goes through the full checks, which raise or convert it."""
        net, dt, nd = self.net, self.dtype, np.ndarray
        if not self._ready_theta(theta):
            theta = check_theta(net, theta)  # raises, or a contiguous native copy
            if theta.dtype != dt:
                raise TypeError(f"theta: expected dtype {dt} (the step's dtype), got {theta.dtype}")
        if not (type(X) is nd and X.dtype is dt and X.ndim == 2 and X.shape[1] == net.n_in and X.shape[0] > 0
                and X.flags.c_contiguous):  # fmt: skip
            X = check_X(net, X, dt)  # raises, or a converted copy (checked then)
        B = X.shape[0]
        if self._labels:
            if type(y) is nd and y.dtype is _INT64 and y.shape == (B,) and y.flags.c_contiguous:
                labels, targets = y, self._no_targets
            else:
                labels, targets = check_y(net, y, B, dt)
        elif type(y) is nd and y.dtype is dt and y.shape == (B, net.n_out) and y.flags.c_contiguous:
            labels, targets = self._no_labels, y
        else:
            labels, targets = check_y(net, y, B, dt)
        return Inputs(theta, X, labels, targets)

    def _bad_values(self, inp: Inputs) -> int:
        """NumPy's check of what the numba backend's call checks in its compiled pass: 0, or the code of
        :func:`fastgrad.cpu.check_values` (1 θ, 2 X, 3 targets, 4 labels)."""
        lo, hi = self._domain
        if not _all_finite(inp.theta):
            return 1
        if not _all_finite(inp.X):
            return 2
        t, labels = inp.targets, inp.labels
        if t.size and not (_all_finite(t) and t.min() >= lo and t.max() <= hi):
            return 3
        if labels.size and (labels.min() < 0 or labels.max() >= self.net.n_out):
            return 4
        return 0

    def _refuse(self, code: int, inp: Inputs) -> None:
        """Raise the error for a nonzero :meth:`_bad_values` / ``check_values`` code, naming the argument."""
        if code == 1:
            raise ValueError("theta: contains NaN or Inf")
        if code == 2:
            raise ValueError("X: contains NaN or Inf")
        if code == 3:
            if not _all_finite(inp.targets):
                raise ValueError("y: contains NaN or Inf")
            raise ValueError(self._loss.domain_error())
        check_y(self.net, inp.labels, inp.labels.shape[0], self.dtype)  # raises, naming the range
        raise AssertionError(f"check_values code {code}")  # pragma: no cover

    def __call__(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, copy: bool = False):
        """One step on a batch.

        Parameters
        ----------
        theta : ndarray (P,) of the step's dtype
            Flat parameters.
        X : ndarray (B, n0)
            Inputs; B up to ``max_batch_size`` when that was given.
        y : ndarray
            Labels (B,) or targets (B, n_L), as for :func:`fastgrad.backprop`.
        copy : bool
            Return arrays of its own rather than the step's buffers (which the next call overwrites).

        Returns
        -------
        BackpropResult, or ClippedGrad (with ``loss``) when the step was built with ``max_norm``.
            Bit-identical to :func:`fastgrad.backprop` / :func:`fastgrad.clipped_grad` (with
            ``return_stats=True`` and call k's seed, see ``seed``) on the same inputs and backend.

        Raises
        ------
        TypeError, ValueError
            For bad input, naming the argument, before any kernel runs.
        RuntimeError
            When another thread's call is using this step.
        FloatingPointError
            As :func:`fastgrad.clipped_grad`: a sample's gradient norm is NaN or Inf.
        """
        self._claim()
        try:
            return self._step(theta, X, y, copy)
        finally:
            self._busy.release()

    def _call_updating(self, theta: np.ndarray, X, y, update: tuple):
        """One call, as :meth:`__call__` (``copy=False``), that also updates ``theta`` in place as the
        :class:`fastgrad.update.Update` pack ``update`` (a plain tuple) says, block by block right after
        the block of the gradient is made: on the numba backend in the kernels' last pass (without
        ``max_norm``, ``modes[ROW]`` is set here; with it, from the noised step made in the same pass); with
        ``max_norm`` on the other host backends in :func:`fastgrad.privacy.dp_step`'s pass. ``theta`` must be
        a writeable C-contiguous (P,) array of the step's dtype (the update lands in it). Bad input raises
        before anything runs, and a NaN or Inf norm before anything is updated: θ unchanged. For
        :class:`fastgrad.torch.SGD`."""
        if self.max_norm is None and self._grad_row < 0:
            raise RuntimeError("step: an update in the kernels needs the numba backend and grad")
        if not (self._ready_theta(theta) and theta.flags.writeable):
            raise ValueError(
                f"theta: the update needs a writeable C-contiguous ({self.net.num_params},) ndarray of "
                f"{self.dtype}"
            )
        if self.max_norm is None:
            update[3][ROW] = self._grad_row
        self._claim()
        try:
            return self._step(theta, X, y, False, update)
        finally:
            self._busy.release()

    def _step(self, theta, X, y, copy: bool, update: tuple | None = None):
        inp = self._inputs(theta, X, y)
        B = inp.batch_size
        if self.max_batch_size is not None and B > self.max_batch_size:
            raise ValueError(f"X: {B} samples, more than the step's max_batch_size = {self.max_batch_size}")
        if self.backend == "numba":  # with max_norm the kernels make the noised step, and the update from it
            raw = self._run_numba(inp, update)
        else:
            code = self._bad_values(inp)
            if code:
                self._refuse(code, inp)
            if "per_sample" in self.need:
                check_per_sample_fits(B, self.net.num_params, self.dtype)
            raw = self._run(self.net, inp, self.need, self.max_norm, None)
        if self.max_norm is None:
            values = finish(self._rest, raw, B)
            grad = values.get("grad")
            if grad is not None and grad is not self._grad:  # numpy, naive: into the step's buffer
                np.copyto(self._grad, grad)
                values["grad"] = self._grad
            if copy:
                values = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in values.items()}
            return BackpropResult(loss=float(raw["loss"]), **values)
        return self._clipped(raw, B, copy, None if update is None else (inp.theta, update))

    def _run_numba(self, inp: Inputs, update: tuple | None = None) -> dict:
        """The prepared call: the values' check and every chunk's kernels in one compiled call (the step's
        lock, held by the caller, stands for the workspace's claim), with θ's ``update`` when given, and with
        ``max_norm`` the noised step into the step's gradient buffer (the update made from it)."""
        cpu = self._cpu
        cpu._threading.check_fork_safe()
        B = inp.batch_size
        call = self._prepared_call(B)
        noise = None
        if self.max_norm is not None:  # the noised step of this call's seed, into the gradient buffer
            C, sigma = self.max_norm, self.noise_multiplier
            words = seed_words(self._call_seed()) if sigma * C > 0 else (0, 0, 0)
            D = B if self.expected_batch_size is None else self.expected_batch_size
            noise = call.noise_pack(self._grad, C, sigma, D, words)
        w = cpu._writeable  # a read-only array would be another type to Numba: another compile
        with cpu.kernel_blas:
            arrays = w(inp.theta), w(inp.X), w(inp.labels), w(inp.targets)
            code = call.launch(*arrays, self._check, update, noise)
        if code == cpu.NORMS_NOT_FINITE:
            check_clip_norms(call.norms)  # raises, naming the sample
        if code:
            self._refuse(code, inp)
        return call.finish()

    def _call_seed(self) -> np.random.SeedSequence:
        """Call k's seed: child n + k of :attr:`seed_sequence` (what its ``spawn`` would give next, had it
        spawned one per call), made without spawning, so a refused call draws no seed."""
        ss = self.seed_sequence
        key = (*ss.spawn_key, self._first_child + self.calls)
        return np.random.SeedSequence(ss.entropy, spawn_key=key, pool_size=ss.pool_size)

    def _clipped(self, raw: dict, B: int, copy: bool, update: tuple | None = None) -> ClippedGrad:
        norms = raw["norms"]
        C = self.max_norm
        noise_std = self.noise_multiplier * C
        denominator = B if self.expected_batch_size is None else self.expected_batch_size
        if self.backend == "numba":  # made in the kernels' last pass, the update too
            grad = self._grad
        else:
            seed = self._call_seed() if noise_std > 0 else None
            total, sigma = raw["clipped_sum"], self.noise_multiplier
            grad = dp_step(total, norms, C, sigma, denominator, seed, out=self._grad, update=update)
        self.calls += 1
        clipped = int(np.count_nonzero(norms > self.dtype.type(C)))
        if copy:
            grad, norms = grad.copy(), norms.copy()
        return ClippedGrad(grad, norms, clipped / B, noise_std, float(denominator), float(raw["loss"]))


__all__ = ["HOST_BACKENDS", "Step"]

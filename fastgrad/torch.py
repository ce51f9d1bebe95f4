"""Train a PyTorch MLP with fastgrad's gradients: the ``torch`` extra.

:class:`GradStep` takes an ``nn.Sequential`` MLP (what :func:`fastgrad.from_torch` accepts) and
makes its parameters views into one flat θ tensor: W_l in torch's (out, in) row-major order, then
b_l, which is fastgrad's layout, so a step copies no parameter. ``loss = step(X, y)`` runs the
fused kernel on θ's NumPy view and leaves every ``p.grad`` as ``loss.backward()`` would have, in
the torch loss's convention (fastgrad's loss is s × torch's: s = 1 for ``CrossEntropyLoss``, K/2
for ``MSELoss``, K for ``BCEWithLogitsLoss``, K outputs; so ``p.grad`` = fastgrad's gradient / s).
Any ``torch.optim`` optimizer, learning-rate scheduler and ``state_dict`` work unchanged.

:class:`DPGradStep` is DP-SGD on top: per-sample clipping at a norm in torch's scale, Gaussian
noise (a noise multiplier, or one calibrated for (ε, δ, epochs) by :mod:`fastgrad.privacy`),
Poisson batches, the expected batch size as denominator (as Opacus's ``DPOptimizer``) and the
ε spent so far.

Importing :mod:`fastgrad` does not import this module or torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from . import privacy
from .api import backprop, resolve_backend
from .extras import require
from .interop import from_torch
from .losses import REGISTRY as LOSS_REGISTRY

from .step import Step

torch = require("torch", "torch", "fastgrad.torch")
import torch.optim.optimizer as _torch_optimizer  # noqa: E402 (torch is an extra: required above)
from torch.autograd.graph import increment_version  # noqa: E402

_TORCH_LOSSES = {  # fastgrad loss -> torch's mean-reduced loss module (the registry's, where it has one)
    q.name: getattr(torch.nn, q.torch) for q in LOSS_REGISTRY.values() if q.torch is not None
}


def loss_scale(loss: str, n_out: int) -> float:
    """s, with fastgrad's loss = s × PyTorch's mean-reduced loss on ``n_out`` outputs (K): the ``scale``
    of the loss's registry entry (1 for cross-entropy, K/2 for MSE, K for binary cross-entropy)."""
    return LOSS_REGISTRY[loss].scale(n_out)


def _loss_name(loss) -> str:
    """fastgrad's name of ``loss``: one of :data:`_TORCH_LOSSES`' names, or a torch loss module of
    those kinds with the default options (mean reduction, no weights, no label smoothing)."""
    if isinstance(loss, str):
        if loss not in _TORCH_LOSSES:
            raise ValueError(
                f"loss: expected one of {', '.join(_TORCH_LOSSES)} (the losses with a PyTorch "
                f"counterpart) or a torch loss module of those kinds, got {loss!r}"
            )
        return loss
    for name, kind in _TORCH_LOSSES.items():
        if isinstance(loss, kind):
            if loss.reduction != "mean":
                raise ValueError(
                    f"loss: {type(loss).__name__}(reduction={loss.reduction!r}); expected 'mean'"
                )
            extras = {
                "weight": getattr(loss, "weight", None),
                "pos_weight": getattr(loss, "pos_weight", None),
            }
            for key, value in extras.items():
                if value is not None:
                    raise ValueError(f"loss: {type(loss).__name__} with {key}= is not supported")
            if getattr(loss, "label_smoothing", 0.0):
                raise ValueError("loss: CrossEntropyLoss with label_smoothing is not supported")
            return name
    raise TypeError(
        f"loss: expected a loss name or {', '.join(k.__name__ for k in _TORCH_LOSSES.values())}, "
        f"got {type(loss).__name__}"
    )


@dataclass(frozen=True)
class StepStats:
    """What one :class:`DPGradStep` call computed, in torch's scale.

    Attributes
    ----------
    loss : float
        The batch's mean loss (torch's convention), before clipping; NaN for an empty batch.
    norms : ndarray (B,)
        ‖h_i‖₂: each sample's gradient norm before clipping, in torch's scale (Opacus's
        per-sample gradient norms). The step's buffer: overwritten by the next call.
    clip_fraction : float
        The share of the batch with ‖h_i‖ > C (clipped); 0 for an empty batch.
    batch_size : int
        B (Poisson batches vary).
    """

    loss: float
    norms: np.ndarray
    clip_fraction: float
    batch_size: int


class GradStep:
    """Fill a PyTorch MLP's ``p.grad`` from fastgrad's fused backward pass.

    >>> step = fastgrad.torch.GradStep(model, torch.nn.CrossEntropyLoss())
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> for X, y in loader:
    ...     loss = step(X, y)        # p.grad of every parameter, as loss.backward() leaves it
    ...     opt.step()

    Parameters
    ----------
    model : torch.nn.Sequential
        ``Linear, act, ..., Linear`` as :func:`fastgrad.from_torch` accepts, float32 or float64,
        on the CPU (or on a CUDA device when the ``cuda`` backend runs here). Its parameters are
        made views into one flat tensor :attr:`theta` in place (the same ``Parameter`` objects, so
        an optimizer made before or after keeps working); moving or casting the model afterwards
        (``model.to(...)``, ``.double()``) is refused at the next call.
    loss : str or torch loss module
        ``"cross_entropy"`` / ``CrossEntropyLoss()``, ``"mse"`` / ``MSELoss()`` or
        ``"binary_cross_entropy"`` / ``BCEWithLogitsLoss()``, mean-reduced, without weights.
    backend : str
        fastgrad's backend for CPU models (``"auto"``: numba where it runs, else numpy). A CUDA
        model uses the ``cuda`` backend.

    Attributes
    ----------
    net : fastgrad.MLP
    theta : torch.Tensor (P,)
        The parameters, flat: every ``Linear``'s weight and bias is a view of it.
    grad : torch.Tensor (P,)
        The gradient, flat, in torch's scale: every ``p.grad`` is a view of it.
    scale : float
        s, fastgrad's loss / torch's.
    """

    def __init__(self, model, loss="cross_entropy", *, backend: str = "auto"):
        name = _loss_name(loss)
        self.net, theta = from_torch(model, loss=name)
        self.scale = loss_scale(name, self.net.n_out)
        self._inv_scale = 1.0 / self.scale
        linears = [m for m in model if isinstance(m, torch.nn.Linear)]
        first = linears[0].weight
        self.device = first.device
        if any(p.device != self.device for p in model.parameters()):
            raise ValueError("model: parameters on more than one device")
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            if backend not in ("auto", "cuda"):
                raise ValueError(f"backend: a CUDA model needs backend 'cuda' (or 'auto'), got {backend!r}")
            self.backend = resolve_backend("cuda")
        else:
            self.backend = resolve_backend(backend, host=True)  # "auto": numba, else numpy
        P = self.net.num_params
        self._theta_np = None if self._cuda else theta
        self._step = None if self._cuda else self._make_step()
        with torch.no_grad():
            self.theta = torch.from_numpy(theta).to(self.device)
            if self._cuda:
                self.grad = torch.zeros(P, dtype=self.theta.dtype, device=self.device)
            else:  # the step's own gradient buffer: its kernels write every p.grad, nothing is copied
                self.grad = torch.from_numpy(self._step.grad_buffer)
                self.grad.zero_()
        self._params: list[tuple] = []  # (parameter, its view of theta's address, its grad view)
        for lin, spec in zip(linears, self.net.layers):
            for p, start, stop, shape in (
                (lin.weight, spec.w_start, spec.b_start, (spec.n_out, spec.n_in)),
                (lin.bias, spec.b_start, spec.end, (spec.n_out,)),
            ):
                p.data = self.theta[start:stop].view(shape)
                g = self.grad[start:stop].view(shape)
                p.grad = g
                self._params.append((p, p.data_ptr(), g))
        self._grad_np = None if self._cuda else self._step.grad_buffer

    def _make_step(self):
        return Step(self.net, self._theta_np.dtype, compute=("loss", "grad"), backend=self.backend)

    # -------------------------------------------------------------- per call

    def _check_params(self) -> None:
        for p, ptr, g in self._params:
            if p.data_ptr() != ptr:
                raise RuntimeError(
                    "model: a parameter no longer lies in the step's flat theta (the model was moved, "
                    "cast or given new parameters after the GradStep was made); make a new GradStep"
                )
            if p.grad is not g:  # optimizer.zero_grad() sets p.grad to None
                p.grad = g

    def _host(self, name: str, a):
        """A CPU tensor's NumPy view (detached), or ``a`` as it is when not a tensor."""
        if isinstance(a, torch.Tensor):
            if not a.is_cpu:
                raise TypeError(f"{name}: a {a.device.type} tensor, but the model is on the CPU")
            return a.detach().numpy() if a.requires_grad else a.numpy()
        return a

    def __call__(self, X, y) -> float:
        """One step: every ``p.grad`` of the model for the batch (X, y); returns the loss.

        Parameters
        ----------
        X : torch.Tensor or ndarray (B, n0)
            Inputs (any real dtype, converted to the model's; any strides).
        y : torch.Tensor or ndarray
            Class labels (B,) of any integer dtype for cross-entropy; targets (B, K) otherwise.

        Returns
        -------
        float
            The batch's mean loss in the torch loss's convention.

        Raises
        ------
        TypeError, ValueError
            For bad input, naming the argument, before any kernel runs.
        RuntimeError
            When the model's parameters no longer lie in :attr:`theta`.
        """
        self._check_params()
        if self._cuda:
            return self._call_cuda(X, y)
        res = self._step(self._theta_np, self._host("X", X), self._host("y", y))  # res.grad is p.grad's
        if self.scale != 1.0:
            np.multiply(res.grad, self._inv_scale, out=res.grad)
        return res.loss * self._inv_scale

    def closure(self, X, y) -> BatchClosure:
        """A closure for ``optimizer.step(closure)``: calling it is ``self(X, y)`` (every ``p.grad``; it
        returns what the call returns: the loss, or a :class:`DPGradStep`'s :class:`StepStats`), so it
        works with any ``torch.optim`` optimizer.

        >>> loss = opt.step(step.closure(X, y))   # the same as: loss = step(X, y); opt.step()

        With :class:`fastgrad.torch.SGD` over this step's model (CPU) the update is made in the pass
        that makes the gradient, block by block, while the gradient's block is still in the core's
        cache: the kernels' last pass (numba backend; a :class:`DPGradStep`'s noised step is made there
        too), or for a :class:`DPGradStep` on the numpy backend the pass that draws the noise (a batch of
        at least one sample). The parameters, momentum buffers, ``p.grad`` and the return value are those
        of the two calls, bit for bit; the optimizer's step hooks and learning-rate schedulers see an
        ordinary ``opt.step``.
        """
        return BatchClosure(self, X, y)

    def _call_updating(self, X, y, update: tuple) -> float:
        """``self(X, y)`` whose kernels also make the SGD ``update`` on θ (see :meth:`closure`)."""
        res = self._step._call_updating(self._theta_np, self._host("X", X), self._host("y", y), update)
        return res.loss * self._inv_scale

    def _call_cuda(self, X, y) -> float:
        X, y = torch.as_tensor(X, device=self.device), torch.as_tensor(y, device=self.device)
        res = backprop(self.net, self.theta, X, y, compute=("loss", "grad"), backend="cuda")
        with torch.no_grad():
            self.grad.copy_(torch.as_tensor(res.grad, device=self.device)).mul_(self._inv_scale)
        return res.loss * self._inv_scale


@dataclass(frozen=True)
class BatchClosure:
    """``step.closure(X, y)`` (:meth:`GradStep.closure`): calling it returns ``step(X, y)``."""

    step: GradStep
    X: object
    y: object

    def __call__(self):
        return self.step(self.X, self.y)


class DPGradStep(GradStep):
    """DP-SGD for a PyTorch MLP: clipped, noised ``p.grad`` from one fused pass, Poisson batches,
    and the privacy spent.

    >>> dp = fastgrad.torch.DPGradStep(model, "cross_entropy", num_samples=len(X),
    ...                                expected_batch_size=256, max_norm=1.0,
    ...                                target_epsilon=3.0, delta=1e-5, epochs=20, seed=0)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
    >>> for epoch in range(20):
    ...     for Xb, yb in dp.loader(X, y):      # Poisson: each sample with probability q
    ...         stats = dp(Xb, yb)
    ...         opt.step()
    ...     print(dp.epsilon())

    Each call sets ``p.grad`` to Opacus's ``DPOptimizer`` gradient in torch's scale:
    (1/E) [Σ_i min(1, C/‖h_i‖) h_i + σ C ξ] with h_i the per-sample gradient of torch's loss,
    E the expected batch size, ξ ~ N(0, I). (Opacus clips with C/(‖h_i‖ + 1e-6): a relative
    difference below 1e-6/C.)

    Parameters
    ----------
    model, loss, backend
        As for :class:`GradStep` (CPU models only).
    num_samples : int
        N, the dataset size.
    expected_batch_size : float
        E = q·N: the sampling rate is q = E/N, an epoch is N // E steps (as ``fastgrad train``),
        and the clipped sum is divided by E.
    max_norm : float
        C > 0, the per-sample clipping norm in torch's scale (Opacus's ``max_grad_norm``).
    noise_multiplier : float, optional
        σ ≥ 0. Either this or ``target_epsilon`` (with ``delta`` and ``epochs``).
    target_epsilon : float, optional
        ε for the whole run of ``epochs`` epochs: σ is calibrated with
        :func:`fastgrad.privacy.calibrate_noise_multiplier` (needs the ``dp`` extra).
    delta : float, optional
        δ for ``target_epsilon`` and :meth:`epsilon` (default: the largest power of ten below 1/N).
    epochs : int, optional
        The run's length, for ``target_epsilon``.
    accountant : {"rdp", "pld"}
    seed : int, optional
        Seeds the Poisson sampling and the noise (reproducible steps); ``None``: fresh entropy.

    Attributes
    ----------
    noise_multiplier : float
        σ.
    sampling_rate : float
        q.
    steps : int
        Noised steps taken so far (what :meth:`epsilon` counts; a call that raised is not one).
    """

    def __init__(
        self,
        model,
        loss="cross_entropy",
        *,
        num_samples: int,
        expected_batch_size: float,
        max_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
        epochs: int | None = None,
        accountant: str = "rdp",
        seed: int | None = None,
        backend: str = "auto",
    ):
        from ._validation import check_max_norm, check_noise_multiplier, check_positive

        self.max_norm = check_max_norm(max_norm)
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
            raise TypeError(f"num_samples: expected a positive integer, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples: expected a positive integer, got {num_samples}")
        self.num_samples = int(num_samples)
        self.expected_batch_size = check_positive("expected_batch_size", expected_batch_size)
        if self.expected_batch_size > self.num_samples:
            raise ValueError(
                f"expected_batch_size: {self.expected_batch_size:g} exceeds num_samples = {self.num_samples}"
            )
        self.sampling_rate = self.expected_batch_size / self.num_samples
        self.steps_per_epoch = max(1, self.num_samples // math.ceil(self.expected_batch_size))
        # by default the power of ten below 1/N (δ < 1/N, the usual rule)
        self.delta = (
            10.0 ** -(math.floor(math.log10(self.num_samples)) + 1) if delta is None else float(delta)
        )
        self.accountant = accountant
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("noise_multiplier, target_epsilon: give exactly one of the two")
        if target_epsilon is not None:
            if epochs is None:
                raise ValueError("epochs: needed with target_epsilon (the run's length sets σ)")
            noise_multiplier = privacy.calibrate_noise_multiplier(
                target_epsilon, self.delta, self.sampling_rate, epochs * self.steps_per_epoch, accountant
            )
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        privacy.check_seed(seed)
        root = np.random.SeedSequence(seed)
        self._sampling_seed, self._noise_seed, self._empty_seed = root.spawn(3)
        self.steps = 0
        super().__init__(model, loss, backend=backend)
        if self._cuda:
            raise NotImplementedError("model: DPGradStep runs CPU models only; move the model to the CPU")
        self._empty_norms = np.zeros(0, self._theta_np.dtype)

    def _make_step(self):
        return Step(
            self.net,
            self._theta_np.dtype,
            backend=self.backend,
            max_norm=self.scale * self.max_norm,  # torch's C in fastgrad's loss scale
            noise_multiplier=self.noise_multiplier,
            seed=self._noise_seed,
            expected_batch_size=self.expected_batch_size,
        )

    def batches(self, epochs: int = 1):
        """Poisson batches for ``epochs`` epochs: an iterator of sorted index arrays (int64), each
        sample taken with probability q; a batch may be empty (call the step with it anyway: the
        step is then noise alone)."""
        return privacy.poisson_batches(
            self.num_samples,
            self.sampling_rate,
            epochs * self.steps_per_epoch,
            seed=self._sampling_seed.spawn(1)[0],
        )

    def loader(self, X, y, epochs: int = 1):
        """Poisson batches of the data for ``epochs`` epochs: an iterator of ``(X[idx], y[idx])`` for the
        index arrays ``idx`` that :meth:`batches` would give (the same draws: each call continues with new
        batches), each gathered in one call: ``torch.index_select`` for tensors, ``ndarray.take`` for
        arrays (torch's ``X[idx]`` with an index array takes about 3× as long, docs/benchmarks.md).

        >>> for Xb, yb in dp.loader(X, y, epochs=20):
        ...     opt.step(dp.closure(Xb, yb))

        Parameters
        ----------
        X, y : torch.Tensor or ndarray
            The whole dataset: ``num_samples`` rows each (samples along the first axis).
        epochs : int
            As for :meth:`batches`.

        Returns
        -------
        iterator of (X_batch, y_batch)
            Of X's and y's types; the arguments are checked at the call.
        """
        data = []
        for name, a in (("X", X), ("y", y)):
            if not isinstance(a, (torch.Tensor, np.ndarray)):
                raise TypeError(f"{name}: expected a torch.Tensor or an ndarray, got {type(a).__name__}")
            if a.ndim == 0 or a.shape[0] != self.num_samples:
                raise ValueError(
                    f"{name}: expected {self.num_samples} samples (num_samples) along the first axis, "
                    f"got shape {tuple(a.shape)}"
                )
            data.append(a)
        return self._gathered(data, self.batches(epochs))

    @staticmethod
    def _gathered(data: list, batches):
        for idx in batches:
            yield tuple(
                torch.index_select(a, 0, torch.from_numpy(idx).to(a.device))
                if isinstance(a, torch.Tensor)
                else a.take(idx, axis=0)
                for a in data
            )

    def __call__(self, X, y) -> StepStats:
        """One DP-SGD step on the batch (X, y): every ``p.grad``; returns the step's statistics.

        Parameters
        ----------
        X, y
            As for :meth:`GradStep.__call__`; the batch may be empty (B = 0).

        Returns
        -------
        StepStats
        """
        self._check_params()
        X, y = self._host("X", X), self._host("y", y)
        if len(X) == 0:  # Poisson sampling took no one: the step is the noise alone
            self.steps += 1
            privacy.dp_step(
                np.zeros_like(self._grad_np),
                self._empty_norms,
                self.max_norm,
                self.noise_multiplier,
                self.expected_batch_size,
                self._empty_seed.spawn(1)[0],
                out=self._grad_np,
            )
            return StepStats(math.nan, self._empty_norms, 0.0, 0)
        res = self._step(self._theta_np, X, y)  # res.grad is p.grad's buffer
        self.steps += 1  # a refused call (it raised) released nothing, so it does not count
        if self.scale != 1.0:
            np.multiply(res.grad, self._inv_scale, out=res.grad)
        return self._stats(res)

    def _call_updating(self, X, y, update: tuple) -> StepStats:
        """``self(X, y)`` on a batch of at least one sample, whose noise pass also makes the SGD ``update``
        on θ, the gradient first multiplied by 1/s (the pack's scale; see :meth:`GradStep.closure`)."""
        X, y = self._host("X", X), self._host("y", y)
        res = self._step._call_updating(self._theta_np, X, y, update)
        self.steps += 1
        return self._stats(res)

    def _stats(self, res) -> StepStats:
        """The step's statistics in torch's scale from the step's result (its gradient scaled already)."""
        inv = self._inv_scale
        norms = res.norms if self.scale == 1.0 else res.norms * inv
        return StepStats(res.loss * inv, norms, res.clip_fraction, len(norms))

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far (after :attr:`steps` steps) at ``delta`` (default: the step's δ)."""
        return privacy.epsilon(
            self.noise_multiplier,
            self.sampling_rate,
            self.steps,
            self.delta if delta is None else delta,
            self.accountant,
        )


@functools.cache
def _torch_fuses_alpha_add(dtype: np.dtype) -> bool:
    """Whether torch's CPU ``y.add(x, alpha=a)`` rounds a·x + y once (a fused multiply-add, as its
    vectorised kernels do) rather than twice (its plain build, ``ATEN_CPU_CAPABILITY=default``):
    asked once per dtype, on 4,099 values (a vectorised body and a scalar tail), where the two
    roundings differ in about one value in ten."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 4099)).astype(dtype)
    alpha = dtype.type(0.1)
    got = torch.from_numpy(y).add(torch.from_numpy(x), alpha=0.1).numpy()
    return not np.array_equal(got, alpha * x + y)


# where this torch keeps the global step hooks and says whether its profiler runs (not found: True and
# None, so that every step goes through torch's wrapper)
_GLOBAL_PRE_HOOKS, _GLOBAL_POST_HOOKS = (
    getattr(_torch_optimizer, name, True)
    for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
)
_PROFILER_ENABLED = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)


def _step_hooks_or_profiler(opt) -> bool:
    """Whether ``opt.step`` must go through torch's wrapper: a step hook (global or the optimizer's) or
    a running profiler (any kind); also when this torch keeps them where we do not look."""
    return bool(
        _PROFILER_ENABLED is None
        or _PROFILER_ENABLED()
        or _GLOBAL_PRE_HOOKS
        or _GLOBAL_POST_HOOKS
        or getattr(opt, "_optimizer_step_pre_hooks", True)
        or getattr(opt, "_optimizer_step_post_hooks", True)
    )


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` for a :class:`GradStep`'s model, its update one compiled pass over the flat θ.

    >>> step = fastgrad.torch.GradStep(model, torch.nn.CrossEntropyLoss())
    >>> opt = fastgrad.torch.SGD(step, lr=0.1, momentum=0.9)
    >>> for X, y in loader:
    ...     loss = step(X, y)
    ...     opt.step()

    The same optimizer as ``torch.optim.SGD(model.parameters(), ...)``, giving the same parameters
    and momentum buffers bit for bit: it *is* one (a subclass), so learning-rate schedulers,
    ``state_dict`` / ``load_state_dict`` (in either direction with ``torch.optim.SGD``), hooks and
    ``zero_grad`` work as they do there. Its :meth:`step` runs the update of every parameter in
    one pass over θ, the gradient and one flat momentum buffer, on Numba's threads
    (:func:`fastgrad.update.sgd_update`), in place of torch's per-tensor passes on torch's
    threads; the momentum buffers in :attr:`state` are views of the flat one. Its multiply-adds are
    rounded once or twice as torch's are in this process (fused in torch's vectorised CPU builds,
    not in its plain one: asked once per dtype).

    It falls back to ``torch.optim.SGD.step`` (the same result, at torch's speed) when the fused
    pass cannot run: a CUDA model, Numba missing, parameter groups other than the one it was made
    with, a parameter no longer in the step's θ, or a ``p.grad`` that is not the step's view.

    Parameters
    ----------
    step : GradStep or DPGradStep
        Whose model's parameters to optimise (all of them, in one group).
    lr, momentum, dampening, weight_decay, nesterov, maximize
        As for ``torch.optim.SGD`` (checked by it).
    """

    def __init__(self, step: GradStep, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False):  # fmt: skip
        if not isinstance(step, GradStep):
            raise TypeError(
                f"step: expected a fastgrad.torch.GradStep (or DPGradStep), got {type(step).__name__}; "
                "for other parameters use torch.optim.SGD"
            )
        params = [p for p, _, _ in step._params]
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize)  # fmt: skip
        self._grad_step = step
        self.fused_steps = 0
        """Steps the compiled pass made (the others fell back to ``torch.optim.SGD.step``)."""
        self._params = step._params  # (parameter, its address in θ, its grad view)
        spans = [
            span
            for spec in step.net.layers
            for span in ((spec.w_start, spec.b_start), (spec.b_start, spec.end))
        ]
        # each parameter's [start, stop) in θ and whether it has no momentum buffer yet (Update's segments)
        self._segments = np.array([(a, b, 0) for a, b in spans], np.int64).reshape(-1, 3)
        self._update = None  # the compiled pass; None: torch's update (a CUDA model, or no Numba)
        if step._cuda:
            return
        try:
            from . import update
        except ImportError:
            return
        self._update = update
        dt = step._theta_np.dtype
        self._coef = np.ones(5, dt)  # Update's coef and modes, refilled when the group's options change
        self._options = None
        self._modes = np.zeros(4, np.int64)
        self._modes[update.FUSED] = _torch_fuses_alpha_add(dt)
        self._flat_buf = np.zeros(step.net.num_params, dt)
        flat = torch.from_numpy(self._flat_buf)
        # each parameter's momentum buffer: a view of the flat one
        self._buf_views = [
            flat[start:stop].view(p.shape) for (p, _, _), (start, stop) in zip(self._params, spans)
        ]

    def step(self, closure=None):
        """One update of every parameter with a gradient, as ``torch.optim.SGD.step``; returns the
        closure's loss (``None`` without a closure). With ``closure = step.closure(X, y)`` of this
        optimizer's :class:`GradStep`, the gradient and the update are one compiled call
        (:meth:`GradStep.closure`).

        The optimizer's step hooks (global and its own) and the profiler's record of the step run as
        torch runs them (``Optimizer.profile_hook_step``), but only when there are hooks or a profiler:
        torch's wrapper costs 20-40 µs a step without either (its ``record_function``), a tenth of a
        whole step on small networks (docs/benchmarks.md)."""
        if _step_hooks_or_profiler(self):
            return _hooked_step(self, closure)
        return self._step(closure)

    step.hooked = True  # torch's Optimizer wraps a step without this mark in its profiler and hooks

    def _step(self, closure=None):
        if isinstance(closure, BatchClosure) and closure.step is self._grad_step:
            loss = self._update_in_kernels(closure)
            if loss is not None:
                return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._fused_update():
            super().step()
        return loss

    def _update_in_kernels(self, closure: BatchClosure):
        """``closure()`` with the update made in its last pass (the kernels', or a DP step's noise pass);
        ``None`` (nothing done) where that cannot stand for the closure and torch's step: a CUDA model, a
        plain step on a backend other than numba, a DP step on an empty batch, or what
        :meth:`_update_pack` refuses."""
        grad_step = self._grad_step
        prepared = grad_step._step
        if prepared is None:
            return None
        if isinstance(grad_step, DPGradStep):
            if len(closure.X) == 0:
                return None
        elif prepared.backend != "numba":
            return None
        grad_step._check_params()  # every p.grad the step's view, as the call leaves them
        made = self._update_pack(grad_step._inv_scale)
        if made is None:
            return None
        pack, updated = made
        loss = grad_step._call_updating(closure.X, closure.y, pack)
        self._updated(updated)
        return loss

    def _fused_update(self) -> bool:
        """Run the compiled update if it can stand for torch's here; False (nothing done) if not."""
        made = self._update_pack(1.0)
        if made is None:
            return False
        pack, updated = made
        if updated[0]:  # some parameter has a gradient
            grad_step = self._grad_step
            self._update.sgd_update(grad_step._theta_np, grad_step._grad_np, pack)
            self._updated(updated)
        return True

    def _update_pack(self, scale: float) -> tuple[tuple, tuple[list, list]] | None:
        """The :class:`fastgrad.update.Update` pack (a plain tuple) of torch's step for the parameters
        with a gradient now, the gradient first multiplied by ``scale``, and their indices in ``_params``;
        ``None`` when the compiled update cannot stand for torch's: no Numba or a CUDA model, parameter
        groups other than the one it was made with, a parameter no longer in the step's θ, or a ``p.grad``
        that is not the step's view. A momentum buffer given by ``load_state_dict`` is copied in; the
        states whose buffer is to be the flat one's view after the update are listed with them."""
        if self._update is None or len(self.param_groups) != 1:
            return None
        group = self.param_groups[0]
        if len(group["params"]) != len(self._params) or group.get("differentiable") or group.get("fused"):
            return None
        momentum = group["momentum"]
        u, segments, state = self._update, self._segments, self.state
        active, to_point = [], []
        for i, ((p, ptr, g), q) in enumerate(zip(self._params, group["params"])):
            if q is not p or p.data_ptr() != ptr:
                return None
            grad = p.grad
            if grad is None:
                continue  # torch skips it
            if grad is not g:
                return None
            if momentum != 0:
                param_state = state[p]
                mb = param_state.get("momentum_buffer")
                view = self._buf_views[i]
                segments[i, u.FRESH] = mb is None
                if mb is not view:  # new, or from load_state_dict (copied in): the view after the update
                    if mb is not None:
                        with torch.no_grad():
                            view.copy_(mb)
                    to_point.append((param_state, view))
            active.append(i)
        # as floats: a tensor lr that a scheduler fills in place would compare equal to itself
        lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
        dampening, nesterov, maximize = group["dampening"], group["nesterov"], group["maximize"]
        options = (lr, momentum, dampening, weight_decay, scale, nesterov, maximize)
        if options != self._options:  # a scheduler's new lr, ...: coef and modes refilled
            coef, modes = self._coef, self._modes
            coef[u.LR] = lr  # torch casts its Python floats to θ's dtype so
            coef[u.MOMENTUM] = momentum
            coef[u.KEEP] = 1.0 - dampening  # torch: alpha = 1 - dampening
            coef[u.WEIGHT_DECAY] = weight_decay
            coef[u.SCALE] = scale
            modes[u.NESTEROV] = bool(nesterov)
            modes[u.MAXIMIZE] = bool(maximize)
            self._options = options
        if len(active) != len(segments):
            segments = segments[active]
        return (self._flat_buf, segments, self._coef, self._modes), (active, to_point)

    def _updated(self, updated: tuple[list, list]) -> None:
        """After a compiled update of :meth:`_update_pack`'s parameters: what torch's update leaves."""
        active, to_point = updated
        # autograd then refuses a graph that saved the old values
        increment_version([self._params[i][0] for i in active])
        for param_state, view in to_point:  # the momentum buffers: views of the flat one
            param_state["momentum_buffer"] = view
        self.fused_steps += 1


_hooked_step = torch.optim.Optimizer.profile_hook_step(SGD._step)
"""``SGD._step`` in torch's wrapper: the pre-hooks, the step in a ``record_function``, the post-hooks."""

__all__ = ["SGD", "BatchClosure", "DPGradStep", "GradStep", "StepStats", "loss_scale"]

"""Public entry points and backend dispatch.

Every backend computes the same raw quantities from validated inputs (loss, grad,
per_sample, norms, layer_norms, sq_mean, and the clipped *sum* for DP-SGD); the
derived ones (variance, noise scale, the noised clipped mean) are finished here,
once, so the backends cannot disagree about them.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, make_dataclass

import numpy as np

from ._validation import (
    Inputs,
    PerSampleMemoryError,
    available_memory,
    check_compute,
    check_inputs,
    check_max_norm,
    check_noise_multiplier,
    check_out,
    check_per_sample_fits,
    check_positive,
)
from .mlp import MLP
from .privacy import check_seed, dp_step
from .quantities import HOST, QUANTITIES, REGISTRY, finish, needed


def _result_doc() -> str:
    lines = [
        "What :func:`backprop` computed; a quantity not requested is ``None``.",
        "",
        "One field per name of :data:`fastgrad.QUANTITIES`, read from the registry",
        "(:mod:`fastgrad.quantities`).",
        "",
        "Attributes",
        "----------",
    ]
    for name in QUANTITIES:
        q = REGISTRY[name]
        kind = "float" if q.shape == "scalar" else f"ndarray {q.shape}"
        lines += [f"{name} : {kind}", f"    {q.doc}"]
    return "\n".join(lines) + "\n"


def _result_repr(self) -> str:
    parts = []
    for f in fields(self):
        v = getattr(self, f.name)
        if v is None:
            continue
        parts.append(f"{f.name}={v:.6g}" if np.ndim(v) == 0 else f"{f.name}=<{v.dtype} {v.shape}>")
    return f"BackpropResult({', '.join(parts)})"


BackpropResult = make_dataclass(
    "BackpropResult",
    [
        (name, "float | None" if REGISTRY[name].shape == "scalar" else "np.ndarray | None", None)
        for name in QUANTITIES
    ],
    namespace={"__repr__": _result_repr, "__doc__": _result_doc()},
)
BackpropResult.__module__ = __name__


# ------------------------------------------------------------------- backends

# name -> "module:function" running validated host inputs, signature
#   run(net, inputs, need, max_norm, out) -> dict of raw quantities
_BACKENDS: dict[str, str] = {
    "naive": "fastgrad.reference:run_naive",
    "numpy": "fastgrad.reference:run_batched",
    "numba": "fastgrad.cpu:run",
    "cuda": "fastgrad.cuda:run",
}


BACKENDS: tuple[str, ...] = tuple(_BACKENDS)
"""Every backend name, whether or not it can run here."""

BACKEND_PREFERENCE: tuple[str, ...] = ("cuda", "numba", "numpy")
"""The order in which ``resolve_backend("auto")`` picks a backend: fastest first."""

HOST_PREFERENCE: tuple[str, ...] = ("numba", "numpy")
"""The order in which ``backend="auto"`` of :func:`backprop`, :func:`clipped_grad` and
:class:`fastgrad.Step` picks a backend for host (NumPy) arrays. The CUDA backend is not picked for
them: it would copy θ, X and y to the GPU and the results back on every call, and change the
arithmetic (other kernels, other bits) without being asked; GPU arrays go to it."""


def available_backends() -> list[str]:
    """Names of the backends that can run here (the CUDA one only with a GPU)."""
    names = []
    for name in _BACKENDS:
        try:
            _backend(name)
        except (ImportError, RuntimeError, ValueError):
            continue
        names.append(name)
    return names


def resolve_backend(name: str, host: bool = False) -> str:
    """Check that backend ``name`` can run here and return it; ``"auto"`` picks the fastest
    that can (cuda, else numba, else numpy), or with ``host`` the fastest for host arrays
    (numba, else numpy: :data:`HOST_PREFERENCE`).

    Raises
    ------
    ValueError
        For an unknown name.
    RuntimeError, ImportError
        Saying why a known backend cannot run here (no GPU, a missing extra).
    """
    if name == "auto":
        if host:
            return _best_host()
        avail = available_backends()
        return next((b for b in BACKEND_PREFERENCE if b in avail), "numpy")
    _backend(name)
    return name


@functools.cache
def _best_host() -> str:
    """The first of :data:`HOST_PREFERENCE` that runs here (asked once per process)."""
    for name in HOST_PREFERENCE[:-1]:
        try:
            _backend(name)
        except (ImportError, RuntimeError, ValueError):
            continue
        return name
    return HOST_PREFERENCE[-1]


def _auto(backend: str, *arrays) -> str:
    """``backend``, with ``"auto"`` resolved for these arrays: ``"cuda"`` when any is a GPU array,
    else the fastest host backend."""
    if backend != "auto":
        return backend
    if any(hasattr(a, "__cuda_array_interface__") for a in arrays):
        return "cuda"
    return _best_host()


def run_backend(
    name: str,
    net: MLP,
    inputs: Inputs,
    need: frozenset[str],
    max_norm: float | None = None,
    out=None,
    **options,
) -> dict:
    """The raw quantities ``need`` (names of :data:`fastgrad.quantities.RAW`) from backend ``name``.

    For tools that check the backends themselves (``fastgrad validate``); everyone else
    wants :func:`backprop`. ``inputs`` come from :func:`check_inputs`; the result is a dict
    of host arrays, with ``clipped_sum`` too when ``max_norm`` is given. ``options`` go to
    the backend as they are (the CUDA backend takes ``path="fused"`` or ``"tiled"``).
    """
    return _backend(name)(net, inputs, need, max_norm, out, **options)


def _backend(name: str) -> Callable:
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"backend: unknown name {name!r}; expected one of {', '.join(_BACKENDS)}")
    module_name, func = _BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValueError(f"backend: {name!r} is not implemented in this version of fastgrad") from None
        raise
    checker = getattr(module, "check_available", None)
    if checker is not None:
        checker()
    return getattr(module, func)


def _on_device(backend: str, *arrays) -> bool:
    """True when any input is a GPU array (``__cuda_array_interface__``: numba, CuPy, PyTorch CUDA).

    Those skip the host checks; only backend ``"cuda"`` takes them, validates them on
    the device and returns device arrays.
    """
    if not any(hasattr(a, "__cuda_array_interface__") for a in arrays):
        return False
    if backend != "cuda":
        raise TypeError(f"backend: {backend!r} takes host (NumPy) arrays; GPU arrays need backend='cuda'")
    return True


def _backend_module(name: str):
    return importlib.import_module(_BACKENDS[name].split(":")[0])


def backprop(
    net: MLP,
    theta: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    compute: Sequence[str] = ("grad",),
    backend: str = "auto",
    *,
    out: np.ndarray | None = None,
    workspace=None,
) -> BackpropResult:
    """Per-sample backpropagation: any combination of quantities from one pass.

    Parameters
    ----------
    net : MLP
        The network spec.
    theta : ndarray (P,), float32 or float64
        Flat parameters (layout: :class:`fastgrad.MLP`). Results come back in its dtype.
    X : ndarray (B, n0)
        Inputs, one sample per row; converted to θ's dtype.
    y : ndarray
        Integer labels (B,) in [0, n_L) for ``cross_entropy``; float targets
        (B, n_L) for ``mse``, ``binary_cross_entropy`` (in [0, 1]) and ``linear``
        ((B,) is accepted when n_L = 1).
    compute : sequence of str
        Any of :data:`fastgrad.QUANTITIES` (each one's shape and meaning: the fields of
        :class:`BackpropResult`).
    backend : str
        ``"auto"`` (the default: ``"cuda"`` for GPU arrays, else ``"numba"`` where Numba is
        installed, else ``"numpy"``; see :data:`HOST_PREFERENCE`), ``"naive"`` (the per-sample
        loop, the definition), ``"numpy"`` (batched GEMMs), ``"numba"`` (CPU kernels; the first
        call per dtype compiles them, about 20 s, once: they are cached on disk), ``"cuda"`` (GPU
        kernels).
    out : ndarray (B, P), optional
        Receives ``per_sample`` (e.g. an ``np.memmap`` for batches that do not fit in RAM; every
        host backend writes it in chunks of bounded size). Native byte order, C-contiguous,
        writeable, sharing no memory with θ, X or y.
    workspace : fastgrad.cpu.Workspace, optional
        ``backend="numba"`` only: scratch buffers reused across calls, so a training
        loop allocates nothing of size B × widths per step (by default each Python
        thread keeps one). The numba backend may be called from several Python
        threads at once; give each its own workspace.

    Returns
    -------
    BackpropResult

    Raises
    ------
    TypeError, ValueError
        For bad input, naming the argument, before any kernel runs.
    PerSampleMemoryError
        (a ``MemoryError`` and a ``ValueError``) when ``per_sample`` is asked for without ``out=``
        and its B × P matrix would not fit in the available memory, before any work.
    """
    want = check_compute(compute)
    backend = _auto(backend, theta, X, y, out)
    run = _backend(backend)
    if out is not None and "per_sample" not in want:
        raise ValueError("out: given, but 'per_sample' is not in compute")
    if _on_device(backend, theta, X, y, out):  # validated on the GPU, results stay there
        module = _backend_module(backend)
        raw = module.backprop_device(net, theta, X, y, needed(want), out)
        batch_size, xp = X.shape[0], module.ARRAYS
    else:
        inp = check_inputs(net, theta, X, y)
        out = check_out(out, (inp.batch_size, net.num_params), inp.dtype, {"theta": theta, "X": X, "y": y})
        if "per_sample" in needed(want) and out is None:  # asked for, or read by a derived quantity
            check_per_sample_fits(inp.batch_size, net.num_params, inp.dtype)
        raw = run(net, inp, needed(want), None, out, **_workspace_kw(backend, workspace))
        batch_size, xp = inp.batch_size, HOST
    values = finish(want - {"loss"}, raw, batch_size, xp)
    return BackpropResult(loss=float(raw["loss"]), **values)


def _workspace_kw(backend: str, workspace) -> dict:
    """``{"workspace": workspace}`` for the numba backend; checks its type."""
    if workspace is None:
        return {}
    if backend != "numba":
        raise ValueError(f"workspace: only the 'numba' backend takes one, got backend={backend!r}")
    from .cpu import Workspace

    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace: expected a fastgrad.cpu.Workspace, got {type(workspace).__name__}")
    return {"workspace": workspace}


@dataclass(frozen=True)
class ClippedGrad:
    """What :func:`clipped_grad` computed, with ``return_stats=True``: the step and what the same
    pass knew on the way (no second pass).

    Attributes
    ----------
    grad : ndarray (P,)
        The clipped, noised mean gradient: (1/D) [Σ_i c_i ∇ℓ_i + σ C ξ].
    norms : ndarray (B,)
        ‖∇ℓ_i‖₂ before clipping (the norms ``backprop(compute=("norms",))`` gives).
    clip_fraction : float
        Share of the batch that was clipped: samples with ‖∇ℓ_i‖ > C (clip factor < 1).
    noise_std : float
        σ C, the standard deviation of the noise added to the clipped *sum* (Opacus's ``std``);
        the noise in ``grad`` has standard deviation ``noise_std / denominator``. 0 without noise.
    denominator : float
        D: the batch size B, or ``expected_batch_size``.
    loss : float or None
        (1/B) Σ ℓ_i, the batch's mean loss, from the same forward pass (``None`` where a caller
        that builds a ``ClippedGrad`` itself has none).
    """

    grad: np.ndarray
    norms: np.ndarray
    clip_fraction: float
    noise_std: float
    denominator: float
    loss: float | None = None

    @property
    def batch_size(self) -> int:
        """B, the number of samples in the batch."""
        return int(self.norms.shape[0])

    def __repr__(self) -> str:
        return (
            f"ClippedGrad(grad=<{self.grad.dtype} {self.grad.shape}>, B={self.batch_size}, "
            f"clip_fraction={self.clip_fraction:.4g}, noise_std={self.noise_std:.4g}, "
            f"denominator={self.denominator:g})"
        )


def clipped_grad(
    net: MLP,
    theta: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    max_norm: float,
    noise_multiplier: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
    *,
    workspace=None,
    expected_batch_size: float | None = None,
    secure_noise: bool = False,
    return_stats: bool = False,
) -> np.ndarray | ClippedGrad:
    """DP-SGD's clipped (and optionally noised) mean gradient, from one backward pass.

    (1/D) [Σ_i min(1, C/‖∇ℓ_i‖) ∇ℓ_i + σ C ξ],  ξ ~ N(0, I),  D = B or the expected batch size.

    Parameters
    ----------
    net, theta, X, y, backend, workspace
        As for :func:`backprop`.
    max_norm : float
        C > 0, the per-sample clipping norm (in fastgrad's loss scale: docs/dp.md gives
        the factor from a PyTorch/Opacus C).
    noise_multiplier : float
        σ ≥ 0. With σ = 0 no noise is drawn.
    seed : int, sequence of int, numpy SeedSequence or Generator, or None
        Seed of the Gaussian noise (:func:`fastgrad.privacy.standard_normal`); the same seed
        gives the same noise on every backend. ``None`` draws fresh noise. Checked before any work.
    expected_batch_size : float, optional
        The denominator D. By default the actual batch size B; with Poisson sampling
        (:func:`fastgrad.privacy.poisson_batches`) pass q·N, as Opacus's DPOptimizer does.
    secure_noise : bool
        Draw ξ from the operating system's CSPRNG, with Opacus's ``secure_mode`` defence
        against floating-point attacks (:func:`fastgrad.privacy.standard_normal`); ``seed``
        must then be ``None``. 4× the random bits of one draw, all from the kernel: 16–51× the
        time of NumPy's PCG64 draw where measured, which is ~3× the default draw's (docs/dp.md).
    return_stats : bool
        Return a :class:`ClippedGrad` (the step, the per-sample norms, the fraction clipped,
        the noise's standard deviation) rather than the step alone.

    Returns
    -------
    ndarray (P,) in θ's dtype, or ClippedGrad with ``return_stats``

    Raises
    ------
    TypeError, ValueError
        For bad input, naming the argument, before any kernel runs.
    FloatingPointError
        When a sample's gradient norm is NaN or Inf (its pass overflowed θ's dtype): it could not
        be clipped, so no gradient is returned.
    NotImplementedError
        For GPU arrays with ``expected_batch_size``, ``secure_noise`` or ``return_stats``
        (pass host arrays, or finish the step yourself from ``backprop``).
    """
    max_norm = check_max_norm(max_norm)
    noise_multiplier = check_noise_multiplier(noise_multiplier)
    check_seed(seed, secure_noise)
    denominator = (
        None if expected_batch_size is None else check_positive("expected_batch_size", expected_batch_size)
    )
    if not isinstance(return_stats, (bool, np.bool_)):
        raise TypeError(f"return_stats: expected True or False, got {type(return_stats).__name__}")
    backend = _auto(backend, theta, X, y)
    run = _backend(backend)
    if _on_device(backend, theta, X, y):
        if denominator is not None or secure_noise or return_stats:
            raise NotImplementedError(
                "clipped_grad: expected_batch_size, secure_noise and return_stats are not implemented "
                "for GPU arrays yet; pass host (NumPy) arrays"
            )
        device = _backend_module(backend)
        return device.clipped_grad_device(net, theta, X, y, max_norm, noise_multiplier, seed)
    inp = check_inputs(net, theta, X, y)
    noise_std = noise_multiplier * max_norm
    denominator = inp.batch_size if denominator is None else denominator
    ws_kw = _workspace_kw(backend, workspace)
    if backend == "numba" and not secure_noise:  # the noised step in the kernels' last pass: dp_step's bits
        cpu = _backend_module(backend)
        grad, raw = cpu.clipped_step(net, inp, max_norm, noise_multiplier, denominator, seed, **ws_kw)
    else:  # the norms come with the clipped sum (its clip factors need them): asking costs nothing
        raw = run(net, inp, needed(("norms",), clipping=True), max_norm, None, **ws_kw)
        total, norms = raw["clipped_sum"], raw["norms"]
        grad = dp_step(total, norms, max_norm, noise_multiplier, denominator, seed, secure=secure_noise)
    if not return_stats:
        return grad
    norms = raw["norms"]
    clipped = int(np.count_nonzero(norms > inp.dtype.type(max_norm)))  # exactly the rows with c_i < 1
    fraction = clipped / inp.batch_size
    return ClippedGrad(grad, norms, fraction, noise_std, float(denominator), float(raw["loss"]))


__all__ = [
    "BACKENDS",
    "BACKEND_PREFERENCE",
    "HOST_PREFERENCE",
    "QUANTITIES",
    "BackpropResult",
    "ClippedGrad",
    "PerSampleMemoryError",
    "available_backends",
    "available_memory",
    "backprop",
    "check_inputs",
    "clipped_grad",
    "resolve_backend",
    "run_backend",
]

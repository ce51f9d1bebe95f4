"""Public entry points and backend dispatch.

Every backend computes the same raw quantities from validated inputs (loss, grad,
per_sample, norms, layer_norms, sq_mean, and the clipped *sum* for DP-SGD); the
derived ones (variance, noise scale, the noised clipped mean) are finished here,
once, so the backends cannot disagree about them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import fields, make_dataclass

import numpy as np

from ._validation import (
    Inputs,
    PerSampleMemoryError,
    check_compute,
    check_inputs,
    check_max_norm,
    check_noise_multiplier,
    check_out,
    check_per_sample_fits,
)
from .mlp import MLP
from .quantities import QUANTITIES, REGISTRY, check_clip_norms, dp_noise, finish, needed, noised_mean


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


def resolve_backend(name: str) -> str:
    """Check that backend ``name`` can run here and return it; ``"auto"`` picks the fastest
    that can (cuda, else numba, else numpy).

    Raises
    ------
    ValueError
        For an unknown name.
    RuntimeError, ImportError
        Saying why a known backend cannot run here (no GPU, a missing extra).
    """
    if name == "auto":
        avail = available_backends()
        return next((b for b in BACKEND_PREFERENCE if b in avail), "numpy")
    _backend(name)
    return name


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
    backend: str = "numpy",
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
        Any of ``loss``, ``grad``, ``per_sample``, ``norms``, ``layer_norms``,
        ``sq_mean``, ``variance``, ``noise_scale``.
    backend : str
        ``"naive"`` (the per-sample loop, the definition), ``"numpy"`` (batched
        GEMMs), ``"numba"`` (CPU kernels), ``"cuda"`` (GPU kernels).
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
    run = _backend(backend)
    if out is not None and "per_sample" not in want:
        raise ValueError("out: given, but 'per_sample' is not in compute")
    if _on_device(backend, theta, X, y, out):  # validated on the GPU, results stay there
        raw = _backend_module(backend).backprop_device(net, theta, X, y, needed(want), out)
        batch_size = X.shape[0]
    else:
        inp = check_inputs(net, theta, X, y)
        out = check_out(out, (inp.batch_size, net.num_params), inp.dtype, {"theta": theta, "X": X, "y": y})
        if "per_sample" in want and out is None:
            check_per_sample_fits(inp.batch_size, net.num_params, inp.dtype)
        raw = run(net, inp, needed(want), None, out, **_workspace_kw(backend, workspace))
        batch_size = inp.batch_size
    values = finish(want - {"loss"}, raw, batch_size)
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


def clipped_grad(
    net: MLP,
    theta: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    max_norm: float,
    noise_multiplier: float = 0.0,
    seed: int | None = None,
    backend: str = "numpy",
    *,
    workspace=None,
) -> np.ndarray:
    """DP-SGD's clipped (and optionally noised) mean gradient, from one backward pass.

    (1/B) [Σ_i min(1, C/‖∇ℓ_i‖) ∇ℓ_i + σ C ξ],  ξ ~ N(0, I).

    Parameters
    ----------
    net, theta, X, y, backend, workspace
        As for :func:`backprop`.
    max_norm : float
        C > 0, the per-sample clipping norm.
    noise_multiplier : float
        σ ≥ 0. With σ = 0 no noise is drawn.
    seed : int or None
        Seed of the Gaussian noise (``numpy.random.default_rng``); the same seed
        gives the same noise on every backend. ``None`` draws fresh noise.

    Returns
    -------
    ndarray (P,) in θ's dtype

    Raises
    ------
    FloatingPointError
        When a sample's gradient norm is NaN or Inf (its pass overflowed θ's dtype): it could not
        be clipped, so no gradient is returned.
    """
    max_norm = check_max_norm(max_norm)
    noise_multiplier = check_noise_multiplier(noise_multiplier)
    run = _backend(backend)
    if _on_device(backend, theta, X, y):
        device = _backend_module(backend)
        return device.clipped_grad_device(net, theta, X, y, max_norm, noise_multiplier, seed)
    inp = check_inputs(net, theta, X, y)
    raw = run(net, inp, needed((), clipping=True), max_norm, None, **_workspace_kw(backend, workspace))
    check_clip_norms(raw["norms"])  # a NaN or Inf norm would leave its sample unclipped
    noise_std = noise_multiplier * max_norm
    noise = dp_noise(net.num_params, seed, inp.dtype) if noise_std > 0 else None
    return noised_mean(raw["clipped_sum"], noise_std, noise, inp.batch_size)


__all__ = [
    "BACKENDS",
    "BACKEND_PREFERENCE",
    "QUANTITIES",
    "BackpropResult",
    "PerSampleMemoryError",
    "available_backends",
    "backprop",
    "check_inputs",
    "clipped_grad",
    "resolve_backend",
    "run_backend",
]

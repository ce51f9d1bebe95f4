"""The registry of quantities: what each one is, declared once.

Every quantity fastgrad computes comes from one backward pass, which leaves, per
layer l and sample i, the delta δ_{l,i} (rows of Δ_l, B × n_l) and the layer input
a_{l-1,i} (rows of A_{l-1}, B × n_{l-1}). Each *raw* quantity is one of:

- a **sum over samples** (:class:`Sum`): per layer, the weight part Mᵀ S and the
  bias part Σ_i M_i, with the operand M one of Δ, Δ⊙Δ or c⊙Δ (c: the clip
  factors) and the source S one of A or A⊙A, then scaled by 1/B or left a sum;
- a **per-sample map** (:class:`PerSample`): one row per sample (the loss, the
  norms from Goodfellow's per-row terms, the per-sample gradient rows).

A *derived* quantity (:class:`Derived`) is a function of raw ones, finished on the
host by :func:`finish`, so no backend can disagree about it.

Backends read only the operand and source kinds (:data:`DELTA`, :data:`DELTA_SQUARED`,
:data:`CLIPPED_DELTA`; :data:`INPUT`, :data:`INPUT_SQUARED`), never quantity names
beyond the raw ones they are asked for. The API's result fields, ``compute``'s valid
names, the set a backend must compute, the tests and the benchmarks read this module.

The per-row scalar math that both compiled targets need (:func:`clip_factor`,
:func:`layer_norm_sq`, :func:`variance_from_moments`) is written here once with
``register_jitable``: Numba's CPU and CUDA targets compile the same source, and
NumPy runs it on whole arrays (each is written with ``np.maximum`` and arithmetic
only, so that it works element-wise on arrays as well as on scalars).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from numba.extending import register_jitable

from ._scalar import like

# ------------------------------------------------------------ operand kinds

DELTA, DELTA_SQUARED, CLIPPED_DELTA = range(3)
"""Operand M of a sum over samples: Δ_l, Δ_l ⊙ Δ_l, or c ⊙ Δ_l (rows scaled by the clip factors)."""
OPERANDS: tuple[str, ...] = ("delta", "delta_squared", "clipped_delta")

INPUT, INPUT_SQUARED = range(2)
"""Source S of a sum over samples: A_{l-1} or A_{l-1} ⊙ A_{l-1}."""
SOURCES: tuple[str, ...] = ("input", "input_squared")


# ------------------------------------------------------- per-row scalar math


@register_jitable
def clip_factor(norm, max_norm):
    """DP-SGD's clip factor c = min(1, C / ‖∇ℓ_i‖): 1 when the norm is at most C (a zero norm too).

    ``max_norm`` must already have the float type of ``norm``. Written as C / max(‖g‖, C),
    which is exactly C/‖g‖ above C and exactly 1 below; a NaN norm gives a NaN factor
    (never an unclipped sample).
    """
    return max_norm / np.maximum(norm, max_norm)


@register_jitable
def layer_norm_sq(delta_sq, input_sq):
    """‖∇_{W_l, b_l} ℓ_i‖² from ‖δ_{l,i}‖² and ‖a_{l-1,i}‖² (Goodfellow 2015):
    ‖δ aᵀ‖²_F + ‖δ‖² = ‖δ‖² (‖a‖² + 1)."""
    return delta_sq * (input_sq + like(input_sq, 1.0))


@register_jitable
def variance_from_moments(sq_mean, grad):
    """The population variance sq_mean − grad², clamped at 0 against rounding."""
    return np.maximum(sq_mean - grad * grad, like(grad, 0.0))


def noise_scale(grad: np.ndarray, norms: np.ndarray) -> float:
    """B_simple = tr(Σ) / ‖G‖², tr(Σ) = mean ‖∇ℓ_i‖² − ‖G‖², accumulated in float64 (inf when G = 0)."""
    grad_sq = float(np.dot(grad.astype(np.float64), grad.astype(np.float64)))
    trace = float(np.mean(norms.astype(np.float64) ** 2)) - grad_sq
    return trace / grad_sq if grad_sq > 0 else float("inf")


def dp_noise(num_params: int, seed, dtype, secure: bool = False) -> np.ndarray:
    """ξ ~ N(0, I) of DP-SGD, drawn on the host by ``numpy.random.default_rng(seed)``,
    so every backend adds the same noise for the same seed; with ``secure``, from the OS
    CSPRNG instead (:func:`fastgrad.privacy.standard_normal`; ``seed`` must be ``None``)."""
    from .privacy import standard_normal

    return standard_normal(num_params, dtype, seed, secure=secure)


def noised_mean(clipped_sum: np.ndarray, noise_std: float, noise, denominator: float) -> np.ndarray:
    """DP-SGD's step (1/D) [Σ_i c_i ∇ℓ_i + σ C ξ] from the clipped sum; ``noise_std`` = σ C and
    the denominator D is the batch size B, or the expected batch size of Poisson sampling.

    With ``noise_std`` = 0 no noise is added (``noise`` may then be ``None``).
    """
    dt = clipped_sum.dtype
    total = clipped_sum
    if noise_std > 0:
        total = total + dt.type(noise_std) * noise
    return total / dt.type(denominator)


# ------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Sum:
    """A raw quantity that is a sum over samples, in θ's layout (P,).

    Per layer: W-part Mᵀ S (n_l × n_{l-1}), b-part Σ_i M_i (n_l,), times 1/B when ``mean``.
    """

    name: str
    operand: int  # DELTA, DELTA_SQUARED or CLIPPED_DELTA
    source: int  # INPUT or INPUT_SQUARED
    mean: bool  # divided by B (else the plain sum over samples)
    doc: str
    public: bool = True  # a name ``compute`` accepts (the clipped sum is reached by clipped_grad)
    shape: str = "(P,)"


@dataclass(frozen=True)
class PerSample:
    """A raw quantity made row by row (per sample) in the same pass; ``loss`` is their mean."""

    name: str
    shape: str
    doc: str
    public: bool = True


@dataclass(frozen=True)
class Derived:
    """A quantity computed from raw ones by ``finish(raw)`` on the host (raw: name -> array)."""

    name: str
    needs: tuple[str, ...]
    finish: Callable[[dict], object]
    shape: str
    doc: str
    public: bool = True


def _variance(raw: dict) -> np.ndarray:
    if "variance" in raw:  # a backend that made it from the moments in its own compiled pass
        return raw["variance"]
    return variance_from_moments(raw["sq_mean"], raw["grad"])


def _noise_scale(raw: dict) -> float:
    if "noise_scale" in raw:
        return float(raw["noise_scale"])
    return noise_scale(raw["grad"], raw["norms"])


REGISTRY: dict[str, Sum | PerSample | Derived] = {
    q.name: q
    for q in (
        PerSample("loss", "scalar", "(1/B) Σ ℓ_i. Always computed: a by-product of the forward pass."),
        Sum("grad", DELTA, INPUT, True, "(1/B) Σ ∇ℓ_i, in θ's layout."),
        PerSample("per_sample", "(B, P)", "Row i is ∇ℓ_i, in θ's layout."),
        PerSample("norms", "(B,)", "‖∇ℓ_i‖₂."),
        PerSample("layer_norms", "(B, L)", "‖∇_{W_l, b_l} ℓ_i‖₂; the rows' Euclidean norms are ``norms``."),
        Sum("sq_mean", DELTA_SQUARED, INPUT_SQUARED, True, "(1/B) Σ (∇ℓ_i)², element-wise."),
        Derived(
            "variance",
            ("grad", "sq_mean"),
            _variance,
            "(P,)",
            "sq_mean − grad², the population variance (clamped at 0 against rounding).",
        ),
        Derived(
            "noise_scale",
            ("grad", "norms"),
            _noise_scale,
            "scalar",
            "Simple gradient noise scale B_simple = tr(Σ) / ‖grad‖² (inf when grad = 0).",
        ),
        Sum(
            "clipped_sum",
            CLIPPED_DELTA,
            INPUT,
            False,
            "Σ_i min(1, C/‖∇ℓ_i‖) ∇ℓ_i, DP-SGD's clipped sum (see fastgrad.clipped_grad).",
            public=False,
        ),
    )
}
"""Every quantity by name, in the order of ``QUANTITIES`` (then the internal ones)."""

QUANTITIES: tuple[str, ...] = tuple(name for name, q in REGISTRY.items() if q.public)
"""Names accepted by ``compute``; see DESIGN §2 for their definitions."""

SUMS: tuple[Sum, ...] = tuple(q for q in REGISTRY.values() if isinstance(q, Sum))
"""The sums over samples, in the order backends lay out their partial sums."""

RAW: tuple[str, ...] = tuple(name for name, q in REGISTRY.items() if not isinstance(q, Derived))
"""Names a backend may be asked for (``need``)."""

PER_ROW: frozenset[str] = frozenset({"norms", "layer_norms"})
"""Raw quantities that need the per-sample norms (Goodfellow's per-row terms)."""


def sums_to_make(need: Iterable[str], clipping: bool) -> tuple[Sum, ...]:
    """The sums over samples a backend makes, in :data:`SUMS` order: those named in ``need``, and
    the clipped one exactly when clipping (its operand needs the clip factors of ``max_norm``)."""
    need = frozenset(need)
    return tuple(q for q in SUMS if (clipping if q.operand == CLIPPED_DELTA else q.name in need))


def needs_norms(need: Iterable[str], clipping: bool) -> bool:
    """Whether a backend makes the per-sample norms: asked for (:data:`PER_ROW`), or clipping,
    whose factors need them."""
    return bool(PER_ROW & frozenset(need)) or clipping


def needed(want: Iterable[str], clipping: bool = False) -> frozenset[str]:
    """The raw quantities a backend must compute for ``want`` (``loss`` always; derived ones
    replaced by what they need; ``clipped_sum`` and the norms it needs when ``clipping``)."""
    need = {"loss"}
    for name in want:
        q = REGISTRY[name]
        if isinstance(q, Derived):
            need.update(q.needs)
            need.add(name)  # a backend may make it in its own pass (see Derived.finish)
        else:
            need.add(name)
    if clipping:
        need.add("clipped_sum")
    return frozenset(need)


def finish(want: Iterable[str], raw: dict) -> dict:
    """The values of ``want`` from a backend's ``raw`` results: raw ones as they are,
    derived ones by their ``finish``."""
    out = {}
    for name in want:
        q = REGISTRY[name]
        out[name] = q.finish(raw) if isinstance(q, Derived) else raw[name]
    return out


__all__ = [
    "CLIPPED_DELTA",
    "DELTA",
    "DELTA_SQUARED",
    "INPUT",
    "INPUT_SQUARED",
    "OPERANDS",
    "PER_ROW",
    "QUANTITIES",
    "RAW",
    "REGISTRY",
    "SOURCES",
    "SUMS",
    "Derived",
    "PerSample",
    "Sum",
    "clip_factor",
    "dp_noise",
    "finish",
    "layer_norm_sq",
    "needed",
    "needs_norms",
    "noise_scale",
    "noised_mean",
    "sums_to_make",
    "variance_from_moments",
]

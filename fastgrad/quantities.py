"""The registry of quantities: what each one is, declared once.

Every quantity fastgrad computes comes from one backward pass, which leaves, per
layer l and sample i, the delta δ_{l,i} (rows of Δ_l, B × n_l) and the layer input
a_{l-1,i} (rows of A_{l-1}, B × n_{l-1}). Each *raw* quantity is one of:

- a **sum over samples** (:class:`Sum`): per layer, the weight part Mᵀ S and the
  bias part Σ_i M_i, with the operand M one of Δ, Δ⊙Δ or c⊙Δ (c: the clip
  factors) and the source S one of A or A⊙A, then scaled by 1/B or left a sum;
- a **per-sample map** (:class:`PerSample`): one row per sample (the loss, the
  norms from Goodfellow's per-row terms, the per-sample gradient rows).

A *derived* quantity (:class:`Derived`) is a function of raw ones, finished by
:func:`finish` with the array module of the raw results (:data:`HOST` for NumPy arrays, the
CUDA backend's ``ARRAYS`` for device arrays), so no backend can disagree about it. A backend
that makes one in its own compiled pass says so here (``Derived.made_in_pass``), not in its code.

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

import functools
import importlib
import math
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
def add_square(scale, ssq, v):
    """One step of a sum of squares kept as scale² · ssq (LAPACK's nrm2): (scale, ssq) after adding v².

    scale is the largest |v| so far and every term is divided by it, so neither the squares of
    large values overflow nor those of tiny ones underflow: the norm scale · √ssq (:func:`scaled_norm`)
    is right wherever it is representable. Start from (0, 0). A NaN makes both NaN; an Inf gives an
    Inf norm. For targets that must not compute in float64 (the float32 CUDA kernels); the CPU
    kernels sum the squares in float64 instead, which vectorizes.
    """
    a = abs(v)
    one = like(ssq, 1.0)
    if a > scale:
        r = scale / a
        return a, one + ssq * r * r
    if a == scale:  # equal (0 or Inf too): one more term of exactly 1
        return scale, ssq + one
    if a > like(a, 0.0):
        r = a / scale
        return scale, ssq + r * r
    if a != a:  # NaN
        return a, a
    return scale, ssq


@register_jitable
def scaled_norm(scale, ssq):
    """The norm scale · √ssq of a sum of squares made by :func:`add_square`."""
    return scale * math.sqrt(ssq)


@register_jitable
def layer_norm(delta_norm, input_norm):
    """‖∇_{W_l, b_l} ℓ_i‖ = ‖δ_{l,i}‖ √(‖a_{l-1,i}‖² + 1): :func:`layer_norm_sq` with nothing squared."""
    return delta_norm * math.hypot(input_norm, like(input_norm, 1.0))


@register_jitable
def variance_from_moments(sq_mean, grad):
    """The population variance sq_mean − grad², clamped at 0 against rounding."""
    return np.maximum(sq_mean - grad * grad, like(grad, 0.0))


def noise_scale(grad: np.ndarray, norms: np.ndarray) -> float:
    """B_simple = tr(Σ) / ‖G‖², tr(Σ) = mean ‖∇ℓ_i‖² − ‖G‖², accumulated in float64 (inf when G = 0).

    :func:`noise_scale_from_sums` of the norms' sum of squares (NumPy's pairwise ``np.sum``).
    """
    return noise_scale_from_sums(grad, float(np.sum(np.square(norms.astype(np.float64)))), norms.shape[0])


def noise_scale_from_sums(grad: np.ndarray, sum_sq_norms: float, batch_size: int) -> float:
    """B_simple from the mean gradient G and Σ_i ‖∇ℓ_i‖² over ``batch_size`` samples (the form a
    sum over chunks gives: ``fastgrad.dask``).

    tr(Σ) is clamped at 0 (its two terms come from different sums, and cancel to a rounding
    error of either sign when the samples agree) and is exactly 0 for one sample. The sums are
    NumPy's pairwise ``np.sum``, not a BLAS dot: BLAS splits a long dot between its threads, so its
    bits change with ``OPENBLAS_NUM_THREADS``.
    """
    g = grad.astype(np.float64)
    grad_sq = float(np.sum(g * g))
    if batch_size == 1:  # one sample: mean ‖∇ℓ_i‖² is ‖G‖², up to rounding
        trace = 0.0
    else:
        trace = max(sum_sq_norms / batch_size - grad_sq, 0.0)
    return trace / grad_sq if grad_sq > 0 else float("inf")


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


class HostArrays:
    """The array module of host results, as a :class:`Derived` quantity's ``finish`` uses it (:data:`HOST`).

    A finish reaches its arrays only through these few operations, so that the same definition
    serves device arrays with the device's module (``fastgrad.cuda.ARRAYS``, the same names).
    """

    @staticmethod
    def map(f: Callable, *args):
        """``f(*args)``: f is element-wise, written with NumPy operations (scalars pass through)."""
        return f(*args)

    @staticmethod
    def zeros_like(a: np.ndarray) -> np.ndarray:
        return np.zeros_like(a)

    @staticmethod
    def to_host(a) -> np.ndarray:
        """``a`` as a NumPy array (the array itself on the host)."""
        return np.asarray(a)

    @staticmethod
    def row_dot(M: np.ndarray, v: np.ndarray) -> np.ndarray:
        """M_i · v of each row (B,), M (B, P), v (P,), summed in float64 (no BLAS: thread-count-free bits)."""
        return np.einsum("ij,j->i", M, v, dtype=np.float64)


HOST = HostArrays()
"""The array module of NumPy results: what :func:`finish` uses unless told otherwise."""


@dataclass(frozen=True)
class Derived:
    """A quantity computed from raw ones by ``finish(raw, batch_size, xp)`` (raw: name -> array; xp:
    the raw arrays' module, :class:`HostArrays` or the device's). ``raw`` may already hold the
    quantity itself (made by a backend's pass, or the naive reference's own definition): finish
    then takes it.

    ``made_in_pass``: (backend, "module:function") pairs for the backends that make the quantity
    in a compiled sweep of their own; the function fills ``out`` (the shape of ``needs[0]``) from
    the needs, ``f(*[raw[n] for n in needs], out)``, and the backend calls it for every entry
    :func:`made_in_pass` gives it, never by name.
    """

    name: str
    needs: tuple[str, ...]
    finish: Callable[[dict, int, HostArrays], object]
    shape: str
    doc: str
    public: bool = True
    made_in_pass: tuple[tuple[str, str], ...] = ()
    from_sums: Callable[[dict, dict, int], object] | None = None
    """Its value over a dataset split into row chunks (``fastgrad.dask``) from sums alone,
    ``f(raw, squares, n)``: raw the dataset's raw sums, squares[m] = Σ_i ‖m_i‖² (float64) of each
    per-sample map m among its needs. None: from ``finish``, which a quantity that reads a
    per-sample map cannot be over chunks."""


def _variance(raw: dict, batch_size: int, xp: HostArrays) -> np.ndarray:
    if "variance" in raw:  # made from the moments in a backend's own compiled sweep
        var = raw["variance"]
    else:
        var = xp.map(variance_from_moments, raw["sq_mean"], raw["grad"])
    if batch_size == 1:  # one sample has no variance; sq_mean − grad² would be a rounding error (1.5e-8 seen)
        var = xp.zeros_like(var)
    return var


def _noise_scale(raw: dict, batch_size: int, xp: HostArrays) -> float:
    if "noise_scale" in raw:
        return float(raw["noise_scale"])
    return noise_scale(xp.to_host(raw["grad"]), xp.to_host(raw["norms"]))  # P + B numbers


def _noise_scale_from_sums(raw: dict, squares: dict, n: int) -> float:
    return noise_scale_from_sums(raw["grad"], squares["norms"], n)


def cosine(dot: np.ndarray, norm: np.ndarray, other_norm: float) -> np.ndarray:
    """dot / (norm · other_norm) in float64, clamped to [−1, 1] (the norms and the dot come from different
    sums), 0 where the product of the norms is 0; in ``norm``'s dtype."""
    den = norm.astype(np.float64) * np.float64(other_norm)
    c = np.divide(dot, den, out=np.zeros(den.shape), where=den > 0)
    return np.clip(c, -1.0, 1.0).astype(norm.dtype)


def _grad_cosine(raw: dict, batch_size: int, xp: HostArrays) -> np.ndarray:
    if "grad_cosine" in raw:
        return raw["grad_cosine"]
    g = raw["grad"]
    g_norm = math.sqrt(float(np.sum(np.square(xp.to_host(g), dtype=np.float64))))
    return xp.map(cosine, xp.row_dot(raw["per_sample"], g), raw["norms"], g_norm)


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
            "sq_mean − grad², the population variance (clamped at 0 against rounding; exactly 0 for B = 1).",
            made_in_pass=(
                ("numba", "fastgrad.cpu:variance_into"),
                ("cuda", "fastgrad.cuda.rows:variance_into"),
            ),
        ),
        Derived(
            "noise_scale",
            ("grad", "norms"),
            _noise_scale,
            "scalar",
            "Simple gradient noise scale B_simple = tr(Σ) / ‖grad‖² (≥ 0; 0 for B = 1; inf when grad = 0).",
            from_sums=_noise_scale_from_sums,
        ),
        Derived(
            "grad_cosine",
            ("per_sample", "grad", "norms"),
            _grad_cosine,
            "(B,)",
            "∇ℓ_i · grad / (‖∇ℓ_i‖ ‖grad‖): each sample's cosine with the mean gradient (0 at a zero norm).",
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
"""Names accepted by ``compute``; see docs/design.md §2 for their definitions."""

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
            need.add(name)  # a backend may make it in its own sweep (see Derived.made_in_pass)
        else:
            need.add(name)
    if clipping:
        need.add("clipped_sum")
    return frozenset(need)


def finish(want: Iterable[str], raw: dict, batch_size: int, xp: HostArrays = HOST) -> dict:
    """The values of ``want`` from a backend's ``raw`` results for a batch of ``batch_size``
    samples: raw ones as they are, derived ones by their ``finish`` with ``raw``'s array module ``xp``."""
    out = {}
    for name in want:
        q = REGISTRY[name]
        out[name] = q.finish(raw, batch_size, xp) if isinstance(q, Derived) else raw[name]
    return out


@functools.lru_cache(maxsize=256)
def made_in_pass(backend: str, need: frozenset[str]) -> tuple[tuple[Derived, Callable], ...]:
    """The derived quantities of ``need`` that ``backend`` makes in a sweep of its own (registry
    order), each with the function that makes it (see :class:`Derived`); cached per request."""
    out = []
    for q in REGISTRY.values():
        if isinstance(q, Derived) and q.name in need:
            for name, path in q.made_in_pass:
                if name == backend:
                    module, func = path.split(":")
                    out.append((q, getattr(importlib.import_module(module), func)))
    return tuple(out)


__all__ = [
    "CLIPPED_DELTA",
    "DELTA",
    "DELTA_SQUARED",
    "HOST",
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
    "HostArrays",
    "PerSample",
    "Sum",
    "add_square",
    "clip_factor",
    "cosine",
    "finish",
    "layer_norm",
    "layer_norm_sq",
    "made_in_pass",
    "needed",
    "needs_norms",
    "noise_scale",
    "noise_scale_from_sums",
    "scaled_norm",
    "sums_to_make",
    "variance_from_moments",
]

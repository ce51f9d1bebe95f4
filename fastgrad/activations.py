"""Hidden-layer activations: the registry, the run-time codes and their scalar definitions.

:data:`REGISTRY` holds, per activation, everything fastgrad knows about it outside the kernels:
its name, its run-time code, the family its weights are initialised with, and the ``torch.nn``
module that computes the same φ (named, not imported: torch stays optional). ``MLP``, its
``init``, :mod:`fastgrad.interop` (``from_torch`` / ``to_torch``, hence ``fastgrad.torch``), the
command line and the tests read it.

The scalar functions here are the *only* definition of each activation used by
the compiled targets: they are ``register_jitable``, so the CPU kernels
(``njit``) and the CUDA kernels (``cuda.jit``) compile the same source. The
activation is a run-time integer code, not a compile-time specialisation, so
one compiled kernel serves every activation.

The NumPy reference (:mod:`fastgrad.reference`) deliberately has its own
vectorised versions: it is the independent check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from numba.extending import register_jitable

from ._scalar import like

IDENTITY, RELU, LEAKY_RELU, TANH, SIGMOID, GELU, SOFTPLUS, SILU = range(8)
"""Run-time codes: the branches of :func:`activate` and :func:`activate_grad`."""

LEAKY_SLOPE = 0.01
GELU_C = 0.7978845608028654  # sqrt(2 / pi)
GELU_K = 0.044715

HE, GLOROT = "he", "glorot"
"""Initialisation families (``MLP.init``): He (Kaiming) normal, std √(2 / n_in), for the ReLU-like
activations; Glorot (Xavier) normal, std √(2 / (n_in + n_out)), for the others."""

SOFTPLUS_THRESHOLD = 40.0
"""The ``threshold`` of the ``nn.Softplus`` that ``to_torch`` builds. PyTorch's softplus returns z
itself above its threshold (20 by default), fastgrad's is log(1 + eᶻ) everywhere: they differ by
~e⁻ᶻ there, visible in float64. Above 40, e⁻ᶻ is below half an ulp of z in float32 and float64, so
with this threshold the two agree to rounding everywhere (and eᶻ ≤ e⁴⁰ does not overflow float32)."""


def _softplus_refusal(module) -> str:
    """Why ``from_torch`` refuses an ``nn.Softplus`` ("" when it computes fastgrad's softplus)."""
    if module.beta != 1:
        return f"module: Softplus(beta={module.beta}) is not supported; fastgrad's has beta = 1"
    if module.threshold != 20 and module.threshold < SOFTPLUS_THRESHOLD:
        return (
            f"module: Softplus(threshold={module.threshold}) is not supported; fastgrad's softplus is "
            f"log(1 + e^z) everywhere, which PyTorch's matches (to ~e^-20) with the default threshold 20 "
            f"or (to rounding) with threshold >= {SOFTPLUS_THRESHOLD:g}"
        )
    return ""


@dataclass(frozen=True)
class Activation:
    """One hidden activation φ, as everything outside the kernels sees it."""

    name: str
    code: int  # its branch in activate / activate_grad
    init: str  # HE or GLOROT: how MLP.init draws the weights
    torch: str  # the torch.nn class computing the same φ
    torch_args: tuple[tuple[str, object], ...] = ()  # (keyword, value): how to_torch builds it
    refusal: Callable[[object], str] | None = None
    """``module -> why from_torch refuses it`` ("" to accept); by default its ``torch_args`` must match."""

    def torch_repr(self) -> str:
        """The torch module as written in messages and docs: ``LeakyReLU(negative_slope=0.01)``."""
        return f"{self.torch}({', '.join(f'{k}={v!r}' for k, v in self.torch_args)})"

    def torch_module(self, nn):
        """A new ``nn.<torch>(**torch_args)``; ``nn`` is ``torch.nn``."""
        return getattr(nn, self.torch)(**dict(self.torch_args))

    def refuses(self, module) -> str:
        """Why ``module`` (an instance of ``nn.<torch>``) does not compute this φ, or ""."""
        if self.refusal is not None:
            return self.refusal(module)
        for key, want in self.torch_args:
            got = getattr(module, key)
            if got != want:
                return (
                    f"module: {self.torch}({key}={got!r}) is not supported; fastgrad's {self.name} is "
                    f"{self.torch_repr()}"
                )
        return ""


REGISTRY: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", IDENTITY, GLOROT, "Identity"),
        Activation("relu", RELU, HE, "ReLU"),
        Activation("leaky_relu", LEAKY_RELU, HE, "LeakyReLU", (("negative_slope", LEAKY_SLOPE),)),
        Activation("tanh", TANH, GLOROT, "Tanh"),
        Activation("sigmoid", SIGMOID, GLOROT, "Sigmoid"),
        Activation("gelu", GELU, HE, "GELU", (("approximate", "tanh"),)),
        Activation(
            "softplus", SOFTPLUS, HE, "Softplus", (("threshold", SOFTPLUS_THRESHOLD),), _softplus_refusal
        ),
        Activation("silu", SILU, HE, "SiLU"),
    )
}
"""Every activation by name, in code order."""

ACTIVATIONS: tuple[str, ...] = tuple(REGISTRY)
"""Valid activation names, in code order."""

assert [a.code for a in REGISTRY.values()] == list(range(len(REGISTRY))), "codes must be 0..n-1 in order"


def activation_code(name: str) -> int:
    """Run-time code of activation ``name``; ``ValueError`` listing the valid names."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"activation: unknown name {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return REGISTRY[name].code


@register_jitable
def stable_sigmoid(z):
    """1 / (1 + exp(-z)) without overflow for large |z|."""
    if z >= like(z, 0.0):
        return like(z, 1.0) / (like(z, 1.0) + math.exp(-z))
    e = math.exp(z)
    return e / (like(z, 1.0) + e)


@register_jitable
def stable_softplus(z):
    """log(1 + exp(z)) without overflow: max(z, 0) + log1p(exp(-|z|)) (NaN for NaN)."""
    return (z if z > like(z, 0.0) else like(z, 0.0)) + math.log1p(math.exp(-abs(z)))


@register_jitable
def activate(code, z):
    """phi(z) for activation ``code``."""
    if code == TANH:
        return math.tanh(z)
    if code == RELU:  # written so that a NaN propagates (max(0, NaN) is 0)
        return like(z, 0.0) if z <= like(z, 0.0) else z
    if code == LEAKY_RELU:
        return z if z > like(z, 0.0) else like(z, LEAKY_SLOPE) * z
    if code == SIGMOID:
        return stable_sigmoid(z)
    if code == GELU:
        u = like(z, GELU_C) * (z + like(z, GELU_K) * z * z * z)
        return like(z, 0.5) * z * (like(z, 1.0) + math.tanh(u))
    if code == SOFTPLUS:
        return stable_softplus(z)
    if code == SILU:
        return z * stable_sigmoid(z)
    return z  # IDENTITY


@register_jitable
def activate_grad(code, z, a):
    """phi'(z), given z and a = phi(z) (tanh and sigmoid are cheaper from a)."""
    if code == TANH:
        return like(z, 1.0) - a * a
    if code == RELU:
        return like(z, 1.0) if z > like(z, 0.0) else like(z, 0.0)
    if code == LEAKY_RELU:
        return like(z, 1.0) if z > like(z, 0.0) else like(z, LEAKY_SLOPE)
    if code == SIGMOID:
        return a * (like(z, 1.0) - a)
    if code == GELU:
        z2 = z * z
        t = math.tanh(like(z, GELU_C) * (z + like(z, GELU_K) * z2 * z))
        du = like(z, GELU_C) * (like(z, 1.0) + like(z, 3.0 * GELU_K) * z2)
        return like(z, 0.5) * (like(z, 1.0) + t) + like(z, 0.5) * z * (like(z, 1.0) - t * t) * du
    if code == SOFTPLUS:
        return stable_sigmoid(z)
    if code == SILU:  # σ(z) (1 + z σ(-z)): both sigmoids from one exp(-|z|), so 1 - σ is never rounded
        one = like(z, 1.0)
        e = math.exp(-abs(z))
        r = one / (one + e)  # σ(|z|); σ(-|z|) = e r
        if z >= like(z, 0.0):
            return r * (one + z * (e * r))
        return (e * r) * (one + z * r)
    return like(z, 1.0)  # IDENTITY

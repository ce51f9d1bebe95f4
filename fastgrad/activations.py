"""Hidden-layer activations: names, run-time codes and their scalar definitions.

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

from numba.extending import register_jitable

from ._scalar import like

ACTIVATIONS: tuple[str, ...] = (
    "identity",
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "softplus",
)
"""Valid activation names, in code order."""

IDENTITY, RELU, LEAKY_RELU, TANH, SIGMOID, GELU, SOFTPLUS = range(len(ACTIVATIONS))

LEAKY_SLOPE = 0.01
GELU_C = 0.7978845608028654  # sqrt(2 / pi)
GELU_K = 0.044715

#: activations initialised with He (Kaiming) normal; the others use Glorot normal
RELU_FAMILY = frozenset({"relu", "leaky_relu", "gelu", "softplus"})


def activation_code(name: str) -> int:
    """Run-time code of activation ``name``; ``ValueError`` listing the valid names."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown name {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS.index(name)


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
    return like(z, 1.0)  # IDENTITY

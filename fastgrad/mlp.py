"""The network spec: sizes, activation, loss; the flat parameter layout θ.

θ holds, for l = 1..L in order, W_l (n_l × n_{l-1}, row-major) then b_l (n_l,).
Every per-parameter result uses this layout, so ``unpack`` returns views.
"""

from __future__ import annotations

from collections.abc import Sequence
import itertools
from dataclasses import dataclass, field

import numpy as np

from .activations import ACTIVATIONS, HE, activation_code
from .activations import REGISTRY as ACTIVATION_REGISTRY
from .losses import loss_code

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class LayerSlice:
    """Where layer l's parameters live in θ: W at [w_start, b_start), b at [b_start, end)."""

    n_in: int
    n_out: int
    w_start: int
    b_start: int
    end: int


@dataclass(frozen=True)
class MLP:
    """A dense MLP ``sizes = [n0, n1, ..., nL]`` with one hidden activation and a loss.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths, input first; at least two entries, each ≥ 1.
    activation : str
        Hidden-layer activation, one of :data:`fastgrad.activations.ACTIVATIONS`.
        The output layer is linear; the loss owns the output nonlinearity.
    loss : str
        Per-sample loss, one of :data:`fastgrad.losses.LOSSES`.

    Examples
    --------
    >>> net = MLP([4, 8, 3], activation="tanh", loss="cross_entropy")
    >>> net.num_params
    67
    >>> theta = net.init(seed=0)
    >>> [W.shape for W, b in net.unpack(theta)]
    [(8, 4), (3, 8)]
    """

    sizes: tuple[int, ...]
    activation: str = "tanh"
    loss: str = "cross_entropy"
    layers: tuple[LayerSlice, ...] = field(init=False, repr=False, compare=False)

    def __init__(self, sizes: Sequence[int], activation: str = "tanh", loss: str = "cross_entropy"):
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__"):
            raise TypeError(f"sizes: expected a sequence of ints, got {type(sizes).__name__}")
        clean = []
        for s in sizes:
            if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
                raise TypeError(f"sizes: expected ints, got {s!r} ({type(s).__name__})")
            if s < 1:
                raise ValueError(f"sizes: every width must be ≥ 1, got {list(sizes)}")
            clean.append(int(s))
        if len(clean) < 2:
            raise ValueError(f"sizes: need at least an input and an output width, got {list(sizes)}")
        activation_code(activation)
        loss_code(loss)
        object.__setattr__(self, "sizes", tuple(clean))
        object.__setattr__(self, "activation", activation)
        object.__setattr__(self, "loss", loss)
        layers, start = [], 0
        for n_in, n_out in itertools.pairwise(clean):
            b_start = start + n_out * n_in
            layers.append(LayerSlice(n_in, n_out, start, b_start, b_start + n_out))
            start = b_start + n_out
        object.__setattr__(self, "layers", tuple(layers))

    @property
    def num_layers(self) -> int:
        """L, the number of weight layers."""
        return len(self.layers)

    @property
    def num_params(self) -> int:
        """P, the length of θ."""
        return self.layers[-1].end

    @property
    def n_in(self) -> int:
        return self.sizes[0]

    @property
    def n_out(self) -> int:
        return self.sizes[-1]

    @property
    def activation_code(self) -> int:
        return activation_code(self.activation)

    @property
    def loss_code(self) -> int:
        return loss_code(self.loss)

    def init(self, seed: int | None = 0, dtype=np.float32) -> np.ndarray:
        """A fresh θ: normal weights of the activation's family (``init`` of its entry in
        :data:`fastgrad.activations.REGISTRY`: He, std √(2/n_in), for the ReLU-like ones; Glorot,
        std √(2/(n_in + n_out)), for the others), zero biases.

        Parameters
        ----------
        seed : int or None
            Seed for ``numpy.random.default_rng``.
        dtype : float32 or float64

        Returns
        -------
        theta : ndarray, shape (P,)
        """
        dt = np.dtype(dtype)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dt}")
        rng = np.random.default_rng(seed)
        theta = np.zeros(self.num_params, dtype=dt)
        he = ACTIVATION_REGISTRY[self.activation].init == HE
        for layer in self.layers:
            std = np.sqrt(2.0 / layer.n_in) if he else np.sqrt(2.0 / (layer.n_in + layer.n_out))
            theta[layer.w_start : layer.b_start] = rng.standard_normal(layer.n_out * layer.n_in) * std
        return theta

    def unpack(self, theta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-layer ``(W, b)`` views into θ (or into any array in θ's layout).

        Parameters
        ----------
        theta : ndarray, shape (P,)
            Also works for a gradient, a variance or any other per-parameter array.

        Returns
        -------
        list of (W (n_l, n_{l-1}), b (n_l,)), sharing memory with ``theta``.
        """
        theta = np.asarray(theta)
        if theta.ndim != 1 or theta.shape[0] != self.num_params:
            raise ValueError(
                f"theta: expected shape ({self.num_params},) for sizes {list(self.sizes)}, got {theta.shape}"
            )
        return [
            (
                theta[s.w_start : s.b_start].reshape(s.n_out, s.n_in),
                theta[s.b_start : s.end],
            )
            for s in self.layers
        ]

    def pack(self, params: Sequence[tuple[np.ndarray, np.ndarray]], dtype=None) -> np.ndarray:
        """Inverse of :meth:`unpack`: a new θ from per-layer ``(W, b)``."""
        if len(params) != self.num_layers:
            raise ValueError(f"params: expected {self.num_layers} (W, b) pairs, got {len(params)}")
        dt = np.dtype(dtype) if dtype is not None else np.result_type(*[p[0] for p in params])
        theta = np.empty(self.num_params, dtype=dt)
        for (W, b), (Wv, bv) in zip(params, self.unpack(theta)):
            W, b = np.asarray(W), np.asarray(b)
            if W.shape != Wv.shape or b.shape != bv.shape:
                raise ValueError(
                    f"params: expected shapes {Wv.shape} and {bv.shape}, got {W.shape} and {b.shape}"
                )
            Wv[...] = W
            bv[...] = b
        return theta


__all__ = ["ACTIVATIONS", "MLP", "LayerSlice"]

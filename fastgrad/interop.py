"""PyTorch interop: ``from_torch`` reads a ``torch.nn.Sequential`` MLP, ``to_torch`` builds one.

Only the layers fastgrad computes are accepted: ``Linear`` layers with one kind
of activation module between them, and no module after the last ``Linear`` (the
output layer is linear; the loss owns the output nonlinearity). torch is imported
only when these functions are called (the ``torch`` extra).
"""

from __future__ import annotations

import numpy as np

from .activations import REGISTRY as ACTIVATION_REGISTRY
from .activations import SOFTPLUS_THRESHOLD
from .extras import require
from .mlp import MLP

_TORCH_DTYPES = ("float32", "float64")


def _activation_name(module) -> str:
    """fastgrad's name for a torch activation module (the entry of :data:`fastgrad.activations.REGISTRY`
    whose ``torch`` class it is), or ``TypeError`` saying why it is not one."""

    nn = require("torch.nn", "torch", "PyTorch interop")
    for act in ACTIVATION_REGISTRY.values():
        if isinstance(module, getattr(nn, act.torch)):
            why = act.refuses(module)
            if why:
                raise TypeError(why)
            return act.name
    raise TypeError(
        f"module: unsupported layer {type(module).__name__}; fastgrad handles Linear layers with one of "
        f"the activations {', '.join(a.torch_repr() for a in ACTIVATION_REGISTRY.values())} between them"
    )


def _unsupported(i: int, m, nn) -> str:
    """Why module ``i`` of the Sequential cannot be computed by fastgrad, or "" when it is a Linear or
    an activation module of :func:`_activation_name`'s list."""
    kind = type(m).__name__
    if isinstance(m, nn.Linear):
        if m.bias is None:
            return (
                f"module: layer {i} is Linear({m.in_features}, {m.out_features}, bias=False); fastgrad's "
                "layers all have a bias (θ holds b_l for every layer), so a bias-less layer would get "
                "a phantom bias and its gradient; use bias=True"
            )
        return ""
    if isinstance(m, nn.Sequential):
        return (
            f"module: layer {i} is a nested Sequential; fastgrad reads one flat Sequential of Linear "
            "and activation modules (unpack it: nn.Sequential(*outer[:i], *outer[i], *outer[i+1:]))"
        )
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return f"module: layer {i} is {kind}, which fastgrad does not compute (no dropout); remove it"
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    if isinstance(m, norms):
        return f"module: layer {i} is {kind}, a normalisation layer, which fastgrad does not compute"
    if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd)):
        return f"module: layer {i} is {kind}; fastgrad computes dense (Linear) layers only"
    try:
        _activation_name(m)
    except TypeError as exc:
        return str(exc).replace("module: ", f"module: layer {i}: ", 1)
    return ""


def _linears_and_activation(layers: list, nn) -> tuple[list, str]:
    """The ``Linear`` layers of ``Linear, act, ..., Linear`` and the one hidden activation's name."""
    if not layers:
        raise ValueError("module: holds no torch.nn.Linear layer (the Sequential is empty)")
    if not isinstance(layers[-1], nn.Linear):
        raise ValueError(
            f"module: ends with {type(layers[-1]).__name__} (layer {len(layers) - 1}); the last layer "
            "must be Linear (fastgrad's output layer is linear and the loss applies the output "
            "nonlinearity)"
        )
    for i, m in enumerate(layers):  # every unsupported module is named, with its index, first
        why = _unsupported(i, m, nn)
        if why:
            raise TypeError(why)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("module: holds no torch.nn.Linear layer")
    if len({id(p) for lin in linears for p in lin.parameters()}) != 2 * len(linears):
        raise ValueError(
            "module: two Linear layers share a parameter (the same module or tensor used twice); "
            "θ gives every layer its own W_l and b_l"
        )
    # between consecutive Linear layers: nothing, or exactly one activation module
    acts: list[str] = []
    gap: list = []
    for i, m in enumerate(layers):
        if isinstance(m, nn.Linear):
            if m is not linears[0]:
                if len(gap) > 1:
                    raise ValueError(
                        f"module: {len(gap)} modules between two Linear layers before layer {i} "
                        f"({', '.join(type(g).__name__ for g in gap)}); expected at most one activation"
                    )
                acts.append(_activation_name(gap[0]) if gap else "identity")
            gap = []
        else:
            if i == 0:
                raise ValueError(f"module: starts with {type(m).__name__}; the first layer must be Linear")
            gap.append(m)
    if len(set(acts)) > 1:
        raise ValueError(
            f"module: mixes hidden activations {sorted(set(acts))}; fastgrad uses one for all layers"
        )
    return linears, acts[0] if acts else "identity"


def from_torch(module, loss: str = "cross_entropy") -> tuple[MLP, np.ndarray]:
    """The fastgrad network and flat θ of a PyTorch MLP.

    Parameters
    ----------
    module : torch.nn.Sequential
        ``Linear, act, Linear, act, ..., Linear``: every hidden activation the same
        kind (or none at all between the ``Linear`` layers, meaning ``identity``),
        nothing after the last ``Linear``. Every ``Linear`` has a bias (fastgrad's θ has
        b_l for every layer); no parameter is shared between layers. Parameters float32
        or float64, all the same dtype.
    loss : str
        The loss to attach (PyTorch keeps the loss outside the module).

    Returns
    -------
    net : MLP
    theta : ndarray (P,)
        A copy of the parameters in θ's layout (W_l row-major, then b_l), in the
        module's dtype. ``torch.nn.Linear.weight`` is already (out, in).

    Raises
    ------
    TypeError
        For a module that is not a ``Sequential`` or holds an unsupported layer (Dropout,
        normalisation, convolution, a nested ``Sequential``, ``Linear(bias=False)``, an
        unsupported activation): the message names the module and its index.
    ValueError
        For mismatched widths, mixed activations, a trailing activation or shared parameters.
    fastgrad.extras.MissingExtraError
        When torch is not installed.
    """

    torch = require("torch", "torch", "PyTorch interop")
    if not isinstance(module, torch.nn.Sequential):
        raise TypeError(f"module: expected a torch.nn.Sequential, got {type(module).__name__}")
    linears, activation = _linears_and_activation(list(module), torch.nn)
    sizes = [linears[0].in_features]
    for i, lin in enumerate(linears):
        if lin.in_features != sizes[-1]:
            raise ValueError(
                f"module: Linear layer {i} takes {lin.in_features} inputs but the previous layer "
                f"gives {sizes[-1]}"
            )
        sizes.append(lin.out_features)
    dtypes = {str(p.dtype).removeprefix("torch.") for p in module.parameters()}
    if len(dtypes) != 1 or not dtypes <= set(_TORCH_DTYPES):
        raise TypeError(f"module: parameters must all be float32 or all float64, got {sorted(dtypes)}")
    net = MLP(sizes, activation=activation, loss=loss)
    theta = np.zeros(net.num_params, dtype=np.dtype(dtypes.pop()))
    with torch.no_grad():
        for lin, (W, b) in zip(linears, net.unpack(theta)):
            W[...] = lin.weight.detach().cpu().numpy()
            b[...] = lin.bias.detach().cpu().numpy()
    return net, theta


def to_torch(net: MLP, theta: np.ndarray):
    """A ``torch.nn.Sequential`` with ``net``'s layers and θ's values (copied), in θ's dtype.

    Parameters
    ----------
    net : MLP
    theta : ndarray (P,), float32 or float64

    Returns
    -------
    torch.nn.Sequential
        ``Linear, act, ..., Linear``; the activation module is the activation's ``torch``
        module in :data:`fastgrad.activations.REGISTRY` (``Softplus`` with threshold
        ``SOFTPLUS_THRESHOLD`` = 40, not PyTorch's default 20, so that it agrees with
        fastgrad's log(1 + eᶻ) to rounding for every z). The loss is not part of it.
    """
    from ._validation import check_net, check_theta

    torch = require("torch", "torch", "PyTorch interop")
    nn = torch.nn
    net = check_net(net)
    theta = check_theta(net, theta)
    act = ACTIVATION_REGISTRY[net.activation]
    tdtype = getattr(torch, theta.dtype.name)
    modules = []
    for l, (W, b) in enumerate(net.unpack(theta)):
        lin = nn.Linear(W.shape[1], W.shape[0], dtype=tdtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(W)))
            lin.bias.copy_(torch.from_numpy(np.array(b)))
        modules.append(lin)
        if l < net.num_layers - 1:
            modules.append(act.torch_module(nn))
    return nn.Sequential(*modules)


__all__ = ["SOFTPLUS_THRESHOLD", "from_torch", "to_torch"]

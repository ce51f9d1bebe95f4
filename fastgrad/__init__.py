"""fastgrad: fused per-sample backpropagation for dense MLPs, and the error of the
"average the error first" shortcut.

>>> import numpy as np, fastgrad
>>> net = fastgrad.MLP([4, 16, 3], activation="tanh", loss="cross_entropy")
>>> theta = net.init(seed=0)
>>> X = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
>>> y = np.arange(32) % 3
>>> res = fastgrad.backprop(net, theta, X, y, compute=("grad", "norms"))
>>> res.grad.shape, res.norms.shape
((115,), (32,))
"""

from . import _threading

# Numba's threading layer is chosen here, on import, not at the first numba call: a user's
# numba.set_num_threads() in between would start Numba's threads on its default layer first
_threading.choose_layer()

from .activations import ACTIVATIONS  # noqa: E402
from .api import BackpropResult, ClippedGrad, available_backends, backprop, clipped_grad, resolve_backend  # noqa: E402
from .interop import from_torch, to_torch  # noqa: E402
from .losses import LOSSES  # noqa: E402
from .mlp import MLP  # noqa: E402
from .quantities import QUANTITIES  # noqa: E402
from .step import Step  # noqa: E402
from .shortcut import METHODS, ShortcutReport, compare_shortcut, covariance_terms, shortcut_grad  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "METHODS",
    "MLP",
    "QUANTITIES",
    "BackpropResult",
    "ClippedGrad",
    "ShortcutReport",
    "Step",
    "available_backends",
    "backprop",
    "clipped_grad",
    "compare_shortcut",
    "covariance_terms",
    "from_torch",
    "resolve_backend",
    "shortcut_grad",
    "to_torch",
]

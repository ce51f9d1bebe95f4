"""Small datasets for the command-line tool: one built in, one bundled with scikit-learn, and the user's own.

- ``spirals``: a deterministic synthetic nonlinear classification problem generated
  in code (interleaved noisy spiral arms, 2 features, 3 classes). No download, so
  ``fastgrad compare`` and ``fastgrad train`` work on a fresh install.
- ``digits``: scikit-learn's bundled 8×8 digits (64 features, 10 classes); needs
  the ``digits`` extra (``pip install "fastgrad[digits]"``).
- ``load_npz(path)``: the user's arrays. Keys: ``X`` (N, d) real features, and
  ``y``: either integer class labels (N,) in [0, K), or real targets (N,) or
  (N, k) for regression losses (``mse``, ``linear``, ``binary_cross_entropy``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..losses import CROSS_ENTROPY, loss_code
from ..extras import MissingExtraError, require

DATASETS: tuple[str, ...] = ("spirals", "digits")
"""Names accepted by :func:`load_dataset` (besides a ``.npz`` file)."""


@dataclass(frozen=True)
class Dataset:
    """Features and targets of a supervised problem.

    Attributes
    ----------
    name : str
    X : ndarray (N, d), float64
    y : ndarray (N,) int64 class labels when ``num_classes`` > 0; else float64 targets (N, k).
    num_classes : int
        K for classification, 0 for a regression dataset.
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    num_classes: int

    @property
    def num_samples(self) -> int:
        return self.X.shape[0]

    @property
    def num_features(self) -> int:
        return self.X.shape[1]

    @property
    def is_classification(self) -> bool:
        return self.num_classes > 0

    @property
    def num_outputs(self) -> int:
        """n_L the network needs: K classes, or the width of the regression targets."""
        return self.num_classes if self.is_classification else self.y.shape[1]

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.name, self.X[index], self.y[index], self.num_classes)

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
        """A deterministic shuffled (train, test) split; ``test_fraction`` = 0 gives an empty test set."""
        if not 0 <= test_fraction < 1:
            raise ValueError(f"test_fraction: expected a number in [0, 1), got {test_fraction}")
        order = np.random.default_rng(seed).permutation(self.num_samples)
        n_test = round(test_fraction * self.num_samples)
        return self.subset(order[n_test:]), self.subset(order[:n_test])

    def targets_for(self, loss: str) -> np.ndarray:
        """``y`` in the form ``loss`` expects: labels for cross-entropy, one-hot rows for the
        other losses on a classification dataset, the targets themselves for regression."""
        code = loss_code(loss)
        if code == CROSS_ENTROPY:
            if not self.is_classification:
                raise ValueError(
                    f"loss: cross_entropy needs integer class labels, but dataset {self.name!r} "
                    "has real-valued targets; choose mse, linear or binary_cross_entropy"
                )
            return self.y
        if self.is_classification:
            onehot = np.zeros((self.num_samples, self.num_classes))
            onehot[np.arange(self.num_samples), self.y] = 1.0
            return onehot
        return self.y


def make_spirals(
    num_samples: int = 1500, num_classes: int = 3, noise: float = 0.25, seed: int = 0
) -> Dataset:
    """Interleaved noisy spiral arms in the plane: not linearly separable, deterministic.

    Arm k holds points at radius t ∈ (0, 1] and angle 2πk/K + 3.5 t (radians),
    plus Gaussian noise of standard deviation ``noise`` on the angle. Features
    are standardised to zero mean and unit variance.

    Parameters
    ----------
    num_samples : int
        N ≥ num_classes; the arms get N // K samples each, the first N % K one more.
    num_classes : int
        K ≥ 2.
    noise : float
        ≥ 0.
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed gives the same bits.

    Returns
    -------
    Dataset
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes: expected an integer ≥ 2, got {num_classes!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples: expected an integer, got {type(num_samples).__name__}")
    if num_samples < num_classes:
        raise ValueError(f"num_samples: expected at least num_classes = {num_classes}, got {num_samples}")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: expected a non-negative number, got {noise}")
    rng = np.random.default_rng(seed)
    labels = np.arange(num_samples) % num_classes
    t = rng.uniform(0.05, 1.0, size=num_samples)
    angle = 2 * np.pi * labels / num_classes + 3.5 * t + noise * rng.standard_normal(num_samples)
    X = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return Dataset("spirals", X, labels.astype(np.int64), int(num_classes))


def load_digits() -> Dataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 × 64, 10 classes), pixels scaled to [0, 1].

    Raises
    ------
    MissingExtraError
        When scikit-learn is not installed (the ``digits`` extra).
    """
    sk = require("sklearn.datasets", "digits", "the digits dataset")
    bunch = sk.load_digits()
    X = np.asarray(bunch.data, dtype=np.float64) / 16.0
    return Dataset("digits", X, np.asarray(bunch.target, dtype=np.int64), 10)


def load_npz(path: str | os.PathLike) -> Dataset:
    """The user's arrays from a ``.npz`` file with keys ``X`` and ``y`` (see the module docstring).

    Raises
    ------
    ValueError
        For a missing file or key, wrong shapes, non-finite values or labels that are not 0..K-1.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data: no such file {path!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"data: {path!r} is not a readable .npz file ({exc})") from None
    with archive:
        missing = [k for k in ("X", "y") if k not in archive.files]
        if missing:
            raise ValueError(
                f"data: {path!r} lacks key(s) {', '.join(missing)}; expected arrays 'X' (N, d) and 'y' "
                f"(found: {', '.join(archive.files) or 'nothing'})"
            )
        X, y = archive["X"], archive["y"]
    for key, arr in (("X", X), ("y", y)):
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
            raise ValueError(f"data: array {key!r} must hold real numbers, got dtype {arr.dtype}")
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"data: array 'X' must be 2-D (N, d) with N, d ≥ 1, got shape {X.shape}")
    n = X.shape[0]
    if y.shape[:1] != (n,) or y.ndim > 2:
        raise ValueError(f"data: array 'y' must have shape ({n},) or ({n}, k) to match X, got {y.shape}")
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        raise ValueError("data: array 'X' contains NaN or Inf")
    name = os.path.basename(path)
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
        classes = np.unique(y)
        if classes[0] < 0 or len(classes) < 2:
            raise ValueError(
                f"data: integer labels 'y' must be class indices 0..K-1 with K ≥ 2, got values {classes[:10]}"
            )
        return Dataset(name, X, y.astype(np.int64), int(classes[-1]) + 1)
    y = y.astype(np.float64).reshape(n, -1)
    if not np.isfinite(y).all():
        raise ValueError("data: array 'y' contains NaN or Inf")
    return Dataset(name, X, y, 0)


def load_dataset(name: str = "spirals", data: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """The dataset the command line asks for: a ``.npz`` file when ``data`` is given, else ``name``."""
    if data is not None:
        return load_npz(data)
    if name == "spirals":
        return make_spirals(seed=seed)
    if name == "digits":
        return load_digits()
    raise ValueError(f"dataset: unknown name {name!r}; expected one of {', '.join(DATASETS)}")


__all__ = [
    "DATASETS",
    "Dataset",
    "MissingExtraError",
    "load_dataset",
    "load_digits",
    "load_npz",
    "make_spirals",
    "require",
]

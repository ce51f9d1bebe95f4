"""Small datasets for the command-line tool: one built in, one bundled with scikit-learn, and the user's own.

- ``spirals``: a deterministic synthetic nonlinear classification problem generated
  in code (interleaved noisy spiral arms, 2 features, 3 classes). No download, so
  ``fastgrad compare`` and ``fastgrad train`` work on a fresh install.
- ``digits``: scikit-learn's bundled 8×8 digits (64 features, 10 classes); needs
  the ``digits`` extra (``pip install "fastgrad[digits]"``).
- ``load_npz(path)``: the user's arrays. Keys: ``X`` (N, d) real features, and
  ``y``: either integer class labels (N,) in [0, K), or real targets (N,) or
  (N, k) for regression losses (``mse``, ``linear``, ``binary_cross_entropy``).
  The arrays' shapes and dtypes are read from the file's headers first: a file
  whose arrays would not fit in the memory available is refused before it is read.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..api import available_memory
from ..losses import CROSS_ENTROPY, loss_code
from ..extras import MissingExtraError, require

DATASETS: tuple[str, ...] = ("spirals", "digits")
"""Names accepted by :func:`load_dataset` (besides a ``.npz`` file)."""

MAX_CLASSES = 10_000
"""The most classes :func:`load_npz` accepts (labels 0..K-1 with K ≤ this, and K ≤ the number of
samples): a stray label such as 100000 would otherwise build a 100 001-output network."""


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

    def check_loss(self, loss: str) -> int:
        """``loss``'s code, or a ValueError when this dataset cannot be used with it (cross-entropy
        needs class labels); builds nothing, unlike :meth:`targets_for`."""
        code = loss_code(loss)
        if code == CROSS_ENTROPY and not self.is_classification:
            raise ValueError(
                f"loss: cross_entropy needs integer class labels, but dataset {self.name!r} "
                "has real-valued targets; choose mse, linear or binary_cross_entropy"
            )
        return code

    def targets_for(self, loss: str) -> np.ndarray:
        """``y`` in the form ``loss`` expects: labels for cross-entropy, one-hot rows for the
        other losses on a classification dataset, the targets themselves for regression."""
        if self.check_loss(loss) == CROSS_ENTROPY:
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


_NPZ_EXPECTED = (
    "expected an .npz archive written by numpy.savez or numpy.savez_compressed, with arrays "
    "'X' (N, d) and 'y' (N,) or (N, k)"
)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an .npz), or an empty one
_NPY_MAGIC = b"\x93NUMPY"


def format_bytes(n: float) -> str:
    """``n`` bytes in a unit a reader takes in at once: 512 B, 3.4 MiB, 37.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


@dataclass(frozen=True)
class _Member:
    """An array of an .npz archive as its header declares it, before any data is read."""

    key: str
    name: str  # the zip member, "X.npy"
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


def _sniff(path: str) -> None:
    """Refuse what is not a zip archive, saying what it looks like and what is expected."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head[:4] in _ZIP_MAGIC:
        return
    if head == _NPY_MAGIC:
        raise ValueError(
            f"data: {path!r} is a single .npy array, not an .npz archive; save X and y together "
            f"with numpy.savez('data.npz', X=X, y=y)"
        )
    raise ValueError(
        f"data: {path!r} is not an .npz archive; {_NPZ_EXPECTED}. A text or CSV file can be converted "
        "with numpy.loadtxt and numpy.savez"
    )


def _header(archive: zipfile.ZipFile, path: str, key: str) -> _Member:
    """The declared shape and dtype of ``key`` (read from the .npy header inside the archive)."""
    name = f"{key}.npy"
    fmt = np.lib.format
    with archive.open(name) as fh:
        try:
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _fortran_order, dtype = read(fh)
        except ValueError as exc:
            raise ValueError(f"data: array {key!r} in {path!r} has no valid .npy header ({exc})") from None
        header_size = fh.tell()
    if dtype.hasobject or not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise ValueError(f"data: array {key!r} must hold real numbers, got dtype {dtype}")
    if np.issubdtype(dtype, np.complexfloating) or np.issubdtype(dtype, np.timedelta64):
        raise ValueError(f"data: array {key!r} must hold real numbers, got dtype {dtype}")
    member = _Member(key, name, tuple(shape), dtype)
    if archive.getinfo(name).file_size < header_size + member.nbytes:
        raise ValueError(
            f"data: {path!r} is damaged: array {key!r} declares shape {member.shape} "
            f"({format_bytes(member.nbytes)}) but holds only {format_bytes(archive.getinfo(name).file_size)}"
        )
    return member


def _check_fits(path: str, X: _Member, y: _Member) -> None:
    """Refuse a file whose arrays would not fit in memory once loaded (X as float64, y as int64 or
    float64, plus the file's own arrays where they need converting)."""
    need = 0
    for member in (X, y):
        converted = int(np.prod(member.shape, dtype=object)) * 8
        need += converted + (member.nbytes if member.dtype != np.float64 else 0)
    avail = available_memory()
    if avail is not None and need > avail:
        raise ValueError(
            f"data: {path!r} declares X of shape {X.shape} ({X.dtype}) and y of shape {y.shape} "
            f"({y.dtype}); loading them needs about {format_bytes(need)} of memory, but only "
            f"{format_bytes(avail)} is available. Use a subset of the rows"
        )


def _all_finite(a: np.ndarray, rows: int = 1 << 16) -> bool:
    """``np.isfinite(a).all()`` a block of rows at a time, without an (N, d) boolean temporary."""
    return all(np.isfinite(a[i : i + rows]).all() for i in range(0, a.shape[0], rows))


def load_npz(path: str | os.PathLike) -> Dataset:
    """The user's arrays from a ``.npz`` file with keys ``X`` and ``y`` (see the module docstring).

    The shapes and dtypes are read from the arrays' headers before their data: a file that
    is not an ``.npz`` archive, that is damaged, that declares arrays of the wrong kind, or
    whose arrays would not fit in the memory available is refused without reading them.
    ``X`` is converted to float64 only when it is not float64 already (no copy then).

    Raises
    ------
    ValueError
        For a missing, unreadable or damaged file, a missing key, wrong shapes or dtypes,
        arrays larger than the memory available, non-finite values, or labels that are not
        class indices 0..K-1 with 2 ≤ K ≤ min(N, :data:`MAX_CLASSES`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data: no such file {path!r}")
    try:
        _sniff(path)
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            missing = [k for k in ("X", "y") if f"{k}.npy" not in names]
            if missing:
                found = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
                raise ValueError(
                    f"data: {path!r} lacks key(s) {', '.join(missing)}; expected arrays 'X' (N, d) and "
                    f"'y' (found: {found})"
                )
            hx, hy = _header(archive, path, "X"), _header(archive, path, "y")
            _check_shapes(hx.shape, hy.shape)
            _check_fits(path, hx, hy)
            X, y = (_read(archive, m) for m in (hx, hy))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"data: {path!r} is damaged or not a readable .npz archive ({exc})") from None
    except (ValueError, TypeError) as exc:
        if str(exc).startswith("data: "):
            raise
        raise ValueError(f"data: {path!r} is not a readable .npz archive ({exc})") from None
    X = np.asarray(X, dtype=np.float64)  # no copy when X is float64 already
    if not _all_finite(X):
        raise ValueError("data: array 'X' contains NaN or Inf")
    n = X.shape[0]
    name = os.path.basename(path)
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
        classes = np.unique(y)
        if classes[0] < 0 or len(classes) < 2:
            raise ValueError(
                f"data: integer labels 'y' must be class indices 0..K-1 with K ≥ 2, got values {classes[:10]}"
            )
        num_classes = int(classes[-1]) + 1
        if num_classes > min(n, MAX_CLASSES):
            raise ValueError(
                f"data: the largest label in 'y' is {classes[-1]:,}, which means {num_classes:,} classes "
                f"for {n:,} samples; labels must be class indices 0..K-1 with K at most the number of "
                f"samples and at most {MAX_CLASSES:,}"
            )
        return Dataset(name, X, y.astype(np.int64), num_classes)
    y = y.astype(np.float64).reshape(n, -1)
    if not np.isfinite(y).all():
        raise ValueError("data: array 'y' contains NaN or Inf")
    return Dataset(name, X, y, 0)


def _check_shapes(x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> None:
    if len(x_shape) != 2 or x_shape[0] == 0 or x_shape[1] == 0:
        raise ValueError(f"data: array 'X' must be 2-D (N, d) with N, d ≥ 1, got shape {x_shape}")
    n = x_shape[0]
    if y_shape[:1] != (n,) or len(y_shape) > 2:
        raise ValueError(f"data: array 'y' must have shape ({n},) or ({n}, k) to match X, got {y_shape}")


def _read(archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    with archive.open(member.name) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


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
    "MAX_CLASSES",
    "Dataset",
    "MissingExtraError",
    "available_memory",
    "format_bytes",
    "load_dataset",
    "load_digits",
    "load_npz",
    "make_spirals",
    "require",
]

"""The mislabel-detection study behind ``fastgrad influence``: flip some training labels, train,
and see whether the per-sample gradient inner products find them.

    fastgrad influence                      # digits, 5 % of the training labels flipped
    fastgrad influence --plot influence.png # and the training digits most influential on a few test digits

Steps (:func:`mislabel_study`):

1. split the data (train / test), flip ``flip_fraction`` of the training labels to another class
   chosen uniformly (seeded), and train an MLP on the noisy labels with plain SGD (the loop of
   ``fastgrad train``), keeping θ after every epoch as a checkpoint;
2. score every training sample, higher meaning "more likely mislabelled":

   - self-influence ‖∇ℓᵢ(θ_T)‖² at the final θ (``backprop(compute=("norms",))`` squared);
   - self-TracIn Σ_k η_k ‖∇ℓᵢ(θ_k)‖² over the checkpoints (the diagonal of TracIn);
   - TracIn against the test set, as the harm −Σ_j min(0, TracIn(zᵢ, z'_j)): how much the steps
     on zᵢ raised the loss of the test points they hurt (a mislabelled sample pulls the test
     points of its true class the wrong way);
   - the same, net: −Σ_j TracIn(zᵢ, z'_j). A mislabelled sample also *helps* the test points of
     the class it was given, so the net sum cancels much of the signal: kept to show it;
   - the loss ℓᵢ(θ_T), the usual baseline;

3. flag the top ``top_fraction`` of each ranking and report how many flipped labels it holds
   (precision, recall) and the AUC of the whole ranking, against a random ranking
   (expected precision = the flipped share, AUC = 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

import fastgrad

from ..api import available_memory, backprop
from ..mlp import MLP
from .datasets import Dataset, format_bytes
from .plotting import plot_path, pyplot
from .train import _check_positive, _check_train_args, _SGD, predict

LOSS = "cross_entropy"


@dataclass(frozen=True)
class Ranking:
    """How well one score finds the flipped labels."""

    name: str
    flagged: int  # the top ``top_fraction`` of the training samples
    found: float  # flipped labels among them (expected value for the random ranking)
    precision: float  # found / flagged
    recall: float  # found / number flipped
    auc: float  # P(score of a flipped sample > score of a clean one), ties counting ½


@dataclass
class InfluenceResult:
    """What :func:`mislabel_study` measured; :meth:`table` is the Markdown report."""

    dataset: str
    net: MLP
    theta: np.ndarray  # (P,) the final θ
    epochs: int
    batch_size: int
    lr: float
    seed: int
    dtype: str
    backend: str
    flip_fraction: float
    top_fraction: float
    train_X: np.ndarray  # (N, d)
    train_y: np.ndarray  # (N,) the labels trained on (flipped ones included)
    true_y: np.ndarray  # (N,) the labels before flipping
    flipped: np.ndarray  # (N,) bool
    test_X: np.ndarray  # (M, d)
    test_y: np.ndarray  # (M,)
    test_accuracy: float
    train_accuracy: float  # on the labels trained on
    scores: dict[str, np.ndarray]  # ranking name -> (N,) score, higher = more suspicious
    checkpoints: list[tuple[np.ndarray, float]]  # (θ_k, η_k) after each epoch
    tracin: np.ndarray  # (N, M) TracIn of each training sample against each test sample
    rankings: list[Ranking]

    @property
    def num_flipped(self) -> int:
        return int(self.flipped.sum())

    def table(self) -> str:
        """The setting in one paragraph, then one Markdown row per ranking."""
        n, m = len(self.train_y), len(self.test_y)
        pct = f"{100 * self.top_fraction:g} %"
        head = (
            f"{self.dataset}: {n} training samples, {self.num_flipped} labels flipped "
            f"({100 * self.flip_fraction:g} %, seed {self.seed}); MLP {list(self.net.sizes)}, "
            f"{self.net.activation}, {LOSS}, SGD lr = {self.lr:g}, B = {self.batch_size}, "
            f"{self.epochs} epochs, {self.epochs} checkpoints (θ after each epoch, η_k = lr), {self.dtype}, "
            f"backend {self.backend}; "
            f"accuracy on the noisy training labels {100 * self.train_accuracy:.1f} %, "
            f"on the {m} held-out samples {100 * self.test_accuracy:.1f} %."
        )
        lines = [
            head,
            "",
            f"| ranking (highest first) | flagged (top {pct}) | flipped found | precision | recall | AUC |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rankings:
            found = f"{r.found:.1f}" if r.name.startswith("random") else f"{r.found:.0f}"
            lines.append(
                f"| {r.name} | {r.flagged} | {found} | {r.precision:.3f} | {r.recall:.3f} | {r.auc:.3f} |"
            )
        return "\n".join(lines)

    def examples(self, count: int) -> list[int]:
        """The test samples the picture shows: the first ``count`` with distinct labels."""
        chosen, seen = [], set()
        for j, label in enumerate(self.test_y):
            if int(label) not in seen:
                chosen.append(j)
                seen.add(int(label))
            if len(chosen) == count:
                break
        return chosen

    def plot(self, path: str, examples: int = 4, per_side: int = 5) -> str:
        """For ``examples`` test digits, the ``per_side`` training digits with the largest TracIn
        (proponents: their steps lowered its loss) and the most negative (opponents), saved to
        ``path`` (``path + ".png"`` when it has no extension); returns the path written."""
        path = plot_path(path)
        side = math.isqrt(self.train_X.shape[1])
        plt = pyplot()
        cols = 1 + 2 * per_side
        rows = self.examples(examples)
        height = 1.45 * len(rows) + 1.0  # inches: 1.45 a row, 1 for the titles above
        fig, axes = plt.subplots(len(rows), cols, figsize=(1.05 * cols + 0.6, height), squeeze=False)
        for r, j in enumerate(rows):
            pred = int(np.argmax(predict(self.net, self.theta, self.test_X[j : j + 1])[0]))
            self._digit(axes[r, 0], self.test_X[j], side, f"test: {self.test_y[j]}\n(predicted {pred})", "k")
            column = self.tracin[:, j]
            order = np.argsort(-column, kind="stable")
            picks = list(order[:per_side]) + list(order[::-1][:per_side])
            for c, i in enumerate(picks, start=1):
                label = f"{self.train_y[i]}"
                color = "tab:blue" if c <= per_side else "tab:red"
                if self.flipped[i]:
                    label += f" (was {self.true_y[i]})"
                    color = "darkviolet"
                self._digit(axes[r, c], self.train_X[i], side, f"{label}\n{column[i]:+.2g}", color)
        axes[0, 1].annotate(
            "proponents (largest TracIn) →", (0, 1.55), xycoords="axes fraction", fontsize=9, color="tab:blue"
        )
        axes[0, 1 + per_side].annotate(
            "opponents (most negative TracIn) →",
            (0, 1.55),
            xycoords="axes fraction",
            fontsize=9,
            color="tab:red",
        )
        fig.suptitle(
            f"{self.dataset}, {self.num_flipped} training labels flipped: the training digits most "
            "influential on test digits (TracIn over checkpoints); label and TracIn under each, "
            "flipped labels in violet",
            fontsize=9,
        )
        fig.subplots_adjust(
            left=0.02, right=0.98, bottom=0.1 / height, top=1 - 1.0 / height, wspace=0.3, hspace=0.75
        )
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    @staticmethod
    def _digit(ax, x: np.ndarray, side: int, title: str, color: str) -> None:
        ax.imshow(x.reshape(side, side), cmap="gray_r", interpolation="nearest")
        ax.set_title(title, fontsize=8, color=color)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(color)


def flip_labels(y: np.ndarray, num_classes: int, fraction: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """``round(fraction · N)`` labels of ``y`` (N,) moved to another class, chosen uniformly among
    the other ``num_classes − 1`` (seeded): returns ``(noisy labels, flipped mask)``."""
    n = len(y)
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=round(fraction * n), replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    flipped = np.zeros(n, bool)
    flipped[idx] = True
    return noisy, flipped


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` (bool) samples: the
    Mann–Whitney U of positives against negatives over n₊ n₋ (ties count ½)."""
    from scipy.stats import mannwhitneyu

    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic / (len(pos) * len(neg)))


def rank(name: str, scores: np.ndarray, flipped: np.ndarray, top_fraction: float) -> Ranking:
    """Flag the ``top_fraction`` highest ``scores``; count the flipped labels among them."""
    k = max(1, round(top_fraction * len(scores)))
    top = np.argsort(-scores, kind="stable")[:k]
    found = int(flipped[top].sum())
    total = int(flipped.sum())
    return Ranking(name, k, found, found / k, found / total if total else float("nan"), auc(scores, flipped))


def random_ranking(n: int, num_flipped: int, top_fraction: float) -> Ranking:
    """What a random ranking finds on average: precision = the flipped share, AUC = ½."""
    k = max(1, round(top_fraction * n))
    found = k * num_flipped / n
    recall = found / num_flipped if num_flipped else float("nan")
    return Ranking("random (expected)", k, found, num_flipped / n, recall, 0.5)


def per_sample_loss(net: MLP, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ℓᵢ = −log softmax(z_L(xᵢ))_{yᵢ} (N,), in float64."""
    from scipy.special import logsumexp

    z = predict(net, theta, X).astype(np.float64)
    return logsumexp(z, axis=1) - z[np.arange(len(y)), y]


RANKINGS = (
    "self-influence ‖∇ℓᵢ(θ_T)‖²",
    "self-TracIn Σ_k η_k ‖∇ℓᵢ(θ_k)‖²",
    "TracIn harm to the test set, −Σ_j min(0, TracIn(zᵢ, z'_j))",
    "TracIn net on the test set, −Σ_j TracIn(zᵢ, z'_j)",
    "loss ℓᵢ(θ_T)",
)
"""The scores :func:`mislabel_study` ranks by, in the table's order."""


def mislabel_study(
    data: Dataset,
    hidden: Sequence[int] = (32,),
    activation: str = "tanh",
    flip_fraction: float = 0.05,
    top_fraction: float = 0.05,
    test_fraction: float = 0.2,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.1,
    seed: int = 0,
    dtype="float32",
    backend: str = "numpy",
    progress: Callable[[int], None] | None = None,
) -> InfluenceResult:
    """Flip labels, train with checkpoints, rank the training samples (see the module docstring).

    Parameters
    ----------
    data : Dataset
        A classification dataset (integer labels, K ≥ 2 classes).
    hidden : sequence of int
        Hidden widths of the MLP ``[d, *hidden, K]``.
    activation : str
    flip_fraction : float in (0, 1)
        Share of the training labels moved to another class.
    top_fraction : float in (0, 1)
        Share of the training samples each ranking flags.
    test_fraction : float in (0, 1)
        Held-out share: the test points TracIn is measured against.
    epochs, batch_size, lr, seed, dtype, backend
        As for :func:`fastgrad.tools.train.train_compare` (one method: the true gradient).
        ``seed`` also seeds the split and the flips. One checkpoint per epoch.
    progress : callable, optional
        Called with the number of SGD steps just taken, and with 1 per checkpoint scored.

    Returns
    -------
    InfluenceResult

    Raises
    ------
    ValueError
        For a regression dataset, a fraction outside (0, 1), too few samples to flip or hold
        out, a TracIn matrix that would not fit in memory, or training that diverged.
    """
    if not data.is_classification:
        raise ValueError(f"data: {data.name!r} has real-valued targets; flipping labels needs class labels")
    for name, value in (("flip_fraction", flip_fraction), ("top_fraction", top_fraction)):
        _check_positive(name, value)
        if value >= 1:
            raise ValueError(f"{name}: expected a number in (0, 1), got {value}")
    _check_positive("test_fraction", test_fraction)
    train, test = data.split(test_fraction, seed=seed)
    if test.num_samples == 0 or train.num_samples == 0:
        raise ValueError(
            f"test_fraction: {test_fraction} of {data.num_samples} samples leaves an empty train or test set"
        )
    noisy, flipped = flip_labels(train.y, data.num_classes, flip_fraction, seed=(seed, 2))
    if not flipped.any():
        raise ValueError(
            f"flip_fraction: {flip_fraction} of {train.num_samples} training samples flips no label"
        )
    dtype = np.dtype(dtype)
    need = train.num_samples * test.num_samples * dtype.itemsize * 2  # the TracIn matrix and a temporary
    avail = available_memory()
    if avail is not None and need > avail:
        raise ValueError(
            f"data: the TracIn matrix of {train.num_samples} training × {test.num_samples} test samples "
            f"needs {format_bytes(need)}, but only {format_bytes(avail)} is available"
        )
    noisy_train = Dataset(train.name, train.X, noisy, train.num_classes)
    net = MLP([data.num_features, *hidden, data.num_classes], activation=activation, loss=LOSS)
    _check_train_args(net, noisy_train, ("true",), epochs, batch_size, lr)

    checkpoints: list[tuple[np.ndarray, float]] = []
    sgd = _SGD(
        net,
        noisy_train,
        test,
        noisy,
        batch_size,
        lr,
        seed,
        backend,
        None,
        progress,
        on_epoch=lambda epoch, theta: checkpoints.append((theta, float(lr))),
    )
    theta0 = net.init(seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(train.num_samples) for _ in range(epochs)]
    history = sgd.run("true", theta0, orders)
    if history.diverged_at is not None:
        raise ValueError(f"lr: training diverged in epoch {history.diverged_at}; try a smaller --lr")
    theta = checkpoints[-1][0]

    X, Xt = train.X.astype(dtype), test.X.astype(dtype)
    final_norms = backprop(net, theta, X, noisy, ("norms",), backend=backend).norms.astype(np.float64)
    self_tracin = np.zeros(train.num_samples)
    for theta_k, eta_k in checkpoints:
        norms = backprop(net, theta_k, X, noisy, ("norms",), backend=backend).norms.astype(np.float64)
        self_tracin += eta_k * norms**2
        if progress is not None:
            progress(1)
    tracin = np.asarray(fastgrad.tracin(net, checkpoints, X, noisy, Xt, test.y, backend=backend))
    scores = dict(
        zip(
            RANKINGS,
            (
                final_norms**2,
                self_tracin,
                -np.minimum(tracin, 0).sum(axis=1, dtype=np.float64),
                -tracin.sum(axis=1, dtype=np.float64),
                per_sample_loss(net, theta, X, noisy),
            ),
        )
    )
    rankings = [rank(name, s, flipped, top_fraction) for name, s in scores.items()]
    rankings.append(random_ranking(train.num_samples, int(flipped.sum()), top_fraction))
    return InfluenceResult(
        dataset=data.name,
        net=net,
        theta=theta,
        epochs=int(epochs),
        batch_size=int(batch_size),
        lr=float(lr),
        seed=int(seed),
        dtype=dtype.name,
        backend=backend,
        flip_fraction=float(flip_fraction),
        top_fraction=float(top_fraction),
        train_X=X,
        train_y=noisy,
        true_y=train.y,
        flipped=flipped,
        test_X=Xt,
        test_y=test.y,
        test_accuracy=history.test_accuracy[-1],
        train_accuracy=history.train_accuracy[-1],
        scores=scores,
        checkpoints=checkpoints,
        tracin=tracin,
        rankings=rankings,
    )


__all__ = [
    "RANKINGS",
    "InfluenceResult",
    "Ranking",
    "auc",
    "flip_labels",
    "mislabel_study",
    "per_sample_loss",
    "random_ranking",
    "rank",
]

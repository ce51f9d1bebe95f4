"""The training demo and the sweep behind ``fastgrad train`` and ``fastgrad sweep``.

``train_compare`` trains the same network from the same θ on the same minibatch
sequence with the true mean gradient, with each shortcut, and optionally with
DP-SGD, and records the loss curves: the picture that shows what the shortcut
costs. ``sweep_shortcut`` measures the shortcut's error against batch size,
depth and activation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import privacy, reference
from ..api import ClippedGrad, backprop, clipped_grad
from ..extras import MissingExtraError
from .datasets import Dataset
from .plotting import plot_path, pyplot
from ..losses import CROSS_ENTROPY
from ..mlp import MLP
from ..shortcut import METHODS, compare_shortcut, shortcut_grad

TRAIN_METHODS: tuple[str, ...] = ("true", *METHODS, "dp_sgd")
"""Methods ``train_compare`` knows: the true gradient, each shortcut, DP-SGD."""


def predict(net: MLP, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Network outputs z_L (N, n_L) for inputs X (N, n0)."""
    X = np.ascontiguousarray(X, dtype=theta.dtype)
    return reference.forward(net, theta, X)[0][-1]


def evaluate(net: MLP, theta: np.ndarray, data: Dataset, backend: str = "numpy") -> tuple[float, float]:
    """Mean loss on ``data`` and, for a classification dataset, accuracy (argmax of z_L); else NaN."""
    if data.num_samples == 0:
        return float("nan"), float("nan")
    loss = backprop(net, theta, data.X, data.targets_for(net.loss), ("loss",), backend=backend).loss
    if not data.is_classification:
        return loss, float("nan")
    acc = float(np.mean(np.argmax(predict(net, theta, data.X), axis=1) == data.y))
    return loss, acc


@dataclass
class MethodHistory:
    """One method's record per epoch (index 0 = before training): losses and accuracies."""

    method: str
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    diverged_at: int | None = None  # epoch at which θ became non-finite
    epsilon: list[float] = field(default_factory=list)  # DP-SGD only: ε spent by the end of each epoch
    clip_fraction: list[float] = field(
        default_factory=list
    )  # DP-SGD only: share of the epoch's samples clipped


@dataclass(frozen=True)
class DPSettings:
    """How :func:`train_compare` ran DP-SGD: Poisson sampling at rate q = B / N, the clipped sum
    divided by the expected batch size B, ε from ``fastgrad.privacy.epsilon`` at δ."""

    max_norm: float
    noise_multiplier: float  # σ: given, or calibrated for target_epsilon over the whole run
    sampling_rate: float
    steps_per_epoch: int
    delta: float
    accountant: str
    target_epsilon: float | None = None
    accounting: bool = True  # False when dp-accounting is not installed (ε then NaN)


@dataclass
class TrainResult:
    """What :func:`train_compare` recorded, one :class:`MethodHistory` per method."""

    histories: dict[str, MethodHistory]
    sizes: tuple[int, ...]
    activation: str
    loss: str
    dataset: str
    epochs: int
    batch_size: int
    lr: float
    backend: str
    dtype: str
    dp: DPSettings | None = None

    def table(self) -> str:
        """Final loss and accuracy per method, as text."""
        head = (
            f"training {self.dataset}: sizes {list(self.sizes)}, {self.activation}, {self.loss}, "
            f"B = {self.batch_size}, lr = {self.lr:g}, {self.epochs} epochs, {self.dtype}, "
            f"backend {self.backend}"
        )
        cols = f"{'method':<11} {'train loss':>11} {'train acc':>10} {'test loss':>10} {'test acc':>9}  note"
        lines = [head, cols, "-" * len(cols)]
        for h in self.histories.values():
            note = f"diverged in epoch {h.diverged_at}" if h.diverged_at is not None else ""
            lines.append(
                f"{h.method:<11} {_fmt(h.train_loss[-1]):>11} {_fmt(h.train_accuracy[-1], pct=True):>10} "
                f"{_fmt(h.test_loss[-1]):>10} {_fmt(h.test_accuracy[-1], pct=True):>9}  {note}".rstrip()
            )
        return "\n".join(lines)

    def dp_table(self) -> str:
        """DP-SGD's settings, then ε spent and the share of samples clipped, per epoch."""
        dp, h = self.dp, self.histories.get("dp_sgd")
        if dp is None or h is None:
            return ""
        how = (
            f"calibrated for ε = {dp.target_epsilon:g} over {self.epochs} epochs"
            if dp.target_epsilon is not None
            else "given"
        )
        lines = [
            f"DP-SGD: clipping norm C = {dp.max_norm:g}, noise multiplier σ = {dp.noise_multiplier:.4g} "
            f"({how}); Poisson sampling q = {dp.sampling_rate:.4g} (expected batch {self.batch_size}), "
            f"{dp.steps_per_epoch} steps per epoch; ε at δ = {dp.delta:g} ({dp.accountant} accountant)",
        ]
        if not dp.accounting:
            lines.append(f"ε not computed: {MissingExtraError('dp_accounting', 'dp', 'privacy accounting')}")
        lines += [f"{'epoch':>5} {'ε spent':>9} {'clipped':>8}", "-" * 24]
        for e in range(1, len(h.epsilon)):
            lines.append(f"{e:>5} {h.epsilon[e]:>9.4f} {_fmt(h.clip_fraction[e], pct=True):>8}")
        return "\n".join(lines)

    def _label(self, h: MethodHistory) -> str:
        label = _LABELS.get(h.method, h.method)
        if h.method == "dp_sgd" and self.dp is not None and h.epsilon and np.isfinite(h.epsilon[-1]):
            label += f": ε = {h.epsilon[-1]:.3f}, δ = {self.dp.delta:g}"
        return label

    def plot(self, path: str) -> str:
        """Loss curves (train loss per epoch, per method) and test accuracy, saved to ``path``
        (``path + ".png"`` when it has no extension); returns the path written."""
        path = plot_path(path)
        plt = pyplot()
        with_acc = any(np.isfinite(h.test_accuracy).any() for h in self.histories.values())
        fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(11 if with_acc else 6.5, 4.2))
        axes = np.atleast_1d(axes)
        epochs = np.arange(self.epochs + 1)
        for h, style in zip(self.histories.values(), _STYLES):
            n = len(h.train_loss)
            axes[0].plot(epochs[:n], h.train_loss, label=self._label(h), **style)
            if h.method == "dp_sgd":
                _annotate_epsilon(axes[0], h, style["color"])
            if with_acc:
                axes[1].plot(epochs[:n], np.asarray(h.test_accuracy) * 100, **style)
        axes[0].set_xlabel("epoch")
        axes[0].set_ylabel(f"training loss ({self.loss})")
        axes[0].set_yscale("log")
        axes[0].set_title("training loss")
        axes[0].legend(frameon=False)
        if with_acc:
            axes[1].set_xlabel("epoch")
            axes[1].set_ylabel("held-out accuracy (%)")
            axes[1].set_title("held-out accuracy")
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle(
            f"{self.dataset}: MLP {list(self.sizes)}, {self.activation}, {self.loss}, "
            f"B = {self.batch_size}, SGD lr = {self.lr:g}, same seed and batches"
            + (" (DP-SGD: Poisson batches of expected size B)" if self.dp is not None else ""),
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _annotate_epsilon(ax, h: MethodHistory, color: str) -> None:
    """ε spent so far, written beside DP-SGD's loss curve at (up to 8 of) its epochs."""
    n = min(len(h.epsilon), len(h.train_loss))
    for e in range(1, n, max(1, (n - 1) // 8)):
        if np.isfinite(h.epsilon[e]) and np.isfinite(h.train_loss[e]):
            ax.annotate(
                f"ε={h.epsilon[e]:.2f}",
                (e, h.train_loss[e]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
                color=color,
            )


_LABELS = {
    "true": "true gradient (fastgrad)",
    "mean_error": "shortcut: mean error",
    "mean_input": "shortcut: mean input",
    "dp_sgd": "DP-SGD (clip + noise)",
}
_STYLES = [
    {"color": "black", "linewidth": 2.2},
    {"color": "tab:red", "linestyle": "--"},
    {"color": "tab:orange", "linestyle": "-."},
    {"color": "tab:blue", "linestyle": ":"},
    {"color": "tab:green"},
]


def _fmt(x: float, pct: bool = False) -> str:
    if not np.isfinite(x):
        return "-" if np.isnan(x) else "inf"
    return f"{100 * x:.1f}%" if pct else f"{x:.4f}"


def _check_positive(name: str, value, kind=float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0 or (kind is int and int(value) != value):
        raise ValueError(f"{name}: expected a positive {'integer' if kind is int else 'number'}, got {value}")


def _check_train_args(net: MLP, train: Dataset, methods: tuple, epochs, batch_size, lr) -> None:
    for m in methods:
        if m not in TRAIN_METHODS:
            raise ValueError(f"methods: unknown method {m!r}; expected any of {', '.join(TRAIN_METHODS)}")
    if not methods:
        raise ValueError(f"methods: empty; expected any of {', '.join(TRAIN_METHODS)}")
    _check_positive("epochs", epochs, int)
    _check_positive("batch_size", batch_size, int)
    _check_positive("lr", lr)
    if train.num_features != net.n_in:
        raise ValueError(
            f"sizes: the network takes {net.n_in} inputs but dataset {train.name!r} has "
            f"{train.num_features} features"
        )
    if train.num_outputs != net.n_out:
        raise ValueError(
            f"sizes: the network has {net.n_out} outputs but dataset {train.name!r} needs {train.num_outputs}"
        )
    if batch_size > train.num_samples:
        raise ValueError(f"batch_size: {batch_size} exceeds the {train.num_samples} training samples")
    if net.loss_code == CROSS_ENTROPY and not train.is_classification:
        train.targets_for(net.loss)  # raises the explanatory ValueError


@dataclass
class _SGD:
    """Plain SGD on one dataset with the settings of :func:`train_compare`, one method at a time."""

    net: MLP
    train: Dataset
    test: Dataset
    Y: np.ndarray  # the training targets in the form net.loss takes
    batch_size: int
    lr: float
    seed: int
    backend: str
    dp: DPSettings | None
    progress: Callable[[int], None] | None
    on_epoch: Callable[[int, np.ndarray], None] | None = None  # (epoch, θ after it): checkpoints

    def gradient(self, method: str, theta: np.ndarray, idx: np.ndarray, epoch: int, step: int):
        X, y = self.train.X[idx], self.Y[idx]
        if method == "true":
            return backprop(self.net, theta, X, y, ("grad",), backend=self.backend).grad
        if method == "dp_sgd":
            return self.dp_step(theta, X, y, noise_seed=(self.seed, epoch, step))
        return shortcut_grad(self.net, theta, X, y, method)

    def dp_step(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, noise_seed) -> ClippedGrad:
        """DP-SGD's step on a Poisson batch: clipped sum plus noise, over the expected batch size."""
        dp = self.dp
        if len(X) == 0:  # Poisson sampling may draw no one: the step is the noise alone
            no_norms = np.zeros(0, theta.dtype)
            grad = privacy.dp_step(
                np.zeros_like(theta), no_norms, dp.max_norm, dp.noise_multiplier, self.batch_size, noise_seed
            )
            noise_std = dp.noise_multiplier * dp.max_norm
            return ClippedGrad(grad, no_norms, 0.0, noise_std, float(self.batch_size))
        return clipped_grad(
            self.net,
            theta,
            X,
            y,
            dp.max_norm,
            dp.noise_multiplier,
            noise_seed,
            self.backend,
            expected_batch_size=self.batch_size,
            return_stats=True,
        )

    def poisson_batches(self, epochs: int) -> list[list[np.ndarray]]:
        """Each epoch's Poisson batches (rate B / N). Their seed (seed, 0, 1) is no noise step's
        (seed, epoch ≥ 1, step), nor the orders' seed (which SeedSequence reads as (seed, 0, 0))."""
        steps = self.dp.steps_per_epoch
        batches = list(
            privacy.poisson_batches(
                self.train.num_samples, self.dp.sampling_rate, epochs * steps, seed=(self.seed, 0, 1)
            )
        )
        return [batches[e * steps : (e + 1) * steps] for e in range(epochs)]

    def run(self, method: str, theta0: np.ndarray, orders: list[np.ndarray]) -> MethodHistory:
        """Train from ``theta0`` with ``method``, one epoch per entry of ``orders`` (DP-SGD: one
        epoch of Poisson batches per entry)."""
        h = MethodHistory(method)
        theta = theta0.copy()
        steps = self.train.num_samples // self.batch_size
        epochs = len(orders)
        poisson = self.poisson_batches(epochs) if method == "dp_sgd" else None
        if poisson is not None:
            h.clip_fraction.append(float("nan"))  # index 0: before training
        _record(h, self.net, theta, self.train, self.test, self.backend)
        for epoch in range(1, epochs + 1):
            clipped = seen = 0
            for s in range(steps):
                if poisson is not None:
                    idx = poisson[epoch - 1][s]
                else:
                    idx = orders[epoch - 1][s * self.batch_size : (s + 1) * self.batch_size]
                # a diverging run overflows on its way to Inf/NaN; that is caught just below
                with np.errstate(all="ignore"):
                    step = self.gradient(method, theta, idx, epoch, s)
                    if isinstance(step, ClippedGrad):
                        clipped += round(step.clip_fraction * step.batch_size)
                        seen += step.batch_size
                        step = step.grad
                    theta -= theta.dtype.type(self.lr) * step
                if not np.isfinite(theta).all():
                    h.diverged_at = epoch
                    break
            if poisson is not None:
                h.clip_fraction.append(clipped / seen if seen else float("nan"))
            if self.progress is not None:
                self.progress(steps if h.diverged_at is None else steps * (epochs - epoch + 1))
            if h.diverged_at is not None:
                for rec in (h.train_loss, h.test_loss):
                    rec.append(float("inf"))
                for rec in (h.train_accuracy, h.test_accuracy):
                    rec.append(float("nan"))
                break
            _record(h, self.net, theta, self.train, self.test, self.backend)
            if self.on_epoch is not None:
                self.on_epoch(epoch, theta.copy())
        return h


def train_compare(
    net: MLP,
    train: Dataset,
    test: Dataset | None = None,
    methods: Sequence[str] = TRAIN_METHODS[:3],
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 0.1,
    seed: int = 0,
    dtype=np.float32,
    backend: str = "numpy",
    max_norm: float = 1.0,
    noise_multiplier: float | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    target_epsilon: float | None = None,
    delta: float = 1e-5,
    accountant: str = "rdp",
) -> TrainResult:
    """Train ``net`` from the same initial θ and minibatch order with each method; record loss curves.

    Parameters
    ----------
    net : MLP
        Its ``sizes[0]`` must match the features and ``sizes[-1]`` the classes (or target width).
    train, test : Dataset
        Training data and optional held-out data (evaluated after every epoch).
    methods : sequence of str
        Any of ``true`` (the true mean gradient from ``backend``), ``mean_error``,
        ``mean_input`` (the shortcuts) and ``dp_sgd``: DP-SGD on Poisson batches (each
        sample taken with probability q = B / N, N // B steps per epoch), the clipped sum
        plus Gaussian noise of standard deviation ``noise_multiplier * max_norm`` divided by
        the expected batch size B, as Opacus does.
    epochs, batch_size : int
        Plain SGD, ``theta -= lr * g``; the last partial batch of an epoch is dropped.
    lr : float
    seed : int
        Seeds θ's initialisation, the minibatch order and DP-SGD's noise.
    dtype : float32 or float64
    backend : str
        Backend of the true gradient, DP-SGD and the loss evaluations.
    max_norm, noise_multiplier : float
        DP-SGD's clipping norm C and noise multiplier σ (default 0.5 unless ``target_epsilon``).
    progress : callable, optional
        Called with the number of SGD steps just taken (for a progress bar).
    target_epsilon : float, optional
        Calibrate σ so that the whole run spends at most this ε at ``delta``
        (:func:`fastgrad.privacy.calibrate_noise_multiplier`; needs the ``dp`` extra).
    delta : float
        δ of the ε reported for DP-SGD after each epoch (``MethodHistory.epsilon``).
    accountant : {"rdp", "pld"}
        The accountant of ε (:func:`fastgrad.privacy.epsilon`).

    Returns
    -------
    TrainResult
        A method whose θ becomes non-finite stops there (``diverged_at``); its last
        recorded values are then ``inf``/NaN.
    """
    methods = tuple(methods)
    _check_train_args(net, train, methods, epochs, batch_size, lr)
    dp = None
    if "dp_sgd" in methods:
        dp = _dp_settings(
            train, epochs, batch_size, max_norm, noise_multiplier, target_epsilon, delta, accountant
        )
    test = test if test is not None else train.subset(np.arange(0))
    sgd = _SGD(net, train, test, train.targets_for(net.loss), batch_size, lr, seed, backend, dp, progress)
    theta0 = net.init(seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(train.num_samples) for _ in range(epochs)]
    histories = {method: sgd.run(method, theta0, orders) for method in methods}
    if "dp_sgd" in histories:
        h = histories["dp_sgd"]
        h.epsilon = [_epsilon_spent(dp, e * dp.steps_per_epoch) for e in range(len(h.train_loss))]
    return TrainResult(
        histories,
        net.sizes,
        net.activation,
        net.loss,
        train.name,
        int(epochs),
        int(batch_size),
        float(lr),
        backend,
        np.dtype(dtype).name,
        dp,
    )


def _dp_settings(train, epochs, batch_size, max_norm, noise_multiplier, target_epsilon, delta, accountant):
    """DP-SGD's settings, σ calibrated when a target ε is given; every argument checked first."""
    if target_epsilon is not None and noise_multiplier is not None:
        raise ValueError("noise_multiplier: give it or target_epsilon, not both")
    _check_positive("max_norm", max_norm)
    if noise_multiplier is not None and noise_multiplier != 0:
        _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("delta", delta)
    if delta >= 1:
        raise ValueError(f"delta: expected a probability in (0, 1), got {delta}")
    if accountant not in privacy.ACCOUNTANTS:
        raise ValueError(
            f"accountant: unknown {accountant!r}; expected one of {', '.join(privacy.ACCOUNTANTS)}"
        )
    q = batch_size / train.num_samples
    steps = train.num_samples // batch_size
    if target_epsilon is not None:
        sigma = privacy.calibrate_noise_multiplier(target_epsilon, delta, q, epochs * steps, accountant)
    else:
        sigma = 0.5 if noise_multiplier is None else float(noise_multiplier)
    accounting = privacy.accounting_available()
    return DPSettings(float(max_norm), sigma, q, steps, float(delta), accountant, target_epsilon, accounting)


def _epsilon_spent(dp: DPSettings, steps: int) -> float:
    if not dp.accounting:
        return float("nan")
    return privacy.epsilon(dp.noise_multiplier, dp.sampling_rate, steps, dp.delta, dp.accountant)


def _record(h: MethodHistory, net, theta, train, test, backend) -> None:
    with np.errstate(all="ignore"):  # a large but finite θ may overflow the loss to inf
        _record_unguarded(h, net, theta, train, test, backend)


def _record_unguarded(h: MethodHistory, net, theta, train, test, backend) -> None:
    loss, acc = evaluate(net, theta, train, backend)
    h.train_loss.append(loss)
    h.train_accuracy.append(acc)
    loss, acc = evaluate(net, theta, test, backend)
    h.test_loss.append(loss)
    h.test_accuracy.append(acc)


# ---------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class SweepPoint:
    """The total relative error of each shortcut at one setting of the sweep."""

    axis: str  # "batch_size", "depth" or "activation"
    value: int | str
    sizes: tuple[int, ...]
    activation: str
    batch_size: int
    rel_error: dict[str, float]
    cosine: dict[str, float]


@dataclass
class SweepResult:
    points: list[SweepPoint]
    loss: str
    dataset: str
    seeds: int

    def table(self) -> str:
        methods = list(self.points[0].rel_error) if self.points else []
        head = (
            f"shortcut error on {self.dataset}, {self.loss}: relative error ‖g_s − g‖/‖g‖ and cosine, "
            f"median over {self.seeds} seed(s)"
        )
        cols = f"{'axis':<11} {'value':>10} {'sizes':<22} {'act':<10} {'B':>5}" + "".join(
            f" {m + ' err':>15} {'cos':>7}" for m in methods
        )
        lines = [head, cols, "-" * len(cols)]
        for p in self.points:
            lines.append(
                f"{p.axis:<11} {p.value!s:>10} {list(p.sizes)!s:<22} {p.activation:<10} {p.batch_size:>5}"
                + "".join(f" {p.rel_error[m]:>15.4g} {p.cosine[m]:>7.3f}" for m in methods)
            )
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """One panel per swept axis: relative error of each shortcut, saved to ``path``
        (``path + ".png"`` when it has no extension); returns the path written."""
        path = plot_path(path)
        plt = pyplot()
        axes_names = [
            a for a in ("batch_size", "depth", "activation") if any(p.axis == a for p in self.points)
        ]
        fig, axes = plt.subplots(1, len(axes_names), figsize=(4.6 * len(axes_names), 4.0), squeeze=False)
        titles = {"batch_size": "batch size B", "depth": "hidden layers", "activation": "activation"}
        for ax, name in zip(axes[0], axes_names):
            pts = [p for p in self.points if p.axis == name]
            methods = list(pts[0].rel_error)
            x = np.arange(len(pts))
            for i, (m, style) in enumerate(zip(methods, _STYLES[1:])):
                err = [p.rel_error[m] for p in pts]
                if name == "activation":
                    w = 0.8 / len(methods)
                    ax.bar(
                        x + (i - (len(methods) - 1) / 2) * w, err, w, label=_LABELS[m], color=style["color"]
                    )
                else:
                    ax.plot(x, err, marker="o", label=_LABELS[m], **style)
            ax.set_xticks(x, [str(p.value) for p in pts], rotation=30 if name == "activation" else 0)
            ax.set_ylim(0, max(1.05, 1.05 * max(max(p.rel_error.values()) for p in pts)))
            ax.set_xlabel(titles[name])
            ax.set_ylabel("relative error ‖g_s − g‖ / ‖g‖")
            ax.set_title(f"error vs {titles[name]}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(frameon=False)
        fig.suptitle(
            f"{self.dataset}, {self.loss}: how far the shortcut is from the true gradient", fontsize=10
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def sweep_shortcut(
    data: Dataset,
    loss: str = "cross_entropy",
    width: int = 32,
    batch_sizes: Sequence[int] = (1, 4, 16, 64, 256),
    depths: Sequence[int] = (1, 2, 3, 4),
    activations: Sequence[str] = ("identity", "relu", "tanh", "sigmoid", "gelu"),
    base_depth: int = 2,
    base_batch: int = 64,
    base_activation: str = "tanh",
    seeds: int = 3,
    dtype=np.float64,
    backend: str = "numpy",
    progress: Callable[[int], None] | None = None,
) -> SweepResult:
    """Total relative error of both shortcuts at the initial θ, varying one thing at a time.

    Each point fixes the other two at ``base_*``; the network has ``depth`` hidden
    layers of ``width`` units. The error is the median over ``seeds`` draws of
    (θ, batch); batches are drawn from ``data`` without replacement.

    Returns
    -------
    SweepResult
    """
    _check_positive("width", width, int)
    _check_positive("seeds", seeds, int)
    _check_positive("base_batch", base_batch, int)
    uses_base = len(depths) + len(activations) > 0
    for name, b in [("batch_sizes", b) for b in batch_sizes] + [("base_batch", base_batch)] * uses_base:
        _check_positive(name, b, int)
        if b > data.num_samples:
            raise ValueError(f"{name}: {b} exceeds the {data.num_samples} samples of {data.name!r}")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"depths: expected non-negative integers (hidden layers), got {d!r}")
    settings = (
        [("batch_size", b, base_depth, base_activation, b) for b in batch_sizes]
        + [("depth", d, d, base_activation, base_batch) for d in depths]
        + [("activation", a, base_depth, a, base_batch) for a in activations]
    )
    y_all = data.targets_for(loss)
    points = []
    for axis, value, depth, act, B in settings:
        sizes = [data.num_features, *([width] * depth), data.num_outputs]
        net = MLP(sizes, activation=act, loss=loss)
        errs: dict[str, list[float]] = {m: [] for m in METHODS}
        coss: dict[str, list[float]] = {m: [] for m in METHODS}
        for s in range(seeds):
            theta = net.init(seed=s, dtype=dtype)
            idx = np.random.default_rng(1000 + s).choice(data.num_samples, size=B, replace=False)
            rep = compare_shortcut(net, theta, data.X[idx], y_all[idx], backend=backend)
            for m in METHODS:
                errs[m].append(rep.row(m).rel_error)
                coss[m].append(rep.row(m).cosine)
        points.append(
            SweepPoint(
                axis,
                value,
                tuple(sizes),
                act,
                B,
                {m: float(np.median(v)) for m, v in errs.items()},
                {
                    m: float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")
                    for m, v in coss.items()
                },
            )
        )
        if progress is not None:
            progress(1)
    return SweepResult(points, loss, data.name, int(seeds))


__all__ = [
    "TRAIN_METHODS",
    "MethodHistory",
    "SweepPoint",
    "SweepResult",
    "TrainResult",
    "evaluate",
    "predict",
    "sweep_shortcut",
    "train_compare",
]

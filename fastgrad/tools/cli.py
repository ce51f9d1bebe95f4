"""The ``fastgrad`` command: compare, train, sweep, influence, validate, bench, stats.

    fastgrad compare                  # true gradient vs both shortcuts, per layer
    fastgrad train --plot loss.png    # same net, same seed: true gradient vs shortcuts (vs DP-SGD)
    fastgrad sweep --plot sweep.png   # the shortcut's error against batch size, depth, activation
    fastgrad influence                # find flipped labels by self-influence and TracIn (digits)
    fastgrad validate                 # kernels against the NumPy reference
    fastgrad bench                    # the quick peer comparison

The command never shows a traceback; it ends with a one-line message on stderr and
exit status

- 2: a bad argument, a file it cannot use, a missing optional package, or a size
  that would not fit in memory (all found before the work starts, where they can be);
- 1: a failure during the work: out of memory, a file it cannot write, or an
  unexpected error (a bug: run again with ``FASTGRAD_DEBUG=1`` for the traceback);
- 130: interrupted (Ctrl-C), also when the interrupt arrived inside a callback
  from compiled code (LLVM's, while Numba compiles), where Python would only print it.
  (A Ctrl-C while Python is still importing NumPy and Numba, before :func:`main`
  runs, gets Python's own report.)
"""

from __future__ import annotations

import _thread
import argparse
import importlib
import math
import os
import sys
import threading
from collections.abc import Sequence

import numpy as np

from .. import api
from ..activations import ACTIVATIONS
from .datasets import DATASETS, MissingExtraError, available_memory, format_bytes, load_dataset
from ..losses import LOSSES

PROG = "fastgrad"
BACKEND_CHOICES = ("auto", *api.BACKENDS)


class UsageError(Exception):
    """A bad argument found after parsing; printed as ``fastgrad: error: ...``."""


def resolve_backend(name: str) -> str:
    """:func:`fastgrad.resolve_backend` (``auto`` → the fastest backend that runs here), with
    the reason a backend cannot run here as a :class:`UsageError` about ``--backend``."""
    try:
        return api.resolve_backend(name)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--backend {name}: cannot run here: {exc}") from None


# ---------------------------------------------------------------- arguments


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _hidden(text: str) -> list[int]:
    values = [] if text.strip() in ("", "none") else _int_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"hidden widths must be ≥ 1, got {text!r}")
    return values


def _number_parser(cast, accept, what: str):
    """An argparse type: ``cast(text)``, refused unless finite and ``accept(value)``."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not np.isfinite(v) or not accept(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _number_parser(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number_parser(float, lambda v: v > 0, "a positive number")
_nonneg_float = _number_parser(float, lambda v: v >= 0, "a non-negative number")
_seed = _number_parser(int, lambda v: v >= 0, "a non-negative integer")
_fraction = _number_parser(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default="spirals",
        help="built-in synthetic spirals (default), or scikit-learn's digits (extra: digits)",
    )
    g.add_argument(
        "--data",
        metavar="FILE.npz",
        help="your own arrays instead: key 'X' (N, d) features and key 'y' with integer labels (N,) "
        "or real targets (N,) / (N, k)",
    )


def _add_net_args(p: argparse.ArgumentParser, hidden: str, batch: int) -> None:
    g = p.add_argument_group("network")
    g.add_argument(
        "--hidden",
        type=_hidden,
        default=_hidden(hidden),
        metavar="N1,N2,...",
        help=f"hidden widths; input and output widths come from the data (default {hidden})",
    )
    g.add_argument("--activation", choices=ACTIVATIONS, default="tanh", help="hidden activation (tanh)")
    g.add_argument(
        "--loss",
        choices=LOSSES,
        default=None,
        help="loss (cross_entropy for labelled data, mse for real targets)",
    )
    g.add_argument("--batch-size", type=_positive_int, default=batch, metavar="B", help=f"(default {batch})")
    g.add_argument(
        "--seed", type=_seed, default=0, help="seed of θ's initialisation and of the batches, ≥ 0 (0)"
    )
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="backend of the true gradient; auto = the fastest that runs here "
        f"({', '.join(api.BACKEND_PREFERENCE)})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-sample backpropagation for dense MLPs, and how wrong the "
        "'average the error first' shortcut is.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"fastgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compare", help="true gradient vs both shortcuts, per layer, on one batch")
    _add_data_args(p)
    _add_net_args(p, "32,32", 64)

    p = sub.add_parser("train", help="train with the true gradient vs the shortcuts (and DP-SGD)")
    _add_data_args(p)
    _add_net_args(p, "32,32", 32)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=30, help="(default 30)")
    g.add_argument("--lr", type=_positive_float, default=0.2, help="SGD learning rate (default 0.2)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the data (0.2)")
    g.add_argument("--plot", metavar="FILE.png", help="draw the loss curves (extra: plot)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("DP-SGD (Poisson sampling at rate B/N, noise over the expected batch size)")
    g.add_argument("--dp", action="store_true", help="also train with DP-SGD (clip + noise) and report ε")
    g.add_argument("--max-norm", type=_positive_float, default=1.0, help="clipping norm C (1.0)")
    sigma = g.add_mutually_exclusive_group()
    sigma.add_argument("--noise-multiplier", type=_nonneg_float, default=None, help="noise σ (0.5)")
    sigma.add_argument(
        "--epsilon",
        type=_positive_float,
        default=None,
        help="calibrate σ so that the whole run spends at most this ε (extra: dp)",
    )
    g.add_argument(
        "--delta",
        type=_number_parser(float, lambda v: 0 < v < 1, "a probability in (0, 1)"),
        default=1e-5,
        help="δ of the ε reported (1e-5; keep it below 1/N)",
    )
    g.add_argument("--accountant", choices=("rdp", "pld"), default="rdp", help="ε's accountant (rdp)")

    p = sub.add_parser("sweep", help="the shortcut's error against batch size, depth and activation")
    _add_data_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--loss", choices=LOSSES, default=None, help="(cross_entropy for labelled data)")
    g.add_argument("--width", type=_positive_int, default=32, help="hidden width (32)")
    g.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 16, 64, 256], metavar="B1,B2,...")
    g.add_argument(
        "--depths",
        type=_int_list,
        default=[0, 1, 2, 3, 4],
        metavar="D1,D2,...",
        help="numbers of hidden layers (0,1,2,3,4)",
    )
    g.add_argument("--activations", default="identity,relu,tanh,sigmoid,gelu", metavar="A1,A2,...")
    g.add_argument("--base-depth", type=int, default=2, help="hidden layers while the others vary (2)")
    g.add_argument(
        "--base-batch", type=_positive_int, default=64, help="batch size while the others vary (64)"
    )
    g.add_argument("--base-activation", choices=ACTIVATIONS, default="tanh")
    g.add_argument("--seeds", type=_positive_int, default=3, help="median over this many θ/batch draws (3)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    g.add_argument("--plot", metavar="FILE.png", help="draw the error curves (extra: plot)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "influence",
        help="flip some training labels, train, and find them by self-influence and TracIn",
        description="Mislabel detection with per-sample gradient inner products: flip a share of the "
        "training labels (seeded), train an MLP with SGD keeping θ after every epoch, rank the "
        "training samples by self-influence, self-TracIn, TracIn against the test set and loss, "
        "and print a Markdown table of how many flipped labels each ranking's top share holds.",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="scikit-learn's digits (default; extra: digits), or the built-in spirals",
    )
    g.add_argument(
        "--data", metavar="FILE.npz", help="your own arrays instead: 'X' (N, d) and integer labels 'y' (N,)"
    )
    g.add_argument("--test-fraction", type=_fraction, default=0.2, help="held-out share (0.2)")
    g.add_argument(
        "--flip-fraction", type=_fraction, default=0.05, help="share of training labels flipped (0.05)"
    )
    g.add_argument(
        "--top-fraction", type=_fraction, default=0.05, help="share of training samples flagged (0.05)"
    )
    g = p.add_argument_group("network and training (cross-entropy, plain SGD, one checkpoint per epoch)")
    g.add_argument("--hidden", type=_hidden, default=_hidden("32"), metavar="N1,N2,...", help="(default 32)")
    g.add_argument("--activation", choices=ACTIVATIONS, default="tanh", help="hidden activation (tanh)")
    g.add_argument("--epochs", type=_positive_int, default=30, help="(default 30)")
    g.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="(default 32)")
    g.add_argument("--lr", type=_positive_float, default=0.1, help="SGD learning rate (default 0.1)")
    g.add_argument("--seed", type=_seed, default=0, help="seed of the split, the flips, θ and batches (0)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="(auto: the fastest here)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the most influential training samples for a few test samples (extra: plot; "
        "square images such as digits)",
    )
    g.add_argument(
        "--examples", type=_positive_int, default=4, help="test samples in the picture (4, distinct labels)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("validate", help="check the kernels against the NumPy reference", add_help=False)
    sub.add_parser("bench", help="quick comparison with the peers (PyTorch, NumPy)", add_help=False)
    sub.add_parser("stats", help="dataset-scale gradient statistics on Dask", add_help=False)
    return parser


# ----------------------------------------------------------------- commands


def _load(args):
    data = load_dataset(args.dataset, args.data, seed=0)
    loss = args.loss or ("cross_entropy" if data.is_classification else "mse")
    data.check_loss(loss)  # a clear error for cross-entropy on real targets, before any work
    return data, loss


COPIES_OF_THETA = 4
"""What ``compare`` and ``train`` hold at least: θ and as many vectors of its size (the true
gradient and the shortcuts' in ``compare``; θ₀, θ, the gradient and its step in ``train``)."""


def _net(args, data, loss):
    """The network, refused (before θ is allocated) when its parameters cannot fit in memory."""
    from ..mlp import MLP

    net = MLP([data.num_features, *args.hidden, data.num_outputs], activation=args.activation, loss=loss)
    need = COPIES_OF_THETA * net.num_params * np.dtype(args.dtype).itemsize
    avail = available_memory()
    if avail is not None and need > avail:
        raise UsageError(
            f"--hidden {','.join(map(str, args.hidden))}: the network {list(net.sizes)} has "
            f"{net.num_params:,} parameters; {COPIES_OF_THETA} vectors of them in {args.dtype} need "
            f"{format_bytes(need)}, but only {format_bytes(avail)} of memory is available"
        )
    return net


def _progress(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=disable, leave=False, file=sys.stderr)


def _check_plot(path: str | None) -> str | None:
    """Fail before the work, not after it: the file the plot will be written to (``path``, with
    ``.png`` added when it has no extension), once it is known that it can be written."""
    if path is None:
        return None
    from .plotting import check_plot_destination

    try:
        return check_plot_destination(path)
    except ValueError as exc:
        raise UsageError(f"--plot {path}: {exc}") from None


def _save_plot(result, path: str, what: str) -> None:
    try:
        written = result.plot(path)
    except (OSError, ValueError) as exc:  # checked before the work; e.g. the disk filled up since
        raise OSError(f"--plot {path}: {exc}") from None  # a failure during the work: status 1
    print(f"{what} written to {written}")


def cmd_compare(args) -> int:
    from ..shortcut import compare_shortcut

    data, loss = _load(args)
    backend = resolve_backend(args.backend)
    net = _net(args, data, loss)
    if args.batch_size > data.num_samples:
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {data.num_samples} samples")
    idx = np.random.default_rng(args.seed).choice(data.num_samples, args.batch_size, replace=False)
    theta = net.init(seed=args.seed, dtype=args.dtype)
    batch = data.subset(idx)  # one-hot targets (mse on labels) for the batch only, not all N
    report = compare_shortcut(net, theta, batch.X, batch.targets_for(loss), backend=backend)
    print(
        f"dataset {data.name} ({data.num_samples} samples), θ at initialisation (seed {args.seed}), "
        f"{args.dtype}, true gradient from backend {backend}"
    )
    print(report)
    print(
        "rel.error = ‖g_s − g‖/‖g‖; ‖Cov‖ = ‖Cov(δ, a)‖_F, the term of the true gradient the shortcut drops"
    )
    return 0


def cmd_train(args) -> int:
    from .train import TRAIN_METHODS, train_compare

    if not 0 <= args.test_fraction < 1:
        raise UsageError(f"--test-fraction: expected a number in [0, 1), got {args.test_fraction}")
    if not args.dp and (args.epsilon is not None or args.noise_multiplier is not None):
        raise UsageError("--epsilon/--noise-multiplier: DP-SGD runs only with --dp")
    plot = _check_plot(args.plot)
    data, loss = _load(args)
    backend = resolve_backend(args.backend)
    net = _net(args, data, loss)
    train, test = data.split(args.test_fraction, seed=args.seed)
    del data  # the split holds copies of the rows: one copy of X in memory, not two
    methods = TRAIN_METHODS if args.dp else TRAIN_METHODS[:3]
    total = len(methods) * args.epochs * (train.num_samples // max(args.batch_size, 1))
    with _progress(total, "training", args.no_progress) as bar:
        result = train_compare(
            net,
            train,
            test,
            methods=methods,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            dtype=args.dtype,
            backend=backend,
            max_norm=args.max_norm,
            noise_multiplier=args.noise_multiplier,
            progress=bar.update,
            target_epsilon=args.epsilon,
            delta=args.delta,
            accountant=args.accountant,
        )
    print(result.table())
    if args.dp:
        print()
        print(result.dp_table())
    if plot:
        _save_plot(result, plot, "loss curves")
    return 0


def cmd_sweep(args) -> int:
    from .train import sweep_shortcut

    activations = [a.strip() for a in args.activations.split(",") if a.strip()]
    for a in activations:
        if a not in ACTIVATIONS:
            raise UsageError(f"--activations: unknown {a!r}; expected any of {', '.join(ACTIVATIONS)}")
    if any(d < 0 for d in args.depths) or args.base_depth < 0:
        raise UsageError("--depths/--base-depth: numbers of hidden layers must be ≥ 0")
    plot = _check_plot(args.plot)
    data, loss = _load(args)
    backend = resolve_backend(args.backend)
    total = len(args.batch_sizes) + len(args.depths) + len(activations)
    with _progress(total, "sweep", args.no_progress) as bar:
        result = sweep_shortcut(
            data,
            loss=loss,
            width=args.width,
            batch_sizes=args.batch_sizes,
            depths=args.depths,
            activations=activations,
            base_depth=args.base_depth,
            base_batch=args.base_batch,
            base_activation=args.base_activation,
            seeds=args.seeds,
            dtype=args.dtype,
            backend=backend,
            progress=bar.update,
        )
    print(result.table())
    if plot:
        _save_plot(result, plot, "sweep plot")
    return 0


def cmd_influence(args) -> int:
    from .influence import mislabel_study

    plot = _check_plot(args.plot)
    data = load_dataset(args.dataset, args.data, seed=0)
    if not data.is_classification:
        raise UsageError(f"--data: {data.name!r} has real-valued targets; flipping labels needs class labels")
    if plot and math.isqrt(data.num_features) ** 2 != data.num_features:
        raise UsageError(
            f"--plot: draws square images, but {data.name!r} has {data.num_features} features per sample"
        )
    if plot and args.examples > data.num_classes:
        raise UsageError(f"--examples {args.examples}: at most {data.num_classes} (one per class)")
    backend = resolve_backend(args.backend)
    n_train = data.num_samples - round(args.test_fraction * data.num_samples)
    total = args.epochs * (n_train // args.batch_size) + args.epochs
    with _progress(total, "training", args.no_progress) as bar:
        result = mislabel_study(
            data,
            hidden=args.hidden,
            activation=args.activation,
            flip_fraction=args.flip_fraction,
            top_fraction=args.top_fraction,
            test_fraction=args.test_fraction,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            dtype=args.dtype,
            backend=backend,
            progress=bar.update,
        )
    print(result.table())
    if plot:
        try:
            written = result.plot(plot, examples=args.examples)
        except (OSError, ValueError) as exc:
            raise OSError(f"--plot {plot}: {exc}") from None
        print(f"\npicture written to {written}")
    return 0


def _delegate(command: str, module: str, argv: list[str]) -> int:
    """Run ``fastgrad.tools.<module>.main(argv)`` if this version has it."""
    try:
        mod = importlib.import_module(f"fastgrad.tools.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"fastgrad.tools.{module}":
            raise
        print(f"{PROG} {command}: not available in this version of fastgrad", file=sys.stderr)
        return 2
    return int(mod.main(argv) or 0)


_COMMANDS = {"compare": cmd_compare, "train": cmd_train, "sweep": cmd_sweep, "influence": cmd_influence}
_DELEGATED = {"validate": "validate", "bench": "bench", "stats": "stats"}


class _Interrupts:
    """Ctrl-C that cannot be lost while the command runs.

    An exception raised in a callback from C (a ctypes callback, such as LLVM's object
    cache notification while Numba compiles) is printed by Python and dropped: a Ctrl-C
    that lands there would be swallowed and the command would finish with status 0.
    While active, such a dropped ``KeyboardInterrupt`` is recorded (not printed) and
    raised again in the main thread shortly after, once it is out of the callback; and
    :meth:`swallowed` tells the caller in case it was not.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self._dropped = False
        self._previous_hook = sys.unraisablehook

    def __enter__(self) -> _Interrupts:
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._hook
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._active = False
        sys.unraisablehook = self._previous_hook

    @property
    def swallowed(self) -> bool:
        return self._dropped

    def _hook(self, unraisable) -> None:
        if unraisable.exc_type is None or not issubclass(unraisable.exc_type, KeyboardInterrupt):
            self._previous_hook(unraisable)
            return
        self._dropped = True
        # not raised from here: this hook runs inside the callback, where it would be dropped again
        timer = threading.Timer(0.05, self._raise_in_main_thread)
        timer.daemon = True
        timer.start()

    def _raise_in_main_thread(self) -> None:
        with self._lock:
            if self._active:
                _thread.interrupt_main()


def _debug() -> bool:
    return os.environ.get("FASTGRAD_DEBUG", "").strip() not in ("", "0")


def _run(command: str, argv: list[str]) -> int:
    """Parse ``argv`` and run its command (or the delegated one); errors propagate to :func:`main`."""
    if command in _DELEGATED:
        return _delegate(command, _DELEGATED[command], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return _COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastgrad`` console script; returns the exit status (see the module
    docstring: 0 done, 1 failed during the work, 2 bad usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    prefix = f"{PROG} {command}".rstrip()

    def fail(status: int, message: str) -> int:
        print(f"{prefix}: {message}", file=sys.stderr)
        return status

    interrupts = _Interrupts()
    try:
        with interrupts:
            status = _run(command, argv)
        if interrupts.swallowed:  # dropped in a callback and the command ended before it came back
            return fail(130, "interrupted")
        return status
    except KeyboardInterrupt:
        return fail(130, "interrupted")
    except MissingExtraError as exc:
        return fail(2, str(exc))
    except (UsageError, ValueError, TypeError) as exc:
        if _debug() and not isinstance(exc, UsageError):
            raise
        return fail(2, f"error: {exc}")
    except MemoryError as exc:
        if _debug():
            raise
        detail = f" ({exc})" if str(exc) else ""
        return fail(1, f"out of memory{detail}; try a smaller network, batch or dataset")
    except BrokenPipeError:  # `fastgrad compare | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:  # a file that cannot be written, a full disk
        if _debug():
            raise
        return fail(1, f"error: {exc}")
    except Exception as exc:
        if _debug():
            raise
        return fail(
            1,
            f"unexpected error: {type(exc).__name__}: {exc} (this is a bug; run again with "
            "FASTGRAD_DEBUG=1 to see the traceback)",
        )


if __name__ == "__main__":
    sys.exit(main())

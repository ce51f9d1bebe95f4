"""The ``fastgrad`` command: compare, train, sweep, validate, bench.

    fastgrad compare                  # true gradient vs both shortcuts, per layer
    fastgrad train --plot loss.png    # same net, same seed: true gradient vs shortcuts (vs DP-SGD)
    fastgrad sweep --plot sweep.png   # the shortcut's error against batch size, depth, activation
    fastgrad validate                 # kernels against the NumPy reference
    fastgrad bench                    # the quick peer comparison

Bad arguments and missing optional packages end with a one-line message and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

import numpy as np

from .. import api
from ..activations import ACTIVATIONS
from .datasets import DATASETS, MissingExtraError, load_dataset
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
    g.add_argument("--seed", type=int, default=0, help="seed of θ's initialisation and of the batches (0)")
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
    g.add_argument("--dp", action="store_true", help="also train with DP-SGD (clip + noise)")
    g.add_argument("--max-norm", type=_positive_float, default=1.0, help="DP-SGD clipping norm C (1.0)")
    g.add_argument("--noise-multiplier", type=_nonneg_float, default=0.5, help="DP-SGD noise σ (0.5)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the data (0.2)")
    g.add_argument("--plot", metavar="FILE.png", help="draw the loss curves (extra: plot)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

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

    sub.add_parser("validate", help="check the kernels against the NumPy reference", add_help=False)
    sub.add_parser("bench", help="quick comparison with the peers (PyTorch, NumPy)", add_help=False)
    sub.add_parser("stats", help="dataset-scale gradient statistics on Dask", add_help=False)
    return parser


# ----------------------------------------------------------------- commands


def _load(args):
    data = load_dataset(args.dataset, args.data, seed=0)
    loss = args.loss or ("cross_entropy" if data.is_classification else "mse")
    data.targets_for(loss)  # a clear error for cross-entropy on real targets, before any work
    return data, loss


def _net(args, data, loss):
    from ..mlp import MLP

    return MLP([data.num_features, *args.hidden, data.num_outputs], activation=args.activation, loss=loss)


def _progress(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=disable, leave=False, file=sys.stderr)


def _check_plot(path: str | None) -> None:
    """Fail before the work, not after it: matplotlib installed, the folder of ``path`` there."""
    if path is None:
        return
    from .plotting import pyplot

    plt = pyplot()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--plot {path}: folder {folder!r} does not exist")
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if suffix and suffix not in formats:
        raise UsageError(f"--plot {path}: matplotlib cannot write .{suffix}; use one of {', '.join(formats)}")


def _save_plot(result, path: str, what: str) -> None:
    try:
        result.plot(path)
    except (OSError, ValueError) as exc:  # unwritable file, or a suffix matplotlib cannot write
        raise UsageError(f"--plot {path}: {exc}") from None
    print(f"{what} written to {path}")


def cmd_compare(args) -> int:
    from ..shortcut import compare_shortcut

    data, loss = _load(args)
    backend = resolve_backend(args.backend)
    net = _net(args, data, loss)
    if args.batch_size > data.num_samples:
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {data.num_samples} samples")
    idx = np.random.default_rng(args.seed).choice(data.num_samples, args.batch_size, replace=False)
    theta = net.init(seed=args.seed, dtype=args.dtype)
    report = compare_shortcut(net, theta, data.X[idx], data.targets_for(loss)[idx], backend=backend)
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
    _check_plot(args.plot)
    data, loss = _load(args)
    backend = resolve_backend(args.backend)
    net = _net(args, data, loss)
    train, test = data.split(args.test_fraction, seed=args.seed)
    methods = TRAIN_METHODS if args.dp else TRAIN_METHODS[:3]
    total = len(methods) * args.epochs * (train.num_samples // max(args.batch_size, 1))
    bar = _progress(total, "training", args.no_progress)
    try:
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
        )
    finally:
        bar.close()
    print(result.table())
    if args.dp:
        print(f"DP-SGD: clipping norm C = {args.max_norm:g}, noise multiplier σ = {args.noise_multiplier:g}")
    if args.plot:
        _save_plot(result, args.plot, "loss curves")
    return 0


def cmd_sweep(args) -> int:
    from .train import sweep_shortcut

    activations = [a.strip() for a in args.activations.split(",") if a.strip()]
    for a in activations:
        if a not in ACTIVATIONS:
            raise UsageError(f"--activations: unknown {a!r}; expected any of {', '.join(ACTIVATIONS)}")
    if any(d < 0 for d in args.depths) or args.base_depth < 0:
        raise UsageError("--depths/--base-depth: numbers of hidden layers must be ≥ 0")
    _check_plot(args.plot)
    data, loss = _load(args)
    backend = resolve_backend(args.backend)
    total = len(args.batch_sizes) + len(args.depths) + len(activations)
    bar = _progress(total, "sweep", args.no_progress)
    try:
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
    finally:
        bar.close()
    print(result.table())
    if args.plot:
        _save_plot(result, args.plot, "sweep plot")
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


_COMMANDS = {"compare": cmd_compare, "train": cmd_train, "sweep": cmd_sweep}
_DELEGATED = {"validate": "validate", "bench": "bench", "stats": "stats"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastgrad`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], _DELEGATED[argv[0]], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except MissingExtraError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    except (UsageError, ValueError, TypeError) as exc:
        parser.exit(2, f"{PROG} {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastgrad compare | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``fastgrad stats``: a whole dataset's loss, gradient norm, noise scale and per-sample norms, on Dask.

    fastgrad stats --data X.npy --labels y.npy                    # this machine's threads
    fastgrad stats --data data.zarr --scheduler tcp://host:8786   # a dask.distributed cluster
    fastgrad stats --data X.npy --labels y.npy --plot norms.png   # and a histogram of the norms

``--data`` is a ``.npy`` file (read chunk by chunk, never whole: :func:`fastgrad.dask.from_npy`)
or a ``.zarr`` store: an array, or a group with arrays ``X`` and ``y`` (then ``--labels`` is
not needed). The
network is built as ``fastgrad compare`` builds it (``--hidden``, ``--activation``,
``--loss``, ``--seed``, ``--dtype``); θ is its initialisation, or ``--theta FILE.npy``.
One pass over the data (:func:`fastgrad.dask.delayed_backprop`) gives every number
printed; it needs the ``dask`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

import numpy as np

from ..activations import ACTIVATIONS
from ..extras import MissingExtraError, require
from ..losses import LOSSES
from .cli import BACKEND_CHOICES, UsageError, _check_plot, _hidden, _positive_int, resolve_backend

PROG = "fastgrad stats"
LOCAL_SCHEDULERS = ("threads", "processes", "sync")
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Dataset-scale loss, gradient norm, gradient noise scale and per-sample gradient "
        "norms, computed chunk by chunk on Dask (extra: dask).",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        metavar="FILE.npy|DIR.zarr",
        help="features (N, d): a .npy file (read chunk by chunk) or a zarr array, or a zarr group with "
        "arrays X and y",
    )
    g.add_argument("--labels", metavar="FILE.npy|DIR.zarr", help="integer labels (N,) or real targets (N, k)")
    g.add_argument(
        "--chunk-rows",
        type=_positive_int,
        default=None,
        metavar="R",
        help="rows per Dask chunk (default: a .npy file in chunks of 65536 rows, a zarr array in its own)",
    )
    g.add_argument(
        "--scheduler",
        default="threads",
        metavar="ADDRESS|threads|processes|sync",
        help="a local Dask scheduler (threads, the default), or the address of a dask.distributed "
        "scheduler (tcp://host:8786)",
    )
    g = p.add_argument_group("network")
    g.add_argument(
        "--hidden",
        type=_hidden,
        default=_hidden("32,32"),
        metavar="N1,N2,...",
        help="hidden widths; input and output widths come from the data (default 32,32)",
    )
    g.add_argument("--activation", choices=ACTIVATIONS, default="tanh", help="hidden activation (tanh)")
    g.add_argument(
        "--loss", choices=LOSSES, default=None, help="loss (cross_entropy for integer labels, else mse)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of θ's initialisation (0)")
    g.add_argument("--theta", metavar="FILE.npy", help="parameters θ (P,) instead of the initialisation")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="backend of each chunk (auto)")
    g = p.add_argument_group("output")
    g.add_argument("--plot", metavar="FILE.png", help="a histogram of the per-sample norms (extra: plot)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------- inputs


def open_array(path: str, what: str, chunk_rows: int | None, component: str | None = None):
    """A Dask array of a ``.npy`` file (memory-mapped) or a zarr array, chunked by rows only."""
    import dask.array as da

    if not os.path.exists(path):
        raise UsageError(f"{what} {path}: no such file or directory")
    if os.path.isdir(path):
        zarr = require("zarr", "dask", f"{what} DIR.zarr")
        try:
            node = zarr.open(path, mode="r")
            if component is not None:
                node = node[component]
        except Exception as exc:  # zarr raises several kinds for a folder that is not a store
            raise UsageError(f"{what} {path}: not a readable zarr array ({exc})") from None
        if not hasattr(node, "shape"):
            raise UsageError(f"{what} {path}: a zarr group; expected an array (or a group with X and y)")
        arr = da.from_zarr(node)
        rows = chunk_rows or arr.chunks[0]
    else:
        from ..dask import from_npy

        try:  # read chunk by chunk where each chunk runs, never whole
            arr = from_npy(path, chunk_rows or 65536)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{what} {path}: not a readable .npy file ({exc})") from None
        rows = arr.chunks[0]
    return arr.rechunk((rows, *tuple(-1 for _ in arr.shape[1:])))


def load_data(args):
    """``(X, y, source)``: Dask arrays with the same row chunks, and a line saying where they came from."""
    is_group = os.path.isdir(args.data) and args.labels is None
    if is_group:
        zarr = require("zarr", "dask", "--data DIR.zarr")
        try:
            is_group = isinstance(zarr.open(args.data, mode="r"), zarr.Group)
        except Exception:
            is_group = False
    if is_group:
        X = open_array(args.data, "--data", args.chunk_rows, "X")
        y = open_array(args.data, "--data", None, "y")
    elif args.labels is None:
        raise UsageError("--labels: required unless --data is a zarr group with arrays X and y")
    else:
        X = open_array(args.data, "--data", args.chunk_rows)
        y = open_array(args.labels, "--labels", None)
    if X.ndim != 2:
        raise UsageError(f"--data: expected a 2-D array (N, d), got shape {X.shape}")
    if y.shape[0] != X.shape[0]:
        raise UsageError(f"--labels: {y.shape[0]} rows for the {X.shape[0]} rows of --data")
    return X, y.rechunk((X.chunks[0], *tuple(-1 for _ in y.shape[1:])))


def build_net(args, X, y):
    """``(net, theta)`` from the data's widths and the network options, as ``fastgrad compare`` does."""
    from ..mlp import MLP

    integer = y.dtype.kind in "iu"
    loss = args.loss or ("cross_entropy" if integer else "mse")
    if loss == "cross_entropy":
        if not integer:
            raise UsageError(f"--loss cross_entropy: needs integer labels, got {y.dtype} targets")
        if y.ndim != 1:
            raise UsageError(f"--labels: cross_entropy expects labels (N,), got shape {y.shape}")
        n_out = int(y.max().compute()) + 1  # the classes; labels are small next to X
    else:
        n_out = 1 if y.ndim == 1 else y.shape[1]
    net = MLP([X.shape[1], *args.hidden, n_out], activation=args.activation, loss=loss)
    if args.theta is None:
        return net, net.init(seed=args.seed, dtype=args.dtype)
    try:
        theta = np.load(args.theta, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--theta {args.theta}: not a readable .npy file ({exc})") from None
    if theta.shape != (net.num_params,):
        raise UsageError(
            f"--theta {args.theta}: shape {theta.shape}, but sizes {list(net.sizes)} need ({net.num_params},)"
        )
    return net, theta.astype(args.dtype)


# ------------------------------------------------------------------ running


def _pack(values: dict, norms: np.ndarray):
    return values, norms


def run_stats(net, theta, X, y, backend: str, scheduler: str, progress: bool):
    """``(values, norms)``: the finished dataset-scale quantities and every per-sample norm, one pass."""
    import dask

    from .. import dask as fdask

    lazy = fdask.delayed_backprop(net, theta, X, y, ("loss", "grad", "noise_scale", "norms"), backend=backend)
    values = dask.delayed(dict)(loss=lazy.loss, grad=lazy.grad, noise_scale=lazy.noise_scale)
    # one Delayed holding everything: one graph, one pass over the chunks, one result
    both = dask.delayed(_pack)(values, lazy.norms)
    if scheduler in LOCAL_SCHEDULERS:
        from dask.diagnostics import ProgressBar

        if not progress:
            return both.compute(scheduler=scheduler)
        with ProgressBar(out=sys.stderr, minimum=1.0, dt=0.5):
            return both.compute(scheduler=scheduler)
    distributed = require("distributed", "dask", "--scheduler ADDRESS")
    try:
        client = distributed.Client(scheduler, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise UsageError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
    with client:
        future = client.compute(both)
        if progress:  # distributed's text bar writes to stdout: keep stdout for the numbers
            with contextlib.redirect_stdout(sys.stderr):
                distributed.progress(future)
                print()
        return future.result()


def report(values: dict, norms: np.ndarray) -> str:
    """The numbers, one per line, and the per-sample norm quantiles."""
    grad_norm = float(np.linalg.norm(values["grad"].astype(np.float64)))
    b_simple = values["noise_scale"]
    lines = [
        f"loss (mean over the dataset)        {values['loss']:.6g}",
        f"‖grad‖ (the full-dataset gradient)  {grad_norm:.6g}",
        f"noise scale B_simple = tr(Σ)/‖G‖²   {b_simple:.6g}",
    ]
    if np.isfinite(b_simple):
        lines.append(
            f"  batches much smaller than ~{max(1, round(b_simple)):d} are dominated by gradient noise, "
            "much larger ones waste samples (B_crit ≈ B_simple)"
        )
    q = np.quantile(norms.astype(np.float64), QUANTILES)
    head = "  ".join(f"{'min' if p == 0 else 'max' if p == 1 else f'{p:.0%}':>9}" for p in QUANTILES)
    lines += ["per-sample gradient norms ‖∇ℓ_i‖:", "  " + head, "  " + "  ".join(f"{v:>9.4g}" for v in q)]
    return "\n".join(lines)


def plot_norms(norms: np.ndarray, path: str, title: str) -> None:
    from .plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(norms.astype(np.float64), bins=100, log=True, color="tab:blue")
    ax.set_xlabel("per-sample gradient norm ‖∇ℓ_i‖")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--plot {path}: {exc}") from None
    finally:
        plt.close(fig)


def stats(args) -> int:
    require("dask.array", "dask", PROG)
    _check_plot(args.plot)
    X, y = load_data(args)
    net, theta = build_net(args, X, y)
    backend = resolve_backend(args.backend)
    print(
        f"data {args.data}: {X.shape[0]} samples × {X.shape[1]} features in {len(X.chunks[0])} chunks of "
        f"≤ {max(X.chunks[0])} rows; net {list(net.sizes)} {net.activation} {net.loss} {args.dtype}, θ "
        f"{'from ' + args.theta if args.theta else f'at initialisation (seed {args.seed})'}; backend "
        f"{backend}, scheduler {args.scheduler}"
    )
    sys.stdout.flush()
    values, norms = run_stats(net, theta, X, y, backend, args.scheduler, not args.no_progress)
    print(report(values, norms))
    if args.plot:
        plot_norms(norms, args.plot, f"{args.data}: {len(norms)} samples, net {list(net.sizes)}")
        print(f"histogram written to {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastgrad stats``; returns the exit status (2 for bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return stats(args)
    except MissingExtraError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (UsageError, ValueError, TypeError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

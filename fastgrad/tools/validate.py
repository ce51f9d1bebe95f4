"""``fastgrad validate``: every available backend against the float64 reference.

Runs each backend (and each path of the CUDA backend: ``cuda/fused`` and
``cuda/tiled``) on random problems across every activation, loss, dtype and
shape, compares every raw quantity with the naive per-sample loop run in float64,
prints a table (backend, quantity, dtype, shape, max relative error, pass/fail)
and exits non-zero on any failure. This is how a user checks a GPU kernel
against the reference::

    fastgrad validate                  # every backend that can run here
    fastgrad validate --backend cuda   # the GPU kernels only
    python -m fastgrad.tools.validate  # the same, from a source tree

The relative error of a quantity is max |x - x_ref| / max |x_ref|: the error
relative to the quantity's size, so it is meaningful for vectors with zeros.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .. import api
from ..activations import ACTIVATIONS
from ..losses import LOSSES
from ..losses import REGISTRY as LOSS_REGISTRY
from ..mlp import MLP
from ..quantities import RAW

QUANTITIES = RAW
"""Every raw quantity a backend returns (the registry's), each compared with the reference."""
NEED = frozenset(RAW)  # clipped_sum comes with MAX_NORM, the way clipped_grad asks for it
CUDA_PATHS = ("fused", "tiled")
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
SHAPES = (((5, 8, 3), 7), ((4, 6, 5, 3), 5))  # (sizes, batch): one and two hidden layers
MAX_NORM = 0.5


@dataclass
class Row:
    """One line of the table: the worst case over every activation and loss."""

    backend: str
    quantity: str
    dtype: str
    shape: str
    max_rel_error: float
    worst_case: str
    passed: bool


def quick_combos(activations: Sequence[str], losses: Sequence[str]) -> list[tuple[str, str]]:
    """(activation, loss) pairs that take every activation and every loss at least once, as few as
    that allows: the i-th pair is (activations[i mod n_a], losses[i mod n_l])."""
    n = max(len(activations), len(losses))
    return [(activations[i % len(activations)], losses[i % len(losses)]) for i in range(n)]


def problem(sizes, batch, activation, loss, seed):
    """A random (net, θ float64, X float64, y) with non-zero biases."""
    net = MLP(list(sizes), activation=activation, loss=loss)
    rng = np.random.default_rng(seed)
    theta = net.init(seed=seed, dtype=np.float64)
    for _, b in net.unpack(theta):
        b[...] = 0.1 * rng.standard_normal(b.shape)
    X = rng.standard_normal((batch, sizes[0]))
    y = LOSS_REGISTRY[loss].random_targets(rng, batch, sizes[-1])
    return net, theta, X, y


def rel_error(got, ref) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-300))


def runners(names: Sequence[str] | None) -> dict[str, Callable]:
    """``label -> run(net, inputs, need, max_norm, out)`` for the requested (default: available)
    backends; the CUDA backend once per path (``cuda/fused``, ``cuda/tiled``)."""
    wanted = list(names) if names else api.available_backends()
    out: dict[str, Callable] = {}
    for name in wanted:
        api.resolve_backend(name)  # raises a clear error for unknown or unavailable backends
        if name == "cuda":
            for path in CUDA_PATHS:
                out[f"cuda/{path}"] = functools.partial(api.run_backend, "cuda", path=path)
        else:
            out[name] = functools.partial(api.run_backend, name)
    return out


def validate(
    backends: Sequence[str] | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Every backend against the float64 naive loop: a :class:`Row` per backend, quantity, dtype, shape.

    Raises ``RuntimeError`` when the package's source changed after this process imported it:
    the numba kernels (and their disk cache, keyed on the source) would then not be what is on disk."""
    runs = runners(backends)
    if "numba" in runs:
        from ..cpu import check_kernels_current

        check_kernels_current()
    combos = [(a, lo) for a in ACTIVATIONS for lo in LOSSES]
    if quick:  # every activation and every loss at least once
        combos = quick_combos(ACTIVATIONS, LOSSES)
    worst: dict[tuple, tuple[float, str]] = {}
    for s_index, (sizes, batch) in enumerate(SHAPES):
        shape = f"{list(sizes)} B={batch}"
        for c_index, (activation, loss) in enumerate(combos):
            net, theta, X, y = problem(sizes, batch, activation, loss, seed + 1000 * s_index + c_index)
            ref = api.run_backend("naive", net, api.check_inputs(net, theta, X, y), NEED, MAX_NORM)
            for dtype in ("float32", "float64"):
                inp = api.check_inputs(net, theta.astype(dtype), X.astype(dtype), y)
                for label, run in runs.items():
                    if progress:
                        progress(f"{label} {dtype} {shape} {activation}/{loss}")
                    case = f"{activation}/{loss}"
                    try:
                        raw = run(net, inp, NEED, MAX_NORM, None)
                    except Exception as exc:  # a crash fails every quantity of the case, not the tool
                        raw = {}
                        case += f": {type(exc).__name__}: {exc}"
                    for q in QUANTITIES:
                        err = rel_error(raw[q], ref[q]) if q in raw else float("inf")
                        key = (label, q, dtype, shape)
                        if key not in worst or not err <= worst[key][0]:
                            worst[key] = (err, case)
    rows = [
        Row(label, q, dtype, shape, err, case, bool(err <= TOLERANCE[dtype]))
        for (label, q, dtype, shape), (err, case) in worst.items()
    ]
    labels, shapes = list(runs), [f"{list(s)} B={b}" for s, b in SHAPES]
    rows.sort(
        key=lambda r: (labels.index(r.backend), r.dtype, shapes.index(r.shape), QUANTITIES.index(r.quantity))
    )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    head = ("backend", "quantity", "dtype", "shape", "max rel error", "tolerance", "result", "worst case")
    body = [
        (
            r.backend,
            r.quantity,
            r.dtype,
            r.shape,
            f"{r.max_rel_error:.2e}",
            f"{TOLERANCE[r.dtype]:.0e}",
            "pass" if r.passed else "FAIL",
            r.worst_case,
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastgrad validate`` and ``python -m fastgrad.tools.validate``; 0 when all pass."""
    parser = argparse.ArgumentParser(
        prog="fastgrad validate",
        description="Check every available backend against the float64 NumPy reference.",
    )
    parser.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help=f"a backend to check (repeatable; default: every available one of {', '.join(api.BACKENDS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="each activation and each loss once, instead of every pair"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problems")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"argument --seed: expected a non-negative integer, got {args.seed}")
    try:
        rows = validate(args.backend, quick=args.quick, seed=args.seed)
    except (ValueError, RuntimeError) as exc:
        print(f"fastgrad validate: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    labels = sorted({r.backend for r in rows})
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} checks passed ({', '.join(labels)}; "
        f"tolerance float32 {TOLERANCE['float32']:.0e}, float64 {TOLERANCE['float64']:.0e})"
    )
    if "numba" in labels:  # which kernels were checked: cached ones are keyed on this source
        from ..cpu import cache_description

        print(cache_description())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

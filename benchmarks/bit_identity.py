"""Not a benchmark: a refactor's check that every output stays the same, bit for bit.

    PYTHONPATH=OLD_TREE python benchmarks/bit_identity.py dump old.npz [cuda]
    PYTHONPATH=NEW_TREE python benchmarks/bit_identity.py dump new.npz [cuda]
    python benchmarks/bit_identity.py compare old.npz new.npz      # exit 1 when anything differs

``dump`` runs every backend on every activation × loss, float32 and float64, through the
public API (every quantity at once, grad alone, variance with norms, the clipped gradient with
and without noise) and, for the numba backend, on its default, phase-2, chunked and no-Wᵀ
paths (by setting ``fastgrad.cpu.config``'s tunables); per-sample matrices are stored as digests.
``cuda`` runs the CUDA backend instead, both paths, at tiny sizes: set NUMBA_ENABLE_CUDASIM=1
without a GPU (about 3.5 minutes here; the CPU dump about 1.5). Used for issue 9's
restructuring (2026-11-28): CPU 4784 arrays identical; CUDA 601 of 810 identical, the rest
norms and what follows from them, within 1 ulp, from the shared Goodfellow term adding 1 after
the sum. asv imports this file and finds no benchmark in it.
"""

import hashlib
import importlib
import itertools
import sys

import numpy as np

import fastgrad

try:
    from fastgrad.api import check_inputs
    from fastgrad.tools.validate import problem as validate_problem
except ImportError:  # before 2026-11-28
    from fastgrad._validation import check_inputs
    from fastgrad.validate import problem as validate_problem

ACTS = fastgrad.ACTIVATIONS
LOSSES = fastgrad.LOSSES
ALL = ("loss", "grad", "per_sample", "norms", "layer_norms", "sq_mean", "variance", "noise_scale")


def problem(sizes, act, loss, B, dtype, seed=0):
    """``fastgrad validate``'s random problem (non-zero biases), θ, X and float targets in ``dtype``."""
    net, theta, X, y = validate_problem(sizes, B, act, loss, seed)
    y = y if loss == "cross_entropy" else y.astype(dtype)
    return net, theta.astype(dtype), X.astype(dtype), y


def digest(a: np.ndarray) -> np.ndarray:
    """A stand-in for a large array: its bytes' SHA-256, dtype and shape."""
    return np.frombuffer(
        hashlib.sha256(a.tobytes()).digest() + str(a.dtype).encode() + str(a.shape).encode(), np.uint8
    )


def record(store, key, net, theta, X, y, backend):
    """Every public result of ``backend`` on one problem into ``store``, keys prefixed by ``key``."""
    res = fastgrad.backprop(net, theta, X, y, compute=ALL, backend=backend)
    for name in ALL:
        v = np.asarray(getattr(res, name))
        store[f"{key}|all|{name}"] = digest(v) if name == "per_sample" else v
    res = fastgrad.backprop(net, theta, X, y, compute=("grad",), backend=backend)
    store[f"{key}|grad|grad"] = res.grad
    res = fastgrad.backprop(net, theta, X, y, compute=("variance", "norms"), backend=backend)
    store[f"{key}|var|variance"] = res.variance
    store[f"{key}|var|norms"] = res.norms
    norms = fastgrad.backprop(net, theta, X, y, compute=("norms",), backend="numpy").norms
    C = float(np.median(norms))
    store[f"{key}|clip"] = fastgrad.clipped_grad(net, theta, X, y, max_norm=C, backend=backend)
    store[f"{key}|clipnoise"] = fastgrad.clipped_grad(
        net, theta, X, y, max_norm=C, noise_multiplier=0.7, seed=1, backend=backend
    )


CPU_PATHS = {
    "default": {},
    "phase2": {"PARTIALS_BYTES": 0},
    "chunked": {"WORKSPACE_BYTES": 1},
    "noWT": {"SMALL_LAYER": 0},
    "productT": {"SMALL_LAYER": 0, "TRANSPOSED_ROWS": 1024},
    "chunked_phase2": {"WORKSPACE_BYTES": 1, "PARTIALS_BYTES": 0},
}
"""The numba backend's paths, reached by its tunables (read at call time)."""


def record_cpu_paths(store, key, problem_args, cpu_mod, defaults):
    """``record`` of the numba backend on every path of :data:`CPU_PATHS`; tunables restored."""
    net, theta, X, y = problem(*problem_args)
    for pname, over in CPU_PATHS.items():
        for k, v in {**defaults, **over}.items():
            setattr(cpu_mod, k, v)
        record(store, f"numba|{key}|{pname}", net, theta, X, y, "numba")
    for k, v in defaults.items():
        setattr(cpu_mod, k, v)
    return net, theta, X, y


def cpu(store):
    cpu_mod = importlib.import_module("fastgrad.cpu")
    cpu_mod = getattr(cpu_mod, "config", cpu_mod)  # the tunables: fastgrad.cpu.config since the package
    defaults = {
        k: getattr(cpu_mod, k, None)  # TRANSPOSED_ROWS: None in trees before it (set, and unread, there)
        for k in ("PARTIALS_BYTES", "WORKSPACE_BYTES", "SMALL_LAYER", "TRANSPOSED_ROWS")
    }
    for dtype in (np.float32, np.float64):
        dt = np.dtype(dtype)
        for act, loss in itertools.product(ACTS, LOSSES):
            args = ([5, 7, 6, 3], act, loss, 300, dtype)
            net, theta, X, y = record_cpu_paths(store, f"{dt}|{act}|{loss}|small", args, cpu_mod, defaults)
            if act in ("tanh", "relu") or loss == "cross_entropy":
                for backend in ("naive", "numpy"):
                    record(store, f"{backend}|{dt}|{act}|{loss}|small", net, theta, X, y, backend)
        # a net with layers wider than one phase-2 BLOCK and bigger than SMALL_LAYER
        for act, loss in (("tanh", "cross_entropy"), ("gelu", "mse"), ("relu", "binary_cross_entropy")):
            args = ([20, 200, 150, 4], act, loss, 260, dtype)
            net, theta, X, y = record_cpu_paths(store, f"{dt}|{act}|{loss}|big", args, cpu_mod, defaults)
            record(store, f"numpy|{dt}|{act}|{loss}|big", net, theta, X, y, "numpy")


def cuda(store):
    fc = importlib.import_module("fastgrad.cuda")
    need = frozenset(ALL) | {"loss"}
    for dtype in (np.float32, np.float64):
        for act, loss in itertools.product(ACTS, LOSSES):
            for path, sizes in (("fused", [3, 4, 3, 2]), ("tiled", [3, 5, 4, 2])):
                net, theta, X, y = problem(sizes, act, loss, 6, dtype)
                inp = check_inputs(net, theta, X, y)
                raw = fc.run(net, inp, need, 0.5, None, path=path)
                for name, v in raw.items():
                    store[f"cuda|{np.dtype(dtype)}|{act}|{loss}|{path}|{name}"] = np.asarray(v)
        # the public entry points, host and device inputs, on the default path
        net, theta, X, y = problem([3, 4, 3, 2], "tanh", "cross_entropy", 6, dtype)
        record(store, f"cuda|{np.dtype(dtype)}|public", net, theta, X, y, "cuda")


def compare(old_path: str, new_path: str) -> int:
    """Print every array of ``old_path`` missing from or different in ``new_path``; the count."""
    a, b = np.load(old_path), np.load(new_path)
    ka, kb = set(a.files), set(b.files)
    bad = 0
    for k in sorted(ka - kb):
        print("missing in new:", k)
        bad += 1
    for k in sorted(ka & kb):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            print("DIFFERS:", k, x.dtype, y.dtype, x.shape, y.shape)
            bad += 1
    print(f"{len(ka & kb)} compared, {bad} differ/missing, {len(kb - ka)} new keys")
    return bad


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
    if sys.argv[1:2] != ["dump"] or len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    store = {}
    (cuda if sys.argv[3:] == ["cuda"] else cpu)(store)
    np.savez(sys.argv[2], **store)
    print(len(store), "arrays")

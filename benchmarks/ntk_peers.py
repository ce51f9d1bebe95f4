"""The empirical NTK of an MLP: ``fastgrad.ntk`` against neural-tangents' structured derivatives.

A script, not an asv benchmark (nothing runs on import). It needs ``jax`` and ``neural-tangents``,
which are not fastgrad's dependencies (neural-tangents brings TensorFlow through ``tf2jax``, and its
last release, 0.6.5, runs its structured derivatives only on jax ≤ 0.4.2x, which needs NumPy 1): run
it from an environment of its own, with fastgrad on the path::

    python -m venv /tmp/nt
    /tmp/nt/bin/pip install neural-tangents==0.6.5 jax==0.4.23 jaxlib==0.4.23 numpy==1.26.4 \
        tf2jax==0.3.5 "ml_dtypes<0.5" numba scipy threadpoolctl tqdm
    PYTHONPATH=. NUMBA_NUM_THREADS=2 /tmp/nt/bin/python benchmarks/ntk_peers.py

Per configuration (tanh, float32, X against itself), the same θ in both libraries
(``stax.Dense(parameterization="standard")`` computes x W + b with W (n_in, n_out), W_lᵀ of θ):

- ``fastgrad.ntk(net, θ, X, backend="numba")``: the factorised Gram of the K one-hot output
  passes, (B, B, K, K), and with ``trace=True`` its trace over k, (B, B);
- neural-tangents ``empirical_ntk_fn(..., implementation=STRUCTURED_DERIVATIVES)`` under
  ``jax.jit``, ``trace_axes=()`` for the whole kernel and ``(-1,)`` for the trace (which
  neural-tangents averages over k: it is compared with fastgrad's trace / K).

Both are checked against each other first (largest difference over the largest entry), then timed
call by call in turns (the jitted function compiled first), medians. The table is printed last.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/ntk_peers.py): its folder is on sys.path
    import _timing

CONFIG_SIZES = {
    "narrow-B256": ("narrow-B256", None),
    "mnist128-B128": ("mnist128-B64", 128),
    "mnist-B128": ("mnist", 128),
}
"""name -> (a configuration of ``fastgrad.tools.configs``, the batch size used here: None keeps its own)."""


def stax_params(net, theta: np.ndarray):
    """θ as neural-tangents' Dense parameters: per layer (W_lᵀ (n_in, n_out), b_l), activations between."""
    params = []
    for l, spec in enumerate(net.layers):
        W = theta[spec.w_start : spec.w_start + spec.n_in * spec.n_out].reshape(spec.n_out, spec.n_in)
        b = theta[spec.b_start : spec.b_start + spec.n_out]
        params.append((np.ascontiguousarray(W.T), b.copy()))
        if l < len(net.layers) - 1:
            params.append(())
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIG_SIZES))
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    import jax
    import neural_tangents as nt
    from neural_tangents import stax

    import fastgrad
    from fastgrad.tools.configs import config

    print(
        f"{_timing.utc_now()}, {_timing.machine()}, "
        f"{os.cpu_count()} cores, load {_timing.load()}; fastgrad {fastgrad.__version__}, "
        f"numpy {np.__version__}, "
        f"jax {jax.__version__}, neural-tangents {getattr(nt, '__version__', '?')}, "
        f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')}"
    )
    rows = []
    for name in args.configs.split(","):
        source, batch_size = CONFIG_SIZES[name]
        sizes, B = config(source)
        B = B if batch_size is None else batch_size
        net = fastgrad.MLP(list(sizes), activation="tanh", loss="cross_entropy")
        theta = net.init(seed=0, dtype=np.float32)
        X = np.random.default_rng(0).standard_normal((B, sizes[0])).astype(np.float32)
        layers = []
        for n_out in sizes[1:-1]:
            layers += [stax.Dense(n_out, parameterization="standard"), stax.Elementwise(fn=jax.numpy.tanh)]
        layers.append(stax.Dense(sizes[-1], parameterization="standard"))
        _, apply_fn, _ = stax.serial(*layers)
        params = jax.tree_util.tree_map(jax.numpy.asarray, stax_params(net, theta))
        Xj = jax.numpy.asarray(X)
        for trace in (False, True):
            kernel_fn = jax.jit(
                nt.empirical_ntk_fn(
                    apply_fn,
                    trace_axes=(-1,) if trace else (),
                    vmap_axes=0,
                    implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES,
                )
            )

            def peer(kernel_fn=kernel_fn, Xj=Xj, params=params):
                return np.asarray(kernel_fn(Xj, None, params).block_until_ready())

            def ours(net=net, theta=theta, X=X, trace=trace):
                return fastgrad.ntk(net, theta, X, trace=trace, backend="numba")

            a, b = ours(), peer()
            if trace:  # neural-tangents' trace_axes averages over the traced axis: Σ_k / K
                a = a / sizes[-1]
            if a.shape != b.shape:
                raise SystemExit(f"{name}: shapes differ, fastgrad {a.shape}, neural-tangents {b.shape}")
            err = float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())
            t = _timing.turns(
                {"ours": _timing.timer(ours, pause=0.1), "peer": _timing.timer(peer, pause=0.1)}, args.reps
            )
            ms_ours, ms_peer = 1e3 * _timing.median(t["ours"]), 1e3 * _timing.median(t["peer"])
            rows.append((name, "trace (B, B)" if trace else "full (B, B, K, K)", ms_ours, ms_peer, err))
            print(f"  {rows[-1]}", flush=True)
    print()
    print("| config | kernel | fastgrad ms | neural-tangents ms | NT / fastgrad | max rel. difference |")
    print("|---|---|---|---|---|---|")
    for name, kind, a, b, err in rows:
        print(f"| {name} | {kind} | {a:.2f} | {b:.2f} | {b / a:.2f}× | {err:.1e} |")


if __name__ == "__main__":
    main()

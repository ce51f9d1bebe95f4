"""fastgrad.dask against fastgrad.backprop on the concatenated rows, on Dask's threads and on a
LocalCluster of two worker processes (one per module, one thread each).

Run time: the cluster starts once (a few seconds); most cluster tests use backend="numpy",
because each worker process loads Numba's compiled kernels on its first call (seconds
each); the bit-identity tests use "numba", the default, on the cluster too.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

import fastgrad  # noqa: E402
import fastgrad.dask as fdask  # noqa: E402
from fastgrad.quantities import QUANTITIES, REGISTRY, Derived, PerSample  # noqa: E402
from problems import overflowing_problem, two_worker_client  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = 128  # rows per chunk: N = 600 gives chunks 128, 128, 128, 128, 88
N = 600
EVERYTHING = fdask.QUANTITIES


def problem(dtype=np.float64, loss="cross_entropy", seed=0):
    """A tiny net and N rows: (net, θ, X, y) as NumPy arrays."""
    n_out = 3
    net = fastgrad.MLP([5, 7, n_out], activation="tanh", loss=loss)
    rng = np.random.default_rng(seed)
    theta = net.init(seed=seed, dtype=dtype)
    theta += rng.normal(0, 0.1, theta.shape).astype(dtype)  # non-zero biases
    X = rng.standard_normal((N, 5)).astype(dtype)
    if loss == "cross_entropy":
        y = rng.integers(0, n_out, N)
    else:
        y = rng.standard_normal((N, n_out)).astype(dtype)
    return net, theta, X, y


def chunked(X, y, rows=ROWS):
    return da.from_array(X, chunks=(rows, -1)), da.from_array(y, chunks=(rows, *y.shape[1:]))


def materialise(value):
    return value.compute() if hasattr(value, "compute") else value


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else float(np.linalg.norm(a))


def same_bits(a, b) -> bool:
    a, b = np.asarray(materialise(a)), np.asarray(materialise(b))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def client():
    """Two worker processes with one thread each (and one Numba thread), shared by the module."""
    with two_worker_client() as c:
        yield c


# ------------------------------------------------------------ the registry


def test_a_derived_quantity_that_reads_a_per_sample_map_is_finished_from_row_sums_or_refused():
    refused = []
    for name, q in REGISTRY.items():
        if isinstance(q, Derived) and any(
            isinstance(REGISTRY[n], PerSample) and n != "loss" for n in q.needs
        ):
            if q.from_sums is None:
                refused.append(name)
                with pytest.raises(ValueError, match=f"compute: '{name}' is not available over chunks"):
                    fdask.backprop(None, None, None, None, compute=(name,))
            else:
                assert all(n in fdask.ROW_SUMS for n in q.needs if n in fdask.MAPS), name
    assert set(fdask.MAPS) == {"per_sample", "norms", "layer_norms"}
    assert refused == ["grad_cosine"]  # a cosine with the dataset's mean needs that mean first
    assert fdask.QUANTITIES == tuple(n for n in QUANTITIES if n not in refused)


# -------------------------------------------------- agreement with the core


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_every_quantity_matches_backprop_on_the_concatenated_rows(backend, loss):
    net, theta, X, y = problem(loss=loss)
    dX, dy = chunked(X, y)
    ref = fastgrad.backprop(net, theta, X, y, EVERYTHING, backend=backend)
    res = fdask.backprop(net, theta, dX, dy, EVERYTHING, backend=backend, scheduler="threads")
    for name in EVERYTHING:
        got = getattr(res, name)
        if name in fdask.MAPS:
            assert isinstance(got, da.Array) and got.chunks[0] == dX.chunks[0], name
        else:
            assert not hasattr(got, "dask"), name
        assert rel_error(materialise(got), getattr(ref, name)) <= 1e-12, name
        assert np.asarray(materialise(got)).dtype == np.asarray(getattr(ref, name)).dtype, name


def test_float32_results_come_back_in_float32_and_match():
    net, theta, X, y = problem(np.float32)
    dX, dy = chunked(X, y)
    ref = fastgrad.backprop(net, theta, X, y, ("grad", "sq_mean", "noise_scale", "norms"), backend="numba")
    res = fdask.backprop(net, theta, dX, dy, ("grad", "sq_mean", "noise_scale", "norms"), scheduler="threads")
    for name in ("grad", "sq_mean", "norms"):
        got = materialise(getattr(res, name))
        assert got.dtype == np.float32 and rel_error(got, getattr(ref, name)) < 1e-5, name
    assert abs(res.noise_scale - ref.noise_scale) <= 1e-4 * ref.noise_scale
    assert abs(res.loss - ref.loss) <= 1e-6 * ref.loss


def test_numpy_labels_are_split_like_X():
    net, theta, X, y = problem()
    res = fdask.backprop(net, theta, chunked(X, y)[0], y, ("grad",), backend="numpy", scheduler="sync")
    assert rel_error(res.grad, fastgrad.backprop(net, theta, X, y, ("grad",)).grad) <= 1e-12


def test_empty_chunks_add_nothing():
    net, theta, X, y = problem()
    dX, dy = chunked(X, y)
    dX = da.concatenate([dX[:0], dX, dX[:0]])
    dy = da.concatenate([dy[:0], dy, dy[:0]])
    res = fdask.backprop(net, theta, dX, dy, ("grad", "norms"), backend="numpy", scheduler="sync")
    assert rel_error(res.grad, fastgrad.backprop(net, theta, X, y, ("grad",)).grad) <= 1e-12
    assert res.norms.compute().shape == (N,)


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.5])
def test_clipped_grad_matches_the_core(noise_multiplier):
    net, theta, X, y = problem()
    dX, dy = chunked(X, y)
    kw = dict(max_norm=0.3, noise_multiplier=noise_multiplier, seed=7, backend="numba")
    ref = fastgrad.clipped_grad(net, theta, X, y, **kw)
    got = fdask.clipped_grad(net, theta, dX, dy, **kw, scheduler="threads")
    assert got.dtype == theta.dtype and rel_error(got, ref) <= 1e-12


def test_delayed_backprop_is_one_pass_with_the_same_bits():
    net, theta, X, y = problem()
    dX, dy = chunked(X, y)
    eager = fdask.backprop(net, theta, dX, dy, EVERYTHING, backend="numpy", scheduler="threads")
    lazy = fdask.delayed_backprop(net, theta, dX, dy, EVERYTHING, backend="numpy")
    scalars = [n for n in EVERYTHING if n not in fdask.MAPS]
    # Delayed ones first: Dask 2026.8's dask.compute groups results by collection type
    values = dask.compute(*[getattr(lazy, n) for n in scalars], scheduler="threads")
    for name, value in zip(scalars, values):
        assert same_bits(value, getattr(eager, name)), name
    for name in fdask.MAPS:
        assert same_bits(getattr(lazy, name), getattr(eager, name)), name


def test_the_chunks_sums_are_added_in_a_fixed_tree_over_chunk_order():
    # values whose float sum depends on the grouping: ((a + b) + (c + d)) + e
    parts = [{"s": v} for v in (1e16, 1.0, -1e16, 1.0, 3.0)]
    tree = fdask.tree_sum([dask.delayed(p) for p in parts])
    expected = ((1e16 + 1.0) + (-1e16 + 1.0)) + 3.0
    for scheduler in ("sync", "threads"):
        assert tree.compute(scheduler=scheduler)["s"] == expected


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_compare_shortcut_matches_the_core_on_the_concatenated_rows(loss):
    net, theta, X, y = problem(loss=loss)
    net = fastgrad.MLP([5, 7, 6, 3], activation="tanh", loss=loss)  # two hidden layers
    theta = net.init(seed=1, dtype=np.float64)
    ref = fastgrad.compare_shortcut(net, theta, X, y, backend="numpy")
    got = fdask.compare_shortcut(net, theta, *chunked(X, y), backend="numpy", scheduler="threads")
    assert got.batch_size == N and len(got.rows) == len(ref.rows)
    for r, g in zip(ref.rows, got.rows):
        assert (r.method, r.layer) == (g.method, g.layer)
        for field in ("rel_error", "cosine", "norm_ratio", "cov_norm", "grad_norm"):
            assert abs(getattr(g, field) - getattr(r, field)) <= 1e-10 * max(1.0, abs(getattr(r, field))), (
                r.method,
                r.layer,
                field,
            )


# ------------------------------------------------------ on a LocalCluster


def test_every_quantity_matches_on_a_local_cluster(client):
    net, theta, X, y = problem()
    dX, dy = chunked(X, y)
    ref = fastgrad.backprop(net, theta, X, y, EVERYTHING, backend="numpy")
    res = fdask.backprop(net, theta, dX, dy, EVERYTHING, backend="numpy", scheduler=client)
    for name in EVERYTHING:
        assert rel_error(materialise(getattr(res, name)), getattr(ref, name)) <= 1e-12, name


def test_bits_are_the_same_on_one_or_two_workers_and_any_scheduler(client):
    net, theta, X, y = problem(np.float32)
    dX, dy = chunked(X, y, rows=64)  # 10 chunks: a tree of 4 levels
    want = ("grad", "sq_mean", "variance", "noise_scale")
    runs = {"two workers": fdask.backprop(net, theta, dX, dy, want, scheduler=client)}
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as one,
        distributed.Client(one, set_as_default=False) as c1,
    ):
        runs["one worker"] = fdask.backprop(net, theta, dX, dy, want, scheduler=c1)
    for scheduler in ("threads", "sync", "processes"):
        runs[scheduler] = fdask.backprop(net, theta, dX, dy, want, scheduler=scheduler)
    first = runs["two workers"]
    for label, res in runs.items():
        for name in (*want, "loss"):
            assert same_bits(getattr(res, name), getattr(first, name)), (label, name)
    clipped = [fdask.clipped_grad(net, theta, dX, dy, 0.5, scheduler=s) for s in (client, "threads")]
    assert same_bits(*clipped)


def test_per_sample_rows_written_to_zarr_from_the_cluster_match(client, tmp_path):
    net, theta, X, y = problem()
    dX, dy = chunked(X, y)
    res = fdask.backprop(net, theta, dX, dy, ("per_sample", "layer_norms"), backend="numpy")
    assert res.loss is None  # maps only: nothing computed yet
    store = str(tmp_path / "per_sample.zarr")
    res.per_sample.to_zarr(store, compute=False).compute(scheduler=client)
    ref = fastgrad.backprop(net, theta, X, y, ("per_sample", "layer_norms"), backend="numpy")
    written = zarr.open(store, mode="r")[:]
    assert written.shape == (N, net.num_params) and rel_error(written, ref.per_sample) <= 1e-12
    assert rel_error(res.layer_norms.compute(scheduler=client), ref.layer_norms) <= 1e-12


def test_per_sample_rows_written_to_an_npy_file_match(tmp_path):
    net, theta, X, y = problem()
    dX, dy = chunked(X, y)
    res = fdask.backprop(net, theta, dX, dy, ("per_sample",), backend="numba")
    path = tmp_path / "per_sample.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=theta.dtype, shape=(N, net.num_params))
    da.store(res.per_sample, out, lock=False, scheduler="threads")
    out.flush()
    del out
    ref = fastgrad.backprop(net, theta, X, y, ("per_sample",), backend="numba").per_sample
    assert rel_error(np.load(path), ref) <= 1e-12


def test_from_npy_reads_each_chunk_where_it_runs(client, tmp_path):
    import pickle

    net, theta, X, y = problem()
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    dX, dy = fdask.from_npy(tmp_path / "X.npy", ROWS), fdask.from_npy(tmp_path / "y.npy", ROWS)
    assert (
        dX.chunks == ((128, 128, 128, 128, 88), (5,))
        and len(pickle.dumps(fdask.NpyRows(tmp_path / "X.npy"))) < 1000
    )
    assert same_bits(dX[130:300, 1:4], X[130:300, 1:4]) and same_bits(dX[::7], X[::7])
    res = fdask.backprop(net, theta, dX, dy, ("grad", "norms"), backend="numpy", scheduler=client)
    ref = fastgrad.backprop(net, theta, X, y, ("grad", "norms"), backend="numpy")
    assert rel_error(res.grad, ref.grad) <= 1e-12
    assert rel_error(res.norms.compute(scheduler=client), ref.norms) <= 1e-12


# ------------------------------------------------------------------ errors


def test_X_chunked_along_columns_is_refused():
    net, theta, X, y = problem()
    with pytest.raises(ValueError, match=r"X: chunked along columns .*rechunk"):
        fdask.backprop(net, theta, da.from_array(X, chunks=(ROWS, 2)), y, backend="numpy")


def test_X_and_y_chunks_that_do_not_line_up_are_refused():
    net, theta, X, y = problem()
    with pytest.raises(ValueError, match=r"y: row chunks .* do not line up with X's"):
        fdask.backprop(net, theta, chunked(X, y)[0], da.from_array(y, chunks=100), backend="numpy")


def test_X_must_be_a_dask_array_and_shapes_are_checked_before_any_task():
    net, theta, X, y = problem()
    with pytest.raises(TypeError, match=r"X: expected a dask.array.Array .*from_array"):
        fdask.backprop(net, theta, X, y)
    with pytest.raises(ValueError, match=r"X: expected 5 columns"):
        fdask.backprop(net, theta, da.from_array(X[:, :4], chunks=(ROWS, -1)), y)
    with pytest.raises(ValueError, match=r"y: cross_entropy expects labels of shape \(600,\)"):
        fdask.backprop(net, theta, chunked(X, y)[0], y[:-1])
    with pytest.raises(TypeError, match=r"y: cross_entropy expects integer class labels"):
        fdask.backprop(net, theta, *chunked(X, y.astype(np.float64)))
    with pytest.raises(ValueError, match=r"compute: unknown quantity"):
        fdask.backprop(net, theta, *chunked(X, y), compute=("grad", "nope"))


@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_a_bad_chunk_is_reported_with_its_rows(where, request):
    scheduler = request.getfixturevalue("client") if where == "cluster" else "threads"
    net, theta, X, y = problem()
    X_nan = X.copy()
    X_nan[300, 2] = np.nan  # in the third chunk, rows 256:384
    with pytest.raises(ValueError, match=r"rows 256:384 .*X: contains NaN"):
        fdask.backprop(net, theta, *chunked(X_nan, y), backend="numpy", scheduler=scheduler)
    y_bad = y.copy()
    y_bad[590] = 3  # the last chunk, rows 512:600
    with pytest.raises(ValueError, match=r"rows 512:600 .*y: labels must lie in \[0, 3\)"):
        fdask.clipped_grad(net, theta, *chunked(X, y_bad), 1.0, backend="numpy", scheduler=scheduler)


def test_a_missing_dask_names_the_extra_to_install():
    code = (
        "import sys\nsys.modules['dask'] = None\n"
        "from fastgrad.extras import MissingExtraError\n"
        "try:\n    import fastgrad.dask\nexcept MissingExtraError as exc:\n    print(exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and 'pip install "fastgrad[dask]"' in p.stdout, p.stderr


# ---------------------------------------------------------- fastgrad stats


def test_stats_command_prints_the_datasets_numbers(tmp_path, capsys):
    from fastgrad.tools.cli import main

    net, _theta, X, y = problem(np.float32)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    status = main(
        ["stats", "--data", str(tmp_path / "X.npy"), "--labels", str(tmp_path / "y.npy"), "--hidden", "7",
         "--chunk-rows", "128", "--backend", "numpy", "--no-progress", "--seed", "3"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    net = fastgrad.MLP([5, 7, 3], activation="tanh", loss="cross_entropy")
    ref = fastgrad.backprop(net, net.init(seed=3, dtype=np.float32), X, y, ("grad", "noise_scale", "norms"))
    assert f"{ref.noise_scale:.4g}"[:4] in out.split("B_simple")[1].split("\n")[0]
    assert "5 chunks" in out and "per-sample gradient norms" in out
    assert f"{np.median(ref.norms):.4g}" in out


def test_stats_command_reads_a_zarr_group_and_refuses_bad_paths(tmp_path, capsys):
    from fastgrad.tools.stats import main

    _net, _theta, X, y = problem(np.float32)
    group = zarr.open_group(str(tmp_path / "data.zarr"), mode="w")
    group.create_array("X", data=X, chunks=(200, 5))
    group.create_array("y", data=y, chunks=(600,))
    assert (
        main(["--data", str(tmp_path / "data.zarr"), "--hidden", "4", "--backend", "numpy", "--no-progress"])
        == 0
    )
    assert "3 chunks" in capsys.readouterr().out
    assert main(["--data", str(tmp_path / "nope.npy"), "--labels", "y.npy"]) == 2
    assert "no such file" in capsys.readouterr().err
    np.save(tmp_path / "X.npy", X)
    assert main(["--data", str(tmp_path / "X.npy")]) == 2
    assert "--labels: required" in capsys.readouterr().err


def test_theta_is_one_key_of_the_graph_that_every_chunk_reads():
    import pickle

    net, theta, X, y = problem()
    lazy = fdask.delayed_backprop(net, theta, *chunked(X, y), ("grad",), backend="numpy")
    graph = dict(lazy.grad.__dask_graph__())
    holding = [k for k, v in graph.items() if theta.tobytes() in pickle.dumps(v)]
    assert len(holding) == 1, holding
    readers = [k for k, v in graph.items() if "run_chunk" in str(k) or "run_chunk" in repr(v)[:200]]
    assert len(readers) >= 5


def test_stats_command_runs_on_a_cluster_by_its_address(client, tmp_path, capsys):
    from fastgrad.tools.stats import main

    _, _, X, y = problem(np.float32)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    args = ["--data", str(tmp_path / "X.npy"), "--labels", str(tmp_path / "y.npy"), "--chunk-rows", "256"]
    assert main([*args, "--backend", "numpy", "--scheduler", client.scheduler.address]) == 0
    on_cluster = capsys.readouterr().out
    assert main([*args, "--backend", "numpy", "--scheduler", "threads", "--no-progress"]) == 0
    on_threads = capsys.readouterr().out
    # the same numbers, bit for bit, whatever runs them; only the header names the scheduler
    assert on_cluster.splitlines()[1:] == on_threads.splitlines()[1:]


def test_stats_command_without_dask_names_the_extra(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros((4, 2)))
    code = (
        "import sys\nsys.modules['dask'] = None\n"
        "from fastgrad.tools.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-c", code, "stats", "--data", str(tmp_path / "X.npy"), "--labels", "y.npy"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert 'pip install "fastgrad[dask]"' in p.stderr


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy reports the overflow it is made to do
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_chunk_with_a_nan_or_inf_norm_is_never_left_unclipped(backend):
    # as fastgrad.clipped_grad: inf − inf (problems.overflowing_problem) makes the fourth
    # sample's pass NaN; its chunk must raise, naming its rows, not add the sample unclipped
    net, theta, X, y = overflowing_problem(np.float32, finite_rows=3)
    Xd, yd = chunked(X, y, rows=2)
    with pytest.raises(FloatingPointError, match=r"rows 2:4 .*gradient norm of sample 1 is (nan|inf)"):
        fdask.clipped_grad(net, theta, Xd, yd, max_norm=1.0, backend=backend, scheduler="sync")

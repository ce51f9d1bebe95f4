"""The numba backend's disk cache: keyed on the package's source, and optional (docs/design.md §8).

The end-to-end tests run a copy of the package in a subprocess, so that editing it or making
its cache folders unwritable touches nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastgrad
from fastgrad import _cache, cpu

SIGMOID_GRAD = "        return a * (like(z, 1.0) - a)\n"
SIGMOID_GRAD_DOUBLED = "        return like(z, 2.0) * a * (like(z, 1.0) - a)\n"


def _copy_package(dest, with_cache: bool) -> str:
    """A copy of the fastgrad package under ``dest``; returns the folder to put on PYTHONPATH."""
    ignore = None if with_cache else shutil.ignore_patterns("__pycache__")
    shutil.copytree(_cache.PACKAGE_DIR, os.path.join(dest, "fastgrad"), ignore=ignore)
    return str(dest)


def _python(code: str, path: str, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "FASTGRAD_NUMBA_CACHE")}
    env.update(PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1", **env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=path, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_source_key_follows_every_kernel_module_and_not_the_applications(tmp_path):
    root = _copy_package(tmp_path, with_cache=False)
    copy = os.path.join(root, "fastgrad")
    assert _cache.source_key(copy) == _cache.SOURCE_KEY  # content, not the folder's path
    with open(os.path.join(copy, "tools", "cli.py"), "a") as fh:
        fh.write("\n# an edit to an application\n")
    assert _cache.source_key(copy) == _cache.SOURCE_KEY
    for module in ("activations.py", "losses.py", "quantities.py", "__init__.py"):
        path = os.path.join(copy, module)
        with open(path) as fh:
            text = fh.read()
        with open(path, "w") as fh:
            fh.write(text + "\n# edited\n")
        assert _cache.source_key(copy) != _cache.SOURCE_KEY, module
        with open(path, "w") as fh:
            fh.write(text)


def test_fastgrads_locators_decline_other_peoples_files():
    for cls in _cache.LOCATORS:
        assert cls.from_function(test_fastgrads_locators_decline_other_peoples_files, __file__) is None


SIGMOID_GRAD_SCRIPT = """
    import numpy as np, fastgrad
    from fastgrad import cpu
    net = fastgrad.MLP([3, 4, 2], activation="sigmoid", loss="mse")
    theta = net.init(seed=0, dtype=np.float64)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    numba = fastgrad.backprop(net, theta, X, y, backend="numba").grad
    naive = fastgrad.backprop(net, theta, X, y, backend="naive").grad
    np.save("numba.npy", numba)
    np.save("naive.npy", naive)
    kernels = (cpu.batch_backprop, cpu.fused_backprop)  # a call loads batch_backprop, which holds the other
    print("hits:", sum(sum(k.stats.cache_hits.values()) for k in kernels))
"""


def _hits(done: subprocess.CompletedProcess) -> int:
    return int(done.stdout.split("hits:")[1].split()[0])


def test_an_edit_to_a_callee_module_recompiles_the_kernels(tmp_path):
    # Today's main: the edited copy loads the kernel cached before the edit (Numba checks only
    # the kernels' own source file), returns the old bits, and validate passes on them.
    if not cpu.CACHE or _cache.cache_dir() != os.path.join(_cache.PACKAGE_DIR, "cpu", "__pycache__"):
        pytest.skip("the kernels are not cached next to the package here (the copy would have none)")
    net = fastgrad.MLP([3, 4, 2], activation="sigmoid", loss="mse")
    theta = net.init(seed=0, dtype=np.float64)
    fastgrad.backprop(net, theta, np.ones((5, 3)), np.ones((5, 2)), backend="numba")  # fills the cache
    root = _copy_package(tmp_path / "pkg", with_cache=True)
    before = _python(SIGMOID_GRAD_SCRIPT, root)
    assert before.returncode == 0, before.stderr
    assert _hits(before) > 0  # the copy loaded its cache: a stale kernel was there to load
    numba_before, naive = np.load(tmp_path / "pkg" / "numba.npy"), np.load(tmp_path / "pkg" / "naive.npy")
    np.testing.assert_allclose(numba_before, naive, rtol=1e-10)

    path = os.path.join(root, "fastgrad", "activations.py")
    with open(path) as fh:
        text = fh.read()
    assert text.count(SIGMOID_GRAD) == 1
    with open(path, "w") as fh:
        fh.write(text.replace(SIGMOID_GRAD, SIGMOID_GRAD_DOUBLED))
    after = _python(SIGMOID_GRAD_SCRIPT, root)
    assert after.returncode == 0, after.stderr
    assert _hits(after) == 0
    numba_after = np.load(tmp_path / "pkg" / "numba.npy")
    # the edit is in the kernel now, so the kernel no longer matches the NumPy reference (which
    # has its own derivative): validate fails, as it must
    assert not np.allclose(numba_after, numba_before, rtol=1e-6)
    assert not np.allclose(numba_after, naive, rtol=1e-6)


def test_cache_files_are_named_with_the_source_key_and_other_sources_files_are_pruned(tmp_path):
    if cpu.CACHE:
        index = cpu.kernels.all_finite._cache._cache_file._index_name  # the index a load would open
        assert f"-{_cache.KEY_TAG}.py" in index
    names = ["kernels.f-10.py311.nbi", "kernels.f-10.py311.1.nbc", f"kernels.f-10-{'0' * 16}.py311.nbi",
             f"kernels.f-10-{_cache.KEY_TAG}.py311.nbi", f"kernels.f-10-{_cache.KEY_TAG}.py311.1.nbc",
             "kernels.cpython-311.pyc", "notes.txt"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert _cache.prune(str(tmp_path)) == 3
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])
    assert _cache.prune(str(tmp_path / "missing")) == 0


STALE_INDEX_SCRIPT = """
    import numpy as np
    from fastgrad import cpu
    print("finite:", cpu.kernels.all_finite(np.ones(3)))
"""


def test_an_index_from_other_source_with_a_missing_module_is_never_loaded(tmp_path):
    """Numba unpickles an index's signatures before it checks the stamp: an index left by older source whose
    types lived in a module since renamed raised ModuleNotFoundError at the first call."""
    import pickle
    import types

    import numba

    root = _copy_package(tmp_path / "pkg", with_cache=False)
    gone = types.ModuleType("fastgrad_renamed_module")
    gone.Pack = type("Pack", (), {"__module__": gone.__name__})
    sys.modules[gone.__name__] = gone
    try:
        payload = pickle.dumps((("fastgrad source", "older"), {("sig", gone.Pack()): "entry"}))
    finally:
        del sys.modules[gone.__name__]
    line = cpu.kernels.all_finite.py_func.__code__.co_firstlineno
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"
    folder = tmp_path / "pkg" / "fastgrad" / "cpu" / "__pycache__"
    folder.mkdir(exist_ok=True)
    stale = folder / f"kernels.all_finite-{line}.{tag}.nbi"  # the name without the key
    with open(stale, "wb") as fh:
        pickle.dump(numba.__version__, fh)
        fh.write(payload)
    done = _python(STALE_INDEX_SCRIPT, root)
    assert done.returncode == 0, done.stderr
    assert "finite: True" in done.stdout
    assert not stale.exists()  # pruned when the cache was configured


def test_a_read_only_install_compiles_without_the_cache_and_warns_once(tmp_path):
    # Today's main: "cannot cache function '_rows': no locator available", the numba backend
    # silently disappears from available_backends() and "auto" falls back to numpy.
    root = _copy_package(tmp_path / "pkg", with_cache=False)
    kernels_cache = os.path.join(root, "fastgrad", "cpu", "__pycache__")
    with open(kernels_cache, "w") as fh:  # not a folder: even root can't
        fh.write("")
    unwritable = os.path.join(kernels_cache, "home-cache")
    code = """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastgrad
            print("available:", fastgrad.available_backends())
            print("auto:", fastgrad.resolve_backend("auto"))
            fastgrad.available_backends()
        ours = [w for w in caught if "Numba's disk cache" in str(w.message)]
        print("warnings:", len(ours))
        print(ours[0].message if ours else "")
        from fastgrad import cpu
        print("cache:", cpu.CACHE)
    """
    done = _python(code, root, XDG_CACHE_HOME=unwritable, HOME=unwritable)
    assert done.returncode == 0, done.stderr
    assert "'numba'" in done.stdout.split("available:")[1].splitlines()[0]
    assert "warnings: 1" in done.stdout
    assert "NUMBA_CACHE_DIR" in done.stdout
    assert "cache: False" in done.stdout
    if "cuda" not in done.stdout.split("auto:")[1].splitlines()[0]:
        assert "auto: numba" in done.stdout


def test_validate_refuses_to_run_kernels_older_than_the_source(monkeypatch):
    from fastgrad.tools import validate

    monkeypatch.setattr(_cache, "SOURCE_KEY", "0" * 64)  # the source changed after it was imported
    with pytest.raises(RuntimeError, match="changed after it was imported"):
        validate.validate(["numba"], quick=True)
    assert validate.main(["--quick", "--backend", "numba"]) == 2

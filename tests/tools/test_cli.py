"""The ``fastgrad`` command through subprocesses (as a user runs it), plus in-process checks of its wiring.

Each subprocess costs about half a second (imports), so there are few and they are small.
"""

import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import fastgrad
from fastgrad.tools import cli
from fastgrad.tools.datasets import make_spirals

ROOT = Path(__file__).resolve().parents[2]
# run fastgrad's main with some modules made unimportable: sys.modules[name] = None
BLOCKING = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "from fastgrad.tools.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def run(*args, block=None, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = (
        [sys.executable, "-m", "fastgrad", *args]
        if block is None
        else [sys.executable, "-c", BLOCKING, block, *args]
    )
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def _row(stdout: str, method: str, layer: str) -> list[str]:
    for line in stdout.splitlines():
        parts = line.split()
        if parts[:2] == [method, layer]:
            return parts
    raise AssertionError(f"no row {method} {layer} in:\n{stdout}")


def test_compare_prints_the_same_numbers_as_compare_shortcut():
    p = run(
        "compare",
        "--backend",
        "numpy",
        "--batch-size",
        "32",
        "--hidden",
        "8,8",
        "--dtype",
        "float64",
        "--seed",
        "3",
    )
    assert p.returncode == 0, p.stderr
    data = make_spirals()
    idx = np.random.default_rng(3).choice(data.num_samples, 32, replace=False)
    net = fastgrad.MLP([2, 8, 8, 3], activation="tanh", loss="cross_entropy")
    rep = fastgrad.compare_shortcut(net, net.init(seed=3, dtype=np.float64), data.X[idx], data.y[idx])
    for method in fastgrad.METHODS:
        for layer in ("1", "2", "3", "total"):
            r = rep.row(method, layer if layer == "total" else int(layer))
            rel, cos = map(float, _row(p.stdout, method, layer)[2:4])
            assert rel == pytest.approx(r.rel_error, rel=1e-3)
            assert cos == pytest.approx(r.cosine, abs=1e-4)
    assert "backend numpy" in p.stdout


def test_train_with_dp_prints_the_table_shows_progress_and_writes_a_png_when_it_can(tmp_path):
    # without matplotlib, the missing-extra test covers --plot
    plot = importlib.util.find_spec("matplotlib") is not None
    p = run(
        "train", "--backend", "numpy", "--epochs", "2", "--hidden", "8", "--batch-size", "100", "--dp",
        *(["--plot", "curves.png"] if plot else []),
        cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    for method in ("true", "mean_error", "mean_input", "dp_sgd"):
        assert any(line.split()[:1] == [method] for line in p.stdout.splitlines()), p.stdout
    assert "training" in p.stderr  # the tqdm bar
    if plot:
        assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_on_a_users_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", X=rng.standard_normal((50, 3)), y=rng.standard_normal((50, 2)))
    p = run(
        "sweep",
        "--data",
        "mine.npz",
        "--backend",
        "numpy",
        "--batch-sizes",
        "1,8",
        "--depths",
        "1",
        "--activations",
        "relu",
        "--width",
        "4",
        "--seeds",
        "1",
        "--base-batch",
        "8",
        "--no-progress",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert "mine.npz, mse" in p.stdout
    lines = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("batch_size")]
    assert [ln[1] for ln in lines] == ["1", "8"]
    assert float(lines[0][-4]) == 0.0  # B = 1: the shortcut is exact
    assert float(lines[1][-4]) > 0.01


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("compare", "--hidden", "4,0"), "hidden widths must be ≥ 1"),
        (("compare", "--activation", "swish"), "invalid choice: 'swish'"),
        (("train", "--lr", "-1"), "expected a positive number"),
        (("compare", "--data", "missing.npz", "--backend", "numpy"), "no such file"),
        (("compare", "--batch-size", "5000", "--backend", "numpy"), "exceeds the 1500 samples"),
        (("sweep", "--activations", "tanh,swish", "--backend", "numpy"), "unknown 'swish'"),
        (("sweep", "--base-batch", "2000", "--backend", "numpy"), "base_batch: 2000 exceeds"),
    ],
)
def test_bad_arguments_end_with_a_message_and_status_2_not_a_traceback(args, message, tmp_path):
    p = run(*args, cwd=tmp_path)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_optional_extras_name_the_extra_to_install(tmp_path):
    p = run("train", "--plot", "x.png", "--backend", "numpy", block="matplotlib", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert 'pip install "fastgrad[plot]"' in p.stderr
    p = run("compare", "--dataset", "digits", "--backend", "numpy", block="sklearn", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert 'pip install "fastgrad[digits]"' in p.stderr


def test_no_command_prints_help_and_fails():
    p = run()
    assert p.returncode == 2
    for command in ("compare", "train", "sweep", "validate", "bench"):
        assert command in p.stdout


def test_console_script_is_installed_and_runs():
    exe = shutil.which("fastgrad")
    if exe is None:
        pytest.skip("fastgrad is not installed in this environment (pip install -e .)")
    p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"fastgrad {fastgrad.__version__}"


# ------------------------------------------------------------ in-process wiring


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (["naive", "numpy"], "numpy"),
        (["naive", "numpy", "numba"], "numba"),
        (["naive", "numpy", "numba", "cuda"], "cuda"),
    ],
)
def test_auto_backend_is_the_fastest_available(monkeypatch, available, expected):
    monkeypatch.setattr(fastgrad.api, "available_backends", lambda: available)
    assert cli.resolve_backend("auto") == expected


def test_an_explicit_backend_that_cannot_run_is_a_usage_error(monkeypatch):
    def unavailable(name):
        raise RuntimeError("no CUDA GPU found")

    monkeypatch.setattr(fastgrad.api, "_backend", unavailable)
    with pytest.raises(cli.UsageError, match="--backend cuda: cannot run here: no CUDA GPU"):
        cli.resolve_backend("cuda")


def test_validate_and_bench_delegate_to_their_modules_with_the_remaining_arguments(monkeypatch):
    seen = {}
    for command in ("validate", "bench"):
        fake = types.ModuleType(f"fastgrad.tools.{command}")
        fake.main = lambda argv, command=command: seen.setdefault(command, list(argv)) and 3
        monkeypatch.setitem(sys.modules, f"fastgrad.tools.{command}", fake)
        assert cli.main([command, "--quick", "x"]) == 3
    assert seen == {"validate": ["--quick", "x"], "bench": ["--quick", "x"]}


def test_a_missing_delegate_module_says_the_feature_is_not_available(monkeypatch, capsys):
    monkeypatch.setitem(cli._DELEGATED, "validate", "no_such_module_here")
    assert cli.main(["validate"]) == 2
    assert "not available in this version" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "message"), [("nowhere/x.png", "does not exist"), ("x.qqq", "cannot write .qqq")]
)
def test_a_plot_path_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, name, message):
    if importlib.util.find_spec("matplotlib") is None:
        message = 'pip install "fastgrad[plot]"'
    try:  # 1000 epochs: were the path checked only after training, this test would take minutes
        status = cli.main(["train", "--backend", "numpy", "--plot", str(tmp_path / name), "--epochs", "1000"])
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_validate_runs_the_real_validation_module_end_to_end():
    p = run("validate", "--quick", "--backend", "numpy")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "checks passed" in p.stdout


def test_the_console_script_and_python_m_fastgrad_run_the_same_main():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["fastgrad"].partition(":")
    assert getattr(importlib.import_module(module), attr) is cli.main
    main_py = (ROOT / "fastgrad" / "__main__.py").read_text()
    assert "from .tools.cli import main" in main_py and "sys.exit(main())" in main_py


def test_the_applications_live_only_under_fastgrad_tools():
    # the package's top level holds the core; the command and its applications are fastgrad.tools.*
    for name in ("cli", "train", "bench", "datasets", "validate"):
        assert not (ROOT / "fastgrad" / f"{name}.py").exists(), name
        assert (ROOT / "fastgrad" / "tools" / f"{name}.py").is_file(), name


def test_import_fastgrad_loads_none_of_the_tools():
    code = "import sys, fastgrad; print(sorted(m for m in sys.modules if m.startswith('fastgrad.tools')))"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


# ------------------------------------------- never a traceback: exit statuses 1, 2, 130


def _main(*args):
    """``cli.main(args)``'s status, also when argparse exits."""
    try:
        return cli.main(list(args))
    except SystemExit as exc:
        return exc.code


def _labels_npz(path, top_label):
    X = np.random.default_rng(0).standard_normal((10, 2))
    np.savez(path, X=X, y=np.array([0, 1] * 4 + [1, top_label]))
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # 16 TB of θ: refused before θ is allocated (was a MemoryError traceback)
        (("compare", "--hidden", "1000000,1000000"), "memory is available"),
        (("train", "--hidden", "1000000,1000000", "--epochs", "1000"), "memory is available"),
        (("compare", "--seed", "-1"), "argument --seed: expected a non-negative integer"),
        (("train", "--seed", "-1"), "argument --seed: expected a non-negative integer"),
        (("validate", "--seed", "-1"), "argument --seed: expected a non-negative integer"),
    ],
)
def test_sizes_that_cannot_fit_and_negative_seeds_are_refused_before_any_work(capsys, args, message):
    assert _main(*args, "--backend", "numpy") == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("top_label", [10**9, 10**5])  # was a MemoryError / a 100 001-class net
def test_absurd_class_counts_in_data_are_refused(tmp_path, capsys, top_label):
    path = _labels_npz(tmp_path / "labels.npz", top_label)
    assert _main("compare", "--data", path, "--backend", "numpy", "--batch-size", "4") == 2
    assert f"{top_label + 1:,} classes for 10 samples" in capsys.readouterr().err


def test_a_memory_error_during_the_work_is_a_message_and_status_1(monkeypatch, capsys):
    def out_of_memory(args):
        raise MemoryError("Unable to allocate 37.3 GiB for an array")

    monkeypatch.setitem(cli._COMMANDS, "compare", out_of_memory)
    assert cli.main(["compare"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastgrad compare: out of memory (Unable to allocate 37.3 GiB")
    assert len(err.splitlines()) == 1


def test_an_unexpected_error_is_one_line_pointing_at_fastgrad_debug_which_shows_it(monkeypatch, capsys):
    def bug(args):
        raise KeyError("oops")

    monkeypatch.setitem(cli._COMMANDS, "compare", bug)
    monkeypatch.delenv("FASTGRAD_DEBUG", raising=False)
    assert cli.main(["compare"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "unexpected error: KeyError: 'oops'" in err and "FASTGRAD_DEBUG=1" in err
    monkeypatch.setenv("FASTGRAD_DEBUG", "1")
    with pytest.raises(KeyError, match="oops"):
        cli.main(["compare"])


def test_delegated_commands_get_the_same_handler(monkeypatch, capsys):
    fake = types.ModuleType("fastgrad.tools.bench")

    def interrupted(argv):
        raise KeyboardInterrupt

    fake.main = interrupted
    monkeypatch.setitem(sys.modules, "fastgrad.tools.bench", fake)
    try:
        status = cli.main(["bench"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped fastgrad's main")
    assert status == 130
    assert capsys.readouterr().err == "fastgrad bench: interrupted\n"


def _swallowed_interrupt():
    """Raise KeyboardInterrupt inside a ctypes callback, as a Ctrl-C during LLVM's object-cache
    callback does while Numba compiles: Python prints it and drops it."""
    import ctypes

    def raiser():
        raise KeyboardInterrupt

    callback = ctypes.CFUNCTYPE(None)(raiser)
    callback()  # returns normally: the exception went to sys.unraisablehook


def test_an_interrupt_dropped_in_a_c_callback_stops_the_command_with_130(monkeypatch, capsys):
    finished = []

    def compiling(args):
        _swallowed_interrupt()
        for _ in range(3000):  # 30 s of "compilation"; the interrupt raised again ends it
            time.sleep(0.01)
        finished.append(True)
        return 0

    monkeypatch.setitem(cli._COMMANDS, "compare", compiling)
    assert cli.main(["compare"]) == 130
    assert not finished
    err = capsys.readouterr().err
    assert err == "fastgrad compare: interrupted\n"  # the dropped exception was not printed either


def test_an_interrupt_dropped_just_before_the_command_ends_still_gives_130(monkeypatch, capsys):
    def compiling(args):
        _swallowed_interrupt()
        return 0

    monkeypatch.setitem(cli._COMMANDS, "compare", compiling)
    assert cli.main(["compare"]) == 130
    assert capsys.readouterr().err == "fastgrad compare: interrupted\n"
    time.sleep(0.2)  # the re-raise is cancelled once main has returned: nothing reaches pytest


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_during_bench_exits_130_with_a_message_and_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "fastgrad", "bench", "--configs", "narrow", "--backends", "numpy"]
    cmd += ["--no-peers", "--repeat", "1000", "--json", "-"]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        first = p.stderr.readline()  # "narrow: 1000 rounds": the benchmark has started
        assert "rounds" in first, first
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().endswith("fastgrad bench: interrupted")


# ------------------------------------------------------------------ --plot paths


def test_plot_without_an_extension_writes_and_reports_the_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    status = cli.main(
        ["train", "--backend", "numpy", "--epochs", "1", "--hidden", "4", "--no-progress",
         "--plot", str(tmp_path / "curves")]
    )  # fmt: skip
    assert status == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "curves").exists()
    assert f"loss curves written to {tmp_path / 'curves.png'}" in capsys.readouterr().out


def _unwritable(tmp_path) -> str:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return str(folder / "x.png")
    if os.path.isdir("/proc"):  # root may write anywhere but in /proc
        return "/proc/fastgrad-test-plot.png"
    pytest.skip("no unwritable folder for root here")


@pytest.mark.parametrize("kind", ["folder", "folder.png", "unwritable"])
def test_a_plot_destination_that_is_a_folder_or_unwritable_is_refused_before_the_work(tmp_path, capsys, kind):
    pytest.importorskip("matplotlib")
    if kind == "unwritable":
        dest, message = _unwritable(tmp_path), "cannot write"
    else:
        dest, message = str(tmp_path / kind), "is a folder"
        (tmp_path / kind).mkdir()
    # 1000 epochs: were the destination checked only after training, this test would take minutes
    assert _main("train", "--backend", "numpy", "--plot", dest.removesuffix(".png"), "--epochs", "1000") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "folder.png").is_file()


def test_a_plot_that_fails_after_the_work_is_status_1_with_a_message(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from fastgrad.tools import train

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.TrainResult, "plot", disk_full)
    status = cli.main(
        ["train", "--backend", "numpy", "--epochs", "1", "--hidden", "4", "--no-progress",
         "--plot", str(tmp_path / "curves.png")]
    )  # fmt: skip
    assert status == 1
    assert "fastgrad train: error: --plot" in capsys.readouterr().err

"""fastgrad.tools.bench, the peer comparison, on tiny problems. The configurations and floors
it shares with the asv suite are tested in tests/tools/test_configs.py, the asv suite in
tests/test_benchmarks_suite.py. Nothing here times anything that is asserted on; these tests
check that the tool runs, computes what it claims, and refuses bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import fastgrad
from fastgrad.tools import bench, configs

TINY = ((6, 5, 4, 3), 16)


@pytest.fixture
def tiny(monkeypatch):
    """A tiny configuration in the peer comparison, and small floor timers."""
    monkeypatch.setitem(configs.CONFIGS, "tiny", TINY)
    monkeypatch.setattr(bench, "SGEMM_SIZE", 64)
    monkeypatch.setattr(bench, "FILL_SHAPE", (8, 16, 16))
    return "tiny"


# ------------------------------------------------------ fastgrad.tools.bench


def test_bench_floor_timers_default_to_its_measurement_sizes(monkeypatch):
    monkeypatch.setattr(bench, "SGEMM_SIZE", 8)
    assert bench.sgemm_timer()[1] == 2 * 8**3
    assert bench.fill_timer((2, 3, 4))[1] == 2 * 12 * 4


def test_compare_times_every_implementation_against_the_reference(tiny):
    result = bench.compare(configs=[tiny], repeat=3, backends=["numpy"], peers=[])
    rows = result["rows"]
    assert [(r["quantity"], r["impl"]) for r in rows] == [(q, "fastgrad numpy") for q in bench.QUANTITIES]
    for r in rows:
        assert len(r["times_s"]) == 3 and r["median_s"] == sorted(r["times_s"])[1]
        assert r["vs_floor"] == pytest.approx(r["median_s"] / r["floor_s"])
        assert r["vs_numpy"] == 1.0
        assert r["rel_error"] < 1e-5  # float32 against float64 on a tiny network
    net = fastgrad.MLP(TINY[0])
    flops_floor = configs.mean_grad_flops(net, TINY[1]) / result["floors"]["sgemm_flops_per_s"]
    write_floor = configs.per_sample_bytes(net, TINY[1]) / result["floors"]["fill_bytes_per_s"]
    by_q = {r["quantity"]: r for r in rows}
    assert by_q["grad"]["floor_s"] == pytest.approx(flops_floor)
    assert by_q["per_sample"]["floor_s"] == pytest.approx(write_floor)
    assert result["floors"]["sgemm_size"] == 64 and result["floors"]["fill_shape"] == [8, 16, 16]
    assert json.loads(json.dumps(result))["versions"]["numpy"] == np.__version__
    share = result["machine"]["other_processes_cpu_share"]
    assert share is None or 0 <= share <= 1
    table = bench.format_table(result)
    assert "| tiny | per_sample | fastgrad numpy |" in table and "GFLOP/s" in table


def test_compare_takes_the_small_batch_set_too(tiny):
    result = bench.compare(["narrow-B32"], repeat=1, backends=["numpy"], peers=[], quantities=["grad"])
    assert [(r["config"], r["quantity"]) for r in result["rows"]] == [("narrow-B32", "grad")]
    assert "| narrow-B32 | grad | fastgrad numpy |" in bench.format_table(result)


def test_other_processes_share_is_the_machine_time_this_process_did_not_use():
    cpus = os.cpu_count()
    # 10 s wall; the machine was busy 8 CPU-seconds, 3 of them this process's
    assert bench._other_share((0.0, 100.0, 1.0), (10.0, 108.0, 4.0)) == pytest.approx(5 / (10 * cpus))
    assert bench._other_share((0.0, 100.0, 1.0), (0.5, 101.0, 1.2)) is None  # too short to count
    assert bench._other_share(None, (10.0, 108.0, 4.0)) is None


def test_compare_refuses_an_implementation_that_computes_something_else(tiny, monkeypatch):
    real = bench._fastgrad_calls

    def off_by_one_percent(*args):
        calls = real(*args)
        call, extract = calls["grad"]
        calls["grad"] = (call, lambda r: {"grad": extract(r)["grad"] * 1.01})
        return calls

    monkeypatch.setattr(bench, "_fastgrad_calls", off_by_one_percent)
    with pytest.raises(RuntimeError, match="fastgrad numpy computes a different grad on tiny"):
        bench.compare(configs=[tiny], repeat=1, backends=["numpy"], peers=[])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"repeat": 0}, "repeat"),
        ({"configs": ["huge"]}, "configs: unknown name 'huge'"),
        ({"quantities": ["hessian"]}, "quantities: unknown name 'hessian'"),
        ({"backends": ["fortran"]}, "backends: 'fortran' cannot run here"),
        ({"peers": ["tensorflow"]}, "peers: unknown name 'tensorflow'"),
    ],
)
def test_compare_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.compare(**kwargs)


def test_main_prints_the_table_and_writes_json(tiny, tmp_path, capsys):
    path = tmp_path / "peers.json"
    rc = bench.main(
        [
            "--configs",
            tiny,
            "--repeat",
            "2",
            "--no-peers",
            "--backends",
            "numpy",
            "--quantities",
            "grad,per_sample",
            "--json",
            str(path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| tiny | grad | fastgrad numpy |" in out and "| tiny | per_sample | fastgrad numpy |" in out
    saved = json.loads(path.read_text())
    assert {r["quantity"] for r in saved["rows"]} == {"grad", "per_sample"}
    assert saved["repeat"] == 2 and saved["machine"]["cpu_count"] == os.cpu_count()


def test_main_rejects_an_unknown_configuration(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--configs", "huge", "--json", "-"])
    assert exc.value.code == 2
    assert "configs: unknown name 'huge'" in capsys.readouterr().err

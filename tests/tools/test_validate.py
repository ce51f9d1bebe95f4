"""``fastgrad validate``: the table, the exit status, and that it catches a wrong backend.

The CUDA backend itself is validated on a GPU by ``benchmarks/gpu_check.sh``
(under the simulator a full run takes minutes; tests/cuda covers the kernels).
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from fastgrad import api, reference
from fastgrad.tools import validate


@pytest.fixture
def fake_backends(monkeypatch):
    """Register backends 'wrong' (grad off by 1e-3 of its size) and 'crashing' (raises)."""
    mod = types.ModuleType("fastgrad_fake_backends")

    def wrong(net, inp, need, max_norm=None, out=None):
        raw = reference.run_batched(net, inp, need, max_norm, out)
        raw["grad"] = raw["grad"] + inp.dtype.type(1e-3) * np.abs(raw["grad"]).max()
        return raw

    def crashing(net, inp, need, max_norm=None, out=None):
        raise FloatingPointError("kernel blew up")

    mod.wrong, mod.crashing = wrong, crashing
    monkeypatch.setitem(sys.modules, "fastgrad_fake_backends", mod)
    monkeypatch.setitem(api._BACKENDS, "wrong", "fastgrad_fake_backends:wrong")
    monkeypatch.setitem(api._BACKENDS, "crashing", "fastgrad_fake_backends:crashing")


def test_a_correct_backend_passes_with_a_table_and_json(tmp_path, capsys):
    path = tmp_path / "rows.json"
    assert validate.main(["--backend", "numpy", "--quick", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:5] == ["backend", "quantity", "dtype", "shape", "max"]
    rows = json.loads(path.read_text())
    assert len(rows) == len(validate.QUANTITIES) * 2 * len(validate.SHAPES)
    assert all(r["passed"] and r["max_rel_error"] < validate.TOLERANCE[r["dtype"]] for r in rows)
    assert {r["quantity"] for r in rows} == set(validate.QUANTITIES)
    assert f"{len(rows)}/{len(rows)} checks passed" in text


def test_a_wrong_gradient_fails_and_exits_non_zero(fake_backends, capsys):
    assert validate.main(["--backend", "wrong", "--quick"]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if " FAIL " in line]
    assert fails and all(line.split()[1] == "grad" for line in fails)
    assert len(fails) == 2 * len(validate.SHAPES)  # both dtypes, every shape


def test_a_crashing_backend_fails_every_quantity(fake_backends, capsys):
    assert validate.main(["--backend", "crashing", "--quick"]) == 1
    out = capsys.readouterr().out
    assert out.count(" FAIL ") == len(validate.QUANTITIES) * 2 * len(validate.SHAPES)
    assert "FloatingPointError: kernel blew up" in out


def test_an_unknown_backend_is_a_usage_error(capsys):
    assert validate.main(["--backend", "nope"]) == 2
    assert "backend: unknown name 'nope'" in capsys.readouterr().err

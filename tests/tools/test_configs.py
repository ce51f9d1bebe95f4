"""The benchmark configurations and floors, declared once (fastgrad.tools.configs) and read
by every timing harness: ``fastgrad bench``, benchmarks/cpu_targets.py, benchmarks/gpu_check.py
and, through a frozen copy that must stay equal, the asv suite.

The timing harnesses themselves are tested in tests/tools/test_bench.py and
tests/test_benchmarks_suite.py; none of these tests times anything.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fastgrad.tools import configs

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _problems  # noqa: E402

# ---------------------------------------------------- fastgrad.tools.configs


def test_the_configurations_are_the_design_ones():
    assert configs.CONFIGS == {
        "narrow": ((64, 64, 64, 10), 4096),
        "mnist": ((784, 512, 256, 10), 512),
        "wide": ((1024, 1024, 1024, 10), 256),
    }
    assert sorted(configs.SMALL_BATCH_CONFIGS.values()) == [
        ((64, 64, 64, 10), 32),
        ((64, 64, 64, 10), 256),
        ((784, 128, 10), 64),
    ]


def test_fill_kernel_writes_the_outer_products():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    out = np.full((2, 12), np.nan, dtype=np.float32)
    configs.fill_kernel()(a, b, out)
    np.testing.assert_array_equal(out, np.einsum("rj,rk->rjk", a, b).reshape(2, 12))
    short = np.full((2, 10), np.nan, dtype=np.float32)  # a row length that is not n·m: cut short
    configs.fill_kernel()(a, b, short)
    np.testing.assert_array_equal(short, out[:, :10])


def test_fill_timer_writes_every_number_of_its_output():
    out = np.full((3, 1000), np.nan, dtype=np.float32)
    call = configs.fill_timer(out)
    out[...] = np.nan
    call()
    assert np.isfinite(out).all() and np.count_nonzero(out) > 0.99 * out.size


def test_problem_is_seeded_and_takes_a_name_or_sizes():
    net, theta, X, y = configs.problem("mnist")
    assert net.sizes == (784, 512, 256, 10) and net.activation == "tanh" and net.loss == "cross_entropy"
    assert X.shape == (512, 784) and X.dtype == theta.dtype == np.float32 and y.shape == (512,)
    again = configs.problem([784, 512, 256, 10], 512)
    np.testing.assert_array_equal(theta, again[1])
    np.testing.assert_array_equal(X, again[2])
    assert configs.problem("narrow-B32")[2].shape == (32, 64)
    assert configs.problem("narrow", 8, dtype=np.float64)[2].dtype == np.float64
    with pytest.raises(ValueError, match="config: unknown name 'huge'"):
        configs.problem("huge")
    with pytest.raises(ValueError, match="batch_size"):
        configs.problem([3, 2])


def test_floor_work_counts_match_the_design():
    net, theta, _, _ = configs.problem("mnist")
    assert configs.mean_grad_flops(net, 512) == 6 * 512 * (784 * 512 + 512 * 256 + 256 * 10)
    assert configs.mean_grad_flops(net.sizes, 512) == configs.mean_grad_flops(net, 512)
    assert configs.per_sample_bytes(net, 512) == 512 * theta.size * 4
    assert configs.per_sample_bytes(net.sizes, 512, np.float64) == 512 * theta.size * 8
    assert configs.sgemm_timer(8)[1] == 2 * 8**3


def test_asv_suites_frozen_copy_of_the_configurations_matches_the_single_source():
    # benchmarks/_problems.py keeps its own copy (asv runs it against commits without
    # fastgrad.tools); it must stay equal to fastgrad.tools.configs
    assert _problems.CONFIGS == configs.CONFIGS
    assert _problems.SMALL_BATCH_CONFIGS == configs.SMALL_BATCH_CONFIGS
    for name, (sizes, B) in {**configs.CONFIGS, **configs.SMALL_BATCH_CONFIGS}.items():
        assert _problems.mean_grad_flops(name) == configs.mean_grad_flops(sizes, B)
        assert _problems.per_sample_bytes(name) == configs.per_sample_bytes(sizes, B)
        a, b = _problems.problem(name), configs.problem(name)
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:]):
            np.testing.assert_array_equal(x, y)


CONFIG_SIZES = re.compile(r"784,\s*512,\s*256,\s*10|1024,\s*1024,\s*1024,\s*10")
"""The mnist and wide layer sizes: written only in the single source and the asv copy."""
SINGLE_SOURCE = {ROOT / "fastgrad" / "tools" / "configs.py", ROOT / "benchmarks" / "_problems.py"}
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"


def copies_of_the_configurations(files) -> list[str]:
    return [os.path.relpath(f, ROOT) for f in files if CONFIG_SIZES.search(f.read_text())]


def test_no_harness_declares_its_own_configurations():
    files = [*(ROOT / "fastgrad").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    files = [f for f in files if f not in SINGLE_SOURCE and f != GPU_CHECK]
    assert copies_of_the_configurations(files) == []


def test_the_gpu_check_declares_no_configurations_of_its_own():
    assert copies_of_the_configurations([GPU_CHECK]) == []

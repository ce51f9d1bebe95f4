"""``fastgrad influence``: the mislabel-detection study on digits (scikit-learn), small and seeded.

The runs are small (a [64, 16, 10] network, few epochs, the numpy backend): a second or two each.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

import fastgrad
from fastgrad.tools import cli
from fastgrad.tools.datasets import load_digits
from fastgrad.tools.influence import (
    RANKINGS,
    auc,
    flip_labels,
    mislabel_study,
    rank,
    random_ranking,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--hidden", "16", "--epochs", "6", "--backend", "numpy", "--no-progress"]


def table_rows(stdout: str) -> dict[str, list[float]]:
    """The Markdown table's rows: ranking name -> [flagged, found, precision, recall, AUC]."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("ranking (highest first)", "---"):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


@pytest.fixture(scope="module")
def study():
    return mislabel_study(load_digits(), hidden=(16,), epochs=6, seed=0, backend="numpy")


# ------------------------------------------------------------------ the command


def test_the_command_prints_a_consistent_markdown_table(capsys):
    assert cli.main(["influence", *SMALL]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == [*RANKINGS, "random (expected)"]
    n_train = 1797 - round(0.2 * 1797)
    flipped = round(0.05 * n_train)
    assert f"{n_train} training samples, {flipped} labels flipped" in out
    for name, (flagged, found, precision, recall, area) in rows.items():
        assert flagged == round(0.05 * n_train), name
        assert 0 <= found <= flagged, name
        assert 0 <= precision <= 1 and 0 <= recall <= 1 and 0 <= area <= 1, name
        assert abs(precision - found / flagged) < 6e-4 and abs(recall - found / flipped) < 6e-4, name
    assert rows["random (expected)"][2:] == [round(flipped / n_train, 3), round(flagged / n_train, 3), 0.5]


def test_flipped_labels_are_found_far_better_than_random(capsys):
    # measured on this seed (6 epochs): self-influence finds 51 of the 72 in its top 72 (AUC 0.989),
    # self-TracIn 52 (0.982), TracIn harm 33 (0.952); a random ranking 3.6 (0.5)
    assert cli.main(["influence", *SMALL, "--seed", "3"]) == 0
    rows = table_rows(capsys.readouterr().out)
    random_precision = rows["random (expected)"][2]
    for name in (RANKINGS[0], RANKINGS[1]):  # self-influence and self-TracIn
        _, _, precision, _, area = rows[name]
        assert precision >= 10 * random_precision and area >= 0.95, (name, rows[name])
    _, _, precision, _, area = rows[RANKINGS[2]]  # TracIn harm to the test set
    assert precision >= 5 * random_precision and area >= 0.9, rows[RANKINGS[2]]


def test_the_picture_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "influence"
    assert cli.main(["influence", *SMALL, "--epochs", "2", "--plot", str(path), "--examples", "2"]) == 0
    assert f"picture written to {path}.png" in capsys.readouterr().out
    assert (tmp_path / "influence.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flip-fraction", "1.5"], "--flip-fraction: expected a number in (0, 1), got '1.5'"),
        (["--top-fraction", "0"], "--top-fraction: expected a number in (0, 1)"),
        (["--epochs", "0"], "--epochs: expected a positive integer"),
        (["--examples", "11", "--plot", "x.png"], "--examples 11: at most 10 (one per class)"),
        (["--dataset", "spirals", "--plot", "x.png"], "--plot: draws square images, but 'spirals' has 2"),
        (["--batch-size", "5000"], "batch_size: 5000 exceeds the 1438 training samples"),
        (
            ["--lr", "100", "--activation", "identity", "--epochs", "2"],
            "lr: training diverged in epoch 1; try a smaller --lr",
        ),
        (["--backend", "naive"], "backend: 'naive' has no inner products"),
    ],
)
def test_bad_options_get_one_line_and_status_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        status = cli.main(["influence", *SMALL, *args])
    except SystemExit as exc:  # argparse's own refusals (types, ranges) exit from parse_args
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_regression_data_is_refused(tmp_path, capsys):
    np.savez(tmp_path / "reg.npz", X=np.random.default_rng(0).standard_normal((40, 4)), y=np.zeros(40))
    assert cli.main(["influence", "--data", str(tmp_path / "reg.npz"), "--backend", "numpy"]) == 2
    assert "flipping labels needs class labels" in capsys.readouterr().err


def test_the_command_runs_as_a_user_runs_it():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, "-m", "fastgrad", "influence", *SMALL, "--epochs", "2", "--flip-fraction", "0.1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "144 labels flipped (10 %, seed 0)" in p.stdout


# ------------------------------------------------------------ the study's parts


def test_the_scores_are_the_inner_products_they_claim(study):
    net, ckpts, rows = study.net, study.checkpoints, slice(0, 40)
    X, y = study.train_X[rows], study.train_y[rows]
    assert len(ckpts) == study.epochs and all(eta == study.lr for _, eta in ckpts)
    # self-TracIn (from norms at each checkpoint) is the diagonal of TracIn of the rows against themselves
    T = fastgrad.tracin(net, ckpts, X, y, backend="numpy")
    got = study.scores[RANKINGS[1]][rows]
    assert np.max(np.abs(got - np.diag(T)) / np.abs(np.diag(T))) < 1e-5
    # the TracIn matrix against the test set, from the definition Σ_k η_k g_i(θ_k) · g'_j(θ_k)
    Xt, yt = study.test_X[:30], study.test_y[:30]
    ref = sum(
        eta
        * fastgrad.backprop(net, th, X, y, ("per_sample",), backend="numpy").per_sample.astype(np.float64)
        @ fastgrad.backprop(net, th, Xt, yt, ("per_sample",), backend="numpy").per_sample.astype(np.float64).T
        for th, eta in ckpts
    )
    assert np.linalg.norm(study.tracin[rows, :30] - ref) <= 1e-5 * np.linalg.norm(ref)
    # self-influence at the final θ is the norms squared, to float32's rounding: the study's norms come
    # from one pass over the whole training set, these from 40 rows, and a BLAS may round GEMMs of
    # other sizes differently (OpenBLAS's AVX-512 kernels do: 2e-6 apart); the final θ is the last checkpoint
    assert np.array_equal(study.theta, ckpts[-1][0])
    norms = fastgrad.backprop(net, study.theta, X, y, ("norms",), backend="numpy").norms.astype(np.float64)
    np.testing.assert_allclose(study.scores[RANKINGS[0]][rows], norms**2, rtol=1e-5)
    harm = -np.minimum(study.tracin, 0).sum(axis=1, dtype=np.float64)
    np.testing.assert_array_equal(study.scores[RANKINGS[2]], harm)


def test_flips_change_the_label_and_only_the_chosen_ones():
    y = np.arange(200) % 10
    noisy, flipped = flip_labels(y, 10, 0.05, seed=1)
    assert (
        flipped.sum() == 10
        and np.all(noisy[flipped] != y[flipped])
        and np.all(noisy[~flipped] == y[~flipped])
    )
    assert np.all((noisy >= 0) & (noisy < 10))
    again, _ = flip_labels(y, 10, 0.05, seed=1)
    assert np.array_equal(noisy, again)


def test_auc_and_rank_against_their_definitions():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.1
    scores = rng.standard_normal(300) + positive
    scores[:20] = 0.5  # ties count one half
    assert abs(auc(scores, positive) - roc_auc_score(positive, scores)) < 1e-12
    assert auc(positive.astype(float), positive) == 1.0 and auc(-positive.astype(float), positive) == 0.0
    r = rank("x", positive.astype(float), positive, positive.mean())
    assert r.precision == 1.0 and r.recall == 1.0
    rr = random_ranking(300, int(positive.sum()), 0.1)
    assert rr.precision == positive.mean() and rr.auc == 0.5 and rr.flagged == 30


def test_the_docs_table_is_what_the_documented_command_prints(capsys):
    # docs/attribution.md shows the table of `fastgrad influence --backend numba`; the numpy backend
    # printed the same table there. Counts and AUCs may move a little with another BLAS (float32
    # training), so they are compared with a small margin; the setting line must be the same.
    docs = (ROOT / "docs" / "attribution.md").read_text()
    assert "fastgrad influence --backend numba --plot docs/img/influence_digits.png" in docs
    assert cli.main(["influence", "--backend", "numpy", "--no-progress"]) == 0
    out = capsys.readouterr().out
    documented, printed = table_rows(docs), table_rows(out)
    assert list(documented) == list(printed) == [*RANKINGS, "random (expected)"]
    for name in documented:
        flagged, found, _, _, area = documented[name]
        assert printed[name][0] == flagged and abs(printed[name][1] - found) <= 2, name
        assert abs(printed[name][4] - area) <= 0.01, name
    setting = out.splitlines()[0].replace("backend numpy", "backend numba")
    assert setting.split("; accuracy")[0] in docs


def test_any_labelled_dataset_runs_without_a_picture(capsys):
    assert cli.main(["influence", "--dataset", "spirals", *SMALL, "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "spirals: 1200 training samples, 60 labels flipped" in out
    assert len(table_rows(out)) == len(RANKINGS) + 1

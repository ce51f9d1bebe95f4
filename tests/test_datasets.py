"""The built-in, bundled and user datasets of the command-line tool."""

import numpy as np
import pytest

from fastgrad.tools.datasets import Dataset, load_dataset, load_digits, load_npz, make_spirals


def test_spirals_are_deterministic_balanced_standardised_and_change_with_the_seed():
    a, b = make_spirals(seed=3), make_spirals(seed=3)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.X.shape == (1500, 2) and a.num_classes == 3
    assert np.bincount(a.y).tolist() == [500, 500, 500]
    np.testing.assert_allclose(a.X.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(a.X.std(axis=0), 1, rtol=1e-12)
    assert not np.array_equal(make_spirals(seed=4).X, a.X)


def test_spirals_are_not_linearly_separable():
    # least-squares linear classifier on one-hot targets: far from perfect on spirals
    d = make_spirals()
    A = np.hstack([d.X, np.ones((d.num_samples, 1))])
    W, *_ = np.linalg.lstsq(A, d.targets_for("mse"), rcond=None)
    acc = np.mean(np.argmax(A @ W, axis=1) == d.y)
    assert acc < 0.75


def test_split_is_a_deterministic_partition():
    d = make_spirals(num_samples=100)
    tr, te = d.split(0.2, seed=1)
    assert (tr.num_samples, te.num_samples) == (80, 20)
    rows = {tuple(r) for r in np.vstack([tr.X, te.X])}
    assert rows == {tuple(r) for r in d.X}
    np.testing.assert_array_equal(d.split(0.2, seed=1)[1].X, te.X)


def test_targets_for_gives_labels_onehots_or_regression_targets():
    d = make_spirals(num_samples=9)
    np.testing.assert_array_equal(d.targets_for("cross_entropy"), d.y)
    oh = d.targets_for("binary_cross_entropy")
    assert oh.shape == (9, 3) and (oh.sum(axis=1) == 1).all() and (np.argmax(oh, axis=1) == d.y).all()
    reg = Dataset("r", np.zeros((4, 2)), np.ones((4, 1)), 0)
    with pytest.raises(ValueError, match="cross_entropy needs integer class labels"):
        reg.targets_for("cross_entropy")


def test_npz_with_labels_and_with_real_targets(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10, 4))
    np.savez(tmp_path / "cls.npz", X=X, y=np.arange(10) % 4)
    d = load_npz(tmp_path / "cls.npz")
    assert d.is_classification and d.num_classes == 4 and d.num_outputs == 4
    np.testing.assert_array_equal(d.X, X)
    np.savez(tmp_path / "reg.npz", X=X, y=rng.standard_normal(10))
    d = load_dataset(data=tmp_path / "reg.npz")
    assert not d.is_classification and d.y.shape == (10, 1) and d.num_outputs == 1


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((3, 2))}, "lacks key"),
        ({"X": np.zeros(3), "y": np.zeros(3)}, "must be 2-D"),
        ({"X": np.zeros((3, 2)), "y": np.zeros(4)}, "must have shape"),
        ({"X": np.full((3, 2), np.nan), "y": np.zeros(3)}, "NaN"),
        ({"X": np.zeros((3, 2)), "y": np.array([-1, 0, 1])}, "class indices"),
        ({"X": np.array([["a", "b"]]), "y": np.zeros(1)}, "real numbers"),
    ],
)
def test_bad_npz_files_raise_a_clear_error(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_missing_and_unreadable_files_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_npz(tmp_path / "junk.npz")


def test_digits_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn")
    d = load_digits()
    assert d.X.shape == (1797, 64) and d.num_classes == 10
    assert d.X.min() == 0 and d.X.max() == 1


def test_optional_packages_that_are_missing_name_the_extra_to_install(monkeypatch):
    import fastgrad
    from fastgrad.tools.datasets import MissingExtraError

    for module, call, extra in [
        ("sklearn", load_digits, "digits"),
        ("torch", lambda: fastgrad.from_torch(None), "torch"),
        ("torch", lambda: fastgrad.to_torch(fastgrad.MLP([2, 1]), np.zeros(3, np.float32)), "torch"),
    ]:
        with monkeypatch.context() as m:
            m.setitem(__import__("sys").modules, module, None)
            with pytest.raises(MissingExtraError, match=rf'pip install "fastgrad\[{extra}\]"'):
                call()

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


# ---------------------------------------- what is read, and what is refused before it is read


def test_a_float64_X_is_not_copied_and_other_dtypes_are_converted(tmp_path, monkeypatch):
    from fastgrad.tools import datasets

    read = {}
    original = datasets._read

    def recording(archive, member):
        read[member.key] = original(archive, member)
        return read[member.key]

    monkeypatch.setattr(datasets, "_read", recording)
    X = np.random.default_rng(0).standard_normal((20, 3))
    np.savez(tmp_path / "f64.npz", X=X, y=np.arange(20) % 2)
    d = load_npz(tmp_path / "f64.npz")
    assert d.X is read["X"] and d.X.dtype == np.float64
    np.savez(tmp_path / "f32.npz", X=X.astype(np.float32), y=np.arange(20) % 2)
    d = load_npz(tmp_path / "f32.npz")
    assert d.X.dtype == np.float64 and not np.shares_memory(d.X, read["X"])
    np.testing.assert_array_equal(d.X, X.astype(np.float32))


def test_a_file_too_large_for_the_memory_available_is_refused_before_its_data_is_read(tmp_path, monkeypatch):
    from fastgrad.tools import datasets

    np.savez(tmp_path / "big.npz", X=np.zeros((100, 10)), y=np.arange(100) % 2)
    monkeypatch.setattr(datasets, "available_memory", lambda: 4096)

    def no_reading(*args):
        raise AssertionError("data read before the size check")

    monkeypatch.setattr(np.lib.format, "read_array", no_reading)
    with pytest.raises(ValueError, match=r"X of shape \(100, 10\).*needs about 9.4 KiB.*only 4.0 KiB"):
        load_npz(tmp_path / "big.npz")


def test_available_memory_is_a_positive_number_of_bytes_here():
    from fastgrad.tools.datasets import available_memory

    avail = available_memory()
    assert avail is None or (isinstance(avail, int) and avail > 1 << 20)


def _npz_bytes(tmp_path, **kwargs) -> bytearray:
    np.savez(tmp_path / "ok.npz", **kwargs)
    return bytearray((tmp_path / "ok.npz").read_bytes())


def test_a_header_that_declares_more_than_the_member_holds_is_refused_as_damaged(tmp_path):
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros((2, 2)))
    header["shape"] = (10**6, 800)  # 6.4 GB declared, 32 bytes stored
    with zipfile.ZipFile(tmp_path / "liar.npz", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("X.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            fh.write(np.zeros(4).tobytes())
        with zf.open("y.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros(10**6))
    with pytest.raises(ValueError, match=r"damaged: array 'X' declares shape \(1000000, 800\) \(6.0 GiB\)"):
        load_npz(tmp_path / "liar.npz")


@pytest.mark.parametrize("compressed", [False, True])
def test_a_corrupted_member_is_a_clear_error(tmp_path, compressed):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 5))
    (np.savez_compressed if compressed else np.savez)(tmp_path / "ok.npz", X=X, y=np.arange(200) % 2)
    raw = bytearray((tmp_path / "ok.npz").read_bytes())
    start = raw.index(b"X.npy") + 400  # inside X's data, past its .npy header
    raw[start : start + 64] = bytes(64)
    (tmp_path / "bad.npz").write_bytes(raw)
    with pytest.raises(ValueError, match="bad.npz' is damaged"):
        load_npz(tmp_path / "bad.npz")


def test_an_npy_file_named_npz_and_a_text_file_get_what_is_expected_never_allow_pickle(tmp_path):
    np.save(tmp_path / "arr.npy", np.zeros((3, 2)))
    (tmp_path / "arr.npy").rename(tmp_path / "arr.npz")
    with pytest.raises(ValueError, match=r"is a single \.npy array, not an \.npz archive.*numpy\.savez"):
        load_npz(tmp_path / "arr.npz")
    (tmp_path / "text.npz").write_text("1 2 3\n4 5 6\n")
    with pytest.raises(
        ValueError, match="not an .npz archive; expected an .npz archive written by numpy.savez"
    ) as e:
        load_npz(tmp_path / "text.npz")
    assert "pickle" not in str(e.value)


@pytest.mark.parametrize(
    ("num_samples", "top_label", "classes"),
    [(10, 100_000, "100,001 classes for 10 samples"), (10_002, 10_000, "10,001 classes for 10,002 samples")],
)
def test_class_counts_above_the_samples_or_max_classes_are_refused(tmp_path, num_samples, top_label, classes):
    from fastgrad.tools.datasets import MAX_CLASSES

    y = np.arange(num_samples) % 2
    y[-1] = top_label
    np.savez(tmp_path / "c.npz", X=np.zeros((num_samples, 1)), y=y)
    with pytest.raises(
        ValueError, match=f"{classes}; labels must be class indices .* at most {MAX_CLASSES:,}"
    ):
        load_npz(tmp_path / "c.npz")


def test_object_and_timedelta_arrays_are_refused_from_the_header(tmp_path):
    np.savez(tmp_path / "td.npz", X=np.zeros((3, 2), dtype="m8[s]"), y=np.zeros(3))
    with pytest.raises(ValueError, match="'X' must hold real numbers, got dtype timedelta64"):
        load_npz(tmp_path / "td.npz")
    np.savez(tmp_path / "obj.npz", X=np.zeros((3, 2)), y=np.array([1, "a", None], dtype=object))
    with pytest.raises(ValueError, match="'y' must hold real numbers, got dtype object"):
        load_npz(tmp_path / "obj.npz")

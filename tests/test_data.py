import os
import pickle

import numpy as np
import pytest
import torch

from pylandscape.data import DIGITS_TRAIN_SIZE, load_dataset, safe_unpickle


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_split_and_normalisation(digits):
    d = digits
    assert d.x_train.shape == (DIGITS_TRAIN_SIZE, 3, 32, 32) and d.x_test.shape == (297, 3, 32, 32)
    assert d.y_train.dtype == torch.int64 and d.num_classes == 10
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(d.x_train.double().mean((0, 2, 3)), zeros, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.x_train.double().std((0, 2, 3)), ones, atol=1e-5, rtol=0)
    assert torch.equal(d.x_train[:, 0], d.x_train[:, 2])  # grey replicated
    # stratified: every class's share of the test set within one image of proportional
    counts = torch.bincount(torch.cat([d.y_train, d.y_test]), minlength=10).double()
    assert (torch.bincount(d.y_test, minlength=10) - counts * 297 / 1797).abs().max() < 1.0
    # fixed split: the same on every call, independent of seed
    d2 = load_dataset("digits", seed=5)
    assert torch.equal(d2.x_test, d.x_test) and torch.equal(d2.y_train, d.y_train)


def test_random_labels_random_and_fixed_by_seed(digits):
    r = load_dataset("digits", labels="random", seed=1)
    agree = (r.y_train == digits.y_train).double().mean().item()
    assert abs(agree - 0.1) < 0.035  # 1/C, 1500 draws: sd 0.008
    assert torch.equal(r.y_train, load_dataset("digits", labels="random", seed=1).y_train)
    assert not torch.equal(r.y_train, load_dataset("digits", labels="random", seed=2).y_train)
    assert torch.equal(r.y_test, digits.y_test) and torch.equal(r.x_train, digits.x_train)
    assert set(torch.bincount(r.y_train, minlength=10).tolist()) and r.y_train.min() >= 0 and r.y_train.max() <= 9


def test_random_inputs_and_subset(digits):
    r = load_dataset("digits", inputs="random", labels="random", seed=3)
    assert r.x_train.shape == digits.x_train.shape
    assert abs(r.x_train.mean().item()) < 0.01 and abs(r.x_train.std().item() - 1) < 0.01
    s = load_dataset("digits", train_size=100, seed=4)
    assert s.x_train.shape[0] == 100 and torch.bincount(s.y_train, minlength=10).min() >= 9
    # rows of the subset are rows of the full training set
    full = digits.x_train.flatten(1)
    assert all((full == row).all(1).any() for row in s.x_train.flatten(1)[:10])
    with pytest.raises(ValueError, match="train_size"):
        load_dataset("digits", train_size=5000)
    with pytest.raises(ValueError, match="labels"):
        load_dataset("digits", labels="shuffled")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("mnist")


def _write_fake_cifar(folder, n=6, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        batches[name] = d
    return batches


def test_fake_cifar_loads_through_real_code(tmp_path):
    b = _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    d = load_dataset("cifar10", root=tmp_path)
    assert d.x_train.shape == (30, 3, 32, 32) and d.x_test.shape == (6, 3, 32, 32)
    assert d.y_train.tolist() == sum((b[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    raw = np.concatenate([b[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255.0
    mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3), ddof=1)
    expect = (raw - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(d.x_train.numpy(), expect, atol=1e-5)
    # $PYLANDSCAPE_DATA is the default root
    os.environ["PYLANDSCAPE_DATA"] = str(tmp_path)
    try:
        assert torch.equal(load_dataset("cifar10").y_test, d.y_test)
    finally:
        del os.environ["PYLANDSCAPE_DATA"]


def test_missing_cifar_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cifar-10-batches-py")):
        load_dataset("cifar10", root=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar(folder)
    _Evil.marker = tmp_path / "pwned"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing.*system"):
        load_dataset("cifar10", root=tmp_path)
    assert not _Evil.marker.exists()
    with open(tmp_path / "g", "wb") as f:
        pickle.dump(getattr, f)  # builtins are refused too
    with pytest.raises(pickle.UnpicklingError):
        safe_unpickle(tmp_path / "g")


def test_bad_cifar_shapes(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(ValueError, match="test_batch.*3072"):
        load_dataset("cifar10", root=tmp_path)

"""Offline datasets: the Fashion-MNIST idx reader, on small files written here."""

import gzip

import numpy as np
import pytest

from jaxprune import data


def _write_idx(path, arr, magic_type=0x08, cut=0):
    arr = np.asarray(arr, np.uint8)
    head = (magic_type << 8 | arr.ndim).to_bytes(4, "big")
    head += b"".join(n.to_bytes(4, "big") for n in arr.shape)
    body = arr.tobytes()
    with gzip.open(path, "wb") as f:
        f.write(head + body[: len(body) - cut])


def _fake_fashion(root, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    want = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img = rng.integers(0, 256, (n, 28, 28))
        lab = rng.integers(0, 10, n)
        images, labels = data._FASHION_FILES[split]
        _write_idx(root / images, img)
        _write_idx(root / labels, lab)
        want[split] = (img, lab)
    return want


def test_fashion_mnist_idx_files_are_read_as_nhwc_floats_and_int_labels(tmp_path):
    want = _fake_fashion(tmp_path)
    ds = data.load_fashion_mnist(str(tmp_path))
    assert ds.name == "fashion-mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (4, 28, 28, 1) and ds.y_test.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train[..., 0] * 255.0, want["train"][0])
    np.testing.assert_array_equal(ds.y_test, want["test"][1])


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("not-gzip", r"cannot be read as gzip"),
        ("magic", r"not an idx file of unsigned bytes \(magic 0xd03\)"),
        ("truncated", r"is truncated: expected 3136 values, got 3130"),
    ],
)
def test_damaged_fashion_mnist_files_raise_dataset_errors_naming_the_file(tmp_path, damage, match):
    _fake_fashion(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    img = np.zeros((4, 28, 28))
    if damage == "not-gzip":
        path.write_bytes(b"plain bytes")
    else:
        _write_idx(
            path,
            img,
            magic_type=0x0D if damage == "magic" else 0x08,
            cut=6 * (damage == "truncated"),
        )
    with pytest.raises(data.DatasetError, match=match) as err:
        data.load_fashion_mnist(str(tmp_path))
    assert str(path) in str(err.value) and "Fix: reinstall" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_swapped_fashion_mnist_files_raise_dataset_errors(tmp_path):
    _fake_fashion(tmp_path)
    images, labels = data._FASHION_FILES["train"]
    test_labels = data._FASHION_FILES["test"][1]
    (tmp_path / labels).write_bytes((tmp_path / test_labels).read_bytes())  # 4 labels, 6 images
    with pytest.raises(data.DatasetError, match=r"labels of shape \(4,\) for the 6 images"):
        data.load_fashion_mnist(str(tmp_path))
    _fake_fashion(tmp_path)
    (tmp_path / images).write_bytes((tmp_path / labels).read_bytes())  # labels as images
    with pytest.raises(data.DatasetError, match=r"shape \(6,\), not 28x28 images.*Fix"):
        data.load_fashion_mnist(str(tmp_path))


def test_batches_refuse_images_and_labels_of_different_lengths():
    with pytest.raises(ValueError, match=r"as many examples, got 5 and 4"):
        next(data.batches(np.zeros((5, 3)), np.zeros(4), 2))


def test_digits_without_scikit_learn_name_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(FileNotFoundError, match=r"needs scikit-learn.*pip install scikit-learn"):
        data.load_digits()

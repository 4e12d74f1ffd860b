"""Fashion-MNIST from the Debian package: shapes, dtypes, labels, and clear errors when missing or corrupt."""
from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from crisp_edge.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR_ENV,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_dir,
    load_fashion_mnist,
    load_fashion_mnist_raw,
    normalize_images,
)
from crisp_edge.errors import DataError

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def test_test_split(monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_DIR_ENV, raising=False)
    assert str(fashion_mnist_dir()) == "/usr/share/datasets/fashion-mnist"
    x, y = load_fashion_mnist("test", limit=500)
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (500,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) == len(FASHION_MNIST_CLASSES) - 1 == 9
    assert len(torch.unique(y)) == 10
    raw = (x * FASHION_MNIST_STD + FASHION_MNIST_MEAN) * 255  # undo the normalization: whole pixel values
    assert float(raw.min()) > -1e-3 and float(raw.max()) < 255 + 1e-3
    assert float((raw - raw.round()).abs().max()) < 1e-3
    assert abs(float(x.mean())) < 0.2  # roughly centred by the training statistics


def test_raw_full_test_split():
    images, labels = load_fashion_mnist_raw("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced


def test_normalize_images():
    images = np.array([[[0] * 28] * 28, [[255] * 28] * 28], dtype=np.uint8)
    x = normalize_images(images)
    assert x.shape == (2, 1, 28, 28)
    assert float(x[0].max()) == pytest.approx(-FASHION_MNIST_MEAN / FASHION_MNIST_STD)
    assert float(x[1].min()) == pytest.approx((1 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)


def test_bad_split():
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        load_fashion_mnist("validation")


def test_missing_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"not found\. Install it with `apt-get install -y dataset-fashion-mnist`"):
        load_fashion_mnist("test", limit=10)


def _write_idx(path, magic_dims, dims, payload):
    header = bytes([0, 0, 0x08, magic_dims]) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    """A copy of the real test split in a temporary folder the tests may damage."""
    for name in TEST_FILES:
        shutil.copy(f"/usr/share/datasets/fashion-mnist/{name}", tmp_path / name)
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    return tmp_path


def test_copied_folder_is_used(data_dir):
    x, y = load_fashion_mnist("test", limit=3)
    assert x.shape == (3, 1, 28, 28)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"this is not gzip at all"), "not a readable gzip IDX file"),
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "not a readable gzip IDX file"),  # truncated gzip stream
    (lambda p: _write_idx(p, 3, (2, 28, 28), bytes(2 * 28 * 28 - 5)), "header promises 1568"),
    (lambda p: _write_idx(p, 2, (2, 784), bytes(2 * 784)), "not an unsigned-byte IDX file with 3 dimensions"),
    (lambda p: p.write_bytes(gzip.compress(b"\x00\x00")), "not an unsigned-byte IDX file"),
])
def test_corrupt_images(data_dir, damage, message):
    damage(data_dir / TEST_FILES[0])
    with pytest.raises(DataError, match=message):
        load_fashion_mnist("test", limit=10)


def test_images_and_labels_disagree(data_dir):
    _write_idx(data_dir / TEST_FILES[1], 1, (7,), bytes(7))
    with pytest.raises(DataError, match="10000 images but 7 labels"):
        load_fashion_mnist("test")

"""Real image data that is reachable offline: Fashion-MNIST from Debian's ``dataset-fashion-mnist``.

The four IDX files are read with numpy (no pickle, no download). Images come back as float32
tensors of shape (N, 1, 28, 28), normalized with the training set's mean and standard deviation,
which is what the embedded ViT was trained on.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from crisp_edge.errors import DataError

FASHION_MNIST_DIR_ENV = "CRISP_EDGE_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Statistics of the 60,000 training images (pixel values scaled to [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_DIR_ENV, FASHION_MNIST_DEFAULT_DIR))


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(
            f"Fashion-MNIST file {path} not found. Install it with "
            f"`apt-get install -y dataset-fashion-mnist` (the Makefile's set-up does this), "
            f"or point {FASHION_MNIST_DIR_ENV} at a folder holding the four IDX .gz files."
        ) from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable gzip IDX file ({e}); reinstall dataset-fashion-mnist.") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != expected_dims:
        raise DataError(f"{path} is not an unsigned-byte IDX file with {expected_dims} dimensions.")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_dims)]
    offset = 4 + 4 * expected_dims
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise DataError(f"{path} holds {len(data) - offset} bytes of data, its header promises {count}.")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist_raw(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` for ``split`` in {"train", "test"}."""
    if split not in _FILES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}.")
    root = fashion_mnist_dir()
    images = _read_idx(root / _FILES[split][0], 3)
    labels = _read_idx(root / _FILES[split][1], 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels.")
    return images, labels


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), normalized as the embedded ViT expects."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255.0)
    return x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(1)


def load_fashion_mnist(split: str = "test", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as model-ready tensors: ``(x float32 (N, 1, 28, 28), y int64 (N,))``."""
    images, labels = load_fashion_mnist_raw(split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return normalize_images(images), torch.from_numpy(labels.copy())

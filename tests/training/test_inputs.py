"""Input checks: wrong image shapes, channel counts and dtypes, empty or malformed datasets, NaN in
weights or data, divergence and out-of-range settings each get a typed error that names the fix,
before the model is changed."""
from __future__ import annotations

import math

import pytest
import torch

from crisp_edge import retrofit_
from crisp_edge.errors import ConfigError, DataError
from crisp_edge.testing import toy_model
from crisp_edge.training.adapt import AdaptConfig, adapt_
from crisp_edge.training.loop import TrainConfig, check_inputs, expected_inputs
from tests.conftest import fresh_toy
from tests.files.test_mixers import crisp_toy
from tests.training.test_adapt import toy_task

FAST = AdaptConfig(train=TrainConfig(epochs=1, batch_size=32))


@pytest.fixture(scope="module")
def data():
    return toy_task(n=64)


@pytest.mark.parametrize("change, message", [
    (lambda x: torch.nn.functional.interpolate(x, size=(20, 20)), r"takes images of shape \(N, 1, 16, 16\).*got \(64, 1, 20, 20\)"),
    (lambda x: x.expand(-1, 3, -1, -1), r"takes images of shape \(N, 1, 16, 16\).*got \(64, 3, 16, 16\)"),
    (lambda x: x[:, 0], r"got \(64, 16, 16\) \(add the channel axis: x.unsqueeze\(1\)\)"),
    (lambda x: (x * 50 + 100).clamp(0, 255).to(torch.uint8), r"images are torch.uint8 but the model computes in "
                                                               r"torch.float32; pass x.to\(torch.float32\), scaled"),
    (lambda x: x.double(), "images are torch.float64 but the model computes in torch.float32"),
])
def test_wrong_images_are_refused_before_the_model_changes(data, change, message):
    x, y = data
    model = crisp_toy()
    head = model.head
    with pytest.raises(DataError, match="training data: VisionTransformer " + message if "takes" in message else message):
        adapt_(model, change(x), y, num_classes=3, config=FAST, progress=False)
    with pytest.raises(DataError, match="evaluation data"):
        adapt_(model, x, y, num_classes=3, config=FAST, eval_data=(change(x), y), progress=False)
    assert model.head is head  # no new head was made for a run that could not start


def test_expected_inputs_are_read_from_the_model():
    assert expected_inputs(toy_model("timm-vit")) == ("image", (1, 16, 16), torch.float32)
    assert expected_inputs(toy_model("hf-vit")) == ("image", (1, 16, 16), torch.float32)
    assert expected_inputs(toy_model("hf-llama")) == ("tokens", (), torch.int64)
    assert expected_inputs(torch.nn.Linear(3, 4)) is None
    llama = toy_model("hf-llama")
    check_inputs(llama, torch.randint(0, 64, (2, 8)))
    with pytest.raises(DataError, match=r"token ids must lie in \[0, 64\), got \[0, 64\]"):
        check_inputs(llama, torch.tensor([[0, 64]]))
    with pytest.raises(DataError, match=r"takes token ids, an integer tensor \(N, sequence\), got torch.float32"):
        check_inputs(llama, torch.zeros(2, 8))
    with pytest.raises(DataError, match=r"ViTForImageClassification takes images of shape \(N, 1, 16, 16\)"):
        check_inputs(toy_model("hf-vit"), torch.zeros(2, 3, 16, 16))


@pytest.mark.parametrize("make, message", [
    (lambda x, y: (x[:0], y[:0]), "training data is empty"),
    (lambda x, y: (x, y[:10]), "64 inputs but 10 labels"),
    (lambda x, y: (x.tolist(), y), "inputs must be a torch.Tensor, got list"),
    (lambda x, y: (x, y.float()), "labels must be a 1-D tensor of non-negative integers"),
    (lambda x, y: (x, y[:, None]), r"labels must be a 1-D tensor .* of shape \(64, 1\)"),
    (lambda x, y: (x, y - 1), "non-negative integers"),
    (lambda x, y: (x, torch.tensor(1)), "must have a batch dimension"),
    (lambda x, y: (torch.where(torch.arange(64)[:, None, None, None] == 3, math.inf, x), y), "NaN or Inf"),
])
def test_malformed_datasets(data, make, message):
    x, y = make(*data)
    with pytest.raises(DataError, match=message):
        adapt_(crisp_toy(), x, y, num_classes=3, config=FAST, progress=False)


def test_nan_in_weights_is_refused(data):
    model = crisp_toy()
    with torch.no_grad():
        model.crisp_bases["fc1_0_1"].weight[0, 0] = math.nan
    with pytest.raises(DataError, match=r"model weights \['crisp_bases.fc1_0_1.weight'\] contain NaN"):
        adapt_(model, *data, num_classes=3, config=FAST, progress=False)


def test_divergence_stops_before_the_weights_go_bad(data):
    x, y = data
    model = crisp_toy()
    with pytest.raises(ConfigError, match="training diverged at epoch 1, step 1 .*lower the learning rate"):
        adapt_(model, x * 1e38, y, num_classes=3, config=FAST, progress=False)  # finite inputs, infinite logits
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(lr=math.nan), r"lr must be in \(0, 10\)"),
    (lambda: TrainConfig(lr=True), r"lr must be in \(0, 10\)"),
    (lambda: TrainConfig(weight_decay=-0.1), r"weight_decay must be in \[0, 10\)"),
    (lambda: TrainConfig(warmup_fraction=None), r"warmup_fraction must be in \[0, 1\)"),
    (lambda: TrainConfig(clip_grad_norm="1"), r"clip_grad_norm must be in \(0, inf\) or None"),
    (lambda: TrainConfig(clip_grad_norm=math.inf), r"clip_grad_norm must be in \(0, inf\) or None"),
    (lambda: TrainConfig(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (lambda: TrainConfig(seed=-1), "seed must be a non-negative integer"),
    (lambda: TrainConfig(seed=0.5), "seed must be a non-negative integer"),
    (lambda: TrainConfig(schedule=["cosine"]), "schedule must be one of"),
    (lambda: TrainConfig(batch_size=0), "batch_size must be a positive integer"),
    (lambda: AdaptConfig(train=None), "train must be a TrainConfig"),
    (lambda: AdaptConfig(train_head="yes"), "train_head must be True or False"),
    (lambda: AdaptConfig(head_lr=math.inf), r"head_lr must be in \(0, 10\)"),
])
def test_out_of_range_settings(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=0), "num_classes must be a positive integer"),
    (dict(num_classes=2.0), "num_classes must be a positive integer"),
    (dict(config=TrainConfig()), "config must be an AdaptConfig"),
])
def test_out_of_range_adapt_arguments(data, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        adapt_(crisp_toy(), *data, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="gradient", steps=0), "steps must be a positive integer"),
    (dict(method="gradient", lr=-1.0), r"lr must be in \(0, 10\)"),
    (dict(seed="0"), "seed must be an integer"),
    (dict(refine_steps=True), "refine_steps must be a non-negative integer"),
])
def test_out_of_range_retrofit_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        retrofit_(fresh_toy("timm-vit"), progress=False, **kwargs)

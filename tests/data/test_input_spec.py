"""InputSpec from the model itself: timm (matching timm's own eval transform), Hugging Face ViT (config
and image processor), the embedded ViT (Fashion-MNIST normalisation), language models; validation and
JSON round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import timm.data
import torch
import transformers
from PIL import Image

from crisp_edge.data.fashion_mnist import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    normalize_images,
)
from crisp_edge.data.images import preprocess_image
from crisp_edge.data.input_spec import DEFAULT_MAX_TEXT_LENGTH, InputSpec, input_spec_of
from crisp_edge.errors import ConfigError, DataError
from crisp_edge.models.sources import EMBEDDED_VIT_SOURCE, build_model
from crisp_edge.testing import toy_hf_llama, toy_hf_vit, toy_timm_vit


def _rgb_timm_vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3,
                             embed_dim=32, depth=1, num_heads=2)


def test_timm_spec_reads_size_and_channels_from_the_model_not_the_pretrained_config():
    spec = input_spec_of(toy_timm_vit())  # built at 16x16 grey; timm's pretrained config says 3x224x224
    assert (spec.kind, spec.channels, spec.height, spec.width) == ("image", 1, 16, 16)
    assert spec.mean == (0.5,) and spec.std == (0.5,)  # the 3-channel (0.5, 0.5, 0.5) averaged for one channel
    assert (spec.crop_pct, spec.interpolation, spec.crop_mode) == (0.9, "bicubic", "center")
    assert spec.shape == (1, 16, 16)


def test_timm_spec_follows_the_pretrained_mean_and_std_of_other_models():
    m = timm.create_model("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=False, img_size=32, patch_size=8,
                          num_classes=2, depth=1)
    m_in1k = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=2,
                               depth=1)
    assert input_spec_of(m).mean == (0.5, 0.5, 0.5)
    assert input_spec_of(m_in1k).mean == pytest.approx((0.485, 0.456, 0.406))
    assert input_spec_of(m_in1k).std == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("hw", [(50, 40), (37, 61), (32, 32), (20, 90)])
def test_preprocessing_equals_timms_own_eval_transform(hw):
    model = _rgb_timm_vit()
    spec = input_spec_of(model)
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**{**cfg, "input_size": (3, 32, 32)})
    img = Image.fromarray(np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8))
    ours = preprocess_image(img, spec)
    assert ours.shape == (3, 32, 32)
    assert torch.equal(ours, transform(img))


def test_embedded_vit_spec_is_fashion_mnist_normalisation():
    model = build_model(EMBEDDED_VIT_SOURCE)  # the architecture alone: the spec comes from its source record
    spec = input_spec_of(model)
    assert (spec.channels, spec.height, spec.width, spec.crop_pct) == (1, 28, 28, 1.0)
    assert spec.mean == (FASHION_MNIST_MEAN,) and spec.std == (FASHION_MNIST_STD,)
    assert "Fashion-MNIST" in spec.source
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    assert torch.equal(preprocess_image(Image.fromarray(pixels), spec), normalize_images(pixels[None])[0])


def test_hf_vit_without_processor_uses_config_and_vit_processor_defaults():
    spec = input_spec_of(toy_hf_vit())
    assert (spec.channels, spec.height, spec.width) == (1, 16, 16)
    assert spec.mean == (0.5,) and spec.std == (0.5,)
    assert (spec.crop_mode, spec.crop_pct, spec.interpolation) == ("squash", 1.0, "bilinear")
    assert "defaults" in spec.source


def test_hf_vit_with_processor_dir_matches_the_processor(tmp_path):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=16, patch_size=8, num_channels=3, num_labels=3)
    model = transformers.ViTForImageClassification(config)
    proc = transformers.ViTImageProcessor(size={"height": 16, "width": 16}, resample=3,
                                          image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3])
    proc.save_pretrained(tmp_path)
    spec = input_spec_of(model, processor_dir=tmp_path)
    assert spec.mean == (0.4, 0.5, 0.6) and spec.std == (0.2, 0.25, 0.3)
    assert (spec.interpolation, spec.crop_mode, spec.crop_pct) == ("bicubic", "squash", 1.0)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 24, 3), dtype=np.uint8))
    theirs = torch.as_tensor(proc(img, return_tensors="np")["pixel_values"][0])
    torch.testing.assert_close(preprocess_image(img, spec), theirs, atol=1e-5, rtol=0)  # same PIL resize underneath


def test_hf_processor_with_a_centre_crop_gives_its_crop_pct(tmp_path):
    transformers.DeiTImageProcessor(size={"height": 20, "width": 20}, crop_size={"height": 16, "width": 16},
                                    do_center_crop=True).save_pretrained(tmp_path)
    spec = input_spec_of(toy_hf_vit(), processor_dir=tmp_path)
    assert (spec.crop_mode, spec.crop_pct) == ("squash", 0.8)


def test_hf_processor_dir_without_config_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="preprocessor_config.json"):
        input_spec_of(toy_hf_vit(), processor_dir=tmp_path)


def test_language_models_take_tokens():
    spec = input_spec_of(toy_hf_llama())
    assert (spec.kind, spec.max_length, spec.vocab_size) == ("tokens", 32, 64)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=1024))
    assert input_spec_of(bert).max_length == DEFAULT_MAX_TEXT_LENGTH
    assert input_spec_of(bert, max_length=1024).max_length == 1024
    with pytest.raises(ConfigError, match=r"\[1, 1024\]"):
        input_spec_of(bert, max_length=1025)


def test_spec_survives_retrofit():
    from crisp_edge.training.retrofit import retrofit_

    model = toy_timm_vit()
    before = input_spec_of(model)
    retrofit_(model)
    assert input_spec_of(model) == before


def test_unknown_model_is_a_data_error():
    with pytest.raises(DataError, match="pass an InputSpec yourself"):
        input_spec_of(torch.nn.Linear(3, 3))


def test_spec_validation_and_json_round_trip():
    with pytest.raises(ConfigError, match="one per channel"):
        InputSpec("image", channels=3, height=8, width=8, mean=(0.5,), std=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="crop_pct"):
        InputSpec("image", channels=1, height=8, width=8, mean=(0.5,), std=(0.5,), crop_pct=1.5)
    with pytest.raises(ConfigError, match="kind"):
        InputSpec("audio")
    with pytest.raises(ConfigError, match="max_length"):
        InputSpec("tokens")
    for spec in (input_spec_of(toy_timm_vit()), input_spec_of(toy_hf_llama())):
        assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ConfigError, match="version"):
        InputSpec.from_dict({**input_spec_of(toy_hf_llama()).to_dict(), "version": 99})

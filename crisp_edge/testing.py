"""Toy models for tests and examples: one per supported architecture, tiny, seeded, in eval mode.

    model = toy_model("hf-llama", seed=0)
    out = forward(model, example_inputs(model))   # a tensor, whatever the architecture

Every toy is small enough that a full retrofit takes milliseconds on a CPU.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crisp_edge.models.outputs import logits_of
from crisp_edge.models.sources import build_model

#: The timm toy's source record (what a checkpoint stores to rebuild it): 16x16 grey images, 4 tokens + CLS.
TIMM_VIT_SOURCE: dict[str, Any] = {
    "library": "timm", "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 8, "in_chans": 1, "num_classes": 4,
               "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 4.0},
}


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG untouched
        torch.manual_seed(seed)
        return make().eval()


def toy_timm_vit(seed: int = 0, depth: int = 4) -> nn.Module:
    """A timm ``VisionTransformer`` (embed 32, 2 heads, ``depth`` blocks), built by ``build_model`` so it
    records its source."""
    source = {**TIMM_VIT_SOURCE, "kwargs": {**TIMM_VIT_SOURCE["kwargs"], "depth": depth}}
    return _seeded(seed, lambda: build_model(source))


def toy_hf_vit(seed: int = 0, depth: int = 2) -> nn.Module:
    """A Hugging Face ``ViTForImageClassification`` (hidden 32, 2 heads, 16x16 grey images, 3 labels)."""
    import transformers

    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=depth, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=8, num_channels=1, num_labels=3,
    )
    return _seeded(seed, lambda: transformers.ViTForImageClassification(config))


def toy_hf_llama(seed: int = 0, depth: int = 2) -> nn.Module:
    """A Hugging Face ``LlamaForCausalLM`` (hidden 32, 2 query heads, 1 key/value head, vocabulary 64)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return _seeded(seed, lambda: transformers.LlamaForCausalLM(config))


def toy_hf_bert(seed: int = 0, depth: int = 2) -> nn.Module:
    """A Hugging Face ``BertForSequenceClassification`` (hidden 32, 2 heads, vocabulary 64, 3 labels);
    inputs are token ids and an attention mask (``example_inputs``)."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=depth, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )
    return _seeded(seed, lambda: transformers.BertForSequenceClassification(config))


#: Architecture name (as in ``crisp_edge.method.specs``) -> toy factory.
TOYS: dict[str, Callable[..., nn.Module]] = {
    "timm-vit": toy_timm_vit, "hf-vit": toy_hf_vit, "hf-llama": toy_hf_llama, "hf-bert": toy_hf_bert,
}


def toy_model(arch: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """The toy of architecture ``arch`` ("timm-vit", "hf-vit", "hf-llama" or "hf-bert")."""
    return TOYS[arch](seed=seed, **kwargs)


def example_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs that fit ``model`` (a toy or any model of the same kind): ``model(**inputs)``."""
    g = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None) == "llama":
        return {"input_ids": torch.randint(0, config.vocab_size, (batch, 8), generator=g)}
    if config is not None and getattr(config, "model_type", None) == "bert":
        # Token ids and a padding mask: every row keeps at least its first 4 tokens; later rows are padded more.
        mask = (torch.arange(8) < 8 - torch.arange(batch).unsqueeze(1) % 5).long()
        return {"input_ids": torch.randint(0, config.vocab_size, (batch, 8), generator=g), "attention_mask": mask}
    if config is not None:  # Hugging Face ViT
        shape = (batch, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=g)}
    channels, *size = model.patch_embed.proj.in_channels, *model.patch_embed.img_size
    return {"x": torch.randn((batch, channels, *size), generator=g)}


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(**inputs)`` as one tensor (the logits of Hugging Face outputs)."""
    return logits_of(model(**inputs))


def make_task_file(model: nn.Module, path: str | Path, task: str = "task1", seed: int = 1, num_classes: int = 3,
                   biases: bool = False, scale: float = 0.1) -> Path:
    """A stand-in task for tests and benchmarks: ``model``'s mixers perturbed (seeded, by ``scale``) and a
    new head of ``num_classes`` classes, written as a mixer file at ``path`` (``model`` is not changed)."""
    import copy

    from crisp_edge.files.mixers import save_mixers
    from crisp_edge.method.convert import crisp_layers
    from crisp_edge.training.adapt import new_head_

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in crisp_layers(m).values():
            layer.crisp_mixer.add_(scale * torch.randn(layer.crisp_mixer.shape, generator=g))
    new_head_(m, num_classes, seed=seed)
    save_mixers(m, path, task=task, biases=biases)
    return Path(path)


def make_lm_task_file(model: nn.Module, path: str | Path, task: str = "task1", seed: int = 1,
                      scale: float = 0.5) -> Path:
    """A stand-in language-model task: ``model``'s mixers perturbed (seeded, by ``scale``) and saved as a
    mixer file at ``path`` without a head (an LM's head is its vocabulary projection, not a task tensor)."""
    import copy

    from crisp_edge.files.mixers import save_mixers
    from crisp_edge.method.convert import crisp_layers

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in crisp_layers(m).values():
            layer.crisp_mixer.add_(scale * torch.randn(layer.crisp_mixer.shape, generator=g))
    save_mixers(m, path, task=task, head=False)
    return Path(path)

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


def toy_hf_llama(seed: int = 0, depth: int = 2, width: int = 32, tied: bool = False) -> nn.Module:
    """A Hugging Face ``LlamaForCausalLM`` (hidden ``width`` = 32, MLP 2x that, 2 query heads, 1 key/value head,
    vocabulary 64). A wider toy (``width=256``) has weights that outweigh the graph's own bytes, for size checks;
    ``tied``: the head shares the embedding's weight (as SmolLM2's does)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied,
    )
    return _seeded(seed, lambda: transformers.LlamaForCausalLM(config))


def toy_confident_llama(seed: int = 0, width: int = 256, scale: float = 15.0) -> nn.Module:
    """``toy_hf_llama`` whose predictions are confident, as a trained model's are: its ``lm_head`` is its
    embedding times ``scale``, so it predicts its current token with a clear margin (logits up to ~20). A
    random-init toy's logits are near-ties that any rounding reorders, which says nothing about a quantized
    export; quantized language-model tests use this one."""
    model = toy_hf_llama(seed=seed, width=width)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight * scale)
    return model


def toy_hf_bert(seed: int = 0, depth: int = 2) -> nn.Module:
    """A Hugging Face ``BertForSequenceClassification`` (hidden 32, 2 heads, vocabulary 64, 3 labels);
    inputs are token ids and an attention mask (``example_inputs``)."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=depth, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )
    return _seeded(seed, lambda: transformers.BertForSequenceClassification(config))


def toy_hf_llama_cls(seed: int = 0, depth: int = 2, num_labels: int = 3) -> nn.Module:
    """The LLaMA toy as a text classifier (``LlamaForTextClassification``, ``num_labels`` classes, pad id 0);
    inputs are token ids and an attention mask (``example_inputs``)."""
    from crisp_edge.models.llama_classifier import as_text_classifier

    return as_text_classifier(toy_hf_llama(seed, depth), num_labels, pad_token_id=0, seed=seed)


#: Architecture name (as in ``crisp_edge.method.specs``) -> toy factory.
TOYS: dict[str, Callable[..., nn.Module]] = {
    "timm-vit": toy_timm_vit, "hf-vit": toy_hf_vit, "hf-llama": toy_hf_llama, "hf-bert": toy_hf_bert,
    "hf-llama-cls": toy_hf_llama_cls,
}


def toy_model(arch: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """The toy of architecture ``arch`` ("timm-vit", "hf-vit", "hf-llama", "hf-llama-cls" or "hf-bert")."""
    return TOYS[arch](seed=seed, **kwargs)


def example_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs that fit ``model`` (a toy or any model of the same kind): ``model(**inputs)``.

    Text classifiers (BERT, ``LlamaForTextClassification``) get token ids and an attention mask as long
    as their ``InputSpec``'s ``max_length``: the length their text data is padded to, so a bundle
    exported on these inputs takes that data (``crisp-edge parity --inputs texts.jsonl``).
    """
    g = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "llama" and not hasattr(model, "score"):  # a causal LM
        return {"input_ids": torch.randint(0, config.vocab_size, (batch, 8), generator=g)}
    if model_type in ("bert", "llama"):
        from crisp_edge.data.input_spec import input_spec_of

        length = input_spec_of(model).max_length
        # Token ids and a padding mask: every row keeps at least its first half; later rows are padded more.
        mask = (torch.arange(length) < length - (torch.arange(batch).unsqueeze(1) % 5) * (length // 8)).long()
        return {"input_ids": torch.randint(0, config.vocab_size, (batch, length), generator=g), "attention_mask": mask}
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


#: The toy text tasks' words: the label is whether the text holds a word of the first or the second group.
TOY_WORDS = (("good", "great", "fine", "nice"), ("bad", "awful", "poor", "dull"),
             ("the", "a", "movie", "film", "plot", "was", "is", "very", "and", "cast"))


def toy_text_folder(path: str | Path, arch: str = "hf-llama", seed: int = 0) -> Path:
    """A Hugging Face folder as users hold one: ``config.json``, ``model.safetensors`` and a word-level
    ``tokenizer.json`` over ``TOY_WORDS`` (built with the ``tokenizers`` library). ``arch`` "hf-llama": a
    tiny ``LlamaForCausalLM`` whose tokenizer has no padding token (as LLaMA's have none); "hf-bert": a
    tiny ``BertForSequenceClassification`` (2 labels) whose tokenizer pads with ``[PAD]``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [w for group in TOY_WORDS for w in group]
    special = ["<unk>", "<s>", "</s>"] if arch == "hf-llama" else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[0] if arch == "hf-llama" else "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if arch == "hf-llama":
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                    eos_token="</s>")
        config = transformers.LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=None)
        make = lambda: transformers.LlamaForCausalLM(config)  # noqa: E731
    else:
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                    cls_token="[CLS]", sep_token="[SEP]")
        config = transformers.BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, num_labels=2, pad_token_id=0)
        make = lambda: transformers.BertForSequenceClassification(config)  # noqa: E731
    path = Path(path)
    _seeded(seed, make).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def toy_text_table(path: str | Path, n: int = 40, seed: int = 0) -> Path:
    """A JSONL text-classification table of ``n`` distinct texts, labels "pos" / "neg" by ``TOY_WORDS``."""
    import json
    import random

    rng = random.Random(seed)
    pos, neg, filler = TOY_WORDS
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = [rng.choice(filler) for _ in range(4)] + [rng.choice(pos if i % 2 else neg)]
        rng.shuffle(words)
        rows.append(json.dumps({"text": " ".join(words) + f" {filler[i % len(filler)]}", "label": label}))
    Path(path).write_text("\n".join(rows) + "\n")
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


#: The toy tokenizer's characters (after lower-casing); id 0 is "[UNK]", so ids stay below the toy LLaMA's 64.
TOY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:'!?-\n"


def toy_char_tokenizer():
    """A character-level Hugging Face fast tokenizer (lower-cased, ``TOY_CHARS``, unknown -> 0) whose ids
    fit the toy LLaMA's vocabulary of 64: real tokenizer code paths (``save_pretrained`` /
    ``AutoTokenizer``) without a download."""
    import tokenizers
    import transformers

    vocab = {"[UNK]": 0} | {c: i + 1 for i, c in enumerate(TOY_CHARS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("(?m:.)"), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def toy_llama_folder(path: str | Path, seed: int = 0, depth: int = 2) -> Path:
    """A local Hugging Face model folder (``config.json``, safetensors weights, tokenizer files) holding the
    toy LLaMA and ``toy_char_tokenizer``: what ``crisp-edge retrofit FOLDER`` and the text commands read."""
    path = Path(path)
    toy_hf_llama(seed=seed, depth=depth).save_pretrained(path, safe_serialization=True)
    toy_char_tokenizer().save_pretrained(path)
    return path

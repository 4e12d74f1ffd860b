"""Language-model adaptation (Alg. 3 for a causal LM): the bases stay frozen and only the CRISP mixers
learn a text domain by next-token prediction; the task is then a mixer file of kilobytes.

    model = load_checkpoint("smollm2-crisp/")          # a CRISP LlamaForCausalLM (retrofit_ / `crisp-edge retrofit`)
    report = adapt_lm_(model, text, tokenizer=tok)     # or 1-D token ids, or (N, window) token windows
    print(report.before["perplexity"], "->", report.after["perplexity"])   # on held-out windows
    save_mixers(model, "kjv.mixers.safetensors", task="kjv", head=False)

The text is cut into non-overlapping windows of ``config.window`` tokens (``causal_lm.windows``); each
window predicts its own tokens 2..window from the ones before, as ``causal_lm.perplexity`` measures it.
Held-out windows are ``eval_data`` when given, else every k-th window of the text (k = 1 / val_fraction),
so they sample the whole text. The training loop is ``training.loop.train_classifier`` with the
next-token loss (same schedule, clipping, progress bar, checkpoint and resume); the trainable set is
``adapt.mark_trainable_`` without head: the LM head (often tied to the token embedding) stays frozen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crisp_edge.errors import ConfigError, DataError
from crisp_edge.files.fingerprint import bases_fingerprint
from crisp_edge.files.run_state import check_checkpointing
from crisp_edge.method.convert import is_crisp
from crisp_edge.models.causal_lm import perplexity, tokenize, windows
from crisp_edge.training.adapt import mark_trainable_
from crisp_edge.training.loop import TrainConfig, TrainHistory, check_inputs, expected_inputs, train_classifier

#: Chosen on SmolLM2-135M (s=4, groups of 4 blocks, 128-token windows, 16 steps of 2 Old Testament windows,
#: judged on New Testament windows, perplexity 25.55 before): 3e-3 -> 29.26 (worse), 1e-3 -> 24.06,
#: 3e-4 -> 23.26, 1e-4 -> 24.13. Far below adapt_'s ViT default (3e-2): the closed-form retrofit
#: puts the gated mixer values at <= gate_init_max (0.15), and Adam moves every entry by about lr per step, so
#: 3e-3 changes the smaller components of an exact pretrained weight by tens of percent within a few steps.
DEFAULT_LM_MIXER_LR = 3e-4
DEFAULT_WINDOW = 128
DEFAULT_LM_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class AdaptLMConfig:
    """What language-model adaptation trains, and how.

    Attributes:
        train: optimisation settings; ``batch_size`` counts windows, an epoch is one pass over them.
        mixer_lr: learning rate of the mixers.
        window: tokens per window (training and held-out).
        val_fraction: without ``eval_data``, the share of windows held out (every k-th window).
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=4))
    mixer_lr: float = DEFAULT_LM_MIXER_LR
    window: int = DEFAULT_WINDOW
    val_fraction: float = DEFAULT_LM_VAL_FRACTION

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}.")
        v = self.mixer_lr
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 10:
            raise ConfigError(f"mixer_lr must be in (0, 10), got {v!r}.")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ConfigError(f"window must be an integer of at least 2 tokens, got {self.window!r}.")
        v = self.val_fraction
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5], got {v!r}.")


@dataclass
class AdaptLMReport:
    """What ``adapt_lm_`` did: trainable numbers by kind, the training history, whether the bases are
    bit-identical afterwards, and the held-out perplexity before and after (``causal_lm.perplexity``)."""

    trainable: dict[str, int]
    history: TrainHistory
    bases_unchanged: bool
    before: dict
    after: dict
    train_windows: int
    window: int

    @property
    def trainable_total(self) -> int:
        return sum(self.trainable.values())

    def to_dict(self) -> dict:
        return {"trainable": self.trainable, "trainable_total": self.trainable_total,
                "bases_unchanged": self.bases_unchanged, "window": self.window, "train_windows": self.train_windows,
                "perplexity_before": self.before, "perplexity_after": self.after, "history": self.history.to_dict()}


def lm_windows(data: Any, *, window: int, tokenizer=None, what: str = "training data") -> torch.Tensor:
    """``(N, window)`` int64 token windows from ``data``: a text (``tokenizer`` required), 1-D token ids,
    or already-cut 2-D windows (of ``window`` tokens). Raises a DataError that says what is short."""
    if isinstance(data, str):
        if tokenizer is None:
            raise ConfigError(f"{what} is text: pass tokenizer= (the model's own) to turn it into token ids.")
        if not data.strip():
            raise DataError(f"{what} holds no text (empty or whitespace only).")
        data = tokenize(tokenizer, data)
    if not isinstance(data, torch.Tensor) or data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
        raise DataError(f"{what} must be a text, 1-D token ids or (N, {window}) token windows (an integer tensor), "
                        f"got {type(data).__name__}{'' if not isinstance(data, torch.Tensor) else ' of ' + str(data.dtype)}.")
    data = data.long()
    if data.dim() == 1:
        if data.numel() < window:
            raise DataError(f"{what}: {data.numel()} tokens do not fill one window of {window}; give more text "
                            "or a smaller window.")
        return windows(data, window)
    if data.dim() != 2 or data.shape[1] != window or data.shape[0] == 0:
        raise DataError(f"{what}: token windows must have shape (N, {window}), got {tuple(data.shape)}.")
    return data


def split_heldout(rows: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` windows: every k-th window held out (k = round(1 / fraction)), so the
    held-out windows sample the whole text; deterministic."""
    k = max(2, round(1 / fraction))
    if rows.shape[0] < k:
        raise DataError(f"{rows.shape[0]} window(s) leave none to hold out 1 in {k}; give more text, a smaller "
                        "window or separate held-out text (eval_data / --val).")
    held = torch.arange(k - 1, rows.shape[0], k)
    keep = torch.ones(rows.shape[0], dtype=torch.bool)
    keep[held] = False
    return rows[keep], rows[held]


def next_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``y[:, 1:]`` from ``x`` (``y`` = ``x`` for language modelling)."""
    logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))


def adapt_lm_(model: nn.Module, data: Any, *, tokenizer=None, config: AdaptLMConfig | None = None,
              eval_data: Any = None, progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every: int | None = None, resume: bool = False) -> AdaptLMReport:
    """Adapt a CRISP causal LM to a text domain in place: bases and LM head frozen, mixers trained on
    next-token cross-entropy; returns the held-out perplexity before and after.

        adapt_lm_(model, open("notes.txt").read(), tokenizer=tok)
        adapt_lm_(model, ids, eval_data=heldout_ids, config=AdaptLMConfig(window=128, mixer_lr=3e-3))

    Args:
        data: the training text (with ``tokenizer``), 1-D token ids or ``(N, window)`` windows.
        eval_data: held-out text / ids / windows in the same forms; default: every k-th window of ``data``
            (``config.val_fraction``), which then does not train.
        checkpoint_dir, checkpoint_every, resume: as in ``train_classifier`` (continue after a kill).
    """
    config = config or AdaptLMConfig()
    if not isinstance(config, AdaptLMConfig):
        raise ConfigError(f"config must be an AdaptLMConfig, got {type(config).__name__}.")
    check_checkpointing(checkpoint_dir, checkpoint_every, resume)
    if not is_crisp(model):
        raise ConfigError("model has no CRISP layers; retrofit_ it before adapting.")
    spec = expected_inputs(model)
    if spec is None or spec[0] != "tokens" or not hasattr(model, "lm_head"):
        raise ConfigError(f"adapt_lm_ trains causal language models (with an lm_head); {type(model).__name__} is "
                          "not one: use adapt_ for classifiers.")
    rows = lm_windows(data, window=config.window, tokenizer=tokenizer)
    if eval_data is None:
        train, held = split_heldout(rows, config.val_fraction)
    else:
        train, held = rows, lm_windows(eval_data, window=config.window, tokenizer=tokenizer, what="evaluation data")
    check_inputs(model, train)
    check_inputs(model, held, what="evaluation data")
    batch = config.train.batch_size

    def measure() -> dict:
        return perplexity(model, held.reshape(-1), window=config.window, max_tokens=None, batch_size=batch,
                          progress=progress)

    before_ppl = measure()
    fingerprint = bases_fingerprint(model)
    groups = mark_trainable_(model, head=False)
    history = train_classifier(model, [{"params": groups["mixers"], "lr": config.mixer_lr}], train, train,
                               config.train, None, progress, desc="adapt-lm", checkpoint_dir=checkpoint_dir,
                               checkpoint_every=checkpoint_every, resume=resume, loss_fn=next_token_loss)
    trainable = {kind: sum(p.numel() for p in ps) for kind, ps in groups.items()}
    return AdaptLMReport(trainable, history, bases_fingerprint(model) == fingerprint, before_ppl, measure(),
                         int(train.shape[0]), config.window)

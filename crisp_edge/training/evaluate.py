"""Batched inference and the numbers people compare: accuracy, top-1 agreement, worst difference."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from crisp_edge.models.outputs import logits_of


def model_logits(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``model``'s logits on one batch: ``model(x)``, or ``model(input_ids=x, attention_mask=mask)`` for token
    ids with a padding mask (every training and evaluation step calls the model through here)."""
    if attention_mask is None:
        return logits_of(model(x))
    return logits_of(model(input_ids=x, attention_mask=attention_mask))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500, progress: bool = False,
            desc: str = "inference", attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (with its ``attention_mask``, for padded token ids), in batches, in eval
    mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    chunks = range(0, len(x), batch_size)
    out = [model_logits(model, x[i:i + batch_size], None if attention_mask is None else attention_mask[i:i + batch_size])
           for i in tqdm(chunks, desc=desc, disable=not progress, leave=False)]
    model.train(was_training)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of inputs on which two models predict the same class."""
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())

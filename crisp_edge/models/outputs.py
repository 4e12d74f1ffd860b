"""One place that turns what a supported model returns into its logits tensor.

timm models return a tensor; Hugging Face models return a ``ModelOutput`` (``ImageClassifierOutput``,
``SequenceClassifierOutput``, ``CausalLMOutputWithPast``, ...) whose ``logits`` field is the tensor, or
a tuple with the logits first when called with ``return_dict=False``. Training, evaluation,
distillation and the exporters all call ``logits_of(model(x))``, so a new output type is taught here
once rather than in each of them.
"""
from __future__ import annotations

from typing import Any

import torch

from crisp_edge.errors import ConfigError


def logits_of(out: Any) -> torch.Tensor:
    """The logits tensor in a model's output (a tensor, an object or dict with ``logits``, or a tuple
    whose first item is the logits)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"cannot find logits in the model's output ({type(out).__name__}); the model must return a "
                          "tensor or an output with a 'logits' tensor (Hugging Face *ForImageClassification, "
                          "*ForSequenceClassification, *ForCausalLM).")
    return logits

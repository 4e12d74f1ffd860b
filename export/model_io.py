"""What both exporters need of a PyTorch model, independent of the runtime: its example inputs, a
positional-argument wrapper that returns the logits tensor, and its stored-parameter count."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from crisp_edge.export.errors import ExportError
from crisp_edge.export.parity.reference import REFERENCE_BATCHES
from torch import nn

from crisp_edge.errors import ConfigError
from crisp_edge.models.outputs import logits_of

#: The name of the single output of every exported graph / program.
OUTPUT_NAME = "logits"


class _Forward(nn.Module):
    """``model(**inputs)`` as a positional-argument module returning one tensor."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.input_names = model, list(input_names)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(**dict(zip(self.input_names, xs))))


def _example_inputs(model: nn.Module, example_input: Any) -> dict[str, torch.Tensor]:
    if example_input is None:
        from crisp_edge.testing import example_inputs

        example_input = example_inputs(model, batch=REFERENCE_BATCHES[0])
    if isinstance(example_input, torch.Tensor):
        example_input = {"x": example_input}
    if not isinstance(example_input, dict) or not example_input:
        raise ConfigError("example_input must be a tensor or a dict of named tensors.")
    for name, t in example_input.items():
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32):
            raise ExportError(f"input {name!r} must be a float32 tensor (integer inputs such as token ids are not "
                              "supported by this exporter yet).")
        if t.numel() == 0:
            raise ConfigError(f"input {name!r} has shape {list(t.shape)}, with no elements; a bundle exported (and "
                              "checked) on empty inputs checks nothing. Give a batch of at least 1.")
    return example_input


def _stored_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():  # parameters() yields each tensor once: a shared basis counts once
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n

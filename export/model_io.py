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
#: Input dtypes both exporters take (``crisp_edge.export.inputs.INPUT_DTYPES``): float32 (images, features)
#: and integers (token ids, attention masks), which keep their dtype in the graph / program.
INPUT_DTYPES = (torch.float32, torch.int64, torch.int32)


class _Forward(nn.Module):
    """``model(**inputs)`` as a positional-argument module returning one tensor."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.input_names = model, list(input_names)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(**dict(zip(self.input_names, xs))))


def _check_traceable(model: nn.Module) -> None:
    """Refuse an architecture the table marks as not exportable by a torch trace (``ArchSpec.trace_export``)."""
    from crisp_edge.errors import UnknownArchitectureError
    from crisp_edge.method.specs import detect_architecture, get_architecture

    arch = getattr(model, "crisp_arch", None)  # recorded by retrofit_ (its arch= may name a registered spec)
    try:
        spec = get_architecture(arch) if isinstance(arch, str) else detect_architecture(model)
    except UnknownArchitectureError:  # a model outside the table: the trace and the parity check decide
        return
    if spec.trace_export:
        raise ExportError(f"{spec.name} ({type(model).__name__}) cannot be exported this way yet: {spec.trace_export}.")


def _example_inputs(model: nn.Module, example_input: Any) -> dict[str, torch.Tensor]:
    _check_traceable(model)
    if example_input is None:
        from crisp_edge.testing import example_inputs

        example_input = example_inputs(model, batch=REFERENCE_BATCHES[0])
    if isinstance(example_input, torch.Tensor):
        example_input = {"x": example_input}
    if not isinstance(example_input, dict) or not example_input:
        raise ConfigError("example_input must be a tensor or a dict of named tensors.")
    for name, t in example_input.items():
        if not (isinstance(t, torch.Tensor) and t.dtype in INPUT_DTYPES):
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ExportError(f"input {name!r} must be a float32 tensor (images, features) or an int64 / int32 "
                              f"tensor (token ids, attention masks), got {got}.")
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

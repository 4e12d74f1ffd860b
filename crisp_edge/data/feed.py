"""The one conversion point from whatever a caller hands a data-dependent step to model-ready tensors.

Adaptation, distillation, rank calibration, evaluation and the pipeline all call ``feed``; it takes

* ``x`` tensor (+ ``y`` tensor): used as they are (checked);
* an ``(x, y)`` pair of tensors;
* a ``LabeledData`` (from ``crisp_edge.data.formats.load_dataset`` or a built-in task);
* a torch ``Dataset`` or ``DataLoader`` (through ``formats.as_tensors``, with the model's ``InputSpec``);
* a path: an image folder, ``.safetensors`` / ``.npz``, ``.jsonl`` / ``.csv`` (``formats.load_dataset``;
  text is tokenised with ``tokenizer``, else the model's own: ``models.tokenizers.tokenizer_of``).

and returns a ``LabeledData``. Files and datasets are read with the model's ``InputSpec`` and checked
against it as they are read; tensors are checked by the step itself against the live model
(``training.loop.check_inputs``, which also knows models that take any image size). Either way a shape,
channel or label problem is a ``DataError`` before any training starts.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from crisp_edge.data.formats import as_tensors, load_dataset
from crisp_edge.data.input_spec import InputSpec, input_spec_of
from crisp_edge.data.labeled import LabeledData, check_classification
from crisp_edge.errors import CrispEdgeError, DataError


def model_spec(model: nn.Module, spec: InputSpec | None = None) -> InputSpec | None:
    """``spec``, else the model's own ``InputSpec``, else None (a model crisp-edge cannot read)."""
    if spec is not None:
        return spec
    try:
        return input_spec_of(model)
    except CrispEdgeError:
        return None


def feed(data: Any, y: torch.Tensor | None = None, *, model: nn.Module | None = None, spec: InputSpec | None = None,
         labels: str = "required", what: str = "training data", class_names: tuple[str, ...] | None = None,
         tokenizer=None, progress: bool = False) -> LabeledData:
    """``data`` (see the module docstring) as a checked ``LabeledData`` for ``model`` (or ``spec``).

    Args:
        labels: "required" (classification: labels and two classes at least) or "optional"
            (distillation / calibration inputs).
        class_names: the training set's classes, when ``data`` is a validation set.
    """
    spec = model_spec(model, spec) if model is not None else spec
    if y is not None and not isinstance(data, torch.Tensor):
        raise DataError(f"{what}: inputs must be a torch.Tensor, got {type(data).__name__} (labels y go only with an "
                        "x tensor; pass other data alone).")
    if isinstance(data, (str, os.PathLike)):
        if spec is None:
            raise DataError(f"{what}: cannot read {data} for a model whose input crisp-edge cannot tell; pass tensors "
                            "or an InputSpec.")
        if tokenizer is None and str(data).lower().endswith((".jsonl", ".csv")) and spec.kind == "tokens":
            from crisp_edge.models.tokenizers import tokenizer_of

            tokenizer = tokenizer_of(model)
        out = load_dataset(data, spec, labels=labels, class_names=class_names, tokenizer=tokenizer, progress=progress)
        if out.x is None and labels == "required":
            raise DataError(f"{what}: {out.source} is text, and the model records no tokenizer to turn it into token "
                            "ids; pass one (tokenizer=load_tokenizer(DIR), --tokenizer DIR: a Hugging Face folder or "
                            "a .gguf file).")
        return out
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data, y = data
    if isinstance(data, torch.Tensor):  # the step checks tensors itself (training.loop.check_dataset)
        for name, t in (("inputs", data), ("labels", y)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() == 0):
                raise DataError(f"{what}: {name} must be a torch.Tensor and must have a batch dimension, got "
                                f"{type(t).__name__}{' of 0 dims' if isinstance(t, torch.Tensor) else ''}.")
        if len(data) == 0:
            raise DataError(f"{what} is empty.")
        if y is None and labels == "required":
            raise DataError(f"{what}: classification needs labels; pass y beside the x tensor.")
        if y is not None and len(y) != len(data):
            raise DataError(f"{what}: {len(data)} inputs but {len(y)} labels.")
        return LabeledData(data, y, class_names=class_names, source=what)
    if isinstance(data, LabeledData):
        out = data
    elif isinstance(data, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        if spec is None:
            raise DataError(f"{what}: cannot read a {type(data).__name__} for a model whose input crisp-edge cannot "
                            "tell; pass tensors or an InputSpec.")
        return as_tensors(data, spec, labels=labels, class_names=class_names)
    else:
        raise DataError(f"{what}: expected an x tensor (+ y), an (x, y) pair, a LabeledData, a torch Dataset or "
                        f"DataLoader, or a path; got {type(data).__name__}.")
    if out.x is None:
        raise DataError(f"{what}: {out.source} holds raw text; load it with a tokenizer (load_dataset(..., tokenizer=)).")
    return check_classification(out, labels)

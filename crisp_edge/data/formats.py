"""Data in the forms people have it, checked against the model before any training.

    spec = input_spec_of(model)
    train = load_dataset("my_images/", spec)                 # class folders -> x (N, C, H, W), y, class_names
    train, val = split_validation(train, 0.1, seed=0)
    val = load_dataset("my_val/", spec, class_names=train.class_names)   # same class indices as train
    unlabelled = load_dataset("frames/", spec, labels="optional")        # flat folder: distillation inputs

Formats, by path:

* a folder: images in class folders (``ImageFolder`` layout) or flat (unlabelled); see ``images.py``;
* ``.safetensors`` / ``.npz``: ``x`` and optional ``y`` (and optional ``class_names``: a string array in
  ``.npz``, a JSON list in the safetensors metadata). Image ``x`` is float (model-ready, used as is) or
  uint8 raw pixels 0..255 (scaled and normalised with the spec; no resize). Shape (N, C, H, W), or
  (N, H, W) for one-channel models. Token ``x`` is int (N, L), with optional ``attention_mask``;
* ``.jsonl`` / ``.csv``: ``text`` + ``label`` columns (see ``text.py``);
* ``.txt``: UTF-8 text for language-model calibration, returned as one text (``texts[0]``).

A torch ``Dataset`` / ``DataLoader`` goes through ``as_tensors``. ``max_items`` keeps the first items
(class folders: a class-balanced prefix, classes in turn).
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crisp_edge.data.images import load_image_folder, preprocess_image
from crisp_edge.data.input_spec import InputSpec
from crisp_edge.data.labeled import (
    MAX_FILE_BYTES,
    LabeledData,
    check_classification,
    check_images,
    check_label_mode,
    check_labels,
    check_max_items,
    check_tokens,
    split_validation,
    stat_regular,
)
from crisp_edge.data.text import load_text_table, read_text_file
from crisp_edge.errors import DataError

__all__ = ["LabeledData", "load_dataset", "load_tensor_file", "as_tensors", "split_validation", "SUFFIXES"]

SUFFIXES = (".safetensors", ".npz", ".jsonl", ".csv", ".txt")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def load_dataset(path: str | os.PathLike, spec: InputSpec, *, labels: str = "required",
                 class_names: tuple[str, ...] | list[str] | None = None, num_classes: int | None = None,
                 max_items: int | None = None, tokenizer=None, progress: bool = True,
                 max_bytes: int | None = MAX_FILE_BYTES) -> LabeledData:
    """Load ``path`` (format from the path; see the module docstring) for a model taking ``spec``.

    Args:
        labels: "required" (classification: labels and at least two classes, else DataError) or
            "optional" (distillation / calibration: labels kept when present).
        class_names: the training set's classes, for a validation set: folder / string labels map to
            their indices, and integer labels must lie below their count.
        num_classes: integer labels must lie in [0, num_classes) (e.g. the model head's size).
        tokenizer: a Hugging Face tokenizer; text tables then come back as token ids + attention mask.
        max_bytes: refuse a data file larger than this (image files have their own limit).
    """
    check_label_mode(labels)
    check_max_items(max_items)
    if not isinstance(spec, InputSpec):
        raise DataError(f"spec must be an InputSpec (crisp_edge.data.input_spec.input_spec_of(model)), got "
                        f"{type(spec).__name__}.")
    names = tuple(class_names) if class_names is not None else None
    if names is not None and num_classes is not None and num_classes != len(names):
        raise DataError(f"num_classes={num_classes} but {len(names)} class names were given.")
    limit = num_classes if num_classes is not None else (len(names) if names is not None else None)
    path = Path(path)
    if path.is_dir():
        data = load_image_folder(path, spec, class_names=names, max_items=max_items, progress=progress)
    else:
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            stat_regular(path, None)  # a missing path says so before the suffix does
            raise DataError(f"cannot tell the format of {path}: use a folder of images, or a file ending in "
                            f"{', '.join(SUFFIXES)}.")
        if suffix in (".safetensors", ".npz"):
            data = load_tensor_file(path, spec, class_names=names, max_items=max_items, max_bytes=max_bytes)
        elif suffix == ".txt":
            if labels == "required":
                raise DataError(f"{path} is plain text, which has no labels; for classification use a .jsonl or .csv "
                                "with 'text' and 'label' columns (.txt is for language-model calibration).")
            data = LabeledData(None, None, source=f"text file {path}", texts=(read_text_file(path, max_bytes),))
        else:
            if spec.kind != "tokens":
                raise DataError(f"{path} is text but the model takes {spec.describe()} ({spec.source}).")
            data = load_text_table(path, spec, labels=labels, tokenizer=tokenizer, class_names=names,
                                   max_items=max_items, max_bytes=max_bytes)
    if data.y is not None and limit is not None:
        check_labels(data.y, data.source, limit)
    return check_classification(data, labels)


def _class_names_npz(z: Any, path: Path) -> tuple[str, ...] | None:
    if "class_names" not in z.files:
        return None
    arr = z["class_names"]
    if arr.dtype.kind != "U" or arr.ndim != 1:
        raise DataError(f"{path}: 'class_names' must be a 1-D string array (np.array(['cat', 'dog'])), got {arr.dtype}.")
    return tuple(str(s) for s in arr)


def _read_tensors(path: Path, max_items: int | None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, int], tuple[str, ...] | None]:
    """Tensors ``x``, ``y``, ``attention_mask`` (those present; the first ``max_items``), their full
    lengths, and the stored class names."""
    keys = ("x", "y", "attention_mask")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                if z.files and any(k in z.files and z[k].dtype.hasobject for k in keys):
                    raise DataError(f"{path}: arrays of Python objects need pickle, which crisp-edge refuses; save "
                                    "numeric arrays.")
                arrays = {k: z[k] for k in keys if k in z.files}
                lengths = {k: len(a) if a.ndim else 0 for k, a in arrays.items()}
                out = {k: torch.from_numpy(np.ascontiguousarray(a[:max_items])) for k, a in arrays.items()}
                return out, lengths, _class_names_npz(z, path)
        except DataError:
            raise
        except (ValueError, OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
            raise DataError(f"{path} is not a readable .npz archive ({type(e).__name__}: {e}); write it with "
                            "numpy.savez(path, x=x, y=y).") from None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            present = [k for k in keys if k in f.keys()]
            lengths = {k: (f.get_slice(k).get_shape() or [0])[0] for k in present}
            out = {k: f.get_slice(k)[:max_items] if max_items else f.get_tensor(k) for k in present}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e}); write it with "
                        "safetensors.torch.save_file({'x': x, 'y': y}, path).") from None
    names = None
    if "class_names" in meta:
        try:
            names = json.loads(meta["class_names"])
        except json.JSONDecodeError:
            names = None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise DataError(f"{path}: metadata 'class_names' must be a JSON list of strings, e.g. "
                            "save_file(t, path, metadata={'class_names': json.dumps(['cat', 'dog'])}).")
        names = tuple(names)
    return out, lengths, names


def _images_from_pixels(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 normalised with the spec (as images from a folder, minus the resize)."""
    x = x.float().div_(255.0)
    for c in range(x.shape[1]):
        x[:, c].sub_(spec.mean[c]).div_(spec.std[c])
    return x


def _model_ready(x: torch.Tensor, spec: InputSpec, where: str) -> torch.Tensor:
    """Image ``x`` as float32 (N, C, H, W), checked against the spec; token ``x`` checked as is."""
    if spec.kind == "tokens":
        check_tokens(x, spec, where)
        return x.to(torch.int64)
    if x.dim() == 3 and spec.channels == 1:
        x = x.unsqueeze(1)
    if x.dtype == torch.uint8:
        check_images(x[:0].float(), spec, where)  # shape first, then convert
        x = _images_from_pixels(x, spec)
    elif x.dtype in _FLOAT_DTYPES:
        x = x.to(torch.float32)
    else:
        raise DataError(f"{where}: images must be float (model-ready, normalised) or uint8 (raw pixels 0..255), "
                        f"got {x.dtype}.")
    check_images(x, spec, where)
    return x


def load_tensor_file(path: str | os.PathLike, spec: InputSpec, *, class_names: tuple[str, ...] | None = None,
                     max_items: int | None = None, max_bytes: int | None = MAX_FILE_BYTES) -> LabeledData:
    """A ``.safetensors`` or ``.npz`` file with ``x`` (+ ``y``, ``attention_mask``, ``class_names``)."""
    path = Path(path)
    stat_regular(path, max_bytes)
    tensors, lengths, stored = _read_tensors(path, max_items)
    if "x" not in tensors:
        raise DataError(f"{path} has no tensor named 'x' (the inputs); save inputs as 'x' and labels as 'y'.")
    where = str(path)
    x = _model_ready(tensors["x"], spec, where)
    if len(x) == 0:
        raise DataError(f"{path}: 'x' holds no examples.")
    y = tensors.get("y")
    if y is not None:
        if lengths["y"] != lengths["x"]:
            raise DataError(f"{path}: {lengths['x']} inputs ('x') but {lengths['y']} labels ('y'); there must be one "
                            "label per input.")
        if stored is not None and class_names is not None and tuple(stored) != tuple(class_names):
            raise DataError(f"{path}: its class names {list(stored)} differ from the training classes {list(class_names)}.")
        y = check_labels(y, where, len(stored) if stored else None)
    mask = tensors.get("attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(x.shape):
        raise DataError(f"{path}: attention_mask has shape {tuple(mask.shape)} but x has {tuple(x.shape)}.")
    return LabeledData(x, y, class_names=stored or class_names, source=f"tensor file {path}",
                       attention_mask=None if mask is None else mask.to(torch.int64))


def _split_item(item: Any, where: str) -> tuple[Any, Any]:
    if isinstance(item, dict):
        xk = next((k for k in ("x", "pixel_values", "input_ids", "image") if k in item), None)
        yk = next((k for k in ("y", "label", "labels") if k in item), None)
        if xk is None:
            raise DataError(f"{where}: a dict item needs an input key (x, pixel_values, input_ids or image); got "
                            f"{sorted(item)}.")
        return item[xk], (item[yk] if yk else None)
    if isinstance(item, (tuple, list)):
        if len(item) not in (1, 2):
            raise DataError(f"{where}: items must be (input, label) pairs, got a {type(item).__name__} of {len(item)}.")
        return item[0], (item[1] if len(item) == 2 else None)
    return item, None


def _as_input(v: Any, spec: InputSpec, where: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray) and not v.dtype.hasobject:
        return torch.from_numpy(np.ascontiguousarray(v))
    if type(v).__module__.startswith("PIL.") and spec.kind == "image":
        return preprocess_image(v, spec)
    raise DataError(f"{where}: cannot use an input of type {type(v).__name__}; items must hold a torch.Tensor, a numeric "
                    "numpy array or (image models) a PIL image, alone or as (input, label) / {'x':..., 'y':...}.")


def _as_label(v: Any, where: str) -> torch.Tensor:
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(v).reshape(-1)
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return torch.tensor([int(v)])
    if isinstance(v, (list, tuple)) and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in v):
        return torch.tensor([int(t) for t in v])
    raise DataError(f"{where}: labels must be integers or integer tensors, got {type(v).__name__} ({v!r:.40}).")


def as_tensors(obj: Iterable, spec: InputSpec, *, labels: str = "required", max_items: int | None = None,
               num_classes: int | None = None, class_names: tuple[str, ...] | None = None) -> LabeledData:
    """Materialise a torch ``Dataset`` (items) or ``DataLoader`` (batches) as ``LabeledData``.

    Items / batches may be ``(x, y)``, ``(x,)``, ``x`` alone or a dict (``x``/``pixel_values``/``input_ids``
    and ``y``/``label``/``labels``); inputs tensors, numeric numpy arrays, or PIL images (preprocessed
    with ``spec``); labels ints or integer tensors. Either every item has a label or none has.
    """
    check_label_mode(labels)
    check_max_items(max_items)
    batched = isinstance(obj, torch.utils.data.DataLoader)
    where = f"{type(obj).__name__}"
    if not batched and not isinstance(obj, (torch.utils.data.Dataset, list, tuple)):
        raise DataError(f"{where}: pass a torch Dataset or DataLoader (or a list of items).")
    if isinstance(obj, torch.utils.data.Dataset) and not isinstance(obj, torch.utils.data.IterableDataset):
        dataset = obj
        obj = (dataset[i] for i in range(len(dataset)))  # map-style: by index, no DataLoader needed
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    count, labelled = 0, None
    for i, item in enumerate(obj):
        x, y = _split_item(item, f"{where} item {i}")
        x = _as_input(x, spec, f"{where} item {i}")
        x = x if batched else x.unsqueeze(0)
        if y is not None:
            y = _as_label(y, f"{where} item {i}")
            if len(y) != len(x):
                raise DataError(f"{where} item {i}: {len(x)} inputs but {len(y)} labels.")
        if labelled is not None and labelled != (y is not None):
            raise DataError(f"{where} item {i}: some items have labels and some do not; label every item or none.")
        labelled = y is not None
        xs.append(x)
        if y is not None:
            ys.append(y)
        count += len(x)
        if max_items is not None and count >= max_items:
            break
    if not xs:
        raise DataError(f"{where} is empty.")
    try:
        x = torch.cat(xs)[:max_items]
    except RuntimeError as e:
        raise DataError(f"{where}: inputs have different shapes ({e}); resize them to the model's size.") from None
    x = _model_ready(x, spec, where)
    limit = num_classes if num_classes is not None else (len(class_names) if class_names else None)
    y = check_labels(torch.cat(ys)[:max_items], where, limit) if ys else None
    data = LabeledData(x, y, class_names=tuple(class_names) if class_names else None, source=f"in-memory {where}")
    return check_classification(data, labels)

"""The data options the commands share: ``--data PATH``, ``--val PATH`` / ``--val-fraction F``.

Data is read with the model's own ``InputSpec`` (``crisp_edge.data.input_spec``), in any form
``crisp_edge.data.formats.load_dataset`` reads: an image folder (one subfolder per class), a
``.safetensors`` / ``.npz`` file with ``x`` (+ ``y``), a ``.jsonl`` / ``.csv`` text table. Every check runs
here, before any training and before any output is written.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from crisp_edge.errors import DataError

#: Held out for validation when --data comes without --val: enough to see overfitting on a few
#: hundred examples, small enough to leave most for training.
DEFAULT_VAL_FRACTION = 0.1


def add_data_arguments(p: argparse.ArgumentParser, *, what: str) -> None:
    p.add_argument("--data", help=f"{what}: a folder of images in class subfolders (ImageFolder layout), a .safetensors "
                                  "or .npz file with x (+ y), or a .jsonl / .csv with text + label")
    p.add_argument("--val", help="validation data, in the same forms (its classes must be the training data's)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"hold out this fraction of --data for validation (default {DEFAULT_VAL_FRACTION} without --val)")


def task_name(path: str) -> str:
    """A task name from a data path: the folder's or file's name (``user-data/fmnist-images/train`` ->
    ``fmnist-images-train`` when the last part is a generic split name)."""
    p = Path(path.rstrip("/"))
    name = p.stem if p.suffix else p.name
    if name.lower() in ("train", "training", "data", "images") and p.parent.name:
        name = f"{p.parent.name}-{name}"
    return name or "task"


def add_tokenizer_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="text data: the tokenizer, a local Hugging Face folder or a .gguf file "
                                       "(default: the one recorded with the model's weights)")


def data_tokenizer(args: argparse.Namespace, model, spec, paths) -> object | None:
    """The tokenizer for text ``paths`` (``--tokenizer``, else the model's own); None for other data; a
    DataError when text has none."""
    from crisp_edge.models.tokenizers import tokenizer_of

    texts = [p for p in paths if p is not None and str(p).lower().endswith((".jsonl", ".csv"))]
    if getattr(args, "tokenizer", None) is not None and not texts:
        raise DataError("--tokenizer tokenises text data (.jsonl / .csv); the data given is not text.")
    if not texts or spec.kind != "tokens":
        return None  # a text file for an image model: load_dataset says so
    tokenizer = tokenizer_of(model, getattr(args, "tokenizer", None))
    if tokenizer is None:
        raise DataError(f"{texts[0]} is text, and the model records no tokenizer to turn it into token ids; pass "
                        "--tokenizer PATH (a Hugging Face folder with tokenizer.json, or a .gguf file).")
    return tokenizer


def load_train_val(args: argparse.Namespace, spec, *, max_items: int | None = None, progress: bool = True,
                   tokenizer=None):
    """``(train, val)`` LabeledData for classification from ``--data`` and ``--val`` / ``--val-fraction``
    (text tokenised with ``tokenizer``: see ``data_tokenizer``)."""
    from crisp_edge.data.formats import load_dataset
    from crisp_edge.data.labeled import split_validation

    if args.val is not None and args.val_fraction is not None:
        raise DataError("pass --val or --val-fraction, not both.")
    train = load_dataset(args.data, spec, max_items=max_items, progress=progress, tokenizer=tokenizer)
    if args.val is not None:
        val = load_dataset(args.val, spec, class_names=train.class_names, num_classes=train.num_classes,
                           progress=progress, tokenizer=tokenizer)
    else:
        train, val = split_validation(train, args.val_fraction or DEFAULT_VAL_FRACTION, seed=getattr(args, "seed", 0))
    return train, val

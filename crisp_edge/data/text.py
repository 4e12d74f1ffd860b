"""Text data: JSONL / CSV tables of ``text`` + ``label`` (classification) and plain ``.txt`` (calibration).

Labels in a table are either all integers (class indices; a CSV cell of digits counts as one) or all
strings (class names; index = position in sorted order, or in ``class_names`` when given). With a
tokenizer, classification texts become token ids + attention mask padded to the spec's
``max_length``; without one the texts come back raw for the caller to tokenise.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from crisp_edge.data.input_spec import InputSpec
from crisp_edge.data.labeled import (
    MAX_FILE_BYTES,
    LabeledData,
    check_labels,
    check_tokens,
    stat_regular,
)
from crisp_edge.errors import DataError

_INT = re.compile(r"[+-]?\d+")


def read_text_file(path: str | os.PathLike, max_bytes: int | None = MAX_FILE_BYTES) -> str:
    """The contents of a UTF-8 text file (a BOM is dropped), refusing non-regular files, oversized files,
    invalid UTF-8 (with the line it is on) and files of whitespace only."""
    path = Path(path)
    stat_regular(path, max_bytes, what="text file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8: byte {e.start} (line {line}) is {raw[e.start:e.start + 1]!r}. Convert "
                        "it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`.") from None
    if not text.strip():
        raise DataError(f"{path} holds no text (empty or whitespace only).")
    return text


def _rows(path: Path, text: str, text_field: str, label_field: str) -> list[tuple[int, Any, Any]]:
    """``(line number, text, label or None)`` per example; the label is None when the column is absent."""
    rows: list[tuple[int, Any, Any]] = []
    if path.suffix.lower() == ".jsonl":
        has_label = None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n} is not JSON ({e.msg}); each line must be one object like "
                                f'{{"{text_field}": "...", "{label_field}": "..."}}.') from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise DataError(f"{path} line {n} has no {text_field!r} field; each line must be an object like "
                                f'{{"{text_field}": "...", "{label_field}": "..."}}.')
            has = label_field in obj
            if has_label is not None and has != has_label:
                raise DataError(f"{path} line {n}: some lines have a {label_field!r} field and some do not; label every "
                                "line or none.")
            has_label = has
            rows.append((n, obj[text_field], obj.get(label_field)))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if text_field not in header:
        raise DataError(f"{path} has no {text_field!r} column (columns: {header}); the first row must name the columns, "
                        f"e.g. `{text_field},{label_field}`.")
    for row in reader:
        if None in row:
            raise DataError(f"{path} line {reader.line_num} has more cells than the header; quote texts that hold "
                            "commas (csv.writer does).")
        rows.append((reader.line_num, row[text_field], row.get(label_field) if label_field in header else None))
    return rows


def _labels(path: Path, rows: list[tuple[int, Any, Any]], class_names: tuple[str, ...] | None
            ) -> tuple[torch.Tensor, tuple[str, ...] | None]:
    csv_cells = path.suffix.lower() == ".csv"
    kinds = set()
    for n, _, label in rows:
        if isinstance(label, bool) or label is None or (csv_cells and label == ""):
            raise DataError(f"{path} line {n}: label {label!r} is not a class name or index.")
        if isinstance(label, float):
            raise DataError(f"{path} line {n}: label {label!r} is not an integer; use class indices 0..K-1 or names.")
        kinds.add("int" if isinstance(label, int) or (csv_cells and _INT.fullmatch(label.strip())) else
                  "str" if isinstance(label, str) else type(label).__name__)
    if len(kinds) > 1 or kinds - {"int", "str"}:
        raise DataError(f"{path}: labels mix {sorted(kinds)}; use class names (strings) or class indices (integers), "
                        "not both.")
    if kinds == {"int"}:
        y = torch.tensor([int(label) for _, _, label in rows], dtype=torch.int64)
        return check_labels(y, str(path), len(class_names) if class_names else None), class_names
    names = tuple(class_names) if class_names is not None else tuple(sorted({label for _, _, label in rows}))
    index = {name: i for i, name in enumerate(names)}
    for n, _, label in rows:
        if label not in index:
            raise DataError(f"{path} line {n}: class {label!r} is not among the training classes {list(names)}.")
    return torch.tensor([index[label] for _, _, label in rows], dtype=torch.int64), names


def tokenize_texts(texts: tuple[str, ...], tokenizer, spec: InputSpec, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face tokenizer -> ``(input_ids, attention_mask)``, int64 (N, spec.max_length)."""
    if getattr(tokenizer, "pad_token_id", 0) is None:
        raise DataError(f"{where}: the tokenizer has no padding token; set one first, e.g. "
                        "`tokenizer.pad_token = tokenizer.eos_token`.")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=spec.max_length, return_tensors="pt")
    ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
    check_tokens(ids, spec, where)
    return ids, mask


def load_text_table(path: str | os.PathLike, spec: InputSpec | None = None, *, labels: str = "required",
                    tokenizer=None, class_names: tuple[str, ...] | None = None, max_items: int | None = None,
                    text_field: str = "text", label_field: str = "label",
                    max_bytes: int | None = MAX_FILE_BYTES) -> LabeledData:
    """A JSONL or CSV file of texts (+ labels) as ``LabeledData`` (texts, and token ids with a tokenizer)."""
    path = Path(path)
    rows = _rows(path, read_text_file(path, max_bytes), text_field, label_field)[:max_items]
    if not rows:
        raise DataError(f"{path} holds no examples (only a header or blank lines).")
    for n, t, _ in rows:
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{path} line {n}: the {text_field!r} is {'empty' if isinstance(t, str) else type(t).__name__}; "
                            "every example needs some text.")
    has_labels = rows[0][2] is not None or (path.suffix.lower() == ".csv" and any(r[2] is not None for r in rows))
    if labels == "required" and not has_labels:
        raise DataError(f"{path} has no {label_field!r} {'column' if path.suffix.lower() == '.csv' else 'field'}; "
                        f"classification needs one label (class name or index) per text.")
    y, names = _labels(path, rows, class_names) if has_labels else (None, None)
    texts = tuple(t for _, t, _ in rows)
    x = mask = None
    if tokenizer is not None:
        if spec is None or spec.kind != "tokens":
            raise DataError(f"{path} is text but the model takes {spec.describe() if spec else 'no tokens'}.")
        x, mask = tokenize_texts(texts, tokenizer, spec, str(path))
    return LabeledData(x, y, class_names=names, source=f"text table {path}", texts=texts, attention_mask=mask)

"""``LabeledData`` (what every loader returns), the checks all loaders share, and ``split_validation``.

Every check runs before any training and raises a ``DataError`` that says what is wrong, where, and
how to fix it.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from crisp_edge.data.input_spec import InputSpec
from crisp_edge.data.tasks import _stratified_split
from crisp_edge.errors import DataError

#: Largest single data file read whole (tensor archive, text table): larger sets are better kept as
#: an image folder or subsampled first; reading 2 GiB into memory is the most a data step should do.
MAX_FILE_BYTES = 2 << 30
LABEL_MODES = ("required", "optional")


@dataclass(frozen=True)
class LabeledData:
    """A dataset in memory, model-ready.

    Attributes:
        x: float32 images (N, C, H, W) normalised per the model's ``InputSpec``, or int64 token ids
            (N, L); None for raw text the caller tokenises (then ``texts`` holds it).
        y: int64 labels (N,) in [0, num_classes), or None (unlabelled: distillation / calibration).
        class_names: label index -> name, when the data names its classes (folders, string labels).
        source: where it came from (said in reports and errors).
        texts: the raw texts, for text formats (a split keeps duplicates on one side by them).
        attention_mask: int64 (N, L) beside token ids (1 = real token, 0 = padding).
    """

    x: torch.Tensor | None
    y: torch.Tensor | None
    class_names: tuple[str, ...] | None = None
    source: str = ""
    texts: tuple[str, ...] | None = None
    attention_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {name: len(v) for name, v in (("x", self.x), ("y", self.y), ("texts", self.texts),
                                              ("attention_mask", self.attention_mask)) if v is not None}
        if not sizes:
            raise DataError(f"{self.source or 'data'}: neither inputs nor texts were given.")
        if len(set(sizes.values())) > 1:
            raise DataError(f"{self.source or 'data'}: lengths differ: {sizes}; every field needs one entry per example.")

    def __len__(self) -> int:
        for v in (self.x, self.texts, self.y):
            if v is not None:
                return len(v)
        return 0

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    @property
    def num_classes(self) -> int | None:
        """``len(class_names)`` when named, else ``max(y) + 1``; None when unlabelled."""
        if self.class_names is not None:
            return len(self.class_names)
        return None if self.y is None or len(self.y) == 0 else int(self.y.max()) + 1

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> LabeledData:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        x, y, mask = (None if t is None else t[idx] for t in (self.x, self.y, self.attention_mask))
        texts = None if self.texts is None else tuple(self.texts[i] for i in idx.tolist())
        return replace(self, x=x, y=y, attention_mask=mask, texts=texts)

    def describe(self) -> str:
        what = "token sequences" if self.x is not None and not self.x.is_floating_point() else (
            "texts" if self.x is None else "images")
        labels = "unlabelled" if self.y is None else f"{self.num_classes} classes"
        if self.class_names:
            shown = ", ".join(self.class_names[:5]) + (", ..." if len(self.class_names) > 5 else "")
            labels += f" ({shown})"
        return f"{len(self):,} {what}, {labels}, from {self.source}"


def check_label_mode(labels: str) -> None:
    if labels not in LABEL_MODES:
        raise DataError(f"labels must be one of {LABEL_MODES}, got {labels!r}.")


def check_max_items(max_items: int | None) -> None:
    if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, (int, np.integer)) or max_items < 1):
        raise DataError(f"max_items must be a positive integer or None, got {max_items!r}.")


def stat_regular(path: Path, max_bytes: int | None = MAX_FILE_BYTES, what: str = "data file") -> os.stat_result:
    """Stat ``path`` (following links) and refuse anything but a regular file of at most ``max_bytes``,
    without opening it: a FIFO or a device would block or never end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist; check the path.") from None
    except OSError as e:
        raise DataError(f"cannot stat {what} {path}: {e.strerror or e}.") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        raise DataError(f"{what} {path} is {kind}; data must be a regular file (copy the data into a file first).")
    if max_bytes is not None and st.st_size > max_bytes:
        raise DataError(f"{what} {path} is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit; subsample it, "
                        "split it, or use an image folder (read one image at a time).")
    return st


def check_labels(y: torch.Tensor, where: str, num_classes: int | None = None) -> torch.Tensor:
    """``y`` as int64 (N,), refusing floats with fractions, negatives and labels >= ``num_classes``."""
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{where}: labels must be a tensor, got {type(y).__name__}.")
    if y.dim() != 1:
        raise DataError(f"{where}: labels must be 1-D (one integer class per example), got shape {tuple(y.shape)}.")
    if y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{where}: labels must be integers, got {y.dtype}.")
    if y.is_floating_point():
        bad = ~torch.isfinite(y) | (y != torch.round(y))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise DataError(f"{where}: labels must be integer class indices; label {i} is {y[i].item()!r}. "
                            "Store labels as int64.")
    y = y.to(torch.int64)
    if len(y) and int(y.min()) < 0:
        i = int((y < 0).nonzero()[0])
        raise DataError(f"{where}: labels must be >= 0; label {i} is {int(y[i])}. Number classes 0..K-1.")
    if num_classes is not None and len(y) and int(y.max()) >= num_classes:
        i = int((y >= num_classes).nonzero()[0])
        raise DataError(f"{where}: label {i} is {int(y[i])}, out of range for {num_classes} classes "
                        f"(labels must lie in [0, {num_classes})).")
    return y


def check_classification(data: LabeledData, labels: str) -> LabeledData:
    """For ``labels="required"``: labels present and at least two classes present."""
    if labels != "required":
        return data
    if data.y is None:
        raise DataError(f"{data.source}: classification needs labels and this data has none; use an image folder "
                        "with one subfolder per class, a tensor file with 'y', or a text table with a label column.")
    present = torch.unique(data.y)
    if len(present) < 2:
        name = data.class_names[int(present[0])] if data.class_names and len(present) else (
            str(int(present[0])) if len(present) else "none")
        raise DataError(f"{data.source}: every example has the same class ({name}); classification needs at least "
                        "two classes (add a folder / label per class).")
    return data


def check_images(x: torch.Tensor, spec: InputSpec, where: str) -> None:
    """``x`` must be finite float images (N, C, H, W) of the spec's channels and size."""
    want = f"(N, {spec.channels}, {spec.height}, {spec.width})"
    if x.dim() != 4:
        raise DataError(f"{where}: the model takes images {want} (N, channels, height, width), got shape {tuple(x.shape)}.")
    c, h, w = x.shape[1:]
    if c != spec.channels:
        hint = " (channels-last? transpose to (N, C, H, W))" if x.shape[-1] == spec.channels else ""
        raise DataError(f"{where}: the model takes {spec.channels}-channel images {want}, got {c} channels "
                        f"(shape {tuple(x.shape)}){hint}.")
    if (h, w) != (spec.height, spec.width):
        raise DataError(f"{where}: the model takes {spec.height}x{spec.width} images {want}, got {h}x{w}; resize them "
                        "(an image folder is resized for you).")
    if not x.is_floating_point():
        raise DataError(f"{where}: images must be float (model-ready) or uint8 (raw pixels), got {x.dtype}.")
    finite = torch.isfinite(x)
    if not finite.all():
        i = int((~finite).flatten(1).any(1).nonzero()[0])
        raise DataError(f"{where}: example {i} contains NaN or Inf; clean or drop it.")


def check_tokens(x: torch.Tensor, spec: InputSpec, where: str) -> None:
    if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
        raise DataError(f"{where}: the model takes token ids, an integer tensor (N, length), got {x.dtype} of shape "
                        f"{tuple(x.shape)}.")
    if spec.vocab_size is not None and x.numel() and (int(x.min()) < 0 or int(x.max()) >= spec.vocab_size):
        raise DataError(f"{where}: token ids must lie in [0, {spec.vocab_size}), got [{int(x.min())}, {int(x.max())}]; "
                        "was it tokenised for another model?")


def _text_key(text: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{text}".encode("utf-8", "surrogatepass")).digest()


def split_validation(data: LabeledData, fraction: float, seed: int = 0) -> tuple[LabeledData, LabeledData]:
    """``(train, val)``: a deterministic split with about ``fraction`` of the examples in ``val``.

    Text data is split by a hash of each text (with ``seed``), so duplicates never straddle the split;
    other labelled data is stratified per class (largest-remainder allocation); unlabelled data is a
    seeded random split. Both sides keep ``data``'s class names.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DataError(f"the validation fraction must lie strictly between 0 and 1, got {fraction!r}.")
    n = len(data)
    n_val = int(round(fraction * n))
    if n_val < 1 or n_val >= n:
        raise DataError(f"{data.source}: {n} examples with validation fraction {fraction} leave "
                        f"{'no validation' if n_val < 1 else 'no training'} example; use a larger dataset or another "
                        "fraction, or pass a separate validation set.")
    rng = np.random.default_rng(seed)
    if data.texts is not None:
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(data.texts):
            groups.setdefault(t, []).append(i)
        val: list[int] = []
        for text in sorted(groups, key=lambda t: _text_key(t, seed)):
            if len(val) >= n_val:
                break
            val.extend(groups[text])
        if len(val) >= n:
            raise DataError(f"{data.source}: all examples are copies of few texts; no split keeps duplicates apart.")
        mask = np.zeros(n, dtype=bool)
        mask[val] = True
        train_idx, val_idx = np.flatnonzero(~mask), np.flatnonzero(mask)
    elif data.y is not None:
        train_idx, val_idx = _stratified_split(data.y.numpy(), n_val, rng)
    else:
        perm = rng.permutation(n)
        train_idx, val_idx = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    tag = f"seed {seed}"
    return (replace(data.subset(train_idx), source=f"{data.source} (train split, {1 - fraction:.0%}, {tag})"),
            replace(data.subset(val_idx), source=f"{data.source} (validation split, {fraction:.0%}, {tag})"))

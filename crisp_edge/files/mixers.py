"""Per-task mixer files: the only tensors a task changes, bound to the bases they were trained on.

A mixer file is one safetensors file (no pickle) holding, per group, the stacked mixers
``mixer.<group>`` (n x r x s), optionally ``bias.<group>`` (n x d_out) and the task head
``head.weight`` / ``head.bias``, plus JSON metadata in the safetensors header: format version,
task name, labels, the group layout (role, shape, r, s, gate, placement), the dtype the mixers were
trained in and the dtype they are stored in, a SHA-256 fingerprint of the bases, and a SHA-256 of
the tensor data. Loading checks the file itself; applying checks it against the model and refuses,
with its own error type, a file for other bases, another layout, another gate or another dtype.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from crisp_edge._version import __version__
from crisp_edge.errors import (
    BasisMismatchError,
    CorruptMixerFileError,
    DtypeMismatchError,
    GateMismatchError,
    LayoutMismatchError,
    MixerFileError,
)
from crisp_edge.files.fingerprint import bases_fingerprint
from crisp_edge.files.io import (
    atomic_write_bytes,
    check_envelope,
    check_writable,
    parse_json,
    read_regular,
    sha256_bytes,
)
from crisp_edge.method.convert import crisp_bases, group_layout, is_crisp
from crisp_edge.method.specs import get_architecture

MIXER_FORMAT = "crisp-edge/mixers"
MIXER_VERSION = 1
META_KEY = "crisp_edge"
MAX_MIXER_FILE_BYTES = 1 << 30
_LAYOUT_FIELDS = ("role", "n", "d_out", "d_in", "r", "s", "transpose")
_GATE_FIELDS = ("gate", "placement")


@dataclass(frozen=True)
class MixerFile:
    """A loaded, self-consistent mixer file (not yet checked against any model)."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    path: Path | None = None
    nbytes: int = 0
    raw_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw_bytes", sum(t.numel() * t.element_size() for t in self.tensors.values()))

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def labels(self) -> list[str] | None:
        return self.meta.get("labels")


def model_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The layout a mixer file (and a swappable bundle) records per group: role, n, shape, r, s, gate,
    placement, and ``transpose: True`` for a transposed group (absent otherwise, so records made
    before transposed groups existed are unchanged)."""
    return {
        key: {"role": g["role"], "n": len(g["layers"]), "d_out": g["d_out"], "d_in": g["d_in"], "r": g["r"],
              "s": g["s"], "gate": g["gate"], "placement": g["placement"]} | ({"transpose": True} if g.get("transpose") else {})
        for key, g in group_layout(model).items()
    }


def _pack_layout(layout: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Compact form kept in the file header: ``{"fc1_0_2": "fc1|3|768x192|12|4|silu|pre"}``, with a
    trailing ``|T`` for a transposed group (files of untransposed layouts read as before)."""
    return {k: f"{g['role']}|{g['n']}|{g['d_out']}x{g['d_in']}|{g['r']}|{g['s']}|{g['gate']}|{g['placement']}"
               + ("|T" if g.get("transpose") else "")
            for k, g in layout.items()}


def _unpack_layout(packed: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    out = {}
    for key, text in packed.items():
        try:
            role, n, shape, r, s, gate, placement, *flag = str(text).split("|")
            d_out, d_in = shape.split("x")
            if flag not in ([], ["T"]):
                raise ValueError
            out[key] = {"role": role, "n": int(n), "d_out": int(d_out), "d_in": int(d_in), "r": int(r), "s": int(s),
                        "gate": gate, "placement": placement} | ({"transpose": True} if flag else {})
        except ValueError:
            raise CorruptMixerFileError(f"{where}: layout entry {key!r}: {text!r} is malformed.") from None
    return out


def head_module(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The task head (path, module) that the model's architecture spec names, if it is a Linear."""
    spec = get_architecture(model.crisp_arch)
    if spec.head is None:
        return None
    head = model.get_submodule(spec.head)
    return (spec.head, head) if isinstance(head, nn.Linear) else None


def task_tensors(model: nn.Module, *, head: bool = True, biases: bool = False) -> dict[str, torch.Tensor]:
    """The tensors that define a task on ``model``: mixers (+ head, + layer biases)."""
    if not is_crisp(model):
        raise MixerFileError("model has no CRISP layers; retrofit_ it before saving mixers.")
    out: dict[str, torch.Tensor] = {}
    for key, basis in crisp_bases(model).items():
        layers = [model.get_submodule(n) for n in basis.layer_names]
        out[f"mixer.{key}"] = torch.stack([l.crisp_mixer.detach() for l in layers])
        if biases:
            if any(l.bias is None for l in layers):
                raise MixerFileError(f"group {key} has layers without bias; save with biases=False.")
            out[f"bias.{key}"] = torch.stack([l.bias.detach() for l in layers])
    if head:
        found = head_module(model)
        if found is None:
            raise MixerFileError(f"{model.crisp_arch} has no linear task head to save; use head=False.")
        out["head.weight"] = found[1].weight.detach()
        if found[1].bias is not None:
            out["head.bias"] = found[1].bias.detach()
    return out


def check_mixer_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """Where a mixer file may be written: a new name, or (with ``overwrite``) an existing crisp-edge
    mixer file. Anything else (a folder, a FIFO, another file) is a ``MixerFileError``: saving never
    replaces a file it did not write. Call it before training, so a refused path costs nothing."""
    path = check_writable(path, MixerFileError, "mixer file")
    if not (path.exists() or path.is_symlink()):
        return path
    if path.is_symlink() or not path.is_file():
        raise MixerFileError(f"{path} exists and is not a regular file; choose another --out.")
    try:
        read_mixers(path)
    except MixerFileError:
        raise MixerFileError(f"{path} exists and is not a crisp-edge mixer file; it is never replaced. Choose another "
                             "--out.") from None
    if not overwrite:
        raise MixerFileError(f"{path} already holds a mixer file; pass --overwrite (overwrite=True) to replace it, or "
                             "choose another --out.")
    return path


def save_mixers(model: nn.Module, path: str | os.PathLike, task: str, *, head: bool = True, biases: bool = False,
                storage_dtype: torch.dtype | None = None, labels: list[str] | None = None,
                extra: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write ``model``'s task tensors to the mixer file ``path`` (atomically); returns the path.

    Args:
        task: the task's name, kept in the file and shown when it is applied.
        head: include the task head (``spec.head``), e.g. a new classifier.
        biases: include every CRISP layer's bias (when adaptation trained them).
        storage_dtype: e.g. ``torch.float16`` to halve the file; values are upcast when applied.
        labels: class names, for apps that show predictions.
        overwrite: replace a mixer file already at ``path``; any other file is always refused
            (``check_mixer_target``).
    """
    if not isinstance(task, str) or not task:
        raise MixerFileError("task must be a non-empty name.")
    check_mixer_target(path, overwrite)
    tensors = task_tensors(model, head=head, biases=biases)
    compute_dtype = next(iter(tensors.values())).dtype
    stored = storage_dtype or compute_dtype
    if not stored.is_floating_point:
        raise MixerFileError(f"storage_dtype must be a floating dtype, got {stored}.")
    tensors = {k: v.to(stored).contiguous().cpu() for k, v in tensors.items()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise MixerFileError(f"refusing to save non-finite values (NaN/Inf, or overflow in {stored}) in {bad}.")
    meta = {
        "format": MIXER_FORMAT, "version": MIXER_VERSION, "crisp_edge_version": __version__, "task": task,
        "arch": model.crisp_arch, "layout": _pack_layout(model_layout(model)), "bases_sha256": bases_fingerprint(model),
        "dtype": str(compute_dtype).removeprefix("torch."), "storage_dtype": str(stored).removeprefix("torch."),
        "data_sha256": _data_digest(tensors),
    }
    if labels is not None:
        meta["labels"] = [str(l) for l in labels]
    if extra:
        meta["extra"] = extra
    data = st_save(tensors, metadata={META_KEY: json.dumps(meta, separators=(",", ":"), sort_keys=True)})
    atomic_write_bytes(path, data)
    return Path(path)


def _data_digest(tensors: dict[str, torch.Tensor]) -> str:
    # reshape(-1) first: a 0-dim tensor cannot be viewed as bytes (same bytes for every other shape)
    parts = [k.encode() + b"\0" + tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
             for k in sorted(tensors)]
    return sha256_bytes(b"".join(parts))


def read_mixers(path: str | os.PathLike) -> MixerFile:
    """Load a mixer file and check it is complete and self-consistent (not yet against a model)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except (OSError, ValueError):
        size = 0  # read_regular says why below
    if size > MAX_MIXER_FILE_BYTES:
        raise CorruptMixerFileError(f"{path} is {size} bytes; a mixer file is kilobytes to megabytes.")
    return parse_mixers(read_regular(path, MixerFileError, "mixer file", MAX_MIXER_FILE_BYTES), path)


def parse_mixers(data: bytes, path: Path | None = None) -> MixerFile:
    """Check the bytes of a mixer file (see ``read_mixers``); raises a ``MixerFileError`` subclass."""
    where = str(path) if path else "mixer file"
    try:
        tensors = st_load(data)
        raw_meta = _safetensors_metadata(data).get(META_KEY)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, RecursionError, TypeError) as e:
        raise CorruptMixerFileError(f"{where} is truncated or not a safetensors file ({e}).") from None
    if raw_meta is None:
        raise CorruptMixerFileError(f"{where} is a safetensors file but not a crisp-edge mixer file (no metadata).")
    meta = parse_json(raw_meta, CorruptMixerFileError, f"{where}: its metadata", "mixer file")
    check_envelope(meta, fmt=MIXER_FORMAT, max_version=MIXER_VERSION, error=CorruptMixerFileError, where=where,
                   what="mixer file", fields={"task": str, "layout": dict, "bases_sha256": str, "dtype": str,
                                              "storage_dtype": str, "data_sha256": str})
    meta["layout"] = _unpack_layout(meta["layout"], where)
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(l, str) for l in labels)):
        raise CorruptMixerFileError(f"{where}: labels must be a list of strings, found {type(labels).__name__}.")
    if _data_digest(tensors) != meta["data_sha256"]:
        raise CorruptMixerFileError(f"{where}: tensor data does not match its recorded SHA-256; the file is damaged.")
    for name, t in tensors.items():
        if str(t.dtype).removeprefix("torch.") != meta["storage_dtype"]:
            raise DtypeMismatchError(f"{where}: tensor {name} is {t.dtype}, the file declares {meta['storage_dtype']}.")
        if not t.is_floating_point():
            raise DtypeMismatchError(f"{where}: tensor {name} is {t.dtype}; mixer files hold floating-point tensors.")
    _check_tensors_fit_layout(tensors, meta["layout"], where)
    bad = [k for k, t in sorted(tensors.items()) if not torch.isfinite(t).all()]
    if bad:
        raise CorruptMixerFileError(f"{where}: tensors {bad[:5]} hold NaN or Inf values; adapt the task again.")
    return MixerFile(meta, tensors, path, len(data))


def _check_tensors_fit_layout(tensors: dict[str, torch.Tensor], layout: dict[str, dict[str, Any]], where: str) -> None:
    """A file's tensors must be the ones its own layout describes: a mixer per group (n x r x s), an
    optional bias per group (n x d_out), an optional head (2-D weight, 1-D bias of as many classes)."""
    expected = {f"mixer.{k}": (g["n"], g["r"], g["s"]) for k, g in layout.items()}
    optional = {f"bias.{k}": (g["n"], g["d_out"]) for k, g in layout.items()}
    unknown = sorted(set(tensors) - set(expected) - set(optional) - {"head.weight", "head.bias"})
    if unknown:
        raise CorruptMixerFileError(f"{where}: tensors {unknown[:5]} have no place in a mixer file of this layout.")
    for name, shape in {**expected, **optional}.items():
        t = tensors.get(name)
        if (t is None and name in expected) or (t is not None and tuple(t.shape) != shape):
            got = None if t is None else tuple(t.shape)
            raise CorruptMixerFileError(f"{where}: {name} has shape {got}, the file's own layout says {shape}.")
    w, b = tensors.get("head.weight"), tensors.get("head.bias")
    if w is None and b is not None:
        raise CorruptMixerFileError(f"{where}: has head.bias without head.weight.")
    if w is not None and (w.dim() != 2 or min(w.shape) == 0):
        raise CorruptMixerFileError(f"{where}: head.weight has shape {tuple(w.shape)}; a head is (classes x features).")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise CorruptMixerFileError(f"{where}: head.bias has shape {tuple(b.shape)}, head.weight has {w.shape[0]} classes.")


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode("utf-8"))  # st_load has already checked this header
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if isinstance(meta, dict) else {}


def check_layouts(mine: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]], where: str, other: str) -> None:
    """Refuse a mixer file's layout ``theirs`` unless it is ``mine`` (the ``other``'s: "model" or
    "bundle"): groups, shapes, ranks, transposition (``LayoutMismatchError``), gates (``GateMismatchError``)."""
    if set(mine) != set(theirs):
        only_file, only_other = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
        raise LayoutMismatchError(
            f"{where}: groups differ from the {other}'s: only in the file {only_file}, only in the {other} {only_other}. "
            "The file was made for another CRISP layout (group size, targets or depth)."
        )

    def field_of(g: dict, f: str) -> Any:
        return bool(g.get(f)) if f == "transpose" else g.get(f)

    for fields_, error, what in ((_LAYOUT_FIELDS, LayoutMismatchError, "differs"),
                                 (_GATE_FIELDS, GateMismatchError, "was trained with another gate")):
        for key in sorted(mine):
            diff = [f"{f} {field_of(theirs[key], f)!r} vs {field_of(mine[key], f)!r}" for f in fields_
                    if field_of(theirs[key], f) != field_of(mine[key], f)]
            if diff:
                raise error(f"{where}: group {key} {what} (file vs {other}): {', '.join(diff)}.")


def check_mixers(model: nn.Module, mixers: MixerFile) -> None:
    """Raise the matching ``MixerFileError`` subclass if ``mixers`` cannot run on ``model``."""
    where = str(mixers.path) if mixers.path else f"mixer file for task {mixers.task!r}"
    if not is_crisp(model):
        raise LayoutMismatchError(f"{where}: the model has no CRISP layers to apply mixers to.")
    check_layouts(model_layout(model), mixers.meta["layout"], where, "model")
    for key, basis in crisp_bases(model).items():
        t = mixers.tensors.get(f"mixer.{key}")
        if t is None or tuple(t.shape) != (basis.n_layers, basis.r, basis.s):
            got = None if t is None else tuple(t.shape)
            raise LayoutMismatchError(f"{where}: mixer.{key} has shape {got}, the model needs {(basis.n_layers, basis.r, basis.s)}.")
        b = mixers.tensors.get(f"bias.{key}")
        if b is not None and tuple(b.shape) != (basis.n_layers, basis.d_out):
            raise LayoutMismatchError(f"{where}: bias.{key} has shape {tuple(b.shape)}, the model needs {(basis.n_layers, basis.d_out)}.")
    if "head.weight" in mixers.tensors:
        found = head_module(model)
        if found is None:
            raise LayoutMismatchError(f"{where} carries a task head but {model.crisp_arch} has no linear head.")
        if mixers.tensors["head.weight"].shape[1] != found[1].in_features:
            raise LayoutMismatchError(
                f"{where}: head takes {mixers.tensors['head.weight'].shape[1]} features, the model's head {found[1].in_features}."
            )
    model_dtype = str(next(iter(crisp_bases(model).values())).weight.dtype).removeprefix("torch.")
    if mixers.meta["dtype"] != model_dtype:
        raise DtypeMismatchError(
            f"{where}: mixers were trained in {mixers.meta['dtype']} but the model computes in {model_dtype}; "
            f"convert the model (e.g. model.to(torch.{mixers.meta['dtype']})) or adapt again in {model_dtype}."
        )
    if mixers.meta["bases_sha256"] != bases_fingerprint(model):
        raise BasisMismatchError(
            f"{where}: task {mixers.task!r} was trained on other bases (fingerprint {mixers.meta['bases_sha256'][:12]}..., "
            f"this model's {bases_fingerprint(model)[:12]}...). Its mixers would compute a wrong answer here; "
            "use the checkpoint it was adapted from, or adapt the task again on this model."
        )


@torch.no_grad()
def apply_mixers_(model: nn.Module, mixers: MixerFile | str | os.PathLike) -> MixerFile:
    """Check ``mixers`` against ``model`` and write them into it in place; returns the MixerFile.

    Nothing is written unless every check passes. A head of another class count replaces the
    model's head module. Tensors the file does not hold (a head, the biases) are left as they are;
    ``TaskSwitcher`` restores them to the base model's between tasks.
    """
    mf = mixers if isinstance(mixers, MixerFile) else read_mixers(mixers)
    check_mixers(model, mf)
    write_task_tensors_(model, mf.tensors)
    return mf


@torch.no_grad()
def write_task_tensors_(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy already-checked task tensors (``mixer.<g>``, ``bias.<g>``, ``head.*``) into ``model``."""
    for key, basis in crisp_bases(model).items():
        stacked, biases = tensors[f"mixer.{key}"], tensors.get(f"bias.{key}")
        for i, name in enumerate(basis.layer_names):
            layer = model.get_submodule(name)
            layer.crisp_mixer.copy_(stacked[i])
            if biases is not None:
                layer.bias.copy_(biases[i])
    if "head.weight" in tensors:
        path, head = head_module(model)
        w, b = tensors["head.weight"], tensors.get("head.bias")
        if head.weight.shape != w.shape or (head.bias is None) != (b is None):
            ref = head.weight
            head = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=ref.dtype, device=ref.device)
            head.requires_grad_(ref.requires_grad)
            _replace(model, path, head)
        head.weight.copy_(w)
        if b is not None:
            head.bias.copy_(b)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

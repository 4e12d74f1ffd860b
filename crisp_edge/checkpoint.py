"""CRISP checkpoints: a folder with ``model.safetensors`` and ``crisp.json``. Loading never executes
code from the files (safetensors + JSON only) and checks everything it can before using the tensors.

``crisp.json`` records the format version, the architecture spec, the CRISP config, how to rebuild
the plain architecture (its "source"), the group layout, every tensor's shape and dtype, and the
SHA-256 of the weights file (which catches truncated or modified files).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .config import CrispConfig
from .convert import convert_, group_layout, is_crisp, plan_groups, restore_
from .errors import CheckpointError, ConfigError, CrispEdgeError
from .io import atomic_write_bytes, atomic_write_json, check_envelope, read_json, sha256_bytes
from .models import build_model, source_of

CHECKPOINT_FORMAT = "crisp-edge/checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "crisp.json"


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, source: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``model`` (a CRISP model) to the folder ``path``; returns the folder.

    Args:
        source: how to rebuild the plain architecture; defaults to what ``model`` records (models
            made by ``crisp_edge.models`` and Hugging Face models know it). Without one, loading
            needs ``load_checkpoint(path, model=<plain model>)``.
        extra: JSON-serialisable notes to keep (e.g. a retrofit report).
    """
    if not is_crisp(model):
        raise CheckpointError("model has no CRISP layers; run retrofit_ or convert_ before save_checkpoint.")
    state, storages = {}, set()
    for k, v in model.state_dict().items():  # tied weights (e.g. lm_head = embed_tokens) share storage,
        v = v.detach().contiguous().cpu()     # which safetensors refuses: save each name its own copy
        ptr = v.untyped_storage().data_ptr()
        state[k] = v.clone() if ptr in storages else v
        storages.add(ptr)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save non-finite values (NaN/Inf) in {bad[:5]}.")
    data = st_save(state, metadata={"format": "pt", "crisp_edge": CHECKPOINT_FORMAT})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "crisp_edge_version": __version__,
        "arch": model.crisp_arch,
        "config": model.crisp_config.to_dict(),
        "source": source if source is not None else source_of(model),
        "groups": group_layout(model),
        "weights": {"file": WEIGHTS_FILE, "bytes": len(data), "sha256": sha256_bytes(data)},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()},
        "extra": extra or {},
    }
    folder = Path(path)
    atomic_write_bytes(folder / WEIGHTS_FILE, data)
    atomic_write_json(folder / META_FILE, meta)  # last: it vouches for the weights by hash
    return folder


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``crisp.json`` of a checkpoint folder (no tensors loaded)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (expected a folder with {META_FILE} and {WEIGHTS_FILE}).")
    meta = read_json(folder / META_FILE, CheckpointError, "checkpoint metadata")
    return check_envelope(meta, fmt=CHECKPOINT_FORMAT, max_version=CHECKPOINT_VERSION, error=CheckpointError,
                          where=str(folder / META_FILE), what="checkpoint",
                          fields={"arch": str, "config": dict, "groups": dict, "weights": dict, "tensors": dict})


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a CRISP checkpoint folder; returns the CRISP model in eval mode.

    Args:
        model: the plain architecture to load into (e.g. ``timm.create_model(...)``). Optional when
            the checkpoint records its source.
    """
    folder = Path(path)
    meta = read_checkpoint_meta(folder)
    try:
        config = CrispConfig.from_dict(meta["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder / META_FILE}: invalid CRISP config: {e}") from None
    tensors = _read_weights(folder, meta)

    if model is None:
        if not meta.get("source"):
            raise CheckpointError(
                f"{folder} does not record how to build its architecture; pass the plain model: "
                "load_checkpoint(path, model=timm.create_model(...))."
            )
        model = build_model(meta["source"])
    if is_crisp(model):
        raise CheckpointError("load_checkpoint needs the plain architecture; the model given is already CRISP.")
    try:
        _, plans = plan_groups(model, config, meta["arch"])
    except CrispEdgeError as e:
        raise CheckpointError(f"the checkpoint's config does not fit the model: {e}") from None
    originals = {n: model.get_submodule(n) for p in plans for n in p.layer_names}
    convert_(model, config, meta["arch"])

    problems = []
    if group_layout(model) != meta["groups"]:
        problems.append("group layout differs from the one recorded in crisp.json")
    expected = model.state_dict()
    for k in sorted(set(expected) - set(tensors)):
        problems.append(f"missing tensor {k} {tuple(expected[k].shape)}")
    for k in sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected tensor {k} {tuple(tensors[k].shape)}")
    for k in sorted(set(expected) & set(tensors)):
        if tensors[k].shape != expected[k].shape:
            problems.append(f"{k}: file has shape {tuple(tensors[k].shape)}, config implies {tuple(expected[k].shape)}")
        elif tensors[k].dtype != expected[k].dtype:
            problems.append(f"{k}: file has dtype {tensors[k].dtype}, model has {expected[k].dtype}")
    if problems:
        restore_(model, originals)  # the caller's model comes back as it was given
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{folder}: the tensors do not match the config/model: {shown}.")
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def _read_weights(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = meta["weights"]
    file = folder / str(weights.get("file", WEIGHTS_FILE))
    if file.parent != folder:
        raise CheckpointError(f"{folder / META_FILE}: weights file must sit inside the checkpoint folder.")
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete.") from None
    if len(data) != weights.get("bytes"):
        raise CheckpointError(
            f"{file} is {len(data)} bytes but crisp.json records {weights.get('bytes')}: the file is truncated or "
            "was replaced; copy the checkpoint again."
        )
    if sha256_bytes(data) != weights.get("sha256"):
        raise CheckpointError(f"{file} does not match the SHA-256 recorded in crisp.json: the file is corrupted or modified.")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file} is not a valid safetensors file: {e}") from None

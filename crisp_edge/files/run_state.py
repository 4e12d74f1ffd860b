"""Resumable long runs: the whole state of a run in one atomically written safetensors file.

``run_state.safetensors`` holds the run's tensors (trainable parameters, optimizer moments, RNG
states, the epoch's shuffle) and, in its header, JSON for everything else (format version, position,
scheduler, history, optimizer scalars, and a fingerprint of the run). One file, written by temp file +
rename, so a kill leaves the previous state or the new one, never a mix; no pickle anywhere.

A run resumes only from a state its own fingerprint matches (same settings, same data shapes, same
parameter shapes): anything else is refused with the field that differs.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crisp_edge._version import __version__
from crisp_edge.errors import CheckpointError, ConfigError
from crisp_edge.files.io import atomic_write_bytes, check_envelope, parse_json, read_regular

RUN_STATE_FILE = "run_state.safetensors"
RUN_STATE_FORMAT = "crisp-edge/run-state"
RUN_STATE_VERSION = 1
_META_KEY = "crisp_edge"
MAX_RUN_STATE_BYTES = 8 << 30


def check_checkpointing(checkpoint_dir: Any, checkpoint_every: Any, resume: Any) -> None:
    """Validate the checkpointing arguments every resumable run takes."""
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise ConfigError(f"checkpoint_every must be a positive number of steps or None, got {checkpoint_every!r}.")
    if checkpoint_dir is None and (checkpoint_every is not None or resume):
        raise ConfigError("checkpoint_every and resume need checkpoint_dir= (the folder that holds the run's state).")
    if not isinstance(resume, bool):
        raise ConfigError(f"resume must be True or False, got {resume!r}.")


def save_run_state(folder: str | os.PathLike, kind: str, fingerprint: dict[str, Any], tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any]) -> Path:
    """Write the state of a ``kind`` run (e.g. "train") to ``folder/run_state.safetensors`` atomically."""
    header = {"format": RUN_STATE_FORMAT, "version": RUN_STATE_VERSION, "crisp_edge_version": __version__,
              "kind": kind, "fingerprint": fingerprint, "state": meta}
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                   metadata={_META_KEY: json.dumps(header, separators=(",", ":"))})
    path = Path(folder) / RUN_STATE_FILE
    atomic_write_bytes(path, data)
    return path


def load_run_state(folder: str | os.PathLike, kind: str,
                   fingerprint: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and JSON state saved by ``save_run_state``, or None when ``folder`` holds none.

    Raises CheckpointError for a damaged file or one written by another run (its fingerprint differs).
    """
    path = Path(folder) / RUN_STATE_FILE
    if not path.exists() and not path.is_symlink():
        return None
    data = read_regular(path, CheckpointError, "run state", MAX_RUN_STATE_BYTES)
    try:
        tensors = st_load(data)
        n = int.from_bytes(data[:8], "little")
        raw = json.loads(data[8:8 + n]).get("__metadata__", {}).get(_META_KEY)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, RecursionError, TypeError, AttributeError) as e:
        raise CheckpointError(f"run state {path} is damaged or not a safetensors file ({e}); "
                              "delete it to start over.") from None
    header = parse_json(raw if isinstance(raw, str) else "null", CheckpointError, f"run state {path}", "run state")
    check_envelope(header, fmt=RUN_STATE_FORMAT, max_version=RUN_STATE_VERSION, error=CheckpointError, where=str(path),
                   what="run state", fields={"kind": str, "fingerprint": dict, "state": dict})
    if header["kind"] != kind:
        raise CheckpointError(f"{path} holds the state of a {header['kind']!r} run, not of a {kind!r} run.")
    if header["fingerprint"] != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(header["fingerprint"])
                      if fingerprint.get(k) != header["fingerprint"].get(k))
        raise CheckpointError(f"{path} was written by another run ({', '.join(diff)} differ); resume with the same "
                              "settings and data, or use another checkpoint_dir.")
    return tensors, header["state"]


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's per-parameter state as tensors (``optim.<param index>.<name>``) plus JSON for any
    non-tensor entries. Hyperparameters are not saved: a resumed run takes them from its own config
    (which the run's fingerprint pins) and its learning rate from its scheduler's position."""
    tensors, scalars = {}, {}
    for idx, entry in opt.state_dict()["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"scalars": scalars}


def restore_copy_(target: torch.Tensor, saved: Any, name: str) -> None:
    """``target.copy_(saved)`` for a tensor from a run state, which must match exactly (``copy_`` alone
    would broadcast a wrong shape or cast a wrong dtype silently) and be finite."""
    if not isinstance(saved, torch.Tensor) or saved.shape != target.shape or saved.dtype != target.dtype:
        got = (tuple(saved.shape), saved.dtype) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise CheckpointError(f"the saved {name} is {got}, the run needs {(tuple(target.shape), target.dtype)}.")
    if saved.is_floating_point() and not torch.isfinite(saved).all():
        raise CheckpointError(f"the saved {name} holds NaN or Inf.")
    with torch.no_grad():
        target.copy_(saved)


def restore_optimizer_(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load what ``optimizer_tensors`` saved into ``opt`` (a fresh optimizer of the same run), after
    checking it fits: the same entries for every parameter, each a scalar for all of them or shaped
    like its parameter for all of them, finite."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("optim."):
                idx, name = key[len("optim."):].split(".", 1)
                state.setdefault(int(idx), {})[name] = value
        for idx, entry in meta["scalars"].items():
            for name, value in entry.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{name} of parameter {idx} is {value!r}")
                state.setdefault(int(idx), {})[name] = value
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the saved optimizer state is malformed ({type(e).__name__}: {e}).") from None
    if state and (set(state) != set(range(len(params))) or len({frozenset(e) for e in state.values()}) > 1):
        raise CheckpointError("the saved optimizer state does not fit this run (its entries differ from parameter "
                              "to parameter, or do not cover its parameters).")
    for name in next(iter(state.values()), {}):
        values = [(state[i][name], params[i]) for i in range(len(params))]
        scalar = all(not isinstance(v, torch.Tensor) or v.dim() == 0 for v, _ in values)
        if not scalar and any(not isinstance(v, torch.Tensor) or v.shape != p.shape for v, p in values):
            raise CheckpointError(f"the saved optimizer state {name!r} is neither a scalar for every parameter nor "
                                  "shaped like each parameter.")
        if any(isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all() for v, _ in values):
            raise CheckpointError(f"the saved optimizer state {name!r} holds NaN or Inf.")
    try:
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"the saved optimizer state does not fit this run ({e}).") from None

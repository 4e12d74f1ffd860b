"""CRISP checkpoints: a folder with ``model.safetensors`` and ``crisp.json``. Loading never executes
code from the files (safetensors + JSON only) and checks everything it can before using the tensors.

``crisp.json`` records the format version, the architecture spec, the CRISP config, how to rebuild
the plain architecture (its "source"), where its pretrained weights came from (its "origin": kind,
name, arguments, and the weight files with their SHA-256), the group layout, every tensor's shape and dtype, and the
SHA-256 of the weights file (which catches truncated or modified files).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from crisp_edge._version import __version__
from crisp_edge.errors import CheckpointError, ConfigError, CrispEdgeError
from crisp_edge.files.io import (
    atomic_write_bytes,
    atomic_write_json,
    check_envelope,
    check_writable,
    inside,
    read_json,
    read_regular,
    sha256_bytes,
)
from crisp_edge.method.config import CrispConfig
from crisp_edge.method.convert import (
    convert_,
    group_layout,
    is_crisp,
    plan_groups,
    restore_,
)
from crisp_edge.method.specs import get_architecture
from crisp_edge.models.sources import build_model, source_of
from crisp_edge.models.weights import ORIGIN_ATTR, origin_of

CHECKPOINT_FORMAT = "crisp-edge/checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "crisp.json"
_STAGED_SUFFIX = ".staged"
_DIGEST_KEY = "crisp_edge_architecture_sha256"
#: The crisp.json fields that decide what model the weights are loaded into.
ARCHITECTURE_FIELDS = ("arch", "config", "source", "groups")


def architecture_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the crisp.json fields that rebuild the model (``ARCHITECTURE_FIELDS``), canonical JSON.

    The fields go through JSON once first, so the digest of the in-memory record (at save) equals that of
    crisp.json read back (at load): a Hugging Face config's ``id2label`` has int keys, which JSON turns into
    strings that sort differently from 10 labels on ("10" < "2")."""
    fields = json.loads(json.dumps({k: meta.get(k) for k in ARCHITECTURE_FIELDS}))
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return sha256_bytes(blob.encode())


def _check_architecture_digest(recorded: str | None, meta: dict[str, Any], folder: Path) -> None:
    """Refuse weights whose recorded architecture digest differs from crisp.json's fields (checkpoints
    written before the digest existed carry none and are checked by tensor names and shapes only).
    Run after the structural checks, which name a difference they can see more precisely."""
    if recorded is not None and recorded != architecture_digest(meta):
        raise CheckpointError(
            f"{folder / META_FILE} does not describe the model these weights were saved from: one of "
            f"{list(ARCHITECTURE_FIELDS)} (e.g. num_heads, the gate or its placement) was changed after the save. "
            "Loading would compute wrong outputs; restore crisp.json from the original checkpoint.")


def check_checkpoint_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """Where a checkpoint may be written: a new or empty folder, or (with ``overwrite``) a folder that
    holds a crisp-edge checkpoint, whose ``crisp.json`` and ``model.safetensors`` are then replaced
    (other files in it are left alone). Anything else is a ``CheckpointError`` that says what to do:
    a checkpoint save never replaces files it did not write."""
    folder = check_writable(path, CheckpointError, "checkpoint", folder=True)
    if not (folder.exists() or folder.is_symlink()):
        return folder
    if not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder; a checkpoint is a folder. Choose another --out.")
    ours = (f".{WEIGHTS_FILE}.", f".{META_FILE}.")  # temporary and staged files of a killed save
    entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith(ours))
    if not entries:
        return folder
    try:
        read_checkpoint_meta(folder)
    except CheckpointError:
        raise CheckpointError(f"{folder} is not a crisp-edge checkpoint (it holds {entries[:5]!r:.200} and no valid "
                              f"{META_FILE}); a checkpoint is never written over other files. Choose another --out or "
                              "an empty folder.") from None
    if not overwrite:
        raise CheckpointError(f"{folder} already holds a checkpoint; pass --overwrite (overwrite=True) to replace it, "
                              "or choose another --out.")
    return folder


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, source: dict | None = None,
                    extra: dict | None = None, origin: dict | None = None, overwrite: bool = True) -> Path:
    """Write ``model`` (a CRISP model) to the folder ``path``; returns the folder.

    Args:
        source: how to rebuild the plain architecture; defaults to what ``model`` records (models
            made by ``crisp_edge.models.sources`` and Hugging Face models know it). Without one, loading
            needs ``load_checkpoint(path, model=<plain model>)``.
        extra: JSON-serialisable notes to keep (e.g. a retrofit report).
        origin: where the pretrained weights came from (kind, name, arguments, files with SHA-256);
            defaults to what ``model`` records (``crisp_edge.models.weights.origin_of``).
        overwrite: replace a checkpoint already in ``path``; a folder holding anything else is always
            refused (``check_checkpoint_target``).
    """
    if not is_crisp(model):
        raise CheckpointError("model has no CRISP layers; run retrofit_ or convert_ before save_checkpoint.")
    check_checkpoint_target(path, overwrite)
    state, storages = {}, set()
    for k, v in model.state_dict().items():  # tied weights (e.g. lm_head = embed_tokens) share storage,
        v = v.detach().contiguous().cpu()     # which safetensors refuses: save each name its own copy
        ptr = v.untyped_storage().data_ptr()
        state[k] = v.clone() if ptr in storages else v
        storages.add(ptr)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save non-finite values (NaN/Inf) in {bad[:5]}.")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "crisp_edge_version": __version__,
        "arch": model.crisp_arch,
        "config": model.crisp_config.to_dict(),
        "source": source if source is not None else source_of(model),
        "origin": origin if origin is not None else (origin_of(model) or _python_origin(model)),
        "groups": group_layout(model),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()},
        "extra": extra or {},
    }
    # the weights carry a digest of the fields that rebuild the model: an edit of crisp.json alone (e.g.
    # num_heads, which changes no tensor shape) no longer matches the weights it describes
    data = st_save(state, metadata={"format": "pt", "crisp_edge": CHECKPOINT_FORMAT, _DIGEST_KEY: architecture_digest(meta)})
    meta["weights"] = {"file": WEIGHTS_FILE, "bytes": len(data), "sha256": sha256_bytes(data)}
    folder = Path(path)
    _write_folder(folder, data, meta)
    return folder


def _python_origin(model: nn.Module) -> dict[str, Any]:
    """What can be said of a model built in Python without ``create_model``: its class and, for timm,
    the architecture its pretrained config names (a hint for the error that asks for a source)."""
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return {"kind": "python", "class": type(model).__name__, "files": [], **({"timm_architecture": arch} if arch else {})}


def _write_folder(folder: Path, data: bytes, meta: dict[str, Any]) -> None:
    """Replace the checkpoint in ``folder`` so that a kill at any moment leaves either the old or the
    new checkpoint loadable (two files cannot be renamed at once, so crisp.json, which names and
    hashes the weights file, is switched over in between):

    1. the new weights go to a staged file beside the old ones;
    2. crisp.json now names the staged file: the new checkpoint is in place;
    3. ``model.safetensors`` becomes a hard link to the staged file (a copy where links fail);
    4. crisp.json names ``model.safetensors`` again; 5. staged files are removed (also any that a
       killed save left: no crisp.json names them any more).
    """
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f".{WEIGHTS_FILE}.{meta['weights']['sha256'][:16]}{_STAGED_SUFFIX}"
    atomic_write_bytes(staged, data)
    atomic_write_json(folder / META_FILE, {**meta, "weights": {**meta["weights"], "file": staged.name}})
    link = folder / f".{WEIGHTS_FILE}.{os.getpid()}.link.tmp"
    try:
        link.unlink(missing_ok=True)
        os.link(staged, link)
        os.replace(link, folder / WEIGHTS_FILE)
    except OSError:  # a file system without hard links
        link.unlink(missing_ok=True)
        atomic_write_bytes(folder / WEIGHTS_FILE, data)
    atomic_write_json(folder / META_FILE, meta)
    for old in folder.glob(f".{WEIGHTS_FILE}.*{_STAGED_SUFFIX}"):  # ours, and any left by a killed save
        old.unlink(missing_ok=True)


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``crisp.json`` of a checkpoint folder (no tensors loaded)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (expected a folder with {META_FILE} and {WEIGHTS_FILE}).")
    meta = read_json(inside(folder, META_FILE, str(folder), CheckpointError, "checkpoint"), CheckpointError,
                     "checkpoint metadata")
    return check_envelope(meta, fmt=CHECKPOINT_FORMAT, max_version=CHECKPOINT_VERSION, error=CheckpointError,
                          where=str(folder / META_FILE), what="checkpoint",
                          fields={"arch": str, "config": dict, "groups": dict, "weights": dict, "tensors": dict})


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a CRISP checkpoint folder; returns the CRISP model in eval mode.

    Args:
        model: the plain architecture to load into (e.g. ``timm.create_model(...)``). Optional when
            the checkpoint records its source.

    Everything is checked before a tensor is used: the weights' size and SHA-256, the tensor list
    crisp.json records, finite values, the config, and (on a skeleton built on the ``meta`` device,
    which allocates nothing however large the file says the model is) that the recorded source and
    config give exactly the tensors in the file.
    """
    folder = Path(path)
    meta = read_checkpoint_meta(folder)
    try:
        config = CrispConfig.from_dict(meta["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder / META_FILE}: invalid CRISP config: {e}") from None
    tensors, digest = _read_weights(folder, meta)

    if model is None:
        source = _check_source(meta, tensors, folder)
        with torch.device("meta"):
            skeleton = _build(source, folder)
        _convert_checked_(skeleton, config, meta, tensors, folder)  # names a difference it can see first
        _check_architecture_digest(digest, meta, folder)
        model = _build(source, folder)
    else:
        _check_architecture_digest(digest, meta, folder)
    if is_crisp(model):
        raise CheckpointError("load_checkpoint needs the plain architecture; the model given is already CRISP.")
    _convert_checked_(model, config, meta, tensors, folder)
    model.load_state_dict(tensors, strict=True)
    if isinstance(meta.get("origin"), dict):  # kept when the model is compressed and saved again
        setattr(model, ORIGIN_ATTR, meta["origin"])
    return model.eval()


def _convert_checked_(model: nn.Module, config: CrispConfig, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                      folder: Path) -> None:
    """Convert ``model`` under ``config``; if its tensors then differ from the file's in any name, shape
    or dtype, put it back as it was given and raise a CheckpointError listing the differences."""
    try:
        _, plans = plan_groups(model, config, meta["arch"])
    except CrispEdgeError as e:
        raise CheckpointError(f"the checkpoint's config does not fit the model: {e}") from None
    implied = sum(p.u * p.r + len(p.layer_names) * p.r * p.s for p in plans)
    held = sum(t.numel() for t in tensors.values())
    if implied > 2 * held + (1 << 20):  # refuse before allocating what the config asks for
        raise CheckpointError(f"{folder}: the config implies {implied:,} CRISP factor values but the weights hold "
                              f"{held:,} values in all: crisp.json does not describe these weights.")
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


#: Source fields by library (see ``models.build_model``): name -> (type, required).
_SOURCE_FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "timm": {"name": (str, True), "kwargs": (dict, False)},
    "transformers": {"config": (dict, True), "class": (str, False)},
}
#: Where each library's source records the number of blocks (checked against the weights first:
#: building thousands of blocks takes minutes even on the meta device).
_DEPTH_KEYS = {"timm": ("kwargs", "depth"), "transformers": ("config", "num_hidden_layers")}
#: Arguments that would make a factory read files or fetch weights: a checkpoint rebuilds a bare
#: architecture, and its weights come from model.safetensors only.
_REFUSED_ARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                           "trust_remote_code", "auto_map"})
_MAX_SOURCE_INT = 1 << 31


def _check_source(meta: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    """Check the recorded source before anything is built from it; returns it."""
    where = folder / META_FILE
    source = meta.get("source")
    if not source:
        origin = meta.get("origin") if isinstance(meta.get("origin"), dict) else {}
        arch = origin.get("timm_architecture")
        name = repr(arch) if isinstance(arch, str) else "'NAME'"
        raise CheckpointError(
            f"{folder} does not record how to build its architecture (its model was built in Python"
            f"{', a timm ' + name if arch else ''}). In Python, load it with load_checkpoint(path, model=<the plain "
            f"model>); to make it usable from the command line, save it again with its source: "
            f"save_checkpoint(model, path, source={{'library': 'timm', 'name': {name}, 'kwargs': {{<the arguments "
            f"you gave timm.create_model>}}}}), or build the model with crisp_edge.create_model('timm:' + {name}, "
            "weights=..., model_args={...}) before retrofitting (it records its source)."
        )
    library = source.get("library") if isinstance(source, dict) else None
    if not isinstance(library, str) or library not in _SOURCE_FIELDS:
        raise CheckpointError(
            f"cannot rebuild a model from source library {library!r}; pass the plain model yourself "
            "(load_checkpoint(path, model=...))."
        )
    for key, (kind, required) in _SOURCE_FIELDS[library].items():
        if (required or key in source) and not isinstance(source.get(key), kind):
            raise CheckpointError(f"{where}: source field {key!r} must be a {kind.__name__}, found {source.get(key)!r:.80}.")
    stack = [source]
    while stack:  # every key and number anywhere in the source (iterative: the JSON may nest deeply)
        item = stack.pop()
        if isinstance(item, dict):
            refused = sorted(_REFUSED_ARGS & set(item))
            if refused:
                raise CheckpointError(f"{where}: source sets {refused}; a checkpoint may only rebuild a bare architecture.")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > _MAX_SOURCE_INT:
            raise CheckpointError(f"{where}: source holds a {item.bit_length()}-bit number, beyond any architecture setting.")
    try:
        prefix = get_architecture(meta["arch"]).blocks + "."
    except CrispEdgeError as e:
        raise CheckpointError(f"the checkpoint's config does not fit the model: {e}") from None
    blocks = {m.group(1) for k in tensors if k.startswith(prefix) and (m := re.match(r"([0-9]+)\.", k[len(prefix):]))}
    section, key = _DEPTH_KEYS[library]
    depth = source.get(section, {}).get(key, len(blocks))
    if depth != len(blocks) or isinstance(depth, bool):
        raise CheckpointError(f"{where}: source records {key}={depth!r:.40} but the weights hold {len(blocks)} blocks.")
    return source


def _build(source: dict[str, Any], folder: Path) -> nn.Module:
    """``build_model(source)``; any failure of the model factory becomes a CheckpointError."""
    try:
        return build_model(source)
    except CrispEdgeError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a factory given bad arguments raises anything
        raise CheckpointError(f"{folder / META_FILE}: cannot build the recorded architecture "
                              f"({type(e).__name__}: {str(e)[:200]}).") from None


def _read_weights(folder: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str | None]:
    """The checked tensors, and the architecture digest the file records (None in older files)."""
    weights = meta["weights"]
    name = weights.get("file", WEIGHTS_FILE)
    if not isinstance(name, str):
        raise CheckpointError(f"{folder / META_FILE}: weights file name must be a string, found {name!r:.80}.")
    file = inside(folder, name, str(folder / META_FILE), CheckpointError, "checkpoint")
    size = weights.get("bytes")
    if not file.exists() and not file.is_symlink():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete.")
    # at most the recorded size + 1: a longer file is refused without reading it all
    limit = size if isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 1 << 40 else 0
    data = read_regular(file, CheckpointError, "checkpoint weights", limit + 1)
    if len(data) != weights.get("bytes"):
        raise CheckpointError(
            f"{file} is {len(data)} bytes but crisp.json records {weights.get('bytes')!r:.40}: the file is truncated or "
            "was replaced; copy the checkpoint again."
        )
    if sha256_bytes(data) != weights.get("sha256"):
        raise CheckpointError(f"{file} does not match the SHA-256 recorded in crisp.json: the file is corrupted or modified.")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, TypeError) as e:
        raise CheckpointError(f"{file} is not a valid safetensors file: {e}") from None
    n = int.from_bytes(data[:8], "little")
    digest = (json.loads(data[8:8 + n]).get("__metadata__") or {}).get(_DIGEST_KEY)
    found = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}
    if found != meta["tensors"]:
        diff = sorted(k for k in set(found) | set(meta["tensors"]) if found.get(k) != meta["tensors"].get(k))
        raise CheckpointError(f"{file} does not hold the tensors crisp.json lists (differences in {diff[:5]}).")
    bad = [k for k, v in sorted(tensors.items()) if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{file} holds NaN or Inf values in {bad[:5]}; the checkpoint is damaged.")
    return tensors, digest

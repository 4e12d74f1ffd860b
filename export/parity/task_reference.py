"""The PyTorch reference of a task added to a bundle after export (``export-task``), and the bundle
update that records it.

A task added later must be checked like the tasks exported with the bundle, so ``add_task`` /
``mixers_to_onnx_adapter`` compute its reference outputs on the bundle's stored inputs from the
checkpoint the task was trained on, found by the bases' fingerprint (``bases_fingerprint``): the one
given (``checkpoint=``, ``--checkpoint``), else the one the bundle records it was exported from
(the manifest's ``source.checkpoint``). A given checkpoint with other bases is an error; without a
matching one the task is recorded as *unchecked* (its reason in the task record), and parity fails on
it unless the user opts out by name (``--allow-unchecked NAME``).

The per-task reference lives in its own file, ``tasks/<name>.reference.npz`` (keys
``output.{task}.{i}.{name}``, the inputs stay in ``reference.npz``), listed under the manifest's
``files`` (so it is hash-checked like any other file) and named by the task record's
``reference.file``. The update computes everything first, writes the reference under a new name (a
name already in use gets a content-hash suffix) and replaces the manifest last, atomically. The task
file itself must be ``tasks/<name><suffix>`` (the C++ runner accepts no other name): a new task is a
new file, but re-adding an existing task replaces its file (atomically) before the manifest, so a run
killed in between leaves a bundle that refuses that task (SHA-256 mismatch), never one that runs it
silently wrong; the all-or-nothing bundle update of issue 16 closes that window. Files the new
manifest no longer names, and that the old one recorded (written by crisp-edge), are removed last.
"""
from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from crisp_edge.export.bundle import MANIFEST, TASKS_DIR
from crisp_edge.export.errors import BundleError
from crisp_edge.export.parity.lm_check import reference_model
from crisp_edge.export.parity.reference import read_reference, reference_outputs, resolve_device

from crisp_edge.errors import BasisMismatchError, CrispEdgeError
from crisp_edge.files.io import atomic_write_json, sha256_bytes

REFERENCE_SUFFIX = ".reference.npz"


def source_record(checkpoint: str | os.PathLike | None, model: Any = None) -> dict | None:
    """The manifest's ``source`` record for a bundle exported from the checkpoint folder ``checkpoint``:
    its absolute path and (for a CRISP ``model``) the bases' fingerprint, which a later use checks."""
    if checkpoint is None:
        return None
    from crisp_edge.files.fingerprint import bases_fingerprint
    from crisp_edge.method.convert import is_crisp

    rec = {"checkpoint": str(Path(checkpoint).resolve())}
    if model is not None and is_crisp(model):
        rec["bases_sha256"] = bases_fingerprint(model)
    return rec


def find_checkpoint(manifest: dict, bases_sha256: str | None, checkpoint: str | os.PathLike | None = None
                    ) -> tuple[Any | None, str]:
    """(the CRISP model whose bases match ``bases_sha256``, where it came from) or (None, why none).

    ``checkpoint`` (given by the user) must match: a ``BasisMismatchError`` otherwise. The checkpoint
    the manifest records is used when it still exists and matches."""
    from crisp_edge.files.checkpoint import load_checkpoint
    from crisp_edge.files.fingerprint import bases_fingerprint

    if checkpoint is not None:
        model = load_checkpoint(checkpoint)
        fp = bases_fingerprint(model)
        if bases_sha256 is not None and fp != bases_sha256:
            raise BasisMismatchError(f"checkpoint {checkpoint} has other bases (fingerprint {fp[:12]}...) than the "
                                     f"bundle ({bases_sha256[:12]}...); give the checkpoint the bundle was exported "
                                     "from (and the task trained on).")
        return model, str(checkpoint)
    recorded = (manifest.get("source") or {}).get("checkpoint") if isinstance(manifest.get("source"), dict) else None
    if not isinstance(recorded, str):
        return None, "the bundle records no source checkpoint and none was given (--checkpoint CK)"
    try:
        model = load_checkpoint(recorded)
    except CrispEdgeError as e:
        return None, f"the recorded source checkpoint {recorded} cannot be loaded ({type(e).__name__}: {str(e)[:200]})"
    if bases_sha256 is None or bases_fingerprint(model) != bases_sha256:
        return None, f"the recorded source checkpoint {recorded} now has other bases than the bundle"
    return model, recorded


def task_reference(bundle: Any, mf: Any, task: str, checkpoint: str | os.PathLike | None = None
                   ) -> tuple[dict[str, np.ndarray] | None, dict]:
    """(reference arrays keyed ``output.{task}.{i}.{name}``, the task record's ``reference`` fields).

    Without a checkpoint of the bundle's bases the arrays are None and the record says
    ``{"reference": None, "unchecked": reason}``."""
    from crisp_edge.files.mixers import apply_mixers_

    swap = bundle.manifest["swappable"]
    model, where = find_checkpoint(bundle.manifest, swap["bases_sha256"], checkpoint)
    if model is None:
        return None, {"reference": None, "unchecked": where}
    import torch

    stored = read_reference(bundle.path, bundle.manifest.get("reference"))
    cases = [{n: torch.from_numpy(np.array(v)) for n, v in c.items()} for c in stored.inputs]
    device = stored.device if stored.device != "cuda" else "auto"  # a GPU reference where one is present
    run = {"output_names": stored.output_names, "device": resolve_device(device), "dtype": stored.dtype}
    task_model = copy.deepcopy(model)
    apply_mixers_(task_model, mf)
    outs = reference_outputs(reference_model(task_model, bundle.manifest), cases, **run)
    arrays = {f"output.{task}.{i}.{n}": v for i, case in enumerate(outs) for n, v in case.items()}
    fields = {"reference": {"checkpoint": where, "device": run["device"], "dtype": run["dtype"]}}
    lm = bundle.manifest.get("lm")
    if isinstance(lm, dict):  # a language model: the task's greedy-generation reference on the recorded prompts too
        from crisp_edge.export.lm import record_references
        from crisp_edge.generation import TorchStepper

        default = lm["generation"]["default"]
        prompts = [c["prompt"] for c in default["cases"]]
        fields["generation"] = record_references({task: TorchStepper(task_model, lm["max_seq_len"])}, prompts,
                                                 default["max_new_tokens"])[task]
    return arrays, fields


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def fresh_name(folder: Path, rel: str, data: bytes, in_use: set[str]) -> str:
    """``rel`` when no file has that name, else ``rel`` with a content-hash suffix before its extension(s)."""
    if not (folder / rel).exists() and rel not in in_use:
        return rel
    head, _, name = rel.rpartition("/")
    stem, dot, ext = name.partition(".")
    return f"{head}/{stem}.{sha256_bytes(data)[:12]}{dot}{ext}" if head else f"{stem}.{sha256_bytes(data)[:12]}{dot}{ext}"


def add_task_files(bundle: Any, task: str, task_suffix: str, write: Callable[[Path], Any],
                   record: Callable[[str, bytes], dict], reference: tuple[dict[str, np.ndarray] | None, dict]) -> Path:
    """Add (or replace) ``task`` in ``bundle``: its task file (``write(path)`` writes it, with any record
    it keeps beside it) and its reference, in one all-or-nothing update (``files.transaction.commit_files``:
    the new files, then the manifest, renamed into place after a journal; a kill or a full disk leaves the
    old bundle or the new one, finished on the next open). Returns the task file's path.

    ``record(rel, data)`` makes the task record of the task file ``rel`` whose bytes are ``data``."""
    from crisp_edge.files.transaction import commit_files

    folder, old = bundle.path, bundle.manifest
    in_use = set(old.get("files", {})) | {t["file"] for t in old.get("tasks", {}).values()}
    rel = f"{TASKS_DIR}/{task}{task_suffix}"  # fixed: loaders (the C++ runner) accept no other name
    staged = folder / TASKS_DIR / f".{task}{task_suffix}.{os.getpid()}.staged"
    try:
        write(staged)
        payload = {rel: staged.read_bytes()}
        for side in sorted(staged.parent.glob(staged.name + ".*")):  # a record beside it (ONNX adapters: .json)
            payload[rel + side.name[len(staged.name):]] = side.read_bytes()
    finally:
        staged.unlink(missing_ok=True)
        for side in staged.parent.glob(staged.name + ".*"):
            side.unlink(missing_ok=True)
    manifest = copy.deepcopy(old)
    prev = manifest.get("tasks", {}).get(task)
    files = manifest["files"]
    if isinstance(prev, dict) and isinstance(prev.get("reference"), dict):
        files.pop(prev["reference"].get("file"), None)
    arrays, fields = reference
    fields = dict(fields)
    generation = fields.pop("generation", None)
    if isinstance(manifest.get("lm"), dict):  # a language model's generation reference lives in its lm section
        manifest["lm"]["generation"].pop(task, None)
        if generation is not None:
            manifest["lm"]["generation"][task] = generation
    rec = {**record(rel, payload[rel]), **fields}
    if arrays is not None:
        data = npz_bytes(arrays)
        ref_rel = fresh_name(folder, f"{TASKS_DIR}/{task}{REFERENCE_SUFFIX}", data, in_use | {rel})
        payload[ref_rel] = data
        files[ref_rel] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        rec["reference"] = {**fields["reference"], "file": ref_rel}
    manifest["tasks"] = {**manifest.get("tasks", {}), task: rec}
    payload[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()  # last: it names the rest
    commit_files(folder, payload, remove=tuple(_stale(folder, old, manifest)), error=BundleError)
    return folder / rel


def _stale(folder: Path, old: dict, new: dict) -> list[str]:
    """The files (and the records beside them) ``old`` named and ``new`` does not: crisp-edge's own."""
    named = set(new.get("files", {})) | {t["file"] for t in new.get("tasks", {}).values()}
    out = []
    for rel in (set(old.get("files", {})) | {t["file"] for t in old.get("tasks", {}).values()}) - named:
        out.append(rel)
        path = folder / rel
        out += [str(Path(rel).parent / side.name) for side in path.parent.glob(path.name + ".*")]
    return sorted(out)


def commit_manifest(folder: Path, old: dict, new: dict) -> None:
    """Replace ``folder``'s manifest with ``new`` (atomically), then remove the files ``old`` recorded
    (crisp-edge's own) that ``new`` no longer names."""
    atomic_write_json(folder / MANIFEST, new)
    named = set(new.get("files", {})) | {t["file"] for t in new.get("tasks", {}).values()}
    stale = (set(old.get("files", {})) | {t["file"] for t in old.get("tasks", {}).values()}) - named
    for rel in stale:
        path = folder / rel
        try:
            path.unlink(missing_ok=True)
            for side in path.parent.glob(path.name + ".*"):  # its record beside it (ONNX adapters: .json)
                side.unlink(missing_ok=True)
        except OSError:  # an old file left behind is harmless: nothing names it
            pass


def remove_task_files(bundle: Any, task: str) -> None:
    """Drop ``task``'s record, its task file and its reference file (the manifest first)."""
    old = bundle.manifest
    if task not in old.get("tasks", {}):
        raise BundleError(f"bundle {bundle.path} has no task {task!r:.80}; it has {sorted(old.get('tasks', {}))}.")
    new = copy.deepcopy(old)
    rec = new["tasks"].pop(task)
    if isinstance(new.get("lm"), dict):
        new["lm"]["generation"].pop(task, None)
    if isinstance(rec.get("reference"), dict):
        new["files"].pop(rec["reference"].get("file"), None)
    commit_manifest(bundle.path, old, new)

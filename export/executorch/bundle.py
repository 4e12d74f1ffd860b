"""The ExecuTorch export bundle on disk: a program, a manifest, reference data and per-task ``.ptd`` files.

    bundle/
      manifest.json        format "crisp-edge/executorch-bundle", version 1 (see ``export_executorch``)
      model.pte            the program: ``forward`` and ``crisp_io`` (+ ``set_task`` and ``crisp_tag`` when swappable)
      default.ptd          swappable only: the exported model's own task tensors (mixers, head)
      runner_spec.txt      a plain-text summary of names, shapes and tag (the C++ runner reads manifest.json)
      reference.npz        fixed seeded inputs and the PyTorch outputs for them (no pickle)
      tasks/<name>.ptd     swappable only: one per task, ExecuTorch's FlatTensor format

The bases live in ``model.pte`` (stored once; ``set_task`` reads them to rebuild every layer's dense
weight in place). ``load_et_bundle`` checks the manifest's envelope and fields, that every file name is
a plain relative path inside the folder, and every file's SHA-256, with the shared checks of
``crisp_edge.export.bundle``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from crisp_edge.export.bundle import (
    MANIFEST,
    MODES,
    Bundle,
    _is_int,
    _names,
    _record,
    bundle_tag,
    check_layout_record,
    check_reference_record,
    check_relpath,
    check_shape,
    check_tolerance_and_tasks,
    open_folder,
    read_manifest_json,
)
from crisp_edge.export.errors import BundleError
from crisp_edge.export.quantize import check_quantize_record
from crisp_edge.files.io import check_envelope

ET_BUNDLE_FORMAT = "crisp-edge/executorch-bundle"
ET_BUNDLE_VERSION = 1
PROGRAM = "model.pte"
DEFAULT_PTD = "default.ptd"
PTD_SUFFIX = ".ptd"
#: A plain-text summary of names, shapes and tag; the C++ runner no longer reads it (it verifies
#: manifest.json and reads that), kept for tools that parse it.
RUNNER_SPEC = "runner_spec.txt"
RECIPES = ("xnnpack", "portable")
#: The task tensor holding the bases-and-layout tag (int64, shape [1]) in every task ``.ptd``.
TAG_KEY = "crisp.tag"
#: The task tensor holding every mixer group of a task ``.ptd`` (float32 [N]; ``tasks.pack_mixers``).
MIXERS_KEY = "crisp.mixers"
#: A swappable XNNPACK language model's one-token step: ``forward``'s graph with the task weights read in
#: place by ``crisp::rowmajor_linear`` (``lm_export``); sessions and the C++ runner call it when T = 1.
DECODE_METHOD = "decode"


def _check_swappable(swap: Any, where: str) -> None:
    if not isinstance(swap, dict):
        raise BundleError(f"{where}: a swappable bundle needs the object 'swappable' (bases, layout, set_task inputs).")
    where = f"{where}: swappable"
    layout = swap.get("layout")
    if not isinstance(swap.get("bases_sha256"), str):
        raise BundleError(f"{where} needs 'bases_sha256' and a non-empty 'layout'.")
    check_layout_record(layout, f"{where}.layout")
    if swap.get("tag") != bundle_tag(swap["bases_sha256"], layout):
        raise BundleError(f"{where}.tag {swap.get('tag')!r:.40} is not the tag of the recorded bases and layout; "
                          "the manifest was edited. Export the bundle again.")
    inputs = swap.get("set_task_inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BundleError(f"{where}.set_task_inputs must be a non-empty list of {{name, shape}}.")
    _names(inputs, where, "set_task_inputs")
    for item in inputs:
        check_shape(item.get("shape"), f"{where}.set_task_inputs[{item['name']!r}]")
    head = swap.get("head")
    if head is not None and not (isinstance(head, dict) and _is_int(head.get("max_classes"), 1)
                                 and _is_int(head.get("num_classes"), 1) and _is_int(head.get("in_features"), 1)
                                 and head["num_classes"] <= head["max_classes"]):
        raise BundleError(f"{where}.head must be null or {{in_features, num_classes, max_classes}}; found {head!r:.200}.")


def check_et_manifest(meta: dict, folder: Path) -> dict:
    """Every field the loaders use, beyond the envelope: types, ranges, and safe file names."""
    where = str(folder / MANIFEST)
    mode = meta["mode"]
    if mode not in MODES:
        raise BundleError(f"{where}: unknown mode {mode!r:.80}; expected one of {MODES}.")
    if meta["recipe"] not in RECIPES:
        raise BundleError(f"{where}: unknown recipe {meta['recipe']!r:.80}; expected one of {RECIPES}.")
    files = meta["files"]
    for name, rec in files.items():
        check_relpath(name, f"{where}: files")
        _record(rec, f"{where}: files[{name!r}]")
    if PROGRAM not in files:
        raise BundleError(f"{where}: 'files' must list the program {PROGRAM} with its SHA-256.")
    _names(meta["inputs"], where, "inputs")
    _names(meta["outputs"], where, "outputs")
    for item in meta["inputs"]:
        check_shape(item.get("shape"), f"{where}: inputs[{item['name']!r}]")
    check_tolerance_and_tasks(meta, where, mode, files, PTD_SUFFIX)
    if mode == "swappable":
        _check_swappable(meta.get("swappable"), where)
        if DEFAULT_PTD not in files:
            raise BundleError(f"{where}: a swappable bundle lists {DEFAULT_PTD} under 'files'.")
    elif "swappable" in meta:
        raise BundleError(f"{where}: a {mode!r} bundle has no 'swappable' record; the manifest was edited.")
    check_reference_record(meta, where, files)
    check_quantize_record(meta, where)
    return meta


def read_et_manifest(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    meta = read_manifest_json(folder)
    check_envelope(meta, fmt=ET_BUNDLE_FORMAT, max_version=ET_BUNDLE_VERSION, error=BundleError,
                   where=str(folder / MANIFEST), what="ExecuTorch bundle",
                   fields={"mode": str, "recipe": str, "files": dict, "inputs": list, "outputs": list,
                           "tolerance": dict})
    return check_et_manifest(meta, folder)


class EtBundle(Bundle):
    """A loaded, hash-checked ExecuTorch export bundle (an export ``Bundle`` with a recipe; its session:
    ``EtCrispSession``, ExecuTorch's Python runtime)."""

    @property
    def recipe(self) -> str:
        return self.manifest["recipe"]

    def weights_bytes(self) -> int:
        """Bytes of the program file (weights and code: ExecuTorch keeps them in one flatbuffer)."""
        return self.file(PROGRAM).stat().st_size


def load_et_bundle(path: str | os.PathLike, verify: bool = True) -> EtBundle:
    """Read an ExecuTorch bundle folder; with ``verify`` check every recorded file's SHA-256."""
    return open_folder(path, read_et_manifest, EtBundle, verify)


__all__ = ["DECODE_METHOD", "DEFAULT_PTD", "ET_BUNDLE_FORMAT", "PROGRAM", "MIXERS_KEY", "RECIPES", "TAG_KEY", "EtBundle", "load_et_bundle"]

"""The ONNX export bundle on disk: a folder with its model(s), a manifest, reference data and tasks.

    bundle/
      manifest.json            format "crisp-edge/onnx-bundle", version 1 (see ``export_onnx``)
      model.onnx               the inference graph (+ model.onnx.data when over 100 MB)
      fold.onnx                swappable only: task tensors in, dense weights out
      reference.npz            fixed seeded inputs and the PyTorch outputs for them (no pickle)
      tasks/<name>.onnx_adapter  swappable only: one per task, ORT's own adapter format

``load_bundle`` reads the manifest, checks its envelope and every file's SHA-256, and returns a
``Bundle``; a damaged or edited file is a ``BundleError``, never a silently different model.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from crisp_edge.io import check_envelope, read_json, sha256_file

from .errors import BundleError

BUNDLE_FORMAT = "crisp-edge/onnx-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
REFERENCE = "reference.npz"
TASKS_DIR = "tasks"
ADAPTER_SUFFIX = ".onnx_adapter"
#: Above this a graph's weights go to an external data file beside it (protobuf's hard limit is
#: 2 GB; 100 MB keeps the .onnx itself quick to parse and diff).
EXTERNAL_DATA_BYTES = 100 << 20
MODES = ("dense", "factored", "swappable")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not _TASK_NAME.match(name) or name == "default":
        raise BundleError(f"task name {name!r} must be 1-64 characters of letters, digits, '_', '-', '.', "
                          "and not 'default' (the exported mixers' own name).")
    return name


def adapter_model_version(bases_sha256: str, layout: dict) -> int:
    """A 31-bit tag binding adapter files to one bundle's bases and layout.

    ``.onnx_adapter`` files carry no metadata except two integers; the model version holds this tag
    so that an adapter made for other bases is refused when loaded, not run.
    """
    blob = bases_sha256 + json.dumps(layout, sort_keys=True, separators=(",", ":"))
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def save_onnx(proto: onnx.ModelProto, path: Path) -> list[str]:
    """Save ``proto`` at ``path``, weights external when large; returns the file names written."""
    data_name = path.name + ".data"
    stale = path.parent / data_name
    if stale.exists():  # onnx.save appends to an existing data file
        stale.unlink()
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return [path.name, data_name]
    onnx.save_model(proto, str(path))
    return [path.name]


def initializer_bytes(path: Path) -> int:
    """Bytes of every initializer of the ONNX file at ``path`` (embedded or external)."""
    proto = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def file_record(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


@dataclass
class Bundle:
    """A loaded, hash-checked export bundle."""

    path: Path
    manifest: dict[str, Any]

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def tasks(self) -> dict[str, dict]:
        return dict(self.manifest.get("tasks", {}))

    def file(self, name: str) -> Path:
        return self.path / name

    def task_path(self, task: str) -> Path:
        if task not in self.manifest.get("tasks", {}):
            raise BundleError(f"bundle {self.path} has no task {task!r}; it has {sorted(self.tasks)}.")
        return self.path / self.manifest["tasks"][task]["file"]

    def session(self, threads: int = 1, **kwargs):
        """An ``OnnxCrispSession`` on this bundle (``threads`` = ORT intra-op threads)."""
        from .onnx_runtime import OnnxCrispSession

        return OnnxCrispSession(self, threads=threads, **kwargs)

    def weights_bytes(self) -> int:
        """Bytes of every weight the bundle's graphs hold (all models, not adapters)."""
        return sum(initializer_bytes(self.path / m["file"]) for m in self.manifest["models"].values())


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    meta = read_json(folder / MANIFEST, BundleError, "bundle manifest")
    check_envelope(meta, fmt=BUNDLE_FORMAT, max_version=BUNDLE_VERSION, error=BundleError,
                   where=str(folder / MANIFEST), what="ONNX bundle",
                   fields={"mode": str, "models": dict, "files": dict, "inputs": list, "outputs": list,
                           "tolerance": dict, "opset": int})
    if meta["mode"] not in MODES:
        raise BundleError(f"{folder}: unknown mode {meta['mode']!r}; expected one of {MODES}.")
    return meta


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle folder; with ``verify`` check every recorded file's SHA-256 (and the tasks')."""
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle folder (no such directory).")
    meta = read_manifest(folder)
    if verify:
        records = dict(meta["files"])
        records.update({t["file"]: t for t in meta.get("tasks", {}).values()})
        for name, rec in records.items():
            p = folder / name
            if not p.is_file():
                raise BundleError(f"{folder}: {name} is missing.")
            if sha256_file(p) != rec["sha256"]:
                raise BundleError(f"{folder}: {name} does not match its recorded SHA-256; the file was changed "
                                  "or damaged. Export the bundle again.")
    return Bundle(folder, meta)

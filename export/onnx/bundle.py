"""The ONNX export bundle on disk: a folder with its model(s), a manifest, reference data and tasks.

    bundle/
      manifest.json            format "crisp-edge/onnx-bundle", version 1 (see ``export_onnx``)
      model.onnx               the inference graph (+ model.onnx.data when over 100 MB)
      fold.onnx                swappable only: task tensors in, dense weights out
      reference.npz            fixed seeded inputs and the PyTorch outputs for them (no pickle)
      tasks/<name>.onnx_adapter  swappable only: one per task, ORT's own adapter format

``load_bundle`` reads the manifest, checks its envelope, every field the loaders use (types,
ranges, and that every file name is a plain relative path inside the bundle folder) and every file's
SHA-256, and returns an ``OnnxBundle``; a damaged or edited file is a ``BundleError``, never a silently
different model, and no manifest makes crisp-edge read a file outside the bundle folder. The fields
every bundle kind shares are checked by ``crisp_edge.export.bundle``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from crisp_edge.export.bundle import (
    _SHA256,
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
from crisp_edge.export.lm import check_lm_section
from crisp_edge.export.quantize import check_quantize_record
from crisp_edge.files.io import check_envelope

BUNDLE_FORMAT = "crisp-edge/onnx-bundle"
BUNDLE_VERSION = 1
ADAPTER_SUFFIX = ".onnx_adapter"
#: Above this a graph's weights go to an external data file beside it (protobuf's hard limit is
#: 2 GB; 100 MB keeps the .onnx itself quick to parse and diff).
EXTERNAL_DATA_BYTES = 100 << 20


def _check_swappable(swap: Any, where: str) -> None:
    if not isinstance(swap, dict):
        raise BundleError(f"{where}: a swappable bundle needs the object 'swappable' (bases, layout, overridable tensors).")
    where = f"{where}: swappable"
    if not isinstance(swap.get("bases_sha256"), str) or not _SHA256.match(swap["bases_sha256"]):
        raise BundleError(f"{where}.bases_sha256 must be 64 lower-case hex digits.")
    layout = swap.get("layout")
    check_layout_record(layout, f"{where}.layout")
    tag = swap.get("adapter_model_version")
    if not _is_int(tag, 0, 0x7FFFFFFF) or tag != bundle_tag(swap["bases_sha256"], layout):
        raise BundleError(f"{where}.adapter_model_version {tag!r:.40} is not the tag of the recorded bases and layout; "
                          "the manifest was edited. Export the bundle again.")
    over = swap.get("overridable")
    if not isinstance(over, dict) or not over or len(over) > 1 << 16:
        raise BundleError(f"{where}.overridable must be a non-empty object (tensor name -> shape).")
    for name, shape in over.items():
        if not name or len(name) > 1024:
            raise BundleError(f"{where}.overridable: tensor name {name!r:.80} is empty or too long.")
        check_shape(shape, f"{where}.overridable[{name!r}]")
    weights = swap.get("weights")
    if (not isinstance(weights, dict) or not weights
            or not all(isinstance(v, str) and k and v for k, v in weights.items())):
        raise BundleError(f"{where}.weights must be a non-empty object (fold output -> model parameter).")
    head = swap.get("head")
    if head is not None and not (isinstance(head, dict) and _is_int(head.get("num_classes"), 1)
                                 and _is_int(head.get("in_features"), 1) and isinstance(head.get("bias"), bool)
                                 and isinstance(head.get("path"), str)):
        raise BundleError(f"{where}.head must be null or an object with path, in_features, num_classes and bias; "
                          f"found {head!r:.200}.")


def check_manifest(meta: dict, folder: Path) -> dict:
    """Every field the loaders use, beyond the envelope: types, ranges, and safe file names."""
    where = str(folder / MANIFEST)
    mode = meta["mode"]
    if mode not in MODES:
        raise BundleError(f"{folder}: unknown mode {mode!r:.80}; expected one of {MODES}.")
    if not _is_int(meta["opset"], 1, 1000):
        raise BundleError(f"{where}: opset {meta['opset']!r:.40} is not an ONNX opset (1..1000).")
    files = meta["files"]
    if not files or len(files) > 1 << 16:
        raise BundleError(f"{where}: field 'files' lists no files (or absurdly many).")
    for name, rec in files.items():
        check_relpath(name, f"{where}: files")
        _record(rec, f"{where}: files[{name!r}]")
    models = meta["models"]
    roles = {"model", "fold"} if mode == "swappable" else {"model"}
    if set(models) != roles:
        raise BundleError(f"{where}: a {mode!r} bundle has the models {sorted(roles)}, the manifest lists "
                          f"{sorted(models)!r:.200}.")
    for role, rec in models.items():
        name = rec.get("file") if isinstance(rec, dict) else None
        check_relpath(name, f"{where}: models[{role!r}].file")
        if not name.endswith(".onnx") or name not in files:
            raise BundleError(f"{where}: models[{role!r}].file {name!r:.80} must be an .onnx file listed (with its "
                              "SHA-256) under 'files'.")
    _names(meta["inputs"], where, "inputs")
    _names(meta["outputs"], where, "outputs")
    check_tolerance_and_tasks(meta, where, mode, files, ADAPTER_SUFFIX)
    if mode == "swappable":
        _check_swappable(meta.get("swappable"), where)
    elif "swappable" in meta:
        raise BundleError(f"{where}: a {mode!r} bundle has no 'swappable' record; the manifest was edited.")
    check_reference_record(meta, where, files)
    check_quantize_record(meta, where)
    if "lm" in meta:
        tok = check_lm_section(meta["lm"], f"{where}: lm").get("tokenizer")
        if tok is not None and tok["file"] not in files:
            raise BundleError(f"{where}: the tokenizer {tok['file']!r:.80} is not listed (with its SHA-256) under 'files'.")
    return meta


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


def io_record(graph: onnx.GraphProto, names: list[str], outputs: bool = False) -> list[dict]:
    """The manifest's record (name, dtype, shape with symbolic axes) of the graph's inputs (or outputs) ``names``."""
    values = {v.name: v for v in (graph.output if outputs else graph.input)}
    out = []
    for n in names:
        t = values[n].type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": n, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
    return out


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


class OnnxBundle(Bundle):
    """A loaded, hash-checked ONNX export bundle (its session: ``OnnxCrispSession``)."""

    def weights_bytes(self) -> int:
        """Bytes of every weight the bundle's graphs hold (all models, not adapters)."""
        return sum(initializer_bytes(self.path / m["file"]) for m in self.manifest["models"].values())


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    meta = read_manifest_json(folder)
    check_envelope(meta, fmt=BUNDLE_FORMAT, max_version=BUNDLE_VERSION, error=BundleError,
                   where=str(folder / MANIFEST), what="ONNX bundle",
                   fields={"mode": str, "models": dict, "files": dict, "inputs": list, "outputs": list,
                           "tolerance": dict, "opset": int})
    return check_manifest(meta, folder)


def load_bundle(path: str | os.PathLike, verify: bool = True) -> OnnxBundle:
    """Read an ONNX bundle folder; with ``verify`` check every recorded file's SHA-256 (and the tasks')."""
    return open_folder(path, read_manifest, OnnxBundle, verify)

"""Per-task ``.onnx_adapter`` files for a swappable bundle, made from crisp-edge mixer files.

An adapter holds the task's tensors under the fold graph's overridable-initializer names, which are
the mixer file's own names (``mixer.<group>``, ``bias.<group>``, ``head.weight``, ``head.bias``),
in float32 (the graph's dtype; a float16 mixer file is upcast). ORT adapters carry no metadata
beyond two integers: the *model version* holds a tag of the bundle's bases and layout
(``adapter_model_version``), checked when an adapter is loaded.

Semantics: a task = the exported model with the file's tensors replacing the exported ones. A file
without a head (or without biases) keeps the exported head (biases). A file whose head has no bias
gets a zero bias, as ``apply_mixers_`` gives a bias-free head.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from crisp_edge.export.bundle import (
    Bundle,
    check_mixers_for_bundle,
    check_task_name,
)
from crisp_edge.export.errors import AdapterError, BundleError
from crisp_edge.export.onnx.adapter_format import MAX_ADAPTER_BYTES, parse_adapter
from crisp_edge.export.onnx.bundle import ADAPTER_SUFFIX, load_bundle
from crisp_edge.export.onnx.fold import CLASS_AXIS

from crisp_edge.errors import (
    BasisMismatchError,
    LayoutMismatchError,
)
from crisp_edge.files.io import atomic_write_json, read_json, read_regular, sha256_bytes
from crisp_edge.files.mixers import MixerFile, read_mixers

ADAPTER_VERSION = 1
RECORD_SUFFIX = ".json"
RECORD_FORMAT = "crisp-edge/onnx-adapter-record"


def _swap(bundle: Bundle) -> dict:
    if bundle.mode != "swappable":
        raise BundleError(f"bundle {bundle.path} is {bundle.mode!r}; per-task adapters need a 'swappable' export.")
    return bundle.manifest["swappable"]


def adapter_arrays(mf: MixerFile, swap: dict, where: str = "mixer file") -> dict[str, np.ndarray]:
    """The adapter tensors (name -> float32 array) for mixer file ``mf`` on a bundle's ``swap`` record."""
    check_mixers_for_bundle(mf, swap, where)
    over = swap["overridable"]
    arrays = {k: v.detach().cpu().float().contiguous().numpy() for k, v in mf.tensors.items()}
    unknown = sorted(set(arrays) - set(over))
    if unknown:
        raise LayoutMismatchError(f"{where}: tensors {unknown} have no place in this bundle; it can swap {sorted(over)}.")
    head = swap.get("head")
    if "head.weight" in arrays and head and head["bias"] and "head.bias" not in arrays:
        arrays["head.bias"] = np.zeros(arrays["head.weight"].shape[0], np.float32)
    if "head.bias" in arrays and "head.weight" not in arrays:
        raise LayoutMismatchError(f"{where}: has head.bias without head.weight.")
    check_arrays(arrays, over, where, _num_classes(swap))
    return arrays


def check_arrays(arrays: dict[str, np.ndarray], overridable: dict[str, list], where: str,
                 num_classes: int | None = None) -> None:
    """Names, dtypes and shapes of adapter tensors against the fold graph's overridable inputs.

    ``num_classes`` is the exported head's: an adapter with a head of another class count must
    replace every head tensor (a new head.weight under the exported head.bias cannot run)."""
    unknown = sorted(set(arrays) - set(overridable))
    if unknown:
        raise AdapterError(f"{where}: tensor names {unknown} are not overridable in this bundle's fold graph; "
                           f"valid names: {sorted(overridable)}.")
    classes = set()
    for name, a in arrays.items():
        if a.dtype != np.float32:
            raise AdapterError(f"{where}: {name} is {a.dtype}, the bundle needs float32.")
        want = overridable[name]
        ok = len(a.shape) == len(want) and all(d >= 1 if isinstance(w, str) else w == d for w, d in zip(want, a.shape))
        if not ok:
            raise AdapterError(f"{where}: {name} has shape {list(a.shape)}, the bundle needs {want} "
                               f"({CLASS_AXIS!r} = any class count from 1).")
        classes.update(d for w, d in zip(want, a.shape) if w == CLASS_AXIS)
    if len(classes) > 1:
        raise AdapterError(f"{where}: head.weight and head.bias disagree on the class count ({sorted(classes)}).")
    head = [k for k, shape in overridable.items() if CLASS_AXIS in shape]
    kept = [k for k in head if k not in arrays]  # the exported tensors the adapter leaves in place
    if classes and kept and num_classes is not None and classes != {num_classes}:
        raise AdapterError(f"{where}: a head of {classes.pop()} classes needs {sorted(head)} all in the adapter; "
                           f"it leaves the exported {kept}, of {num_classes} classes, in place.")


def record_path(path: str | os.PathLike) -> Path:
    """The record beside an adapter file that is used outside its bundle: ``<name>.onnx_adapter.json``."""
    path = Path(path)
    return path.with_name(path.name + RECORD_SUFFIX)


def write_adapter_record(path: str | os.PathLike) -> Path:
    """Write the record (SHA-256 and size) of the adapter at ``path`` beside it. An adapter given to a
    session by path is run only when it matches its record: make one only for a file you trust
    (``write_adapter`` makes it for every adapter it writes). The bases tag and tensors are checked
    from the adapter itself when it is loaded."""
    data = read_adapter_bytes(path)
    rec = {"format": RECORD_FORMAT, "version": 1, "sha256": sha256_bytes(data), "bytes": len(data)}
    atomic_write_json(record_path(path), rec)
    return record_path(path)


def check_adapter_record(data: bytes, path: Path) -> None:
    """Refuse an adapter given by path (not a task of the bundle) unless its record beside it
    (``record_path``) holds its SHA-256: one flipped bit must not run as a task."""
    rpath = record_path(path)
    if not (rpath.exists() or rpath.is_symlink()):
        raise AdapterError(f"{path} has no record {rpath.name} beside it, so its bytes cannot be verified. Add the task "
                           "to the bundle (crisp-edge export-task), or keep the record written with the adapter "
                           "(write_adapter / write_adapter_record) next to it.")
    rec = read_json(rpath, AdapterError, "adapter record", 1 << 16)
    if rec.get("format") != RECORD_FORMAT or not isinstance(rec.get("sha256"), str):
        raise AdapterError(f"{rpath} is not a crisp-edge adapter record (format {rec.get('format')!r:.60}).")
    if rec["sha256"] != sha256_bytes(data):
        raise AdapterError(f"{path} does not match the SHA-256 in {rpath.name}: the file was changed or damaged after "
                           "it was written. Convert the task's mixer file again.")


def write_adapter(arrays: dict[str, np.ndarray], path: Path, model_version: int) -> Path:
    """Write an ``.onnx_adapter`` atomically (temp file in the same folder, then rename), and its record
    (``write_adapter_record``) beside it, so that the file can also be run by path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(model_version)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fmt.export_adapter(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_adapter_record(path)
    return path


def _num_classes(swap: dict) -> int | None:
    head = swap.get("head")
    return head["num_classes"] if isinstance(head, dict) else None


def read_adapter_bytes(path: str | os.PathLike) -> bytes:
    """An adapter file's bytes (at most ``MAX_ADAPTER_BYTES``), or an ``AdapterError``."""
    return read_regular(path, AdapterError, "adapter", MAX_ADAPTER_BYTES)


def check_adapter(data: bytes, swap: dict, where: str) -> dict[str, np.ndarray]:
    """Parse an adapter's bytes (``adapter_format.parse_adapter``: the FlatBuffer checked field by
    field, never handed to ONNX Runtime before) and check it against a bundle's ``swap`` record: the
    bases tag, tensor names, dtypes and shapes. Returns its arrays (float32 copies)."""
    contents = parse_adapter(data, where)
    if contents.model_version != swap["adapter_model_version"]:
        raise BasisMismatchError(
            f"{where} was made for other bases or another layout (tag {contents.model_version}, this bundle's "
            f"{swap['adapter_model_version']}); convert the task's mixer file for this bundle with "
            "mixers_to_onnx_adapter.")
    check_arrays(contents.arrays, swap["overridable"], where, _num_classes(swap))
    return contents.arrays


def read_adapter(path: str | os.PathLike, swap: dict) -> dict[str, np.ndarray]:
    """Read and check an adapter against a bundle's ``swap`` record; returns its arrays (copies)."""
    return check_adapter(read_adapter_bytes(path), swap, str(path))


def mixers_to_onnx_adapter(mixer_file: str | os.PathLike | MixerFile, bundle_dir: str | os.PathLike,
                           name: str | None = None, *, checkpoint: str | os.PathLike | None = None) -> Path:
    """Turn a crisp-edge mixer file into ``tasks/<name>.onnx_adapter`` of an existing swappable bundle.

    The file is checked against the bundle's recorded bases fingerprint and layout (mismatches raise
    ``BasisMismatchError`` / ``LayoutMismatchError`` / ``GateMismatchError``); nothing is re-exported.
    The task's PyTorch reference is computed from ``checkpoint`` or the bundle's recorded source
    checkpoint when its bases match (else the task is recorded as unchecked:
    ``crisp_edge.export.parity.task_reference``). The manifest, replaced last, gains a ``tasks`` entry
    (file, SHA-256, sizes, labels, reference). Returns the adapter's path.
    """
    from crisp_edge.export.parity.task_reference import add_task_files, task_reference

    bundle = load_bundle(bundle_dir)
    swap = _swap(bundle)
    mf = mixer_file if isinstance(mixer_file, MixerFile) else read_mixers(mixer_file)
    task = check_task_name(name or mf.task)
    where = str(mf.path) if mf.path else f"mixer file for task {mf.task!r}"
    arrays = adapter_arrays(mf, swap, where)
    reference = task_reference(bundle, mf, task, checkpoint)
    return add_task_files(bundle, task, ADAPTER_SUFFIX, lambda p: write_adapter(arrays, p, swap["adapter_model_version"]),
                          lambda rel, data: task_record(rel, data, mf, arrays), reference)


def task_record(rel: str, data: bytes, mf: MixerFile, arrays: dict[str, np.ndarray]) -> dict:
    """The manifest's record of the task file ``rel`` (bytes ``data``) made from mixer file ``mf``."""
    head = arrays.get("head.weight")
    return {
        "file": rel, "sha256": sha256_bytes(data), "bytes": len(data),
        "tensor_bytes": int(sum(a.nbytes for a in arrays.values())), "mixer_file_raw_bytes": mf.raw_bytes,
        "tensors": {k: list(a.shape) for k, a in sorted(arrays.items())},
        "num_classes": None if head is None else int(head.shape[0]), "labels": mf.labels,
        "source_task": mf.task,
    }


def remove_task(bundle_dir: str | os.PathLike, task: str) -> None:
    """Drop a task: its manifest entry first, then its adapter and reference files."""
    from crisp_edge.export.parity.task_reference import remove_task_files

    remove_task_files(load_bundle(bundle_dir, verify=False), task)


__all__ = ["adapter_arrays", "check_adapter", "check_adapter_record", "record_path", "write_adapter_record", "mixers_to_onnx_adapter", "read_adapter",
           "read_adapter_bytes", "remove_task", "write_adapter"]

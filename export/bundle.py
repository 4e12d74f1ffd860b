"""The ONNX export bundle on disk: a folder with its model(s), a manifest, reference data and tasks.

    bundle/
      manifest.json            format "crisp-edge/onnx-bundle", version 1 (see ``export_onnx``)
      model.onnx               the inference graph (+ model.onnx.data when over 100 MB)
      fold.onnx                swappable only: task tensors in, dense weights out
      reference.npz            fixed seeded inputs and the PyTorch outputs for them (no pickle)
      tasks/<name>.onnx_adapter  swappable only: one per task, ORT's own adapter format

``load_bundle`` reads the manifest, checks its envelope, every field the loaders use (types,
ranges, and that every file name is a plain relative path inside the bundle folder) and every file's
SHA-256, and returns a ``Bundle``; a damaged or edited file is a ``BundleError``, never a silently
different model, and no manifest makes crisp-edge read a file outside the bundle folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from crisp_edge.io import check_envelope, read_json, sha256_file
from crisp_edge.io import check_relpath as io_check_relpath
from crisp_edge.io import inside as io_inside

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
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: The fields of one CRISP group in a swappable bundle's layout (the mixer files' own layout fields).
LAYOUT_INTS = ("n", "d_out", "d_in", "r", "s")
LAYOUT_STRS = ("role", "gate", "placement")
#: Sizes in a manifest are counts of elements or bytes: anything beyond this is not a real bundle.
_MAX_SIZE = 1 << 48
_MAX_RANK = 8


def check_layout_record(layout: Any, where: str) -> None:
    """A manifest's CRISP layout: a non-empty object of groups, each exactly the mixer files' layout
    fields (sizes >= 1, names), plus ``"transpose": true`` for a transposed group."""
    if not isinstance(layout, dict) or not layout or len(layout) > 1 << 16:
        raise BundleError(f"{where} must be a non-empty object of CRISP groups.")
    for key, group in layout.items():
        fields = set(LAYOUT_INTS + LAYOUT_STRS)
        if (not isinstance(group, dict) or set(group) - {"transpose"} != fields
                or group.get("transpose", True) is not True
                or not all(_is_int(group[f], 1) for f in LAYOUT_INTS)
                or not all(isinstance(group[f], str) and len(group[f]) <= 64 for f in LAYOUT_STRS)):
            raise BundleError(f"{where}[{key!r:.80}] must hold exactly {sorted(fields)} (sizes >= 1 and names), and "
                              f"\"transpose\": true only for a transposed group; found {group!r:.200}.")


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not _TASK_NAME.match(name) or name == "default":
        raise BundleError(f"task name {name!r} must be 1-64 characters of letters, digits, '_', '-', '.', "
                          "and not 'default' (the exported mixers' own name).")
    return name


def check_relpath(name: Any, where: str) -> str:
    """A file name from a manifest: a plain relative path inside the bundle folder, or a ``BundleError``
    (see ``crisp_edge.io.check_relpath``)."""
    return io_check_relpath(name, where, BundleError, "bundle")


def inside(folder: Path, name: str, where: str) -> Path:
    """``folder / name`` for a checked relative ``name``, refusing a path that resolves (through a
    symbolic link) outside ``folder`` (see ``crisp_edge.io.inside``)."""
    return io_inside(folder, name, where, BundleError, "bundle")


def _is_int(v: Any, lo: int = 0, hi: int = _MAX_SIZE) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) < 1e300 if isinstance(v, int) else math.isfinite(v)  # no float() of a 400-digit integer


def _record(rec: Any, where: str) -> dict:
    """A file record: ``sha256`` (64 lower-case hex digits) and ``bytes`` (a size)."""
    if not isinstance(rec, dict):
        raise BundleError(f"{where}: the file record must be an object with 'sha256' and 'bytes', found {type(rec).__name__}.")
    if not isinstance(rec.get("sha256"), str) or not _SHA256.match(rec["sha256"]):
        raise BundleError(f"{where}: 'sha256' must be 64 lower-case hex digits, found {rec.get('sha256')!r:.80}.")
    if not _is_int(rec.get("bytes")):
        raise BundleError(f"{where}: 'bytes' must be a file size (an integer >= 0), found {rec.get('bytes')!r:.40}.")
    return rec


def _dict(meta: dict, key: str, where: str, required: bool = True) -> dict:
    value = meta.get(key, None if required else {})
    if not isinstance(value, dict):
        raise BundleError(f"{where}: field {key!r} is missing or not an object.")
    return value


def _names(items: Any, where: str, key: str) -> None:
    if not isinstance(items, list) or not items or len(items) > 1024:
        raise BundleError(f"{where}: field {key!r} must be a non-empty list of at most 1024 entries.")
    names = []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name or len(name) > 1024:
            raise BundleError(f"{where}: every entry of {key!r} must be an object with a non-empty 'name'; found "
                              f"{item!r:.80}.")
        names.append(name)
    if len(set(names)) != len(names):
        raise BundleError(f"{where}: {key!r} names a tensor twice: {names!r:.200}.")


def check_shape(shape: Any, where: str) -> list:
    """A tensor shape from a manifest: a list of sizes (integers >= 1) or symbolic names (strings)."""
    if (not isinstance(shape, list) or len(shape) > _MAX_RANK
            or not all(_is_int(d, 1, 1 << 31) or (isinstance(d, str) and 0 < len(d) <= 64) for d in shape)):
        raise BundleError(f"{where}: shape {shape!r:.80} must be a list of at most {_MAX_RANK} sizes (integers 1..2^31) "
                          "or symbolic names.")
    return shape


def _check_swappable(swap: Any, where: str) -> None:
    if not isinstance(swap, dict):
        raise BundleError(f"{where}: a swappable bundle needs the object 'swappable' (bases, layout, overridable tensors).")
    where = f"{where}: swappable"
    if not isinstance(swap.get("bases_sha256"), str) or not _SHA256.match(swap["bases_sha256"]):
        raise BundleError(f"{where}.bases_sha256 must be 64 lower-case hex digits.")
    layout = swap.get("layout")
    check_layout_record(layout, f"{where}.layout")
    tag = swap.get("adapter_model_version")
    if not _is_int(tag, 0, 0x7FFFFFFF) or tag != adapter_model_version(swap["bases_sha256"], layout):
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


def check_tolerance_and_tasks(meta: dict, where: str, mode: str, files: dict, suffix: str) -> None:
    """The manifest fields every bundle kind shares: the parity tolerance, and the task records (valid
    names, only in a swappable bundle, files ``tasks/<name><suffix>`` with consistent hashes)."""
    tol = meta["tolerance"]
    if not (_is_number(tol.get("atol")) and tol["atol"] >= 0 and _is_number(tol.get("min_cosine"))
            and -1 <= tol["min_cosine"] <= 1):
        raise BundleError(f"{where}: tolerance needs 'atol' (a number >= 0) and 'min_cosine' (-1..1); found {tol!r:.200}.")
    tasks = _dict(meta, "tasks", where, required=False)
    if tasks and mode != "swappable":
        raise BundleError(f"{where}: a {mode!r} bundle cannot hold tasks; found {sorted(tasks)!r:.200}.")
    for task, rec in tasks.items():
        try:
            check_task_name(task)
        except BundleError as e:
            raise BundleError(f"{where}: {e}") from None
        rec = _record(rec, f"{where}: tasks[{task!r}]")
        name = check_relpath(rec.get("file"), f"{where}: tasks[{task!r}].file")
        if not (name.startswith(TASKS_DIR + "/") and name.endswith(suffix)):
            raise BundleError(f"{where}: tasks[{task!r}].file {name!r:.80} must be {TASKS_DIR}/<name>{suffix}.")
        if name in files and files[name]["sha256"] != rec["sha256"]:
            raise BundleError(f"{where}: {name!r} is recorded twice with different SHA-256s.")


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
    ref = meta.get("reference")
    if ref is not None:
        if not (isinstance(ref, dict) and ref.get("file") == REFERENCE and REFERENCE in files
                and _is_int(ref.get("cases"), 0, 1 << 16)
                and all(isinstance(ref.get(k), list) and all(isinstance(v, str) for v in ref[k])
                        for k in ("inputs", "outputs", "tasks"))):
            raise BundleError(f"{where}: 'reference' must name {REFERENCE} (listed under 'files'), a case count, and "
                              f"the input, output and task names; found {ref!r:.200}.")
    return meta


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
        """The bundle's file ``name`` (a plain relative path that stays inside the folder)."""
        return inside(self.path, name, str(self.path / MANIFEST))

    def task_path(self, task: str) -> Path:
        if not isinstance(task, str) or task not in self.manifest.get("tasks", {}):
            raise BundleError(f"bundle {self.path} has no task {task!r:.80}; it has {sorted(self.tasks)}.")
        return inside(self.path, self.manifest["tasks"][task]["file"], f"{self.path / MANIFEST}: tasks[{task!r}]")

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
    return check_manifest(meta, folder)


def verify_files(folder: Path, meta: dict) -> None:
    """Every file the manifest records (and every task's) exists and matches its size and SHA-256."""
    records = dict(meta["files"])
    records.update({t["file"]: t for t in meta.get("tasks", {}).values()})
    for name, rec in records.items():
        p = inside(folder, name, str(folder / MANIFEST))
        if not p.is_file():
            raise BundleError(f"{folder}: {name} is missing.")
        try:
            size = p.stat().st_size
            digest = sha256_file(p) if size == rec["bytes"] else None
        except (OSError, ValueError) as e:
            raise BundleError(f"{folder}: {name} cannot be read ({type(e).__name__}: {e}).") from None
        if digest != rec["sha256"]:
            what = "SHA-256" if digest else f"size ({size} bytes, recorded {rec['bytes']})"
            raise BundleError(f"{folder}: {name} does not match its recorded {what}; the file was changed "
                              "or damaged. Export the bundle again.")


def open_folder(path: str | os.PathLike, read: Any, make: Any, verify: bool) -> Any:
    """``make(folder, read(folder))`` for a bundle folder, after (with ``verify``) checking every recorded
    file's size and SHA-256: the one loading path of every bundle kind."""
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle folder (no such directory).")
    meta = read(folder)
    if verify:
        verify_files(folder, meta)
    return make(folder, meta)


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read an ONNX bundle folder; with ``verify`` check every recorded file's SHA-256 (and the tasks')."""
    return open_folder(path, read_manifest, Bundle, verify)


def task_mixers(model: Any, tasks: Any) -> list:
    """The mixer files a swappable export ships, read and checked against ``model`` (bases, layout, gate,
    dtype), with valid, distinct task names."""
    from crisp_edge.errors import ConfigError
    from crisp_edge.mixers import MixerFile, check_mixers, read_mixers

    mixers = [t if isinstance(t, MixerFile) else read_mixers(t) for t in tasks]
    for mf in mixers:
        check_mixers(model, mf)
        check_task_name(mf.task)
    if len({mf.task for mf in mixers}) != len(mixers):
        raise ConfigError(f"task names repeat: {[mf.task for mf in mixers]}.")
    return mixers


def write_validated(out_dir: Path, write: Any, make_bundle: Any, *, threads: int = 1, validate: bool = True) -> Any:
    """Write a bundle with ``write(folder) -> manifest`` into a temporary sibling of ``out_dir``, check
    its parity there (the runtime against the stored PyTorch reference; ``ParityError`` on a mismatch),
    record the result in the manifest, and only then move it into place (replacing an old bundle).
    Any failure removes the temporary folder: ``out_dir`` holds the old bundle or the new, never half."""
    import shutil
    import tempfile

    from crisp_edge.io import atomic_write_json

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        manifest = write(tmp)
        if validate:
            from .validate import validate_bundle

            report = validate_bundle(make_bundle(tmp, manifest), threads=threads)
            manifest["parity"] = {"passed": report.passed, "max_abs": report.max_abs,
                                  "checked_cases": len(report.comparisons)}
            atomic_write_json(tmp / MANIFEST, manifest)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return make_bundle(out_dir, manifest)


def feeds_by_name(feeds: Any, input_names: list[str]) -> dict[str, Any]:
    """A session's inputs by name: a dict is checked for every name, a bare array is the single input."""
    from .errors import ExportError

    if not isinstance(feeds, dict):
        if len(input_names) != 1:
            raise ExportError(f"the model takes {input_names}; pass a dict of inputs.")
        return {input_names[0]: feeds}
    missing = sorted(set(input_names) - set(feeds))
    if missing:
        raise ExportError(f"missing inputs {missing}; the model takes {input_names}.")
    return feeds

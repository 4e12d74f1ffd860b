"""The bundle contract, the same for every runtime: manifest fields, file records, task records, the
one loading path (open, verify every file's SHA-256, check every field), staged writes, and the registry
that maps a manifest's ``format`` to its runtime's loader and session.

    bundle/
      manifest.json      {"format": "crisp-edge/<runtime>-bundle", "version": 1, "mode": ..., "files": {...}, ...}
      reference.npz      fixed seeded inputs and the PyTorch outputs for them (no pickle)
      tasks/<name><suffix>   swappable only: one task file per task, in the runtime's own format
      ...                the runtime's model files (see crisp_edge.export.onnx.bundle, .executorch.bundle)

This module imports no runtime: a runtime registers itself in ``RUNTIMES`` (by module path, imported
only when a bundle of its format is opened), so generic code (parity, the command line) opens any
bundle through ``open_bundle`` and reaches its session through ``Bundle.session``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crisp_edge.export.errors import BundleError

from crisp_edge.files.io import check_relpath as io_check_relpath
from crisp_edge.files.io import inside as io_inside
from crisp_edge.files.io import read_json, sha256_file

MANIFEST = "manifest.json"
REFERENCE = "reference.npz"
TASKS_DIR = "tasks"
MODES = ("dense", "factored", "swappable")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: The fields of one CRISP group in a swappable bundle's layout (the mixer files' own layout fields).
LAYOUT_INTS = ("n", "d_out", "d_in", "r", "s")
LAYOUT_STRS = ("role", "gate", "placement")
#: Sizes in a manifest are counts of elements or bytes: anything beyond this is not a real bundle.
_MAX_SIZE = 1 << 48
MAX_MANIFEST_BYTES = 64 << 20
_MAX_RANK = 8


@dataclass(frozen=True)
class Runtime:
    """How to open a bundle format: the runtime's name and its loader and session, as ``module:attribute``;
    ``probe`` (optional, ``module`` holding ``intermediate_outputs`` and ``task_tensors``): per-layer
    outputs by PyTorch module name, for ``crisp_edge.export.parity.layers``."""

    name: str
    loader: str
    session: str
    probe: str = ""
    #: the session of a language-model bundle (a manifest with an ``lm`` section), when the runtime has one
    lm_session: str = ""

    def resolve(self, which: str) -> Any:
        module, _, attr = getattr(self, which).partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise BundleError(f"a {self.name} bundle needs {module} and its runtime, which cannot be imported here "
                              f"({type(e).__name__}: {e}); install the runtime's requirements "
                              "(pip install 'crisp-edge[export]').") from None


#: manifest ``format`` -> its runtime. A new runtime adds one entry (``register_runtime``).
RUNTIMES: dict[str, Runtime] = {
    "crisp-edge/onnx-bundle": Runtime("onnxruntime", "crisp_edge.export.onnx.bundle:load_bundle",
                                      "crisp_edge.export.onnx.session:OnnxCrispSession",
                                      "crisp_edge.export.onnx.probe:intermediate_outputs",
                                      "crisp_edge.export.onnx.lm_session:OnnxLMSession"),
    "crisp-edge/executorch-bundle": Runtime("executorch", "crisp_edge.export.executorch.bundle:load_et_bundle",
                                            "crisp_edge.export.executorch.session:EtCrispSession",
                                            "crisp_edge.export.executorch.probe:intermediate_outputs",
                                            "crisp_edge.export.executorch.lm_session:EtLMSession"),
}


def register_runtime(fmt: str, runtime: Runtime) -> None:
    """Make bundles whose manifest says ``format: fmt`` open with ``runtime``'s loader and session."""
    RUNTIMES[fmt] = runtime


def runtime_of(fmt: Any, where: str) -> Runtime:
    if fmt not in RUNTIMES:
        raise BundleError(f"{where}: format {fmt!r:.80} is not a crisp-edge bundle format; known: {sorted(RUNTIMES)}.")
    return RUNTIMES[fmt]


def bundle_runtime(path: str | os.PathLike) -> tuple[str, Callable[..., Any]]:
    """(runtime name, loader) for the bundle folder at ``path``, from its manifest's ``format``."""
    folder = _bundle_folder(path)
    meta = read_manifest_json(folder)
    runtime = runtime_of(meta.get("format"), str(folder / MANIFEST))
    return runtime.name, runtime.resolve("loader")


def _bundle_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        left = sorted(p.name for p in folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
        hint = (f"; an interrupted export left the previous bundle as {folder.parent / left[0]}: export again (it "
                "is restored first) or rename it back") if left else ""
        raise BundleError(f"{folder} is not a bundle folder (no such directory){hint}.")
    return folder


def read_manifest_json(folder: Path) -> dict:
    """The bundle's ``manifest.json`` as a JSON object: a regular file of bounded size that lies inside
    the bundle (a manifest that is a link to elsewhere, a FIFO or a device is refused). An interrupted
    multi-file update of the bundle (``crisp_edge.files.transaction``) is finished first."""
    from crisp_edge.files.transaction import UpdateError, recover_files

    try:
        recover_files(folder)
    except UpdateError as e:
        raise BundleError(str(e)) from None
    return read_json(inside(folder, MANIFEST, str(folder)), BundleError, "bundle manifest", MAX_MANIFEST_BYTES)


def open_bundle(bundle: Any) -> tuple[str, Any]:
    """(runtime name, loaded and verified bundle) for a bundle object or a bundle folder path."""
    if isinstance(bundle, (str, os.PathLike)):
        runtime, load = bundle_runtime(bundle)
        return runtime, load(bundle)
    return runtime_of(bundle.manifest.get("format"), str(bundle.path)).name, bundle


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


def check_reference_record(meta: dict, where: str, files: dict) -> None:
    """The optional ``reference`` record: the reference file (listed under ``files``), a case count and names."""
    ref = meta.get("reference")
    if ref is not None and not (isinstance(ref, dict) and ref.get("file") == REFERENCE and REFERENCE in files
                                and _is_int(ref.get("cases"), 0, 1 << 16)
                                and all(isinstance(ref.get(k), list) and all(isinstance(v, str) for v in ref[k])
                                        for k in ("inputs", "outputs", "tasks"))):
        raise BundleError(f"{where}: 'reference' must name {REFERENCE} (listed under 'files'), a case count, and the "
                          f"input, output and task names; found {ref!r:.200}.")


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not _TASK_NAME.match(name) or name == "default":
        raise BundleError(f"task name {name!r} must be 1-64 characters of letters, digits, '_', '-', '.', "
                          "and not 'default' (the exported mixers' own name).")
    return name


def check_relpath(name: Any, where: str) -> str:
    """A file name from a manifest: a plain relative path inside the bundle folder, or a ``BundleError``
    (see ``crisp_edge.files.io.check_relpath``)."""
    return io_check_relpath(name, where, BundleError, "bundle")


def inside(folder: Path, name: str, where: str) -> Path:
    """``folder / name`` for a checked relative ``name``, refusing a path that resolves (through a
    symbolic link) outside ``folder`` (see ``crisp_edge.files.io.inside``)."""
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


def check_tolerance_and_tasks(meta: dict, where: str, mode: str, files: dict, suffix: str) -> None:
    """The manifest fields every bundle kind shares: the parity tolerance, and the task records (valid
    names, only in a swappable bundle, files ``tasks/<name><suffix>`` with consistent hashes)."""
    tol = meta["tolerance"]
    if not (_is_number(tol.get("atol")) and tol["atol"] >= 0 and _is_number(tol.get("min_cosine"))
            and -1 <= tol["min_cosine"] <= 1):
        raise BundleError(f"{where}: tolerance needs 'atol' (a number >= 0) and 'min_cosine' (-1..1); found {tol!r:.200}.")
    if tol.get("min_top1") is not None and not (_is_number(tol["min_top1"]) and 0 <= tol["min_top1"] <= 1):
        raise BundleError(f"{where}: tolerance 'min_top1' must be null or a number in 0..1; found {tol['min_top1']!r:.40}.")
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


def bundle_tag(bases_sha256: str, layout: dict) -> int:
    """A 31-bit tag binding task files to one bundle's bases and layout (both runtimes).

    ``.onnx_adapter`` files carry no metadata except two integers (the model version holds this tag);
    an ExecuTorch task ``.ptd`` holds it as ``crisp.tag``: a task made for other bases is refused when
    loaded, not run.
    """
    blob = bases_sha256 + json.dumps(layout, sort_keys=True, separators=(",", ":"))
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def file_record(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


@dataclass
class Bundle:
    """A loaded, hash-checked export bundle of any runtime (subclassed by each runtime's bundle)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def runtime(self) -> str:
        return runtime_of(self.manifest.get("format"), str(self.path / MANIFEST)).name

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
        """A session of this bundle's runtime (``threads`` = the runtime's intra-op threads)."""
        runtime = runtime_of(self.manifest.get("format"), str(self.path / MANIFEST))
        lm = "lm" in self.manifest
        if lm and not runtime.lm_session:
            raise BundleError(f"{self.path} is a language-model bundle, which crisp-edge's {runtime.name} runtime "
                              "cannot run yet.")
        return runtime.resolve("lm_session" if lm else "session")(self, threads=threads, **kwargs)

    def weights_bytes(self) -> int:
        """Bytes of every weight the bundle's model files hold (not task files)."""
        raise NotImplementedError


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
    folder = _bundle_folder(path)
    meta = read(folder)
    if verify:
        verify_files(folder, meta)
    return make(folder, meta)


def task_mixers(model: Any, tasks: Any) -> list:
    """The mixer files a swappable export ships, read and checked against ``model`` (bases, layout, gate,
    dtype), with valid, distinct task names."""
    from crisp_edge.errors import ConfigError
    from crisp_edge.files.mixers import MixerFile, check_mixers, read_mixers

    mixers = [t if isinstance(t, MixerFile) else read_mixers(t) for t in tasks]
    for mf in mixers:
        check_mixers(model, mf)
        check_task_name(mf.task)
    if len({mf.task for mf in mixers}) != len(mixers):
        raise ConfigError(f"task names repeat: {[mf.task for mf in mixers]}.")
    return mixers


def check_mixers_for_bundle(mf: Any, swap: dict, where: str) -> None:
    """Refuse (with crisp-edge's mixer error types) a mixer file made for other bases, layout or dtype
    than a swappable bundle's ``swap`` record."""
    from crisp_edge.errors import BasisMismatchError, DtypeMismatchError
    from crisp_edge.files.mixers import check_layouts

    check_layouts(swap["layout"], mf.meta["layout"], where, "bundle")
    if mf.meta["dtype"] != "float32":
        raise DtypeMismatchError(f"{where}: mixers were trained in {mf.meta['dtype']}; this bundle computes in float32.")
    if mf.meta["bases_sha256"] != swap["bases_sha256"]:
        raise BasisMismatchError(
            f"{where}: task {mf.task!r} was trained on other bases (fingerprint {mf.meta['bases_sha256'][:12]}..., "
            f"the bundle's {swap['bases_sha256'][:12]}...). Its mixers would compute a wrong answer here; use the "
            "checkpoint this bundle was exported from, or adapt the task again on it.")


def check_threads(threads: Any) -> int:
    """A runtime thread count: an integer 1..1024 (``ConfigError`` otherwise, e.g. 0, which runtimes
    read as "all cores" or refuse with their own untyped errors)."""
    from crisp_edge.errors import ConfigError

    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
        raise ConfigError(f"threads must be an integer from 1 to 1024, got {threads!r:.40}.")
    return threads


def feeds_by_name(feeds: Any, input_names: list[str]) -> dict[str, Any]:
    """A session's inputs by name: a dict is checked for every name, a bare array is the single input."""
    from crisp_edge.export.errors import ExportError

    if not isinstance(feeds, dict):
        if len(input_names) != 1:
            raise ExportError(f"the model takes {input_names}; pass a dict of inputs.")
        return {input_names[0]: feeds}
    missing = sorted(set(input_names) - set(feeds))
    if missing:
        raise ExportError(f"missing inputs {missing}; the model takes {input_names}.")
    return feeds

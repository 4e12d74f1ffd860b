"""Per-task ``.ptd`` files for a swappable ExecuTorch bundle, written straight from crisp-edge mixer files.

A task ``.ptd`` is ExecuTorch's FlatTensor format (``FlatTensorSerializer``), holding in float32
``crisp.mixers``: every mixer group of the task (``mixer.<group>`` n x r x s, the mixer file's tensors)
flattened and concatenated in ascending order of their names, one entry (an entry per group cost
~114 bytes of FlatTensor tables each: 13% on top of SmolLM2's 52 KB of mixers); the head (``head.weight``
C x d, ``head.bias`` C) under its own names; ``crisp.tag``: an int64 [1] tensor with the 31-bit tag of the
bundle's bases and layout (``bundle.adapter_model_version``), and ``crisp.digest``: a uint8 [32] SHA-256
of every other tensor (``digest.py`` defines the canonical form), which vouches for a file given by path.
Loaders (Python ``EtCrispSession`` and the C++ runner) compare the tag with the program's ``crisp_tag``
method and refuse a file made for other bases or another layout *before* it runs; only then is
``crisp.mixers`` cut into the groups the manifest's ``set_task`` inputs name (the tag pins that layout,
and its length must be exactly theirs), and names, dtypes and shapes are checked against the manifest.
Files written before ``crisp.mixers`` (one entry per group, under the group's name) still load.

Semantics (as for ONNX adapters): a task = the exported model with the file's tensors replacing the
exported ones. A file without a head keeps the exported head (from ``default.ptd``). A head may have
fewer classes than the program's head capacity (``max_classes``): it is zero-padded when fed to
``set_task`` and the outputs are cut to its class count. Layer biases are fixed in the program: a
mixer file carrying ``bias.*`` tensors is refused (adapt without ``biases=True`` for this target).

    add_task("bundle/", "mnist.mixers.safetensors")    # tasks/mnist.ptd, no re-export
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
from crisp_edge.export.bundle import (
    check_mixers_for_bundle,
    check_task_name,
)
from crisp_edge.export.errors import AdapterError, BundleError
from crisp_edge.export.executorch.bundle import (
    PTD_SUFFIX,
    MIXERS_KEY,
    TAG_KEY,
    EtBundle,
    load_et_bundle,
)
from crisp_edge.export.executorch.digest import DIGEST_KEY, check_digest, ptd_digest
from crisp_edge.export.flatbuffer import FlatReader as _Reader
from crisp_edge.export.flatbuffer import Malformed as _Malformed

from crisp_edge.errors import BasisMismatchError, LayoutMismatchError
from crisp_edge.files.io import atomic_write_bytes, sha256_bytes
from crisp_edge.files.io import read_regular
from crisp_edge.files.mixers import MixerFile, read_mixers

#: No task file of mixers and a head comes near this; a larger file is refused before it is parsed.
MAX_PTD_BYTES = 1 << 30
_ALIGNMENT = 16


def _swap(bundle: EtBundle) -> dict:
    if bundle.mode != "swappable":
        raise BundleError(f"bundle {bundle.path} is {bundle.mode!r}; per-task .ptd files need a 'swappable' export.")
    return bundle.manifest["swappable"]


def _input_shapes(swap: dict) -> dict[str, list]:
    return {i["name"]: i["shape"] for i in swap["set_task_inputs"]}


def task_arrays(mf: MixerFile, swap: dict, where: str = "mixer file") -> dict[str, np.ndarray]:
    """The task tensors (name -> float32 array) that mixer file ``mf`` gives a bundle's ``swap`` record.

    Refuses (``BasisMismatchError``, ``LayoutMismatchError``, ``GateMismatchError``, ``AdapterError``) a
    file for other bases, layout or gate, layer biases, and a head that does not fit the program."""
    check_mixers_for_bundle(mf, swap, where)
    arrays = {k: v.detach().cpu().float().contiguous().numpy() for k, v in mf.tensors.items()}
    biases = sorted(k for k in arrays if k.startswith("bias."))
    if biases:
        raise LayoutMismatchError(f"{where}: carries layer biases {biases[:3]}...; this ExecuTorch bundle swaps mixers "
                                  "and the head only (biases are fixed in the program). Adapt without biases.")
    head = swap.get("head")
    if "head.weight" in arrays and "head.bias" not in arrays:
        arrays["head.bias"] = np.zeros(arrays["head.weight"].shape[0], np.float32)  # as apply_mixers_ gives
    if "head.bias" in arrays and "head.weight" not in arrays:
        raise LayoutMismatchError(f"{where}: has head.bias without head.weight.")
    if "head.weight" in arrays and head is None:
        raise LayoutMismatchError(f"{where}: has a task head, but the exported model has no linear head to replace.")
    check_task_arrays(arrays, swap, where)
    return arrays


def check_task_arrays(arrays: dict[str, np.ndarray], swap: dict, where: str) -> int | None:
    """Names, dtypes, shapes and values of task tensors against the program; returns the head's class
    count (None when the task keeps the exported head)."""
    shapes = _input_shapes(swap)
    unknown = sorted(set(arrays) - set(shapes))
    if unknown:
        raise AdapterError(f"{where}: tensors {unknown} have no place in this bundle; set_task takes {sorted(shapes)}.")
    missing = sorted(k for k in shapes if not k.startswith("head.") and k not in arrays)
    if missing:
        raise AdapterError(f"{where}: lacks the mixers {missing}; a task file holds every group's mixers.")
    if ("head.weight" in arrays) != ("head.bias" in arrays):
        raise AdapterError(f"{where}: holds only one of head.weight and head.bias.")
    classes = None
    for name, a in arrays.items():
        want = list(shapes[name])
        if a.dtype != np.float32:
            raise AdapterError(f"{where}: {name} is {a.dtype}; the program takes float32.")
        if name.startswith("head."):  # rows: any class count up to the program's head capacity
            rows = a.shape[0] if a.ndim else 0
            if a.ndim != len(want) or list(a.shape[1:]) != want[1:] or not 1 <= rows <= want[0]:
                raise AdapterError(f"{where}: {name} has shape {list(a.shape)}; the program takes up to {want} "
                                   f"(at most {want[0]} classes: export the bundle with a larger max_classes, "
                                   "--max-classes on the command line, to ship larger heads).")
            if classes not in (None, rows):
                raise AdapterError(f"{where}: head.weight and head.bias disagree on the class count.")
            classes = rows
        elif list(a.shape) != want:
            raise AdapterError(f"{where}: {name} has shape {list(a.shape)}; the program takes {want}.")
        if not np.isfinite(a).all():
            raise AdapterError(f"{where}: {name} holds NaN or infinite values.")
    return classes


def _mixer_names(names) -> list[str]:
    """The mixer groups among ``names`` (every task tensor but the head), in ``crisp.mixers`` order."""
    return sorted(k for k in names if not k.startswith("head."))


def pack_mixers(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with every mixer group replaced by one ``crisp.mixers`` (float32 [N]): the groups
    flattened and concatenated by name; the head keeps its own tensors."""
    out = {k: v for k, v in arrays.items() if k.startswith("head.")}
    mixers = _mixer_names(arrays)
    if mixers:
        out[MIXERS_KEY] = np.concatenate([np.ascontiguousarray(arrays[k], np.float32).ravel() for k in mixers])
    return out


def unpack_mixers(arrays: dict[str, np.ndarray], swap: dict, where: str) -> dict[str, np.ndarray]:
    """``arrays`` (a task file's tensors) with ``crisp.mixers`` cut into the mixer groups ``set_task``
    takes (the manifest's names and shapes, by name). Only after the file's tag matched the bundle's: the
    tag pins the layout, so the cut is the one the file was written with. A file without ``crisp.mixers``
    (written before it) is returned as it is."""
    packed = arrays.pop(MIXERS_KEY, None)
    if packed is None:
        return arrays
    shapes = _input_shapes(swap)
    names = _mixer_names(shapes)
    sizes = [math.prod(shapes[k]) for k in names]
    if packed.dtype != np.float32 or packed.ndim != 1 or packed.size != sum(sizes):
        raise AdapterError(f"{where}: its {MIXERS_KEY!r} is {packed.dtype} {list(packed.shape)}; this bundle's "
                           f"{len(names)} mixer groups take float32 [{sum(sizes)}]. Convert the task's mixer file "
                           "for this bundle (`crisp-edge export-task BUNDLE MIXERS.safetensors`).")
    twice = sorted(set(names) & set(arrays))
    if twice:
        raise AdapterError(f"{where}: holds {twice[:3]} both in {MIXERS_KEY!r} and as tensors of their own.")
    ends = np.cumsum(sizes)
    for k, end, n in zip(names, ends, sizes):
        arrays[k] = packed[end - n:end].reshape(shapes[k])
    return arrays


def ptd_bytes(arrays: dict[str, np.ndarray], tag: int) -> bytes:
    """A FlatTensor (``.ptd``) file's bytes holding ``arrays`` (float32; the mixer groups packed into
    ``crisp.mixers``), the ``crisp.tag`` tensor, and ``crisp.digest`` over all of them
    (``digest.ptd_digest``: what vouches for a task file handed over by path)."""
    tensors = {k: np.ascontiguousarray(v) for k, v in sorted(pack_mixers(arrays).items())}
    tensors[TAG_KEY] = np.array([tag], np.int64)
    if any(t.ndim == 0 for t in tensors.values()):
        raise AdapterError("task tensors are never 0-d (the FlatTensor serializer would store them as [1]).")
    tensors[DIGEST_KEY] = ptd_digest(tensors)
    return flat_tensor_bytes(tensors)


def flat_tensor_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """ExecuTorch's FlatTensor bytes (``FlatTensorSerializer``) holding ``tensors`` as given, in order."""
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.exir.tensor_layout import TensorLayout
    from executorch.extension.flat_tensor.serialize.serialize import (
        FlatTensorConfig,
        FlatTensorSerializer,
    )

    buffers, named = [], {}
    for i, (k, a) in enumerate(tensors.items()):
        t = torch.from_numpy(np.ascontiguousarray(a))
        buffers.append(t.numpy().tobytes())
        named[k] = DataEntry(buffer_index=i, alignment=_ALIGNMENT, tensor_layout=TensorLayout.from_tensor(t))
    return bytes(FlatTensorSerializer(FlatTensorConfig(segment_alignment=_ALIGNMENT)).serialize(DataPayload(buffers=buffers, named_data=named)))


#: ExecuTorch ScalarType codes (scalar_type.fbs) of the tensors a task file may hold.
_DTYPES = {6: np.float32, 4: np.int64, 0: np.uint8}
_HEADER_MAGIC = b"FH01"
_HEADER_BYTES = 40


def _u64(r: _Reader, pos: int, what: str) -> int:
    r._at(pos, 8, what)
    return struct.unpack_from("<Q", r.data, pos)[0]


def _u8(r: _Reader, pos: int, what: str) -> int:
    if pos < 0 or pos >= r.n:
        raise _Malformed(f"{what} at byte {pos} lies outside the file ({r.n} bytes)")
    return r.data[pos]


def parse_ptd(data: bytes, where: str) -> dict[str, np.ndarray]:
    """Every tensor of a FlatTensor (``.ptd``) file's bytes, as copies.

    A strict pure-Python reader of the FlatTensor FlatBuffer (flat_tensor.fbs), with adapter_format's
    bounds- and alignment-checked reader: the extended header (``FH01``), every segment inside the
    segment data, every tensor contiguous (identity dim order) of a known dtype and holding exactly
    its shape's bytes. Anything else is an ``AdapterError`` naming what is wrong. (ExecuTorch's own
    Python reader shells out to ``flatc`` and trusts what it gets: too slow for a task switch.)"""
    if len(data) < 8 + _HEADER_BYTES or data[4:8] != b"FT01":
        raise AdapterError(f"{where} is not an ExecuTorch .ptd file (no FT01 FlatTensor identifier; {len(data)} bytes).")
    try:
        return _parse_ptd(_Reader(bytes(data)))
    except _Malformed as e:
        raise AdapterError(f"{where} is a damaged or truncated .ptd file ({e}).") from None


def _parse_ptd(r: _Reader) -> dict[str, np.ndarray]:
    if r.data[8:12] != _HEADER_MAGIC:
        raise _Malformed("no FH01 extended header at byte 8")
    length, fb_off, fb_size, seg_base, seg_size = struct.unpack_from("<IQQQQ", r.data, 12)
    if length < _HEADER_BYTES or fb_off + fb_size > r.n or seg_base + seg_size > r.n or seg_base < fb_off + fb_size:
        raise _Malformed(f"the header's offsets (flatbuffer {fb_off}+{fb_size}, segments {seg_base}+{seg_size}) "
                         f"do not fit the file's {r.n} bytes")
    version_at, segments_at, named_at = r.table(r.follow(0, "root table"), "FlatTensor", 3)
    if version_at is not None and r.u32(version_at, "version") > 0:
        raise _Malformed(f"FlatTensor version {r.u32(version_at, 'version')} is newer than this reader (0)")
    if segments_at is None or named_at is None:
        raise _Malformed("it has no segment list or no named data")
    segments = []
    start, count = r.vector(segments_at, 4, "segment list")
    for i in range(count):
        off_at, size_at = r.table(r.follow(start + 4 * i, f"segment {i}"), f"segment {i}", 2)
        off = 0 if off_at is None else _u64(r, off_at, f"segment {i} offset")
        size = 0 if size_at is None else _u64(r, size_at, f"segment {i} size")
        if off + size > seg_size:
            raise _Malformed(f"segment {i} ({off}+{size}) lies outside the segment data ({seg_size} bytes)")
        segments.append((seg_base + off, size))
    out: dict[str, np.ndarray] = {}
    start, count = r.vector(named_at, 4, "named data list")
    for i in range(count):
        what = f"tensor {i}"
        key_at, seg_at, layout_at = r.table(r.follow(start + 4 * i, what), what, 3)
        if key_at is None or layout_at is None:
            raise _Malformed(f"{what} has no key or no tensor layout")
        key = r.string(key_at, f"{what} key")
        what = f"tensor {key!r}"
        if key in out:
            raise _Malformed(f"{what} appears twice")
        seg = 0 if seg_at is None else r.u32(seg_at, f"{what} segment index")
        if seg >= len(segments):
            raise _Malformed(f"{what} names segment {seg}; the file has {len(segments)}")
        type_at, sizes_at, order_at = r.table(r.follow(layout_at, f"{what} layout"), f"{what} layout", 3)
        code = 0 if type_at is None else _u8(r, type_at, f"{what} dtype")
        if code not in _DTYPES:
            raise _Malformed(f"{what} has dtype code {code}; task files hold float32 and int64 tensors only")
        sizes: list[int] = []
        if sizes_at is not None:
            s0, rank = r.vector(sizes_at, 4, f"{what} sizes")
            if rank > 8:
                raise _Malformed(f"{what} has {rank} dimensions")
            sizes = list(struct.unpack_from(f"<{rank}i", r.data, s0))
        order = []
        if order_at is not None:
            o0, n = r.vector(order_at, 1, f"{what} dim order")
            order = list(r.data[o0:o0 + n])
        if any(d < 0 for d in sizes) or order != list(range(len(sizes))):
            raise _Malformed(f"{what} has sizes {sizes} and dim order {order}; expected a contiguous tensor")
        dtype = np.dtype(_DTYPES[code])
        numel = math.prod(sizes)
        pos, size = segments[seg]
        if numel * dtype.itemsize != size:
            raise _Malformed(f"{what} has shape {sizes} but its segment holds {size} bytes")
        out[key] = np.frombuffer(r.data, dtype=dtype.newbyteorder("<"), count=numel, offset=pos).reshape(sizes).astype(dtype)
    return out


def read_ptd_bytes(path: str | os.PathLike) -> bytes:
    return read_regular(path, AdapterError, "task file", MAX_PTD_BYTES)


def check_task_ptd(data: bytes, swap: dict, where: str, hashed: bool = False) -> tuple[dict[str, np.ndarray], int | None]:
    """Parse a task ``.ptd`` and check it against a bundle's ``swap`` record: its ``crisp.digest``, the
    bases tag, then names, dtypes and shapes. Returns (float32 task arrays, head class count or None).

    ``hashed``: the caller checked ``data`` against a SHA-256 recorded in the bundle's manifest. That pins
    every byte of the file, its ``crisp.digest`` included, so the digest (which vouches for a file handed
    over by path, outside any manifest) is not recomputed: it could only agree. Only then may a file lack
    ``crisp.digest`` (task files written before digests, inside their bundle). A file given by path
    (``hashed=False``) must carry a digest, and match it."""
    arrays = parse_ptd(data, where)
    ok = None if hashed else check_digest(arrays)
    if ok is False:
        raise AdapterError(f"{where}: its contents do not match its {DIGEST_KEY!r} (damaged or edited after export). "
                           "Re-export the task with `crisp-edge export-task BUNDLE MIXERS.safetensors`.")
    arrays.pop(DIGEST_KEY, None)
    tag = arrays.pop(TAG_KEY, None)
    if tag is None or tag.dtype != np.int64 or tag.shape != (1,):
        raise AdapterError(f"{where} holds no {TAG_KEY!r} tensor: it is not a crisp-edge task file. Write it with "
                           "crisp_edge.export.executorch.tasks.add_task from the task's mixer file.")
    if int(tag[0]) != swap["tag"]:
        raise BasisMismatchError(
            f"{where} was made for other bases or another layout (tag {int(tag[0])}, this bundle's {swap['tag']}); "
            "its mixers would compute a wrong answer here. Convert the task's mixer file for this bundle (add_task).")
    if ok is None and not hashed:
        raise AdapterError(f"{where} carries no {DIGEST_KEY!r}: a task file given by path must (it was written before "
                           "task files carried one, or not by crisp-edge). Re-export the task with `crisp-edge "
                           "export-task BUNDLE MIXERS.safetensors`, or ship it inside the bundle, whose manifest hashes it.")
    arrays = unpack_mixers(arrays, swap, where)
    return arrays, check_task_arrays(arrays, swap, where)


def write_task_ptd(arrays: dict[str, np.ndarray], path: Path, tag: int) -> Path:
    """Write a task ``.ptd`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ptd_bytes(arrays, tag))
    return path


def task_record(rel: str, data: bytes, mf: MixerFile, arrays: dict[str, np.ndarray]) -> dict:
    """The manifest's record of the task file ``rel`` (bytes ``data``) made from mixer file ``mf``."""
    head = arrays.get("head.weight")
    return {
        "file": rel, "sha256": sha256_bytes(data), "bytes": len(data),
        "tensor_bytes": int(sum(a.nbytes for a in arrays.values())), "mixer_file_raw_bytes": mf.raw_bytes,
        "num_classes": None if head is None else int(head.shape[0]), "labels": mf.labels, "source_task": mf.task,
    }


def add_task(bundle_dir: str | os.PathLike, mixer_file: str | os.PathLike | MixerFile, name: str | None = None, *,
             checkpoint: str | os.PathLike | None = None) -> Path:
    """Turn a mixer file into ``tasks/<name>.ptd`` of an existing swappable ExecuTorch bundle (no re-export).

    The file is checked against the bundle's recorded bases fingerprint and layout first; the task's
    PyTorch reference is computed from ``checkpoint`` or the bundle's recorded source checkpoint when
    its bases match (else the task is recorded as unchecked: ``crisp_edge.export.parity.task_reference``);
    the manifest, replaced last, gains a ``tasks`` entry (file, SHA-256, sizes, labels, reference).
    Returns the ``.ptd`` path."""
    from crisp_edge.export.parity.task_reference import add_task_files, task_reference

    bundle = load_et_bundle(bundle_dir)
    swap = _swap(bundle)
    mf = mixer_file if isinstance(mixer_file, MixerFile) else read_mixers(mixer_file)
    task = check_task_name(name or mf.task)
    arrays = task_arrays(mf, swap, str(mf.path) if mf.path else f"mixer file for task {mf.task!r}")
    reference = task_reference(bundle, mf, task, checkpoint)
    return add_task_files(bundle, task, PTD_SUFFIX, lambda p: write_task_ptd(arrays, p, swap["tag"]),
                          lambda rel, data: task_record(rel, data, mf, arrays), reference)


__all__ = ["add_executorch_task", "add_task", "check_task_ptd", "flat_tensor_bytes", "pack_mixers", "parse_ptd", "ptd_bytes", "read_ptd_bytes",
           "task_arrays", "unpack_mixers", "write_task_ptd"]


#: The name this module is exported under by ``crisp_edge.export``.
add_executorch_task = add_task

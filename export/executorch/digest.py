"""Content records that bind ExecuTorch bundle files to what they claim to be (pure numpy + hashlib).

Two records, each computed identically by Python and by the C++ runner
(``export/executorch/runner``; ``crisp_et_runner --ptd-digest FILE`` and ``--io-spec BUNDLE`` print
its side):

**crisp.digest** - a task ``.ptd`` file's own content digest, so that a task file handed over by path
(outside any bundle, hence covered by no manifest hash) can be checked before it runs. It is a
``uint8 [32]`` tensor named ``crisp.digest`` inside the file, equal to SHA-256 over this canonical
serialization of *every other* tensor of the file (``crisp.tag`` included, so the digest also pins
the bases tag)::

    b"crisp-edge/ptd-digest/v1\\n"                    the domain string (25 bytes)
    u32  number of tensors (crisp.digest excluded)
    then per tensor, by name in ascending bytewise (UTF-8) order:
      u32  byte length of the name, then the name's UTF-8 bytes
      u8   dtype code, ExecuTorch's ScalarType: 0 uint8, 4 int64, 6 float32 (nothing else is allowed)
      u8   rank
      i64  each dimension (rank of them)
      u64  byte length of the data (= product of dims * item size)
      the data: the tensor's elements in C (row-major) order, little-endian

All integers are little-endian. The digest does not depend on the FlatTensor layout (alignment,
segment order, padding), only on names, dtypes, shapes and values.

**crisp_io** - a constant method of the exported program (an int64) equal to ``io_tag(manifest)``:
the first 60 bits of SHA-256 over ``io_spec_text(manifest)``, the bundle's I/O contract as text
(mode; inputs and outputs with dtype and shape, in order; for swappable bundles the ``set_task``
inputs in order, the head record and the bases tag). A loader recomputes it from ``manifest.json``
and compares: a manifest whose names, order or shapes were edited (two same-shaped ``set_task``
inputs swapped, an output renamed, ``swappable`` changed to ``dense``) no longer describes the
program and is refused, even though every file hash in it still matches.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np

#: The tensor holding a task file's content digest (uint8 [32]).
DIGEST_KEY = "crisp.digest"
DIGEST_DOMAIN = b"crisp-edge/ptd-digest/v1\n"
#: ExecuTorch ScalarType codes of the dtypes a task file may hold.
DTYPE_CODES = {np.dtype(np.uint8): 0, np.dtype(np.int64): 4, np.dtype(np.float32): 6}
IO_DOMAIN = "crisp-edge/io/v1"
#: The name of the program's constant method holding ``io_tag`` (absent in programs exported before it).
IO_METHOD = "crisp_io"


def _canonical_parts(arrays: Mapping[str, np.ndarray]):
    """The canonical serialization (module docstring) of ``arrays``, ``crisp.digest`` left out, piece by piece: each
    tensor's data as a view of its (little-endian, C-order) values, not a copy."""
    items = sorted(((k.encode("utf-8"), np.asarray(v)) for k, v in arrays.items() if k != DIGEST_KEY),
                   key=lambda kv: kv[0])
    yield DIGEST_DOMAIN + struct.pack("<I", len(items))
    for name, a in items:
        if a.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name.decode()!r} has dtype {a.dtype}; task files hold float32, int64 and uint8 only.")
        if a.ndim > 255:
            raise ValueError(f"tensor {name.decode()!r} has {a.ndim} dimensions.")
        data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False)
        yield (struct.pack("<I", len(name)) + name + struct.pack("<BB", DTYPE_CODES[a.dtype], a.ndim)
               + struct.pack(f"<{a.ndim}q", *a.shape) + struct.pack("<Q", data.nbytes))
        yield memoryview(data.reshape(-1)).cast("B")


def canonical_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The canonical serialization (module docstring) of ``arrays``, ``crisp.digest`` left out."""
    return b"".join(_canonical_parts(arrays))


def ptd_digest(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The ``crisp.digest`` tensor (uint8 [32]) of a task file holding ``arrays`` (and the digest): SHA-256 of the
    canonical serialization, fed piece by piece (a switch from a file by path pays no copy of the task's data)."""
    h = hashlib.sha256()
    for part in _canonical_parts(arrays):
        h.update(part)
    return np.frombuffer(h.digest(), np.uint8).copy()


def check_digest(arrays: Mapping[str, np.ndarray]) -> bool | None:
    """None when ``arrays`` hold no ``crisp.digest``; else whether it matches the other tensors.

    A ``crisp.digest`` that is not a uint8 [32] tensor counts as not matching."""
    stored = arrays.get(DIGEST_KEY)
    if stored is None:
        return None
    stored = np.asarray(stored)
    if stored.dtype != np.uint8 or stored.shape != (32,):
        return False
    return bool(np.array_equal(stored, ptd_digest(arrays)))


def _dims(shape) -> str:
    return ",".join(str(int(d)) for d in shape)


def io_spec_text(manifest: Mapping) -> str:
    """The bundle's I/O contract as text (the bytes the C++ runner's ``--io-spec`` prints, less its tag line)."""
    lines = [IO_DOMAIN, f"mode {manifest['mode']}"]
    lines += [f"input {i['name']} {i.get('dtype', 'float32')} {_dims(i['shape'])}" for i in manifest["inputs"]]
    lines += [f"output {o['name']} {o.get('dtype', 'float32')} {_dims(o['shape'])}" for o in manifest["outputs"]]
    if manifest["mode"] == "swappable":
        swap = manifest["swappable"]
        lines += [f"set_task {i['name']} float32 {_dims(i['shape'])}" for i in swap["set_task_inputs"]]
        head = swap.get("head")
        lines.append(f"head {head['num_classes']} {head['max_classes']} {head['in_features']}" if head else "head none")
        lines.append(f"tag {swap['tag']}")
    return "\n".join(lines) + "\n"


def io_tag(manifest: Mapping) -> int:
    """The program's ``crisp_io`` constant for ``manifest``: the first 60 bits of SHA-256(io_spec_text)."""
    return int(hashlib.sha256(io_spec_text(manifest).encode()).hexdigest()[:15], 16)


__all__ = ["DIGEST_KEY", "IO_METHOD", "canonical_bytes", "check_digest", "io_spec_text", "io_tag", "ptd_digest"]

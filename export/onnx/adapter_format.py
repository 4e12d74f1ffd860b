"""A strict, pure-Python reader of ONNX Runtime's ``.onnx_adapter`` files (a FlatBuffer).

ONNX Runtime's own loaders (``LoraAdapter.Load``, ``AdapterFormat.read_adapter``) run FlatBuffers'
structural verifier but then trust the contents: a parameter without ``dims`` or ``raw_data``
dereferences a null pointer, and ``raw_data`` shorter than its ``dims`` say is read past its end.
So crisp-edge never hands ORT a file it has not parsed here first: every offset is bounds- and
alignment-checked, every field the loader needs must be present, each tensor must be float32 and
hold exactly the bytes its shape needs, and values must be finite. Anything else is an
``AdapterError`` naming what is wrong.

The schema (onnxruntime/lora/adapter_format/adapter_schema.fbs), file identifier ``TORT``::

    table Parameter { name:string; dims:[int64]; data_type:TensorDataType (int32); raw_data:[uint8]; }
    table Adapter   { format_version:int; adapter_version:int; model_version:int; parameters:[Parameter]; }
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from crisp_edge.export.errors import AdapterError
from crisp_edge.export.flatbuffer import FlatReader as _Reader
from crisp_edge.export.flatbuffer import Malformed as _Malformed

IDENTIFIER = b"TORT"
#: The adapter format versions ONNX Runtime reads (``kAdapterFormatVersion``).
FORMAT_VERSIONS = (1,)
#: TensorDataType.FLOAT: the only element type a crisp-edge fold graph takes.
FLOAT = 1
_TYPE_NAMES = {0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
               8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64",
               15: "COMPLEX128", 16: "BFLOAT16"}
#: FlatBuffers' own limit is 2 GiB; no adapter of mixers and a head comes near this.
MAX_ADAPTER_BYTES = 1 << 30
MAX_RANK = 8
MAX_PARAMETERS = 1 << 16


@dataclass
class AdapterContents:
    """What an ``.onnx_adapter`` holds, checked and copied out of the file's bytes."""

    format_version: int
    adapter_version: int
    model_version: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def parse_adapter(data: bytes, where: str = "adapter") -> AdapterContents:
    """Parse and check an ``.onnx_adapter`` file's bytes; raise ``AdapterError`` on anything ORT could
    misread. Returns the header integers and the tensors (float32 copies, by name)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AdapterError(f"{where}: expected the file's bytes, got {type(data).__name__}.")
    data = bytes(data)
    if len(data) > MAX_ADAPTER_BYTES:
        raise AdapterError(f"{where} is {len(data):,} bytes, larger than any adapter crisp-edge reads "
                           f"({MAX_ADAPTER_BYTES:,}).")
    if len(data) < 16 or data[4:8] != IDENTIFIER:
        raise AdapterError(f"{where} is not an .onnx_adapter file (no {IDENTIFIER.decode()!r} FlatBuffer identifier "
                           f"at bytes 4-8; {len(data)} bytes in all). The file is damaged or of another format.")
    try:
        return _parse(_Reader(data))
    except _Malformed as e:
        raise AdapterError(f"{where} is a damaged .onnx_adapter file ({e}). Write it again with "
                           "mixers_to_onnx_adapter.") from None


def _parse(r: _Reader) -> AdapterContents:
    root = r.follow(0, "root table")
    fv, av, mv, params = r.table(root, "adapter", 4)
    ints = [0 if p is None else r.i32(p, "adapter header") for p in (fv, av, mv)]
    if ints[0] not in FORMAT_VERSIONS:
        raise _Malformed(f"adapter format version {ints[0]} is not one ONNX Runtime reads ({FORMAT_VERSIONS})")
    if params is None:
        raise _Malformed("it has no parameter list")
    start, count = r.vector(params, 4, "parameter list")
    if count > MAX_PARAMETERS:
        raise _Malformed(f"{count} parameters, more than {MAX_PARAMETERS}")
    arrays: dict[str, np.ndarray] = {}
    for i in range(count):
        what = f"parameter {i}"
        name_at, dims_at, type_at, raw_at = r.table(r.follow(start + 4 * i, what), what, 4)
        if name_at is None or dims_at is None or raw_at is None:
            missing = [f for f, p in (("name", name_at), ("dims", dims_at), ("raw_data", raw_at)) if p is None]
            raise _Malformed(f"{what} has no {', '.join(missing)}")
        name = r.string(name_at, f"{what} name")
        what = f"parameter {name!r}"
        if not name:
            raise _Malformed(f"{what}: empty name")
        if name in arrays:
            raise _Malformed(f"{what} appears twice")
        d0, rank = r.vector(dims_at, 8, f"{what} dims")
        if rank > MAX_RANK:
            raise _Malformed(f"{what} has {rank} dimensions, more than {MAX_RANK}")
        dims = list(struct.unpack_from(f"<{rank}q", r.data, d0))
        if any(d < 0 for d in dims):
            raise _Malformed(f"{what} has negative dimensions {dims}")
        dtype = 0 if type_at is None else r.i32(type_at, f"{what} data type")
        if dtype != FLOAT:
            raise _Malformed(f"{what} is {_TYPE_NAMES.get(dtype, f'type code {dtype}')}; crisp-edge adapters hold "
                             "float32 (FLOAT) tensors only")
        raw0, nbytes = r.vector(raw_at, 1, f"{what} raw_data")
        numel = 1
        for d in dims:
            numel *= d
        if numel * 4 != nbytes:
            raise _Malformed(f"{what} has shape {dims} ({numel} float32 values) but {nbytes} bytes of data")
        if numel == 0:
            array = np.zeros(dims, np.float32)
        else:
            array = np.frombuffer(r.data, dtype="<f4", count=numel, offset=raw0).reshape(dims).astype(np.float32)
        if not np.isfinite(array).all():
            raise _Malformed(f"{what} holds NaN or infinite values")
        arrays[name] = array
    return AdapterContents(ints[0], ints[1], ints[2], arrays)


__all__ = ["MAX_ADAPTER_BYTES", "AdapterContents", "parse_adapter"]

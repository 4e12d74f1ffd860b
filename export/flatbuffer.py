"""A strict, bounds- and alignment-checked FlatBuffers reader, for the task files of both runtimes
(ONNX Runtime's ``.onnx_adapter``, ExecuTorch's FlatTensor ``.ptd``): every offset is checked against
the file before it is followed, so a damaged or hostile file is a ``Malformed`` naming what is wrong,
never an out-of-bounds read, a crash or a hang."""
from __future__ import annotations

import struct


class Malformed(Exception):
    """A structural problem; the caller turns it into its own error type with the file's name."""


class FlatReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.n = len(data)

    def _at(self, pos: int, size: int, what: str) -> None:
        if pos < 0 or pos + size > self.n:
            raise Malformed(f"{what} at byte {pos} lies outside the file ({self.n} bytes)")
        if pos % size:
            raise Malformed(f"{what} at byte {pos} is not {size}-byte aligned")

    def u16(self, pos: int, what: str) -> int:
        self._at(pos, 2, what)
        return struct.unpack_from("<H", self.data, pos)[0]

    def u32(self, pos: int, what: str) -> int:
        self._at(pos, 4, what)
        return struct.unpack_from("<I", self.data, pos)[0]

    def i32(self, pos: int, what: str) -> int:
        self._at(pos, 4, what)
        return struct.unpack_from("<i", self.data, pos)[0]

    def follow(self, pos: int, what: str) -> int:
        """The target of the uoffset stored at ``pos``."""
        off = self.u32(pos, what)
        if off == 0 or off >= 1 << 31 or pos + off >= self.n:
            raise Malformed(f"{what}: offset {off} at byte {pos} points outside the file")
        return pos + off

    def table(self, pos: int, what: str, nfields: int) -> list[int | None]:
        """The absolute positions of a table's fields (None when absent), each checked in bounds."""
        vt = pos - self.i32(pos, what)
        vt_size = self.u16(vt, f"{what} vtable")
        tbl_size = self.u16(vt + 2, f"{what} vtable")
        if vt_size < 4 or vt_size % 2 or vt + vt_size > self.n:
            raise Malformed(f"{what}: vtable of {vt_size} bytes at byte {vt} is malformed")
        if tbl_size < 4 or pos + tbl_size > self.n:
            raise Malformed(f"{what}: table of {tbl_size} bytes at byte {pos} runs past the end of the file")
        fields: list[int | None] = []
        for i in range(nfields):
            slot = 4 + 2 * i
            fo = self.u16(vt + slot, f"{what} vtable") if slot < vt_size else 0
            if fo and (fo < 4 or fo + 4 > tbl_size):
                raise Malformed(f"{what}: field {i} at offset {fo} lies outside its table ({tbl_size} bytes)")
            fields.append(pos + fo if fo else None)
        return fields

    def vector(self, pos: int, elem: int, what: str) -> tuple[int, int]:
        """(start of the elements, element count) of the vector whose uoffset is at ``pos``."""
        v = self.follow(pos, what)
        count = self.u32(v, f"{what} length")
        start = v + 4
        if count * elem > self.n - start:
            raise Malformed(f"{what}: {count} elements of {elem} bytes run past the end of the file")
        if elem > 1 and start % elem:
            raise Malformed(f"{what}: elements at byte {start} are not {elem}-byte aligned")
        return start, count

    def string(self, pos: int, what: str) -> str:
        start, count = self.vector(pos, 1, what)
        if start + count >= self.n or self.data[start + count] != 0:
            raise Malformed(f"{what}: string is not NUL-terminated inside the file")
        try:
            return self.data[start:start + count].decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"{what}: not valid UTF-8") from None

"""Handing back the resident memory of a file that a runtime keeps memory-mapped (Linux; elsewhere a no-op).

ONNX Runtime maps a graph's external data file (``*.onnx.data``) rather than copying it, so a swappable
bundle's bases, read by the fold graph once per task switch, stay resident as file pages for the session's
life: as many bytes as the dense weights at full capacity. ``release_file_pages`` advises the kernel
(``madvise(MADV_DONTNEED)``) that the mapping's pages are not needed now: they leave the process's resident
set and the next switch reads them again, from the page cache while it holds them (measured on SmolLM2-shaped
bases: ``bench/bench_lm_onnx.py``, memory and switch). ORT maps the file private and writable (``rw-p``)
but never writes it: a mapping is advised only while none of its pages is a written copy (``Anonymous: 0``
in ``/proc/self/smaps``), so every page dropped is the file's own and a later access maps the same bytes
again. The caller must make sure the file is still the one it verified (``crisp_edge.files.io.file_state``)
before it lets the runtime read it again.

The mappings are found in ``/proc/self/maps`` and their pages counted from ``/proc/self/pagemap`` (present;
file page or a private copy), which reads the page tables of those mappings alone; ``/proc/self/smaps``, which
gives the same numbers, walks every mapping of the process: 38 ms (3.9 ms by pagemap) of a SmolLM2 ONNX Runtime
task switch's ~260 ms, in a process with 760 mappings. It is read only where pagemap cannot be.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

#: ``madvise`` advice: the pages are not needed; a private mapping's unwritten pages are read again on access.
MADV_DONTNEED = 4
_SMAPS = "/proc/self/smaps"
_MAPS = "/proc/self/maps"
_PAGEMAP = "/proc/self/pagemap"
#: pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst): present, swapped, file page or shared anonymous.
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61


def file_mappings(path: str | os.PathLike) -> list[dict[str, int]]:
    """This process's mappings of the file at ``path`` (by its resolved path: a file replaced since it was
    mapped shows as deleted and is not matched), each ``{"start", "end", "rss", "anonymous"}`` in bytes
    (``anonymous``: private copies of the file's pages, resident or swapped out); empty off Linux."""
    if not sys.platform.startswith("linux"):
        return []
    real = os.path.realpath(path)
    try:
        return _pagemap_counts(_ranges(real))
    except (OSError, ValueError):
        return _smaps_mappings(real)


def _ranges(real: str) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of the file ``real`` (``/proc/self/maps``: no page walk)."""
    out = []
    with open(_MAPS) as f:
        for line in f:
            head = line.split(maxsplit=5)
            if len(head) == 6 and head[5].rstrip("\n") == real:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                out.append((lo, hi))
    return out


def _pagemap_counts(ranges: list[tuple[int, int]]) -> list[dict[str, int]]:
    """Resident and anonymous bytes of each range, from the pagemap entries of its pages alone."""
    out, page = [], mmap.PAGESIZE
    if not ranges:
        return out
    fd = os.open(_PAGEMAP, os.O_RDONLY)
    try:
        for lo, hi in ranges:
            want = (hi - lo) // page * 8
            raw = os.pread(fd, want, lo // page * 8)
            if len(raw) != want:
                raise ValueError(f"pagemap gave {len(raw)} of {want} bytes")
            e = np.frombuffer(raw, "<u8")
            present = (e & _PRESENT) != 0
            anonymous = (present & ((e & _FILE) == 0)) | ((e & _SWAPPED) != 0)
            out.append({"start": lo, "end": hi, "rss": int(present.sum()) * page,
                        "anonymous": int(anonymous.sum()) * page})
    finally:
        os.close(fd)
    return out


def _smaps_mappings(real: str) -> list[dict[str, int]]:
    """``file_mappings`` from ``/proc/self/smaps`` (every mapping's page walk), where pagemap cannot be read."""
    out, cur = [], None
    try:
        with open(_SMAPS) as f:
            for line in f:
                head = line.split(maxsplit=5)
                if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                    cur = None
                    if len(head) == 6 and head[5].rstrip("\n") == real:
                        lo, hi = (int(x, 16) for x in head[0].split("-"))
                        cur = {"start": lo, "end": hi, "rss": 0, "anonymous": 0}
                        out.append(cur)
                elif cur is not None and head[0] in ("Rss:", "Anonymous:"):
                    cur[head[0][:-1].lower()] = int(head[1]) * 1024
    except (OSError, ValueError):
        return []
    return out


def resident_bytes(path: str | os.PathLike) -> int:
    """This process's resident bytes of its mappings of ``path`` (0 off Linux)."""
    return sum(m["rss"] for m in file_mappings(path))


def release_file_pages(path: str | os.PathLike) -> int:
    """Drop this process's resident pages of its unwritten mappings of ``path``; returns the bytes released
    (0 where nothing is mapped, or off Linux). Best effort: a mapping holding written pages, or a failed
    advice, is left as it is."""
    maps = [m for m in file_mappings(path) if m["anonymous"] == 0 and m["rss"]]
    if not maps:
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(m["rss"] for m in maps if madvise(m["start"], m["end"] - m["start"], MADV_DONTNEED) == 0)

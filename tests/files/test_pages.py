"""crisp_edge.files.pages: a mapped file's resident pages are handed back without losing a byte, and a
mapping holding written pages is left alone."""
from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from crisp_edge.files.pages import _smaps_mappings, file_mappings, release_file_pages, resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")
SIZE = 1 << 20


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "bases.onnx.data"
    want = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8).tobytes()
    path.write_bytes(want)
    return path, want


def test_pages_are_released_and_read_back_unchanged(data):
    path, want = data
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private and writable, as ONNX Runtime maps
    try:
        assert m[:] == want and resident_bytes(path) >= SIZE // 2  # read: resident
        assert release_file_pages(path) >= SIZE // 2
        assert resident_bytes(path) == 0 and len(file_mappings(path)) == 1  # still mapped, nothing resident
        assert m[:] == want and resident_bytes(path) >= SIZE // 2  # read again: the file's own bytes
    finally:
        m.close()
    assert file_mappings(path) == [] and release_file_pages(path) == 0


def test_a_mapping_with_written_pages_is_left_alone(data):
    path, want = data
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        m[10] = (want[10] + 1) % 256  # a private copy of that page: dropping it would lose the write
        assert m[:SIZE // 2] == m[:SIZE // 2] and release_file_pages(path) == 0
        assert m[10] == (want[10] + 1) % 256 and resident_bytes(path) > 0
    finally:
        m.close()
    assert path.read_bytes() == want  # a private mapping never writes the file


def test_a_file_not_mapped_or_missing_releases_nothing(tmp_path):
    assert release_file_pages(tmp_path / "absent") == 0 and resident_bytes(tmp_path / "absent") == 0


def test_pagemap_counts_equal_the_kernels_smaps_accounting(data):
    """file_mappings reads the pagemap of the file's own mappings (fast); /proc/self/smaps, which walks
    every mapping of the process, must give the same resident and anonymous bytes in every state."""
    path, want = data
    real = str(path.resolve())
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        states = []
        for step in ("mapped", "read", "released", "half read", "written"):
            if step == "read":
                assert m[:] == want
            elif step == "released":
                release_file_pages(path)
            elif step == "half read":
                assert m[:SIZE // 2] == want[:SIZE // 2]
            elif step == "written":
                m[10] = (want[10] + 1) % 256
            got = file_mappings(path)
            assert got == _smaps_mappings(real) and len(got) == 1, step
            states.append((got[0]["rss"], got[0]["anonymous"]))
        page = mmap.PAGESIZE
        assert states[2] == (0, 0) and states[3][0] >= SIZE // 2 and states[3][1] == 0
        assert states[4][1] == page and states[1][0] == SIZE  # one written page is a private copy; all read: resident
    finally:
        m.close()

"""Atomic writes keep the old file on failure and never leave temp files; JSON reading is strict."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from crisp_edge.errors import CheckpointError, DataError
from crisp_edge.files.io import (
    VerifiedFiles,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    sha256_bytes,
    sha256_file,
)


def test_write_replace_and_create_parents(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"
    atomic_write_bytes(path, b"one")
    assert path.read_bytes() == b"one"
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.bin"]


@pytest.mark.parametrize("fails", ["os.fsync", "os.replace"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, fails):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old contents")

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(fails, boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(path, b"new contents that never land")
    monkeypatch.undo()
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["f.bin"]  # the temporary file is gone


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_json(path, {"v": 1})
    monkeypatch.setattr("os.fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"v": 2})
    monkeypatch.undo()
    assert read_json(path, DataError, "thing") == {"v": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_json_round_trip(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"b": [1, 2], "a": None})
    assert read_json(tmp_path / "x.json", CheckpointError, "metadata") == {"a": None, "b": [1, 2]}
    assert (tmp_path / "x.json").read_text().endswith("}\n")


@pytest.mark.parametrize("content, message", [
    (b"{broken", "metadata .* is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON .*UnicodeDecodeError"),
    (b'"a string"', "must hold a JSON object, found str"),
    (b"[" * 100000 + b"]" * 100000, "is not valid JSON"),
])
def test_read_json_errors(tmp_path, content, message):
    (tmp_path / "x.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_json(tmp_path / "x.json", CheckpointError, "metadata")


def test_read_json_missing_and_oversized(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_json(tmp_path / "nope.json", DataError, "card")
    (tmp_path / "big.json").write_bytes(b"{}" + b" " * 100)
    with pytest.raises(DataError, match="larger than any valid one"):
        read_json(tmp_path / "big.json", DataError, "card", max_bytes=50)


def test_hashes(tmp_path):
    data = b"crisp" * 100000
    (tmp_path / "f").write_bytes(data)
    assert sha256_bytes(data) == sha256_file(tmp_path / "f")
    assert sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_written_files_are_readable_by_others(tmp_path):
    atomic_write_bytes(tmp_path / "f.bin", b"x")  # not mkstemp's private 0600
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_bundle_folders_get_the_umask_permissions(tmp_path, umask):
    """A bundle folder (made by write_validated through a temporary sibling) gets mkdir's permissions,
    0o777 less the umask, not mkdtemp's 0o700; the files inside keep theirs."""
    import os

    from crisp_edge.export.writing import write_validated
    from crisp_edge.files.io import atomic_write_json, make_temp_dir

    old = os.umask(umask)
    try:
        assert (make_temp_dir(tmp_path, prefix="x").stat().st_mode & 0o777) == 0o777 & ~umask

        def write(folder):
            atomic_write_json(folder / "manifest.json", {"ok": True})
            return {"ok": True}

        out = write_validated(tmp_path / "bundle", write, lambda folder, manifest: folder)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert (out / "manifest.json").exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "link-to-dev-zero", "folder", "oversized"])
def test_read_regular_refuses_what_is_not_a_bounded_regular_file_at_once(tmp_path, kind):
    """A FIFO used to block forever and /dev/zero to read until memory ran out: both are refused
    before a byte is read, as is a file over the cap."""
    from crisp_edge.files.io import check_regular, read_regular

    path = tmp_path / "x.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "link-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"x" * 101)
    needle = "larger than" if kind == "oversized" else "cannot be read"
    with pytest.raises(DataError, match=needle):
        read_regular(path, DataError, "thing", max_bytes=100)
    with pytest.raises(DataError, match=needle):
        check_regular(path, DataError, "thing", max_bytes=100)
    with pytest.raises(DataError, match=needle):
        read_json(path, DataError, "thing", max_bytes=100)


def test_read_regular_reads_a_regular_file_and_can_refuse_links(tmp_path):
    from crisp_edge.files.io import read_regular

    (tmp_path / "a").write_bytes(b"data")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert read_regular(tmp_path / "b", DataError, "thing", 4) == b"data"
    with pytest.raises(DataError, match="cannot be read"):
        read_regular(tmp_path / "b", DataError, "thing", 4, follow_symlinks=False)


@pytest.mark.timeout(30)
def test_sha256_file_refuses_a_fifo_instead_of_blocking(tmp_path):
    os.mkfifo(tmp_path / "f")
    with pytest.raises(OSError):
        sha256_file(tmp_path / "f")


def test_verified_files_reads_again_whenever_the_file_changed(tmp_path):
    """A kept value is answered only while the file is the one it was made from: a file renamed into
    its place, or edited in place with its size and mtime put back, is read (and verified) again."""
    path = tmp_path / "task.bin"
    path.write_bytes(b"A" * 64)
    reads = []

    def load():
        data = path.read_bytes()
        reads.append(data)
        if b"X" in data:
            raise DataError("damaged")  # the verifying reader refuses it
        return data

    cache = VerifiedFiles()
    assert cache.get("t", path, load) == b"A" * 64
    assert cache.get("t", path, load) == b"A" * 64
    assert len(reads) == 1  # unchanged: kept
    tmp = tmp_path / "new.bin"
    tmp.write_bytes(b"B" * 64)
    os.replace(tmp, path)  # swapped underneath
    assert cache.get("t", path, load) == b"B" * 64
    assert len(reads) == 2
    st = path.stat()
    with open(path, "r+b") as f:  # one byte flipped in place; size and mtime restored
        f.write(b"X")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    for _ in range(2):  # refused each time, never answered from memory
        with pytest.raises(DataError, match="damaged"):
            cache.get("t", path, load)
    assert len(reads) == 4

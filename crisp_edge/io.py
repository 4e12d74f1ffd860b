"""File helpers shared by every writer and reader: atomic writes, hashes, safe JSON.

Writes go to a temporary file in the destination folder, are fsynced, then renamed over the
target, so a process killed mid-write leaves the previous file intact and never a half file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CrispEdgeError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared like any written file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | os.PathLike, error: type[CrispEdgeError], what: str, max_bytes: int = 64 << 20) -> dict:
    """Read a JSON object, raising ``error`` (never a bare exception) on anything malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist.") from None
    if size > max_bytes:
        raise error(f"{what} {path} is {size} bytes, larger than any valid one ({max_bytes}).")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{what} {path} is not valid JSON ({type(e).__name__}: {e}); the file is damaged or not a {what}.") from None
    if not isinstance(obj, dict):
        raise error(f"{what} {path} must hold a JSON object, found {type(obj).__name__}.")
    return obj


def check_envelope(meta: Any, *, fmt: str, max_version: int, fields: dict[str, type], error: type[CrispEdgeError],
                   where: str, what: str) -> dict:
    """Check a versioned JSON header: its format tag, a supported version, and required typed fields."""
    from . import __version__

    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise error(f"{where} is not a crisp-edge {what} (format={found!r}, expected {fmt!r}).")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= max_version:
        raise error(
            f"{where}: {what} format version {version!r} is not supported (this crisp-edge {__version__} reads "
            f"1..{max_version}); upgrade crisp-edge to read newer files."
        )
    for key, kind in fields.items():
        if not isinstance(meta.get(key), kind):
            raise error(f"{where}: field {key!r} is missing or not a {kind.__name__}.")
    return meta

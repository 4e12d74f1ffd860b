"""File helpers shared by every writer and reader: atomic writes, hashes, safe JSON.

Writes go to a temporary file in the destination folder, are fsynced, then renamed over the
target, so a process killed mid-write leaves the previous file intact and never a half file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from crisp_edge.errors import CrispEdgeError


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


def check_writable(path: str | os.PathLike, error: type[CrispEdgeError], what: str = "output", *,
                   folder: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work is done (training that ends in a
    failed write loses its result): a folder where a file goes (or the reverse), or a nearest existing
    folder in which no file can be created (tried with a temporary file, removed at once: permission
    bits do not tell for root, read-only mounts or /proc). Returns the path."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise error(f"{what} {path} is {'a file' if folder else 'a folder'}; give a {'folder' if folder else 'file'} path.")
    start = path if folder and path.exists() else path.parent
    ancestor = next((p for p in (start, *start.parents) if p.exists()), Path("."))
    if not ancestor.is_dir():
        raise error(f"{what} {path}: {ancestor} is a file, so no folder can be made under it; choose another path.")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".crisp-edge-write-check."):
            pass
    except OSError as e:
        raise error(f"{what} {path}: {ancestor} is not writable ({e.strerror or e}: a read-only file system, or no "
                    "permission); choose another path.") from None
    return path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``); elsewhere
    set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str, suffix: str = ".tmp") -> Path:
    """A fresh folder in ``parent`` (``tempfile.mkdtemp``: a unique name, no race) that gets the
    permissions ``mkdir`` would give it (``0o777`` less the umask) rather than mkdtemp's ``0o700``: it
    becomes a user's artifact folder once renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """The temporary files ``atomic_write_bytes`` leaves in ``folder`` when its process is killed
    mid-write (``.<name>.<random>.tmp``), for every target or only for target ``name``. No loader
    reads them: each opens its file by its exact name."""
    pattern = f".{name}.*.tmp" if name else ".*.tmp"
    return sorted(p for p in Path(folder).glob(pattern) if p.is_file())


def remove_stale_temp_files(folder: str | os.PathLike, name: str | None = None, min_age_s: float = 60.0) -> list[Path]:
    """Delete the leftovers ``temp_files`` finds that are at least ``min_age_s`` old (younger ones may
    belong to a write in progress in another process); returns what was removed."""
    removed = []
    for p in temp_files(folder, name):
        try:
            if time.time() - p.stat().st_mtime >= min_age_s:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # removed meanwhile (its writer renamed it into place)
            pass
    return removed


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
    """SHA-256 of a regular file (a FIFO or device raises ``OSError`` at once instead of blocking or
    reading without end)."""
    h = hashlib.sha256()
    fd = _open_regular(Path(path))
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _open_regular(path: Path, follow_symlinks: bool = True) -> int:
    """A read-only descriptor of ``path``, which must be a regular file: checked by ``stat`` before the
    open (a device is never opened) and by ``fstat`` after it (the name cannot be swapped in between);
    opened ``O_NONBLOCK`` so that a FIFO put in its place cannot block. ``OSError`` otherwise."""
    st = os.stat(path, follow_symlinks=follow_symlinks)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                      f"not a regular file but a {_kind(st.st_mode)}", str(path))
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file but a {_kind(st.st_mode)}", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, error: type[CrispEdgeError], what: str, max_bytes: int,
                 follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``), or ``error`` saying why not.

    The one bounded reader every loader uses: a FIFO, device, socket or folder is refused at once (no
    hang, no endless read of ``/dev/zero``), a file over ``max_bytes`` before it is read, and one that
    grows while being read after ``max_bytes + 1`` bytes. ``follow_symlinks=False`` also refuses a
    symbolic link (``O_NOFOLLOW``).
    """
    path = Path(path)
    try:
        fd = _open_regular(path, follow_symlinks)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist.") from None
    except (OSError, ValueError) as e:  # not regular, no permission, a NUL byte in the name, a symlink
        detail = f"{type(e).__name__}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        raise error(f"{what} {path} cannot be read ({detail}); give a regular file.") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{what} {path} is {size:,} bytes, larger than any valid one ({max_bytes:,}).")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{what} {path} grew past {max_bytes:,} bytes while being read; it is not a valid one.")
    return data


def check_regular(path: str | os.PathLike, error: type[CrispEdgeError], what: str, max_bytes: int) -> Path:
    """``path`` if it is a regular file of at most ``max_bytes``, else ``error``: for files handed by
    name to a library that opens them itself (ONNX, ONNX Runtime, NumPy), so that it never blocks on
    a FIFO or reads a device."""
    path = Path(path)
    try:
        os.close(_open_regular(path))
        size = path.stat().st_size
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist.") from None
    except (OSError, ValueError) as e:
        detail = f"{type(e).__name__}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        raise error(f"{what} {path} cannot be read ({detail}); give a regular file.") from None
    if size > max_bytes:
        raise error(f"{what} {path} is {size:,} bytes, larger than any valid one ({max_bytes:,}).")
    return path


def parse_json(data: bytes | str, error: type[CrispEdgeError], where: str, what: str) -> Any:
    """Parse JSON text, raising ``error`` (never a bare exception) on anything malformed: bad UTF-8,
    bad syntax, nesting deep enough to exhaust the stack, integers too long to convert."""
    if not isinstance(data, (bytes, bytearray, str)):
        raise error(f"{where}: expected JSON text, got {type(data).__name__}.")
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{where} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); the file is damaged or not "
                    f"a {what}.") from None


def read_json(path: str | os.PathLike, error: type[CrispEdgeError], what: str, max_bytes: int = 64 << 20) -> dict:
    """Read a JSON object, raising ``error`` (never a bare exception) on anything malformed."""
    path = Path(path)
    data = read_regular(path, error, what, max_bytes)
    obj = parse_json(data, error, f"{what} {path}", what)
    if not isinstance(obj, dict):
        raise error(f"{what} {path} must hold a JSON object, found {type(obj).__name__}.")
    return obj


def check_envelope(meta: Any, *, fmt: str, max_version: int, fields: dict[str, type], error: type[CrispEdgeError],
                   where: str, what: str) -> dict:
    """Check a versioned JSON header: its format tag, a supported version, and required typed fields."""
    from crisp_edge._version import __version__

    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise error(f"{where} is not a crisp-edge {what} (format={found!r:.80}, expected {fmt!r}).")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= max_version:
        raise error(
            f"{where}: {what} format version {version!r:.40} is not supported (this crisp-edge {__version__} reads "
            f"1..{max_version}); upgrade crisp-edge to read newer files."
        )
    for key, kind in fields.items():
        if not isinstance(meta.get(key), kind):
            raise error(f"{where}: field {key!r} is missing or not a {kind.__name__}.")
    return meta


def check_relpath(name: Any, where: str, error: type[CrispEdgeError], folder_kind: str = "folder") -> str:
    """A file name read from a manifest: a plain relative path inside its folder, or ``error``.

    Refused: non-strings, empty names, absolute paths, ``..`` / ``.`` / empty components, NUL bytes,
    backslashes and colons (Windows separators and drive letters), and names over 1024 characters.
    """
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise error(f"{where}: file name {name!r:.80} must be a non-empty string of at most 1024 characters.")
    parts = name.split("/")
    if ("\x00" in name or "\\" in name or ":" in name or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts)):
        raise error(f"{where}: file name {name!r:.80} is not a plain relative path inside the {folder_kind} folder "
                    "(no absolute paths, '..', '.', empty parts, backslashes, colons or NUL bytes).")
    return name


def inside(folder: Path, name: str, where: str, error: type[CrispEdgeError], folder_kind: str = "folder") -> Path:
    """``folder / name`` for a checked relative ``name``, refusing a path that resolves (through a
    symbolic link) outside ``folder``: no manifest can make crisp-edge read a file elsewhere."""
    check_relpath(name, where, error, folder_kind)
    path = Path(folder) / name
    try:
        real, base = os.path.realpath(path), os.path.realpath(folder)
        outside = real == base or os.path.commonpath([real, base]) != base  # ValueError: another drive
    except (OSError, ValueError) as e:
        raise error(f"{where}: {name!r} cannot be resolved ({type(e).__name__}: {e}).") from None
    if outside:
        raise error(f"{where}: {name!r} resolves to {real}, outside the {folder_kind} folder {base} (a symbolic "
                    f"link?); a {folder_kind}'s files must lie inside it.")
    return path


def file_state(path: str | os.PathLike) -> tuple[int, ...] | None:
    """What changes whenever the file at ``path`` may have new contents: its device and inode (a file
    renamed into its place), size, mtime and ctime (the kernel sets ctime on every write, rename or
    ``utime``, and no process can set it back). ``None`` when it cannot be looked at."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedFiles:
    """What a verifying reader made of files, kept per key while each file is unchanged (``file_state``).

    ``get(key, path, load)`` returns the value ``load()`` made the last time when the file's state is
    still the one taken *before* that read; otherwise it calls ``load()`` again, which reads and
    verifies the file anew, so a file replaced, edited or truncated since is read (and refused) rather
    than answered from memory. The state is taken before the read: a file changed while it was read
    differs from it at the next call and is read again. Nothing unverified is ever kept."""

    def __init__(self) -> None:
        self._items: dict[Any, tuple[tuple[int, ...], Any]] = {}

    def get(self, key: Any, path: str | os.PathLike, load: Any) -> Any:
        state = file_state(path)
        hit = self._items.pop(key, None)
        if hit is not None and state is not None and hit[0] == state:
            self._items[key] = hit
            return hit[1]
        value = load()  # raises on a file that fails verification: nothing is kept then
        if state is not None:
            self._items[key] = (state, value)
        return value

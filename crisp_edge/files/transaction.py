"""All-or-nothing updates of artifacts made of several files, across kills and full disks.

Two primitives, both leaving only leftovers that carry crisp-edge's own name pattern and marker:

* ``swap_folder(staging, target)``: put a fully written folder at ``target`` (replacing an old one)
  so that some complete folder is at ``target`` at every instant. On Linux the two folders are
  exchanged in one ``renameat2(RENAME_EXCHANGE)`` call; elsewhere the old folder is renamed aside to
  ``.NAME.old-PID`` first, and ``clean_folder_leftovers`` moves it back if a kill came between the
  two renames.
* ``commit_files(folder, {name: bytes})``: update several files of one folder (e.g. a bundle's task
  file, reference and manifest) together. Every new file is first written in full under a pending
  name beside its target; then a journal naming them is written atomically (the commit point); then
  each pending file is renamed over its target in the order given (manifest last), and the journal is
  removed. ``recover_files(folder)``, run by every loader before it reads the folder, finishes a
  committed update (renames only: no space is needed) or deletes the pending files of one that never
  committed. A full disk or a kill before the journal exists leaves the old files untouched.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from crisp_edge.errors import CrispEdgeError
from crisp_edge.files.io import (
    make_temp_dir,
    _fsync_dir,
    atomic_write_bytes,
    check_relpath,
    inside,
    parse_json,
    read_regular,
    sha256_bytes,
    sha256_file,
)

#: The marker file a staging folder holds while crisp-edge writes it: who made it (host, pid) and when.
STAGING_MARKER = ".crisp-edge-staging.json"
JOURNAL = ".crisp-edge-update.json"
_JOURNAL_FORMAT = "crisp-edge/update-journal"
_PENDING = ".pending"
#: A leftover whose writer cannot be shown dead is left alone until it is this old.
STALE_AFTER_S = 24 * 3600.0


class UpdateError(CrispEdgeError, RuntimeError):
    """A multi-file update cannot be finished or undone (e.g. a read-only folder holds an interrupted one)."""


def _alive(marker: dict) -> bool:
    """Whether the process recorded in a marker may still be writing (same host and its pid exists)."""
    if marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int):
        return False
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _marker(path: Path) -> dict | None:
    try:
        obj = json.loads(read_regular(path, UpdateError, "staging marker", 1 << 12))
    except (CrispEdgeError, ValueError):
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == "crisp-edge/staging" else None


def _mark(folder: Path) -> None:
    info = {"format": "crisp-edge/staging", "host": socket.gethostname(), "pid": os.getpid(), "created": time.time()}
    (folder / STAGING_MARKER).write_text(json.dumps(info))


def make_staging_folder(target: Path) -> Path:
    """A new empty folder ``.NAME.XXXX.tmp`` beside ``target``, marked as crisp-edge's (host, pid, time)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, prefix=f".{target.name}.")  # mkdir's permissions, not mkdtemp's 0o700
    _mark(tmp)
    return tmp


def remove_marked(folder: Path) -> None:
    """Delete a staging or replaced folder so that a kill at any moment leaves it provably crisp-edge's:
    the marker is written first and removed last (after every other entry), then the empty folder."""
    if not folder.is_dir() or folder.is_symlink():
        return
    if not (folder / STAGING_MARKER).exists():
        _mark(folder)
    for child in folder.iterdir():
        if child.name != STAGING_MARKER:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (folder / STAGING_MARKER).unlink(missing_ok=True)
    folder.rmdir()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_folder(staging: Path, target: Path) -> None:
    """Move the complete folder ``staging`` (from ``make_staging_folder``) to ``target``, replacing the
    folder there: an exchange where the system has one, so ``target`` never stops being a complete folder."""
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    if not target.exists():
        staging.rename(target)
    elif _exchange(staging, target):
        remove_marked(staging)  # now the old folder; a kill here leaves a leftover that cleaning removes
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        remove_marked(old)
    _fsync_dir(target.parent)


def clean_folder_leftovers(target: Path, is_ours: Callable[[Path], bool], min_age_s: float = 60.0) -> list[str]:
    """Finish what a killed ``swap_folder`` or writer left beside ``target``; returns what was done.

    Only crisp-edge's provable leftovers are touched: a ``.NAME.*.tmp`` or ``.NAME.old-*`` folder that
    holds our staging marker (its writer dead, or the marker a day old) or that ``is_ours`` (a complete
    artifact of the kind ``target`` holds, untouched for ``min_age_s``). A ``.NAME.old-*`` folder
    with no ``target`` is the previous artifact of an interrupted swap: it is moved back. Others are
    reported in a warning and left alone.
    """
    done, kept = [], []
    if not target.parent.is_dir():
        return done
    for p in sorted(target.parent.glob(f".{target.name}.*")):
        rest = p.name[len(target.name) + 2:]
        if not p.is_dir() or p.is_symlink() or not (rest.endswith(".tmp") or rest.startswith("old-")):
            continue
        marker = _marker(p / STAGING_MARKER)
        try:
            age = time.time() - p.stat().st_ctime
            entries = [e.name for e in p.iterdir()]
        except OSError:
            continue
        if not entries or (entries == [STAGING_MARKER] and marker is None):
            # the last step of remove_marked, or the marker's own write, was cut short: nothing to lose
            (p / STAGING_MARKER).unlink(missing_ok=True)
            p.rmdir()
            done.append(f"removed the empty {p.name}")
            continue
        if marker is not None:
            ours = not _alive(marker) or time.time() - float(marker.get("created", 0)) > STALE_AFTER_S
        else:
            ours = age >= min_age_s and is_ours(p)
        if not ours:
            kept.append(p.name)
        elif rest.startswith("old-") and marker is None and not target.exists():
            p.rename(target)
            done.append(f"restored {target} from {p.name} (left by an interrupted replace)")
        else:
            remove_marked(p)
            done.append(f"removed {p.name} (left by an interrupted write)")
    if kept:
        warnings.warn(f"{target.parent}: {', '.join(kept)} may belong to a write in progress (or are not "
                      "crisp-edge's); left alone. Delete them yourself if no crisp-edge command is running.",
                      stacklevel=2)
    return done


def _pending_name(target: Path, txid: str) -> Path:
    return target.with_name(f".{target.name}.{txid}{_PENDING}")


def commit_files(folder: str | os.PathLike, files: dict[str, bytes], remove: tuple[str, ...] = (),
                 error: type[CrispEdgeError] = UpdateError) -> None:
    """Replace (or create) the files ``files`` (relative name -> bytes) of ``folder`` and delete the
    files ``remove``, all or nothing across kills and full disks. Files are renamed into place in the
    order given: put the file that describes the others (a manifest) last, so that a reader that does
    not know this protocol never sees a description of files that are not yet there.

    A previous interrupted update of ``folder`` is finished or undone first (``recover_files``).
    ``error`` is the type raised for a bad name (a path outside ``folder``).
    """
    folder = Path(folder)
    recover_files(folder)
    targets = [inside(folder, name, str(folder), error) for name in files]
    for name in remove:
        inside(folder, name, str(folder), error)
    txid = f"{os.getpid()}-{secrets.token_hex(4)}"
    written: list[Path] = []
    try:
        for target, data in zip(targets, files.values()):
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(_pending_name(target, txid))
            atomic_write_bytes(written[-1], data)
        journal = {"format": _JOURNAL_FORMAT, "version": 1, "txid": txid, "host": socket.gethostname(),
                   "pid": os.getpid(), "files": [[name, sha256_bytes(data)] for name, data in files.items()],
                   "remove": list(remove)}
        atomic_write_bytes(folder / JOURNAL, json.dumps(journal).encode())  # the commit point
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    _roll_forward(folder, journal)


def _roll_forward(folder: Path, journal: dict) -> None:
    for name, digest in journal["files"]:
        target = folder / name
        pending = _pending_name(target, journal["txid"])
        try:
            os.replace(pending, target)
        except FileNotFoundError:  # renamed already (by an earlier recovery, or a concurrent one)
            if not target.is_file() or sha256_file(target) != digest:
                raise UpdateError(f"{folder}: the interrupted update {journal['txid']} cannot be finished: "
                                  f"{name} is neither pending nor in place. Export the artifact again.") from None
        _fsync_dir(target.parent)
    for name in journal["remove"]:
        (folder / name).unlink(missing_ok=True)
    (folder / JOURNAL).unlink(missing_ok=True)
    _fsync_dir(folder)


def recover_files(folder: str | os.PathLike, min_age_s: float = 60.0) -> list[str]:
    """Finish a committed ``commit_files`` update of ``folder`` that was interrupted, and delete the
    pending files of uncommitted ones whose writer is gone (or that are ``STALE_AFTER_S`` old); returns
    what was done. Raises ``UpdateError`` when an interrupted update cannot be finished here (e.g.
    the folder is read-only): its files are then a mix of old and new."""
    folder = Path(folder)
    done: list[str] = []
    if not folder.is_dir():
        return done
    jpath = folder / JOURNAL
    if jpath.exists() or jpath.is_symlink():
        journal = parse_json(read_regular(jpath, UpdateError, "update journal", 1 << 20), UpdateError, str(jpath),
                             "update journal")
        if (not isinstance(journal, dict) or journal.get("format") != _JOURNAL_FORMAT
                or not isinstance(journal.get("txid"), str) or not journal["txid"].replace("-", "").isalnum()
                or not isinstance(journal.get("files"), list) or not isinstance(journal.get("remove"), list)):
            raise UpdateError(f"{jpath} is not a crisp-edge update journal; remove it if you put it there.")
        for item in journal["files"]:
            check_relpath(item[0] if isinstance(item, list) and len(item) == 2 else None, str(jpath), UpdateError)
        for name in journal["remove"]:
            check_relpath(name, str(jpath), UpdateError)
        try:
            _roll_forward(folder, journal)
        except OSError as e:
            raise UpdateError(f"{folder} holds an interrupted update that cannot be finished here ({e.strerror or e}); "
                              "run the command again where the folder is writable.") from None
        done.append(f"finished the interrupted update {journal['txid']}")
    for p in folder.rglob(f".*{_PENDING}"):
        txid = p.name[:-len(_PENDING)].rsplit(".", 1)[-1]
        pid = txid.split("-", 1)[0]
        alive = pid.isdigit() and _alive({"host": socket.gethostname(), "pid": int(pid)})
        try:
            old = time.time() - p.stat().st_mtime >= (min_age_s if not alive else STALE_AFTER_S)
        except OSError:
            continue
        if p.is_file() and old:
            try:
                p.unlink(missing_ok=True)
            except OSError:  # e.g. a read-only copy: a pending file is never read, so it can stay
                continue
            done.append(f"removed {p.relative_to(folder)} (an update that never committed)")
    return done

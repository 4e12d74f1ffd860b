"""All-or-nothing multi-file updates (``crisp_edge.files.transaction``): a full disk or a kill at any
step leaves the old files or the new ones, and what an interrupted update left is finished or removed
by the next run; a folder swap always leaves a complete folder in place."""
from __future__ import annotations

import errno
import json
import os

import pytest

from crisp_edge.files import transaction as tx
from crisp_edge.files.io import atomic_write_bytes


def _folder(tmp_path):
    folder = tmp_path / "b"
    (folder / "tasks").mkdir(parents=True)
    (folder / "tasks" / "t1.bin").write_bytes(b"old task")
    (folder / "reference.npz").write_bytes(b"old reference")
    (folder / "manifest.json").write_text('{"v": "old"}')
    return folder


NEW = {"tasks/t1.bin": b"new task", "reference.npz": b"new reference", "manifest.json": b'{"v": "new"}'}


def _contents(folder):
    return {n: (folder / n).read_bytes() for n in NEW}


def _visible(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_commit_replaces_every_file_and_leaves_nothing_else(tmp_path):
    folder = _folder(tmp_path)
    (folder / "tasks" / "t0.bin").write_bytes(b"superseded")
    tx.commit_files(folder, NEW, remove=("tasks/t0.bin",))
    assert _contents(folder) == NEW
    assert _visible(folder) == ["manifest.json", "reference.npz", "tasks/t1.bin"]


def test_a_full_disk_before_the_commit_leaves_the_old_files(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    old = _contents(folder)
    calls = []

    def full_on_third(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        atomic_write_bytes(path, data)

    monkeypatch.setattr(tx, "atomic_write_bytes", full_on_third)
    with pytest.raises(OSError) as e:
        tx.commit_files(folder, NEW)
    assert e.value.errno == errno.ENOSPC
    assert _contents(folder) == old and _visible(folder) == ["manifest.json", "reference.npz", "tasks/t1.bin"]


@pytest.mark.parametrize("renamed_before_kill", range(3))
def test_a_kill_after_the_commit_is_finished_by_the_next_open(tmp_path, monkeypatch, renamed_before_kill):
    folder = _folder(tmp_path)
    real_replace, done = os.replace, []

    def killed_replace(src, dst):
        if str(src).endswith(".pending"):
            if len(done) == renamed_before_kill:
                raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line runs
            done.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(tx.os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        tx.commit_files(folder, NEW)
    monkeypatch.setattr(tx.os, "replace", real_replace)
    assert (folder / tx.JOURNAL).exists()
    assert tx.recover_files(folder)  # the next open finishes it
    assert _contents(folder) == NEW
    assert _visible(folder) == ["manifest.json", "reference.npz", "tasks/t1.bin"]


def test_pending_files_of_an_update_that_never_committed_are_removed(tmp_path):
    folder = _folder(tmp_path)
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    stray = folder / "tasks" / f".t1.bin.{dead}-abcd1234.pending"
    stray.write_bytes(b"half")
    os.utime(stray, (0, 0))
    done = tx.recover_files(folder)
    assert not stray.exists() and done
    live = folder / "tasks" / f".t1.bin.{os.getpid()}-abcd1234.pending"  # a writer that is still running
    live.write_bytes(b"in progress")
    tx.recover_files(folder, min_age_s=0)
    assert live.exists()


def test_a_read_only_folder_with_an_interrupted_update_is_a_typed_error(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    (folder / tx.JOURNAL).write_text(json.dumps({"format": "crisp-edge/update-journal", "version": 1, "txid": "1-ab",
                                                 "files": [["manifest.json", "0" * 64]], "remove": []}))

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(tx.os, "replace", read_only)
    with pytest.raises(tx.UpdateError, match="cannot be finished here"):
        tx.recover_files(folder)


def test_a_journal_naming_a_path_outside_is_refused(tmp_path):
    folder = _folder(tmp_path)
    (folder / tx.JOURNAL).write_text(json.dumps({"format": "crisp-edge/update-journal", "version": 1, "txid": "1-ab",
                                                 "files": [["../evil", "0" * 64]], "remove": []}))
    with pytest.raises(tx.UpdateError, match="plain relative path"):
        tx.recover_files(folder)


def _bundle(path, tag):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "crisp-edge/onnx-bundle", "tag": tag}))
    (path / "model.onnx").write_text(tag)


def _is_ours(p):
    return (p / "manifest.json").exists()


def test_swap_folder_replaces_and_leaves_nothing_beside(tmp_path):
    _bundle(tmp_path / "out", "old")
    staging = tx.make_staging_folder(tmp_path / "out")
    (staging / "manifest.json").write_text(json.dumps({"format": "crisp-edge/onnx-bundle", "tag": "new"}))
    tx.swap_folder(staging, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["tag"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (tmp_path / "out" / tx.STAGING_MARKER).exists()


def test_an_old_bundle_hidden_by_an_interrupted_swap_is_restored(tmp_path):
    _bundle(tmp_path / ".out.old-99999999", "old")  # the fallback swap was killed between its two renames
    done = tx.clean_folder_leftovers(tmp_path / "out", _is_ours, min_age_s=0)
    assert (tmp_path / "out" / "model.onnx").read_text() == "old" and "restored" in done[0]


def test_cleanup_removes_only_provable_leftovers(tmp_path):
    _bundle(tmp_path / "out", "current")
    dead = tx.make_staging_folder(tmp_path / "out")  # a killed writer's staging folder
    marker = json.loads((dead / tx.STAGING_MARKER).read_text())
    (dead / tx.STAGING_MARKER).write_text(json.dumps({**marker, "pid": 2 ** 22 + 12345}))
    alive = tx.make_staging_folder(tmp_path / "out")  # a writer still running (this process)
    foreign = tmp_path / ".out.mine.tmp"  # the user's own folder that happens to match the pattern
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="left alone"):
        done = tx.clean_folder_leftovers(tmp_path / "out", _is_ours, min_age_s=0)
    assert not dead.exists() and alive.exists() and (foreign / "notes.txt").exists() and len(done) == 1
    assert (tmp_path / "out" / "model.onnx").read_text() == "current"


def test_remove_marked_keeps_the_marker_to_the_end(tmp_path, monkeypatch):
    """A kill while an old folder is deleted leaves it recognisable: the marker goes last."""
    _bundle(tmp_path / ".out.abc.tmp", "old")
    order = []
    real_unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (order.append(os.path.basename(p)), real_unlink(p, *a, **k)))
    tx.remove_marked(tmp_path / ".out.abc.tmp")
    assert order[-1] == tx.STAGING_MARKER and not (tmp_path / ".out.abc.tmp").exists()

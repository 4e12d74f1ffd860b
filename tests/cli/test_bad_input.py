"""Bad command lines, paths and files: every case is exit status 2 with a message that says what is
wrong (never a traceback, a hang, or a silent replacement of what the tool did not write).

One table: each row builds its situation in a fresh folder (from a small toy checkpoint and mixer
file made once) and gives the command line, the expected status, a phrase of the message, and
what must still be true afterwards (e.g. the user's file is untouched)."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from crisp_edge.cli.main import main
from crisp_edge.files.checkpoint import META_FILE, WEIGHTS_FILE, save_checkpoint
from crisp_edge.files.mixers import save_mixers
from crisp_edge.method.config import CrispConfig, RoleConfig
from crisp_edge.testing import toy_model
from crisp_edge.training.retrofit import retrofit_


def make_artifacts(d: Path) -> Path:
    """A toy CRISP checkpoint ``d/ckpt`` and one of its mixer files ``d/t.mixers.safetensors``."""
    model = toy_model("timm-vit", seed=0)
    retrofit_(model, CrispConfig(default=RoleConfig(s=4, group_size=2)), progress=False)
    save_checkpoint(model, d / "ckpt")
    save_mixers(model, d / "t.mixers.safetensors", task="t")
    return d


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``make_artifacts`` once per module (read-only: rows copy what they change)."""
    return make_artifacts(tmp_path_factory.mktemp("made"))


def run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors: status 2 with the option named
        return e.code


def _user_folder(t: Path) -> Path:
    (t / "out").mkdir()
    (t / "out" / "photo.jpg").write_bytes(b"the user's own file")
    return t / "out"


def _fake_bundle(t: Path, fmt: str) -> Path:
    (t / "out").mkdir()
    (t / "out" / "manifest.json").write_text(json.dumps({"format": fmt, "version": 1}))
    return t / "out"


def _ckpt_copy(t: Path, made: Path) -> Path:
    shutil.copytree(made / "ckpt", t / "ck")
    return t / "ck"


def _edit_extra(t: Path, made: Path, extra) -> Path:
    ck = _ckpt_copy(t, made)
    meta = json.loads((ck / META_FILE).read_text())
    meta["extra"] = extra
    (ck / META_FILE).write_text(json.dumps(meta))
    return ck


def _fifo(t: Path, made: Path, name: str) -> Path:
    ck = _ckpt_copy(t, made)
    (ck / name).unlink()
    os.mkfifo(ck / name)
    return ck


def _unchanged(path_text: str):
    return lambda t: (t / path_text).read_bytes() == b"the user's own file"


# (id, argv builder (tmp, made) -> argv, status, phrase in stderr, check afterwards or None)
CASES = [
    # writers never delete or replace what they did not write
    ("export-overwrite-user-folder", lambda t, m: ["export", m / "ckpt", "--out", _user_folder(t), "--overwrite",
                                                   "--mode", "dense"], 2, "not a crisp-edge onnxruntime bundle",
     _unchanged("out/photo.jpg")),
    ("export-overwrite-other-runtime", lambda t, m: ["export", m / "ckpt", "--out",
                                                     _fake_bundle(t, "crisp-edge/executorch-bundle"), "--overwrite"],
     2, "a bundle of another runtime", lambda t: (t / "out" / "manifest.json").exists()),
    ("export-existing-without-overwrite", lambda t, m: ["export", m / "ckpt", "--out",
                                                        _fake_bundle(t, "crisp-edge/onnx-bundle")], 2,
     "pass overwrite=True (--overwrite)", None),
    ("export-over-a-file", lambda t, m: ["export", m / "ckpt", "--out", (t / "f").write_text("x") and t / "f",
                                         "--overwrite"], 2, "not a folder", lambda t: (t / "f").read_text() == "x"),
    ("retrofit-existing-checkpoint", lambda t, m: ["retrofit", "fmnist-vit", "--out", _ckpt_copy(t, m), "--no-progress"],
     2, "already holds a checkpoint; pass --overwrite", None),
    ("retrofit-overwrite-user-folder", lambda t, m: ["retrofit", "fmnist-vit", "--out", _user_folder(t), "--overwrite",
                                                     "--no-progress"], 2, "not a crisp-edge checkpoint",
     _unchanged("out/photo.jpg")),
    ("apply-out-is-its-input", lambda t, m: ["apply", _ckpt_copy(t, m), m / "t.mixers.safetensors", "--no-eval",
                                             "--out", t / "ck"], 2, "already holds a checkpoint; pass --overwrite", None),
    ("adapt-out-is-a-user-file", lambda t, m: ["adapt", m / "ckpt", "--task", "digits", "--out",
                                               (t / "x.txt").write_bytes(b"the user's own file") and t / "x.txt"],
     2, "not a crisp-edge mixer file", _unchanged("x.txt")),
    ("adapt-existing-mixers", lambda t, m: ["adapt", m / "ckpt", "--task", "digits", "--out",
                                            shutil.copy(m / "t.mixers.safetensors", t / "m.safetensors")], 2,
     "already holds a mixer file; pass --overwrite", None),
    ("compress-llm-existing", lambda t, m: ["compress-llm", "x", "--out", _ckpt_copy(t, m)], 2,
     "already holds a checkpoint", None),
    # numeric options
    ("opset-0", lambda t, m: ["export", m / "ckpt", "--out", t / "b", "--opset", "0"], 2, "argument --opset", None),
    ("opset-7", lambda t, m: ["export", m / "ckpt", "--out", t / "b", "--opset", "7"], 2, "opset 7 is not supported",
     lambda t: not (t / "b").exists()),
    ("opset-99", lambda t, m: ["export", m / "ckpt", "--out", t / "b", "--opset", "99"], 2, "use 18..23", None),
    ("batch-0", lambda t, m: ["export", m / "ckpt", "--target", "executorch", "--out", t / "b", "--batch", "0"], 2,
     "argument --batch", None),
    ("batch-negative", lambda t, m: ["export", m / "ckpt", "--target", "executorch", "--out", t / "b", "--batch", "-1"],
     2, "argument --batch", None),
    ("export-threads-0", lambda t, m: ["export", m / "ckpt", "--out", t / "b", "--threads", "0"], 2,
     "argument --threads", None),
    ("parity-threads-0", lambda t, m: ["parity", t / "b", "--threads", "0"], 2, "argument --threads", None),
    ("atol-nan", lambda t, m: ["parity", t / "b", "--atol", "nan"], 2, "argument --atol", None),
    ("atol-inf", lambda t, m: ["parity", t / "b", "--atol", "inf"], 2, "argument --atol", None),
    ("atol-negative", lambda t, m: ["parity", t / "b", "--atol", "-1"], 2, "argument --atol", None),
    ("min-cosine-2", lambda t, m: ["parity", t / "b", "--min-cosine", "2"], 2, "argument --min-cosine", None),
    ("r-a-billion", lambda t, m: ["retrofit", "fmnist-vit", "--r", "1000000000", "--no-progress"], 2,
     "above the basis height", None),
    ("unknown-role", lambda t, m: ["retrofit", "fmnist-vit", "--role", "nosuch:s=4", "--no-progress"], 2,
     "['nosuch'] are not roles of timm-vit; its roles are ['qkv', 'proj', 'fc1', 'fc2']", None),
    ("config-missing", lambda t, m: ["retrofit", "fmnist-vit", "--config", t / "none.json"], 2, "does not exist", None),
    ("config-a-folder", lambda t, m: ["retrofit", "fmnist-vit", "--config", t], 2, "IsADirectoryError", None),
    ("adapt-epochs-0", lambda t, m: ["adapt", m / "ckpt", "--task", "digits", "--epochs", "0"], 2,
     "argument --epochs", None),
    # reports and outputs pointing at the wrong kind of path
    ("report-dir-is-a-file", lambda t, m: ["parity", t / "nobundle", "--no-plot", "--report-dir",
                                           (t / "r").write_text("x") and t / "r"], 2, "something is already there", None),
    ("json-is-a-folder", lambda t, m: ["parity", t / "nobundle", "--no-plot", "--report-dir", t / "reports", "--json",
                                       t], 2, "a file path", None),
    # crisp.json notes that info reads
    ("info-extra-a-list", lambda t, m: ["info", _edit_extra(t, m, [1, 2])], 2, "field 'extra' must be an object", None),
    ("info-retrofit-malformed", lambda t, m: ["info", _edit_extra(t, m, {"retrofit": {"layers": [{"group": 3}]}})], 2,
     "extra.retrofit must be an object", None),
    # files that are not regular files: refused at once, never waited on
    ("info-fifo-crisp-json", lambda t, m: ["info", _fifo(t, m, META_FILE)], 2, "FIFO", None),
    ("info-fifo-weights", lambda t, m: ["info", _fifo(t, m, WEIGHTS_FILE)], 2, "FIFO", None),
    ("apply-fifo-mixers", lambda t, m: ["apply", m / "ckpt", os.mkfifo(t / "m.safetensors") or t / "m.safetensors",
                                        "--no-eval"], 2, "FIFO", None),
    ("info-crisp-json-is-dev-zero", lambda t, m: ["info", _dev_zero(t, m)], 2, "outside the checkpoint folder", None),
]


def _dev_zero(t: Path, m: Path) -> Path:
    ck = _ckpt_copy(t, m)
    (ck / META_FILE).unlink()
    (ck / META_FILE).symlink_to("/dev/zero")
    return ck


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_exit_2_with_a_message(case, made, tmp_path, capsys):
    _, build, status, needle, after = case
    argv = build(tmp_path, made)
    assert run(argv) == status
    err = capsys.readouterr().err
    assert needle in err, err[-1500:]
    assert "Traceback" not in err
    if after is not None:
        assert after(tmp_path)


@pytest.mark.parametrize("code, phrase", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"),
                                          (errno.EACCES, "permission denied")])
def test_file_system_errors_while_writing_are_exit_2(made, tmp_path, capsys, monkeypatch, code, phrase):
    """A read-only file system, a full disk, no permission: the write fails with a clear message, exit 2."""
    import crisp_edge.files.checkpoint as checkpoint

    def failing(folder, data, meta):
        raise OSError(code, os.strerror(code), str(folder / WEIGHTS_FILE))

    monkeypatch.setattr(checkpoint, "_write_folder", failing)
    assert run(["apply", made / "ckpt", made / "t.mixers.safetensors", "--no-eval", "--out", tmp_path / "new"]) == 2
    err = capsys.readouterr().err
    assert phrase in err and str(tmp_path / "new") in err and "Traceback" not in err


def test_r_above_full_capacity_is_accepted_with_a_note(capsys):
    """The choice: accepted (gradient descent may use the extra rank), with a note that the basis is
    exact at n*s already and the extra rank only stores more numbers."""
    assert run(["retrofit", "fmnist-vit", "--r", "32", "--targets", "fc1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: r=32 for role 'fc1' is above its full capacity 16" in err


def test_adapt_refuses_an_unwritable_out_before_training(made, tmp_path, capsys, monkeypatch):
    """Was: adapt trained to the end and then lost the result when the write failed."""
    import crisp_edge.data.tasks as tasks
    import crisp_edge.files.io as io

    def never(*a, **k):
        raise AssertionError("the task was loaded for training before the output path was checked")

    monkeypatch.setattr(tasks, "load_task", never)
    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")  # what creating a file answers on a read-only mount

    monkeypatch.setattr(io.tempfile, "TemporaryFile", read_only)
    assert run(["adapt", made / "ckpt", "--task", "digits", "--out", tmp_path / "m.safetensors"]) == 2
    assert "not writable" in capsys.readouterr().err

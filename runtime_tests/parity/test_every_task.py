"""Every task of a bundle is checked: a task added later (``export-task``) gets its PyTorch reference from
the checkpoint its bases match, or is recorded as unchecked and fails parity unless opted out by name;
outputs made elsewhere (a device, the C++ runner) are checked for it too. ONNX Runtime and ExecuTorch
(the portable recipe: the fastest lowering)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from crisp_edge.export.executorch.export import export_executorch
from crisp_edge.export.executorch.tasks import add_task
from crisp_edge.export.onnx.adapter import mixers_to_onnx_adapter, remove_task
from crisp_edge.export.onnx.export import export_onnx
from crisp_edge.export.parity.check import check_bundle, check_outputs, run_outputs

import crisp_edge as ce
from crisp_edge.cli import main as crisp_edge_main
from crisp_edge.errors import BasisMismatchError, ConfigError
from crisp_edge.testing import make_task_file, toy_model

from runtime_tests.parity.conftest import CONFIG  # noqa: E402

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def task3(model, tmp_path_factory):
    return make_task_file(model, tmp_path_factory.mktemp("t") / "t3.safetensors", "t3", 3, 5)


@pytest.fixture(scope="module")
def onnx_src(model, ckpt, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("o") / "b", mode="swappable", checkpoint=ckpt).path


@pytest.fixture(scope="module")
def et_src(model, ckpt, tmp_path_factory):
    return export_executorch(model, tmp_path_factory.mktemp("e") / "b", mode="swappable", recipe="portable",
                             checkpoint=ckpt, max_classes=6).path


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "b"))


def manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


ADD = {"onnx": mixers_to_onnx_adapter, "et": lambda mf, b, **kw: add_task(b, mf, **kw)}


@pytest.mark.parametrize("kind", ["onnx", "et"])
def test_added_task_gets_its_reference_from_the_recorded_checkpoint(kind, onnx_src, et_src, task3, ckpt, tmp_path):
    b = copy_of(onnx_src if kind == "onnx" else et_src, tmp_path)
    assert manifest(b)["source"]["checkpoint"] == str(ckpt.resolve())
    ADD[kind](task3, b)
    rec = manifest(b)["tasks"]["t3"]
    assert rec["reference"]["checkpoint"] == str(ckpt.resolve()) and rec["reference"]["file"] in manifest(b)["files"]
    report = check_bundle(b)
    assert report.passed and "t3" in report.tasks
    assert {c.task for c in report.comparisons} == {"default", "t3"}
    # outputs made elsewhere (a phone, the C++ runner) are checked for the added task too
    outs = run_outputs(b)
    assert "output.t3.0.logits" in outs and check_outputs(b, outs).passed
    outs["output.t3.1.logits"] = outs["output.t3.1.logits"] + 0.1
    bad = check_outputs(b, outs)
    assert not bad.passed and any(c.task == "t3" and not c.passed for c in bad.comparisons)


@pytest.mark.parametrize("kind", ["onnx", "et"])
def test_task_without_a_checkpoint_is_unchecked_and_fails_unless_allowed(kind, onnx_src, et_src, task3, tmp_path):
    b = copy_of(onnx_src if kind == "onnx" else et_src, tmp_path)
    m = manifest(b)
    m["source"]["checkpoint"] = str(tmp_path / "gone")  # the checkpoint moved away since the export
    (b / "manifest.json").write_text(json.dumps(m))
    ADD[kind](task3, b)
    rec = manifest(b)["tasks"]["t3"]
    assert rec["reference"] is None and "cannot be loaded" in rec["unchecked"]
    report = check_bundle(b)
    assert not report.passed
    assert [(f.task, f.error) for f in report.failures] == [("t3", "Unchecked")]
    assert "--allow-unchecked t3" in report.failures[0].message
    allowed = check_bundle(b, allow_unchecked=["t3"])
    assert allowed.passed and allowed.unchecked == [{"task": "t3", "reason": rec["unchecked"], "allowed": True}]
    with pytest.raises(ConfigError, match="not unchecked tasks"):
        check_bundle(b, allow_unchecked=["default"])
    outs = run_outputs(b)  # a device run of every task: the unchecked one is still refused by name
    assert "output.t3.0.logits" in outs
    assert [f.error for f in check_outputs(b, outs).failures] == ["Unchecked"]
    assert check_outputs(b, outs, allow_unchecked=["t3"]).passed


def test_checkpoint_with_other_bases_is_refused_and_nothing_written(onnx_src, task3, tmp_path):
    b = copy_of(onnx_src, tmp_path)
    other = toy_model("timm-vit", seed=5, depth=2)
    ce.retrofit_(other, CONFIG, progress=False)
    ce.save_checkpoint(other, tmp_path / "other")
    before = sorted(p.relative_to(b) for p in b.rglob("*"))
    with pytest.raises(BasisMismatchError, match="other bases"):
        mixers_to_onnx_adapter(task3, b, checkpoint=tmp_path / "other")
    assert sorted(p.relative_to(b) for p in b.rglob("*")) == before


def test_readding_a_task_writes_a_new_reference_and_removes_the_old_one(onnx_src, task3, model, tmp_path):
    b = copy_of(onnx_src, tmp_path)
    mixers_to_onnx_adapter(task3, b)
    first = manifest(b)["tasks"]["t3"]
    changed = make_task_file(model, tmp_path / "t3b.safetensors", "t3", 4, 5)
    mixers_to_onnx_adapter(changed, b)
    second = manifest(b)["tasks"]["t3"]
    assert second["file"] == first["file"] == "tasks/t3.onnx_adapter"  # the one name loaders accept
    assert second["sha256"] != first["sha256"] and second["reference"]["file"] != first["reference"]["file"]
    assert not (b / first["reference"]["file"]).exists()
    assert check_bundle(b).passed
    remove_task(b, "t3")
    assert "t3" not in manifest(b)["tasks"] and sorted(p.name for p in (b / "tasks").iterdir()) == []
    assert check_bundle(b).passed


def test_cli_export_task_and_parity_exit_codes(onnx_src, task3, ckpt, tmp_path, capsys):
    b = copy_of(onnx_src, tmp_path)
    m = manifest(b)
    del m["source"]
    (b / "manifest.json").write_text(json.dumps(m))
    assert crisp_edge_main(["export-task", str(b), str(task3)]) == 0
    assert "UNCHECKED" in capsys.readouterr().err
    args = ["parity", str(b), "--report-dir", str(tmp_path / "r"), "--no-plot", "--no-progress"]
    assert crisp_edge_main(args) == 1
    doc = json.loads((tmp_path / "r" / "parity.json").read_text())
    assert doc["unchecked"] == [{"task": "t3", "reason": manifest(b)["tasks"]["t3"]["unchecked"], "allowed": False}]
    assert crisp_edge_main(args + ["--allow-unchecked", "t3"]) == 0
    assert crisp_edge_main(args + ["--allow-unchecked", "nope"]) == 2
    assert crisp_edge_main(["export-task", str(b), str(task3), "--checkpoint", str(ckpt)]) == 0
    assert "PyTorch reference for 't3' computed" in capsys.readouterr().out
    assert crisp_edge_main(args) == 0


def test_reference_file_not_listed_in_the_manifest_is_refused(onnx_src, task3, tmp_path):
    b = copy_of(onnx_src, tmp_path)
    mixers_to_onnx_adapter(task3, b)
    m = manifest(b)
    del m["files"][m["tasks"]["t3"]["reference"]["file"]]  # an edit: the file would no longer be hash-checked
    (b / "manifest.json").write_text(json.dumps(m))
    report = check_bundle(b)
    assert not report.passed and "not listed" in report.failures[0].message


@pytest.mark.slow
def test_cpp_runner_outputs_for_an_added_task_are_checked(et_src, task3, tmp_path):
    """The C++ runner runs a task added by export-task (its manifest record now carries the reference
    fields), and ``check_outputs`` checks its outputs against the task's reference."""
    import subprocess
    import sys

    from crisp_edge.export.executorch.session import write_runner_inputs

    root = Path(__file__).resolve().parents[2]
    exe = tmp_path / "crisp_et_runner"
    subprocess.run(["bash", str(root / "export" / "executorch" / "runner" / "build.sh"), sys.executable, str(exe)],
                   check=True, capture_output=True, timeout=900)
    b = copy_of(et_src, tmp_path)
    add_task(b, task3)
    n = write_runner_inputs(b, tmp_path / "in")
    (tmp_path / "out").mkdir()
    r = subprocess.run([str(exe), str(b), str(tmp_path / "out"), "--inputs", str(tmp_path / "in"), "--cases", str(n),
                        "--task", "t3", "--task", "default"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = check_outputs(b, tmp_path / "out")
    assert report.passed and sorted(report.tasks) == ["default", "t3"]
    bad = tmp_path / "out" / "output.t3.0.logits.npy"
    np.save(bad, np.load(bad) + 0.1)
    assert not check_outputs(b, tmp_path / "out").passed


@pytest.mark.parametrize("failing_write", [1, 2, 3])
def test_readding_a_task_on_a_full_disk_keeps_the_old_task(onnx_src, task3, model, tmp_path, monkeypatch, failing_write):
    """export-task is one all-or-nothing update: when the disk fills at any of its writes (the task file,
    its reference, the manifest), the bundle keeps the old task, its reference and a manifest that matches."""
    import errno

    import crisp_edge.files.transaction as transaction

    b = copy_of(onnx_src, tmp_path)
    mixers_to_onnx_adapter(task3, b)
    before = {p.name: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    real, calls = transaction.atomic_write_bytes, []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == failing_write:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(transaction, "atomic_write_bytes", full_disk)
    changed = make_task_file(model, tmp_path / "t3b.safetensors", "t3", 4, 5)
    with pytest.raises(OSError):
        mixers_to_onnx_adapter(changed, b)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in b.rglob("*") if p.is_file()} == before
    assert check_bundle(b).passed

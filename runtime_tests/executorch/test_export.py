"""ExecuTorch export: dense, factored and swappable bundles of a toy timm ViT, checked in ExecuTorch.

The default suite exports one swappable bundle with the portable recipe (the fastest lowering, ~10 s
here) and checks switching, adding tasks and every refusal on it; XNNPACK exports, the other modes
and the C++ runner (built with g++) are ``slow``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from crisp_edge.export.errors import AdapterError, BundleError, KernelsError, NoTaskError
from crisp_edge.export.executorch.bundle import DEFAULT_PTD, PROGRAM, load_et_bundle
from crisp_edge.export.executorch.export import export_executorch
from crisp_edge.export.executorch.session import write_runner_inputs
from crisp_edge.export.executorch.tasks import (
    add_task,
    check_task_ptd,
    read_ptd_bytes,
    task_arrays,
    write_task_ptd,
)
from crisp_edge.export.parity.check import check_outputs
from crisp_edge.export.parity.validate import validate_bundle

import crisp_edge as ce
from crisp_edge.errors import BasisMismatchError, LayoutMismatchError
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.testing import make_task_file, toy_model

pytestmark = pytest.mark.runtime
CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))
REPO = Path(__file__).resolve().parents[2]


def crisp_toy(seed: int = 0, config: ce.CrispConfig = CONFIG):
    model = toy_model("timm-vit", seed=seed, depth=2)  # 2 blocks: lowering time is the test's cost
    ce.retrofit_(model, config, progress=False)
    return model




def torch_logits(model, mixer_path, x):
    m = copy.deepcopy(model)
    if mixer_path is not None:
        apply_mixers_(m, mixer_path)
    with torch.no_grad():
        return m(x).numpy()


@pytest.fixture(scope="module")
def model():
    return crisp_toy()


@pytest.fixture(scope="module")
def tasks(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return [make_task_file(model, d / "t1.safetensors", "t1", 1, 3), make_task_file(model, d / "t2.safetensors", "t2", 2, 7)]


@pytest.fixture(scope="module")
def portable(model, tasks, tmp_path_factory):
    return export_executorch(model, tmp_path_factory.mktemp("b") / "swap", mode="swappable", recipe="portable",
                             tasks=tasks)


@pytest.fixture()
def bundle_copy(portable, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(portable.path, dst)
    return load_et_bundle(dst)


def test_swappable_bundle_layout_and_parity(portable):
    m = portable.manifest
    assert m["format"] == "crisp-edge/executorch-bundle" and m["version"] == 1 and m["recipe"] == "portable"
    assert m["parity"]["passed"] and m["parity"]["max_abs"] <= m["tolerance"]["atol"] == 1e-4
    assert m["reference"]["tasks"] == ["default", "t1", "t2"]
    assert m["swappable"]["head"]["max_classes"] == 7  # the largest head shipped
    assert set(m["non_delegated_ops"]) == {"forward", "set_task"}
    # set_task folds each group (qkv, proj, fc1, fc2 of the 2 blocks: group_size 2) in one crisp::fold_ call
    assert m["non_delegated_ops"]["set_task"]["crisp.fold_.default"] == 4
    assert m["custom_ops"] == ["crisp::fold_"]  # the kernel a session registers before loading
    assert (portable.path / "tasks" / "t1.ptd").is_file() and (portable.path / DEFAULT_PTD).is_file()
    with np.load(portable.path / "reference.npz", allow_pickle=False) as z:
        assert {"input.0.x", "output.t2.1.logits"} <= set(z.files) and z["output.t2.1.logits"].shape == (2, 7)
    report = validate_bundle(portable)  # again, from disk
    assert report.passed and len(report.comparisons) == 6


def test_session_switches_tasks_and_matches_pytorch(portable, model, tasks):
    sess = load_et_bundle(portable.path).session(threads=1)
    assert sess.swappable and sess.output_names == ["logits"]
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with pytest.raises(NoTaskError):
        sess.run({"x": x.numpy()})
    for task, path in [("t2", tasks[1]), ("t1", tasks[0]), ("default", None), ("t2", tasks[1])]:
        assert sess.set_task(task) == task
        got = sess.run({"x": x.numpy()})["logits"]
        ref = torch_logits(model, path, x)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4
    other = torch_logits(model, tasks[0], x)
    assert np.abs(got[:, :3] - other).max() > 1e-2  # the tasks really differ: switching is visible


def test_kernels_that_cannot_be_loaded_are_a_typed_error(portable, monkeypatch):
    from crisp_edge.export.errors import ExportError
    from crisp_edge.export.executorch import custom_ops

    def fail():
        raise ExportError("no g++ here")

    monkeypatch.setattr(custom_ops, "load_kernels", fail)
    with pytest.raises(KernelsError, match=r"crisp::fold_.*no g\+\+ here"):
        portable.session()


def test_set_task_from_a_ptd_path_and_wrong_input_shape(portable, model, tasks):
    sess = portable.session()
    sess.set_task(portable.path / "tasks" / "t1.ptd")
    x = torch.randn(2, 1, 16, 16)
    assert np.abs(sess(x.numpy()) - torch_logits(model, tasks[0], x)).max() <= 1e-4
    with pytest.raises(Exception, match="static shapes"):
        sess.run({"x": np.zeros((3, 1, 16, 16), np.float32)})


def test_add_task_later_without_reexport(bundle_copy, model, tmp_path):
    path = make_task_file(model, tmp_path / "t3.safetensors", "t3", 3, 5)
    before = (bundle_copy.path / PROGRAM).read_bytes()
    ptd = add_task(bundle_copy.path, path)
    assert ptd == bundle_copy.path / "tasks" / "t3.ptd"
    b = load_et_bundle(bundle_copy.path)  # hashes of the new task checked
    assert (b.path / PROGRAM).read_bytes() == before and "t3" in b.tasks
    rec = b.tasks["t3"]
    # tensors + the FlatTensor metadata (~100 bytes a tensor, a few hundred bytes in all; the size goal
    # of 10% + 1 KB is checked on the real models by bench/bench_executorch.py)
    assert rec["tensor_bytes"] < rec["bytes"] <= rec["tensor_bytes"] + 128 * 12
    sess = b.session()
    sess.set_task("t3")
    x = torch.randn(2, 1, 16, 16)
    assert np.abs(sess(x) - torch_logits(model, path, x)).max() <= 1e-4


def test_mixers_for_other_bases_or_layout_are_refused(bundle_copy, tmp_path):
    other = crisp_toy(seed=1)
    with pytest.raises(BasisMismatchError, match="other bases"):
        add_task(bundle_copy.path, make_task_file(other, tmp_path / "o.safetensors", "o", 1, 3))
    regrouped = crisp_toy(config=ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=1)))
    with pytest.raises(LayoutMismatchError):
        add_task(bundle_copy.path, make_task_file(regrouped, tmp_path / "g.safetensors", "g", 1, 3))
    assert "o" not in load_et_bundle(bundle_copy.path).tasks


def test_head_larger_than_the_program_capacity_is_refused(bundle_copy, model, tmp_path):
    with pytest.raises(AdapterError, match="max_classes"):
        add_task(bundle_copy.path, make_task_file(model, tmp_path / "big.safetensors", "big", 1, 9))


def test_mixer_file_with_biases_is_refused(portable, model, tmp_path):
    mf = read_mixers(make_task_file(model, tmp_path / "b.safetensors", "b", 1, 3, biases=True))
    with pytest.raises(LayoutMismatchError, match="biases"):
        task_arrays(mf, portable.manifest["swappable"])


def test_ptd_for_another_bundle_is_refused_before_it_runs(portable, model, tasks, tmp_path):
    swap = portable.manifest["swappable"]
    arrays = task_arrays(read_mixers(tasks[0]), swap)
    foreign = write_task_ptd(arrays, tmp_path / "foreign.ptd", swap["tag"] ^ 1)
    sess = portable.session()
    sess.set_task("t1")
    with pytest.raises(BasisMismatchError, match="other bases"):
        sess.set_task(foreign)
    with pytest.raises(NoTaskError):  # a failed switch leaves no task, never the previous one
        sess(np.zeros((2, 1, 16, 16), np.float32))
    bad = dict(arrays)
    bad["mixer.qkv_0_1"] = np.zeros((2, 8, 3), np.float32)
    with pytest.raises(AdapterError, match="shape"):
        sess.set_task(write_task_ptd(bad, tmp_path / "shape.ptd", swap["tag"]))


def test_truncated_or_junk_files_give_errors(bundle_copy, tmp_path):
    data = (bundle_copy.path / "tasks" / "t1.ptd").read_bytes()
    sess = bundle_copy.session()
    for i, blob in enumerate([data[:40], data[:300], data[:-64], b"\0" * 512, b"FT01" * 100]):
        p = tmp_path / f"cut{i}.ptd"
        p.write_bytes(blob)
        with pytest.raises(AdapterError):
            sess.set_task(p)
    (bundle_copy.path / "tasks" / "t1.ptd").write_bytes(data[:-10])
    with pytest.raises(BundleError, match="does not match"):
        load_et_bundle(bundle_copy.path)
    pte = bundle_copy.path / PROGRAM
    pte.write_bytes(pte.read_bytes()[: pte.stat().st_size // 2])
    with pytest.raises(BundleError):
        load_et_bundle(bundle_copy.path, verify=False).session()
    from crisp_edge.export.executorch.session import load_program

    with pytest.raises(BundleError, match="cannot load"):
        load_program(pte.read_bytes(), str(pte))


def test_edited_manifest_is_refused(bundle_copy):
    path = bundle_copy.path / "manifest.json"
    meta = json.loads(path.read_text())
    meta["swappable"]["tag"] += 1
    path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="tag"):
        load_et_bundle(bundle_copy.path)
    meta["swappable"]["tag"] -= 1
    meta["tasks"]["t1"]["file"] = "../t1.ptd"
    path.write_text(json.dumps(meta))
    with pytest.raises(BundleError):
        load_et_bundle(bundle_copy.path)


def test_default_ptd_roundtrip(portable):
    swap = portable.manifest["swappable"]
    arrays, classes = check_task_ptd(read_ptd_bytes(portable.path / DEFAULT_PTD), swap, "default")
    assert classes == swap["head"]["num_classes"] == 4
    assert arrays["mixer.fc1_0_1"].shape == (2, 8, 4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "factored", "swappable"])
def test_xnnpack_modes_meet_parity(model, tasks, mode, tmp_path):
    b = export_executorch(model, tmp_path / mode, mode=mode, recipe="xnnpack",
                          tasks=tasks if mode == "swappable" else ())
    m = b.manifest
    assert m["parity"]["passed"] and m["parity"]["max_abs"] <= 1e-3
    # attention stays delegated: no softmax or bmm outside XNNPACK, layer norm is the known exception
    fwd = m["non_delegated_ops"]["forward"]
    assert not any(op.startswith(("aten.bmm", "aten._softmax", "aten.addmm", "aten.mm")) for op in fwd), fwd


@pytest.mark.slow
def test_cpp_runner_switches_tasks_and_refuses_foreign_files(portable, tasks, tmp_path):
    assert shutil.which("g++"), "the C++ runner needs g++ (`make setup` installs it: apt-get install g++)"
    exe = tmp_path / "crisp_et_runner"
    subprocess.run(["bash", str(REPO / "export/executorch/runner/build.sh"), str(REPO / ".venv/bin/python"), str(exe)],
                   check=True, capture_output=True)
    b = portable
    n = write_runner_inputs(b, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    args = [str(exe), str(b.path), str(out), "--inputs", str(tmp_path / "in"), "--cases", str(n)]
    tasks_args = ["--task", f"t1={b.path}/tasks/t1.ptd", "--task", f"t2={b.path}/tasks/t2.ptd",
                  "--task", f"default={b.path}/{DEFAULT_PTD}"]
    r = subprocess.run(args + tasks_args, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    report = check_outputs(b, out, raise_on_failure=True)
    assert report.passed and len(report.comparisons) == 6
    swap = b.manifest["swappable"]
    foreign = write_task_ptd(task_arrays(read_mixers(tasks[0]), swap), tmp_path / "foreign.ptd", swap["tag"] ^ 1)
    r = subprocess.run(args + ["--task", f"t1={foreign}"], capture_output=True, text=True, check=False)
    assert r.returncode == 3 and "other bases" in r.stderr
    data = (b.path / "tasks" / "t1.ptd").read_bytes()
    for i, blob in enumerate([data[:40], data[:300], data[:-64]]):
        (tmp_path / f"cut{i}.ptd").write_bytes(blob)
        r = subprocess.run(args + ["--task", f"t1={tmp_path}/cut{i}.ptd"], capture_output=True, text=True, check=False)
        assert r.returncode == 3, (i, r.returncode, r.stderr)
    cut = tmp_path / "cut_bundle"
    shutil.copytree(b.path, cut)
    (cut / PROGRAM).write_bytes((cut / PROGRAM).read_bytes()[:1000])
    r = subprocess.run([str(exe), str(cut), str(out), "--inputs", str(tmp_path / "in"), "--cases", "1"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 4 and "cannot load" in r.stderr


@pytest.mark.slow
def test_cli_export_and_export_task(model, tasks, tmp_path, capsys):
    import argparse

    from crisp_edge.cli.export import add_parser as add_export_parser
    from crisp_edge.cli.export_task import add_parser as add_export_task_parser
    from crisp_edge.files.checkpoint import save_checkpoint

    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    add_export_parser(sub)
    add_export_task_parser(sub)
    out = tmp_path / "et"
    args = ap.parse_args(["export", str(ckpt), "--target", "executorch", "--recipe", "portable", "--mode",
                          "swappable", "--out", str(out), "--batch", "1", "--task", str(tasks[0]), "--max-classes", "8"])
    assert args.func(args) == 0
    assert "ExecuTorch bundle (portable, batch 1)" in capsys.readouterr().out
    args = ap.parse_args(["export-task", str(out), str(tasks[1]), "--name", "later"])
    assert args.func(args) == 0
    b = load_et_bundle(out)
    assert set(b.tasks) == {"t1", "later"} and b.manifest["inputs"][0]["shape"] == [1, 1, 16, 16]
    sess = b.session()
    sess.set_task("later")
    assert sess(np.zeros((1, 1, 16, 16), np.float32)).shape == (1, 7)


def test_transposed_groups_export_and_switch(tmp_path):
    """A transposed group (fc2 with s = d_out: an input-side basis) builds the same weights in the
    program's set_task as in PyTorch."""
    config = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2),
                            roles={"fc2": ce.RoleConfig(s=32, group_size=2, transpose=True)})
    model = crisp_toy(config=config)
    task = make_task_file(model, tmp_path / "t.safetensors", "t", 1, 3)
    bundle = export_executorch(model, tmp_path / "b", mode="swappable", recipe="portable", tasks=[task])
    assert bundle.manifest["parity"]["passed"]
    assert bundle.manifest["swappable"]["layout"]["fc2_0_1"]["transpose"] is True
    # the fused fold for the other three groups, the product-and-copy path for the transposed one, in one set_task
    assert bundle.manifest["non_delegated_ops"]["set_task"]["crisp.fold_.default"] == 3
    sess = load_et_bundle(bundle.path).session(threads=1)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    sess.set_task("t")
    assert np.abs(sess.run({"x": x.numpy()})["logits"] - torch_logits(model, task, x)).max() <= 1e-4


def _edit_inputs(bundle_copy, change) -> Path:
    path = bundle_copy.path / "manifest.json"
    m = json.loads(path.read_text())
    change(m["swappable"]["set_task_inputs"])
    path.write_text(json.dumps(m))
    return bundle_copy.path


def test_reordered_set_task_inputs_are_caught_by_the_session(bundle_copy):
    """Was: swapping two entries of the same shape fed one layer's mixers to another, silently (only
    parity noticed). The program's own crisp_io tag covers their names and order."""
    inputs = bundle_copy.manifest["swappable"]["set_task_inputs"]
    assert inputs[0]["shape"] == inputs[1]["shape"]  # a swap no shape check can see
    folder = _edit_inputs(bundle_copy, lambda items: items.__setitem__(slice(0, 2), [items[1], items[0]]))
    with pytest.raises(BundleError, match="set_task inputs or head .* are not the ones this program was exported with"):
        load_et_bundle(folder).session()


def test_an_extra_set_task_input_is_a_bundle_error(bundle_copy):
    """Was: a KeyError traceback at set_task."""
    folder = _edit_inputs(bundle_copy, lambda items: items.append({"name": "mixer.extra", "shape": [1, 2]}))
    with pytest.raises(BundleError, match="set_task takes .* inputs|set_task inputs or head .* are not the ones"):
        load_et_bundle(folder).session()


def test_overwrite_replaces_only_an_executorch_bundle(model, tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "manifest.json").write_text(json.dumps({"format": "crisp-edge/onnx-bundle", "version": 1}))
    with pytest.raises(BundleError, match="a bundle of another runtime"):
        export_executorch(model, tmp_path / "onnx", mode="dense", recipe="portable", overwrite=True)
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["format"] == "crisp-edge/onnx-bundle"


def test_a_task_file_changed_after_its_first_use_is_caught(bundle_copy):
    """As for ONNX bundles: a task kept by name is answered from memory only while its file is
    unchanged; a file swapped underneath, or edited in place with size and mtime put back, is read
    again and refused by the manifest's SHA-256, by name and by path."""
    sess = bundle_copy.session()
    x = torch.randn(2, 1, 16, 16)
    t1 = bundle_copy.path / "tasks" / "t1.ptd"
    good = t1.read_bytes()
    sess.set_task("t1")
    want = sess(x)
    tmp = bundle_copy.path / "tasks" / "swapped.tmp"
    tmp.write_bytes((bundle_copy.path / "tasks" / "t2.ptd").read_bytes())
    os.replace(tmp, t1)  # another task's valid file, renamed into t1's place
    with pytest.raises(BundleError, match="recorded SHA-256"):
        sess.set_task("t1")
    with pytest.raises(NoTaskError):
        sess(x)
    t1.write_bytes(good)
    sess.set_task("t1")
    assert np.array_equal(sess(x), want)
    st = t1.stat()
    damaged = bytearray(good)
    at = good.find(check_task_ptd(good, bundle_copy.manifest["swappable"], "t1", hashed=True)[0]["head.weight"].tobytes())
    assert at > 0
    damaged[at] ^= 0x40  # the lowest mantissa byte of the head's first weight
    with open(t1, "r+b") as f:
        f.write(damaged)
    os.utime(t1, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BundleError, match="recorded SHA-256"):
        sess.set_task("t1")
    with pytest.raises(AdapterError):  # by path: no manifest record, so its own crisp.digest refuses it
        sess.set_task(t1)

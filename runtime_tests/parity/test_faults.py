"""The parity check catches faults: each injected fault fails the check with a message naming it.

Faults, injected into real exported bundles of a toy CRISP ViT (the clean bundle passes first):

* one weight perturbed (the manifest re-hashed, so the file check passes and the numbers must catch it);
* another task's mixer file swapped in (``tasks/t2`` holds ``t1``'s mixers);
* a mixer file made for other bases paired with this bundle (refused by the loader, reported as such);
* outputs reordered (a two-output bundle whose graph returns them under each other's names);
* the output dtype changed (a cast to float16 at the end of the graph);

and the same faults in outputs produced elsewhere (``check_outputs``: a device's ``.npz``).
Each runtime of ``RUNTIMES`` below gets every fault it can carry.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from crisp_edge.export import export_onnx
from crisp_edge.export.errors import ParityError
from crisp_edge.export.parity.check import check_bundle, check_outputs, run_outputs
from crisp_edge.export.parity.reference import read_reference, write_reference
from onnx import TensorProto, helper, numpy_helper

import crisp_edge as ce
from crisp_edge.files.io import atomic_write_json, sha256_file
from crisp_edge.testing import make_task_file, toy_model

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)
CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))


# ------------------------------------------------------------------------------------ shared helpers
def crisp_toy(seed: int = 0):
    model = toy_model("timm-vit", seed=seed)
    ce.retrofit_(model, CONFIG, progress=False)
    return model




def rehash(folder: Path) -> None:
    """Record every file's current SHA-256 and size in the manifest (so only the numbers can tell)."""
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    for name, rec in list(m["files"].items()) + [(t["file"], t) for t in m.get("tasks", {}).values()]:
        rec.update(sha256=sha256_file(folder / name), bytes=(folder / name).stat().st_size)
    atomic_write_json(path, m)


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def problems(report) -> str:
    return "\n".join(report.problems())


# ------------------------------------------------------------------------------------ ONNX surgery
def _load(folder: Path, name: str = "model.onnx") -> onnx.ModelProto:
    return onnx.load(str(folder / name))


def _save(proto: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> None:
    onnx.save(proto, str(folder / name))


def onnx_perturb(folder: Path, delta: float = 0.5) -> str:
    """Add ``delta`` to one element of one weight: the fc2 basis of the first group (in fold.onnx for
    swappable, model.onnx for factored) or the head (dense). fc2's output feeds the residual stream
    directly, so one element moves the logits by ~5e-3 (one element of a q-projection basis moves
    them by ~4e-5, under the tolerance: parity bounds the output error, not every weight). Returns
    the tensor's name."""
    m = json.loads((folder / "manifest.json").read_text())
    file, want = {"swappable": ("fold.onnx", "basis.fc2_0_1"), "factored": ("model.onnx", "crisp_bases.fc2_0_1"),
                  "dense": ("model.onnx", "head.weight")}[m["mode"]]
    proto = _load(folder, file)
    for t in proto.graph.initializer:
        if t.name.startswith(want):
            a = numpy_helper.to_array(t).copy()
            a.flat[0] += delta
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            _save(proto, folder, file)
            return t.name
    raise AssertionError(f"no initializer {want}* in {file}")


def onnx_cast_output(folder: Path, to=TensorProto.FLOAT16) -> None:
    """End the graph with a cast of its output to another dtype (the manifest still says float32)."""
    proto = _load(folder)
    out = proto.graph.output[0]
    for node in proto.graph.node:
        node.output[:] = [f"{o}_pre" if o == out.name else o for o in node.output]
    proto.graph.node.append(helper.make_node("Cast", [f"{out.name}_pre"], [out.name], to=to))
    out.type.tensor_type.elem_type = to
    _save(proto, folder)


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a.astype(np.float64) - a.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def onnx_add_probs(folder: Path) -> None:
    """Make a two-output bundle: ``probs = Softmax(logits)`` as a second graph output, with its
    reference (the softmax of the stored reference logits) and the manifest updated and re-hashed."""
    proto = _load(folder)
    logits = proto.graph.output[0]
    proto.graph.node.append(helper.make_node("Softmax", [logits.name], ["probs"], axis=-1))
    probs = copy.deepcopy(logits)
    probs.name = "probs"
    proto.graph.output.append(probs)
    _save(proto, folder)
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    m["outputs"].append({**m["outputs"][0], "name": "probs"})
    m["models"]["model"]["outputs"].append("probs")
    ref = read_reference(folder, m["reference"])
    m["reference"]["outputs"].append("probs")
    outs = {t: [{**c, "probs": _softmax(c["logits"])} for c in cases] for t, cases in ref.outputs.items()}
    write_reference(folder, ref.inputs, outs)
    atomic_write_json(path, m)
    rehash(folder)


def onnx_swap_output_names(folder: Path) -> None:
    """The graph returns softmax values as 'logits' and the logits as 'probs' (names kept, values swapped)."""
    proto = _load(folder)
    nodes = list(proto.graph.node)
    softmax = next(n for n in nodes if n.op_type == "Softmax" and n.output[0] == "probs")
    for node in nodes:
        if node is not softmax:
            node.output[:] = ["raw_logits" if o == "logits" else o for o in node.output]
            node.input[:] = ["raw_logits" if i == "logits" else i for i in node.input]
    softmax.input[:] = ["raw_logits"]
    softmax.output[:] = ["logits"]
    proto.graph.node.append(helper.make_node("Identity", ["raw_logits"], ["probs"]))
    _save(proto, folder)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model():
    return crisp_toy(seed=0)


@pytest.fixture(scope="module")
def task_files(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return [make_task_file(model, d / "t1.safetensors", "t1", 1, 4), make_task_file(model, d / "t2.safetensors", "t2", 2, 4)]


@pytest.fixture(scope="module")
def onnx_bundles(model, task_files, tmp_path_factory):
    """Clean bundles: swappable with tasks t1 and t2, dense, factored, and one of other bases."""
    d = tmp_path_factory.mktemp("onnx")
    out = {"swappable": export_onnx(model, d / "swappable", mode="swappable", tasks=task_files).path,
           "dense": export_onnx(model, d / "dense", mode="dense").path,
           "factored": export_onnx(model, d / "factored", mode="factored").path}
    other = crisp_toy(seed=5)  # other bases: its own t2 mixers
    other_task = make_task_file(other, d / "other_t2.safetensors", "t2", 3, 4)
    out["other-bases"] = export_onnx(other, d / "other", mode="swappable", tasks=[other_task]).path
    return out


# ------------------------------------------------------------------------------------ ONNX Runtime
def test_onnx_clean_bundles_pass(onnx_bundles):
    for mode in ("swappable", "dense", "factored"):
        report = check_bundle(onnx_bundles[mode])
        assert report.passed, problems(report)
        assert not report.problems() and report.max_abs <= 1e-4


@pytest.mark.parametrize("mode", ["dense", "factored", "swappable"])
def test_onnx_perturbed_weight_fails_with_max_abs(onnx_bundles, tmp_path, mode):
    folder = copy_bundle(onnx_bundles[mode], tmp_path / "b")
    name = onnx_perturb(folder)
    report = check_bundle(folder)  # the stale hash is a BundleError first (the file check) ...
    assert not report.passed and report.failures[0].error == "BundleError" and "SHA-256" in report.failures[0].message
    rehash(folder)  # ... with the manifest re-hashed, the numeric check must catch it
    report = check_bundle(folder)
    assert not report.passed and not report.failures, name
    failed = [c for c in report.comparisons if not c.passed]
    assert failed and all(c.fault == "numeric" for c in failed)
    assert "max abs" in failed[0].problem and "> 0.0001" in failed[0].problem, failed[0].problem
    with pytest.raises(ParityError, match=r"max abs \S+ > 0.0001"):
        check_bundle(folder, raise_on_failure=True)


def test_onnx_swapped_task_file_names_the_task(onnx_bundles, tmp_path):
    folder = copy_bundle(onnx_bundles["swappable"], tmp_path / "b")
    shutil.copyfile(folder / "tasks/t1.onnx_adapter", folder / "tasks/t2.onnx_adapter")
    rehash(folder)
    report = check_bundle(folder)
    assert not report.passed
    t2 = [c for c in report.comparisons if c.task == "t2"]
    assert t2 and all(not c.passed and c.fault == "wrong-task" for c in t2)
    assert "outputs match task 't1' rather than 't2' (wrong task's mixers?)" in t2[0].problem
    assert all(c.passed for c in report.comparisons if c.task != "t2")


def test_onnx_mixers_of_other_bases_refused_and_reported(onnx_bundles, tmp_path):
    folder = copy_bundle(onnx_bundles["swappable"], tmp_path / "b")
    shutil.copyfile(onnx_bundles["other-bases"] / "tasks/t2.onnx_adapter", folder / "tasks/t2.onnx_adapter")
    rehash(folder)
    report = check_bundle(folder)
    assert not report.passed
    [f] = report.failures
    assert (f.task, f.stage, f.error) == ("t2", "set_task", "BasisMismatchError")
    assert "other bases" in f.message
    assert "BasisMismatchError" in problems(report)
    assert all(c.passed for c in report.comparisons)  # the other tasks still ran and passed


def test_onnx_reordered_outputs_named(onnx_bundles, tmp_path):
    folder = copy_bundle(onnx_bundles["swappable"], tmp_path / "b")
    onnx_add_probs(folder)
    clean = check_bundle(folder)
    assert clean.passed and {c.output for c in clean.comparisons} == {"logits", "probs"}, problems(clean)
    onnx_swap_output_names(folder)
    rehash(folder)
    report = check_bundle(folder)
    assert not report.passed and not report.failures
    msgs = problems(report)
    assert "outputs reordered: 'logits' matches the reference of 'probs'" in msgs
    assert "outputs reordered: 'probs' matches the reference of 'logits'" in msgs
    assert all(c.fault == "reordered" for c in report.comparisons)


def test_onnx_changed_dtype_named(onnx_bundles, tmp_path):
    folder = copy_bundle(onnx_bundles["dense"], tmp_path / "b")
    onnx_cast_output(folder)
    rehash(folder)
    report = check_bundle(folder)
    assert not report.passed
    assert all(c.fault == "dtype" and c.dtype == "float16" for c in report.comparisons)
    assert "dtype float16 != reference float32" in report.comparisons[0].problem


# ------------------------------------------------------------------------------------ device outputs
@pytest.fixture(scope="module")
def device_outputs(onnx_bundles):
    return run_outputs(onnx_bundles["swappable"])


def test_device_outputs_clean_pass(onnx_bundles, device_outputs):
    report = check_outputs(onnx_bundles["swappable"], dict(device_outputs))
    assert report.passed and report.tasks == ["default", "t1", "t2"] and len(report.comparisons) == 6


def test_device_outputs_faults_named(onnx_bundles, device_outputs):
    b = onnx_bundles["swappable"]
    out = dict(device_outputs)
    out["output.t1.0.logits"] = out["output.t1.0.logits"].copy()
    out["output.t1.0.logits"][0, 1] += 0.3
    assert "max abs 0.3 > 0.0001" in problems(check_outputs(b, out))

    out = {**device_outputs, "output.t2.0.logits": device_outputs["output.t1.0.logits"]}
    assert "outputs match task 't1' rather than 't2'" in problems(check_outputs(b, out))

    out = {**device_outputs, "output.t2.0.logits": device_outputs["output.default.0.logits"]}
    assert "outputs match task 'default' rather than 't2' (the task's mixers were not applied?)" in problems(
        check_outputs(b, out))

    out = {**device_outputs, "output.t1.0.logits": device_outputs["output.t1.1.logits"],
           "output.t1.1.logits": device_outputs["output.t1.0.logits"]}
    msgs = problems(check_outputs(b, out))
    assert "outputs reordered: case 0 matches the reference of case 1" in msgs
    assert "outputs reordered: case 1 matches the reference of case 0" in msgs

    out = {k: v.astype(np.float16) for k, v in device_outputs.items()}
    assert "dtype float16 != reference float32" in problems(check_outputs(b, out))

    out = {k: v for k, v in device_outputs.items() if k != "output.t2.1.logits"}
    assert "case 1: output 'logits' was not produced" in problems(check_outputs(b, out))


def test_device_outputs_reordered_names(onnx_bundles, tmp_path):
    folder = copy_bundle(onnx_bundles["dense"], tmp_path / "b")
    onnx_add_probs(folder)
    outs = run_outputs(folder)
    assert check_outputs(folder, outs).passed
    swapped = {k.replace("logits", "@").replace("probs", "logits").replace("@", "probs"): v for k, v in outs.items()}
    msgs = problems(check_outputs(folder, swapped))
    assert "outputs reordered: 'logits' matches the reference of 'probs'" in msgs


# ------------------------------------------------------------------------------------ ExecuTorch
# An ExecuTorch export takes 10-40 s on 2 cores, so these cases are marked slow (``make test-slow``
# and the parity suite command run them). The bundle is swappable with the portable recipe (its
# constants are stored as plain float32 in the program, so one can be perturbed in place) plus a
# dense XNNPACK one (the deployment recipe).


def et_perturb_program(folder: Path, tensor: np.ndarray, delta: float = 0.5) -> None:
    """Add ``delta`` to the first element of ``tensor`` where its float32 bytes lie in model.pte."""
    data = bytearray((folder / "model.pte").read_bytes())
    raw = np.ascontiguousarray(tensor, np.float32).tobytes()
    at = bytes(data).find(raw[:256])
    assert at >= 0 and bytes(data).find(raw[:256], at + 1) < 0, "the tensor's bytes are not in the program once"
    data[at:at + 4] = np.float32(np.frombuffer(raw[:4], np.float32)[0] + delta).tobytes()
    (folder / "model.pte").write_bytes(bytes(data))


def et_other_bases_task(folder: Path, other_model, other_mixers: Path, name: str) -> None:
    """Write ``tasks/<name>.ptd`` as an export of ``other_model`` (other bases) would: its tag and mixers."""
    from crisp_edge.export.bundle import bundle_tag
    from crisp_edge.export.executorch.tasks import task_arrays, write_task_ptd

    from crisp_edge.files.fingerprint import bases_fingerprint
    from crisp_edge.files.mixers import model_layout, read_mixers

    swap = json.loads((folder / "manifest.json").read_text())["swappable"]
    fp, layout = bases_fingerprint(other_model), model_layout(other_model)
    other = {**swap, "bases_sha256": fp, "layout": layout, "tag": bundle_tag(fp, layout)}
    assert other["tag"] != swap["tag"]
    write_task_ptd(task_arrays(read_mixers(other_mixers), other), folder / f"tasks/{name}.ptd", other["tag"])


@pytest.fixture(scope="module")
def et_bundles(model, task_files, tmp_path_factory):
    from crisp_edge.export.executorch.export import export_executorch

    d = tmp_path_factory.mktemp("et")
    return {"swappable": export_executorch(model, d / "swappable", mode="swappable", recipe="portable",
                                           tasks=task_files).path,
            "dense": export_executorch(model, d / "dense", mode="dense", recipe="xnnpack").path}


@pytest.mark.slow
def test_et_clean_bundles_pass(et_bundles):
    for folder in et_bundles.values():
        report = check_bundle(folder)
        assert report.passed and report.runtime == "executorch", problems(report)
    assert check_bundle(et_bundles["swappable"]).tasks == ["default", "t1", "t2"]
    from crisp_edge.export import validate_bundle

    assert validate_bundle(et_bundles["dense"]).runtime == "executorch"  # one entry point, dispatched on format


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["swappable", "dense"])
def test_et_perturbed_weight_fails_with_max_abs(model, et_bundles, tmp_path, mode):
    folder = copy_bundle(et_bundles[mode], tmp_path / "b")
    if mode == "swappable":  # a basis, a constant of the program (stored once, read by set_task)
        tensor = ce.crisp_bases(model)["fc2_0_1"].weight.detach().numpy()
    else:
        tensor = model.head.weight.detach().numpy()
    et_perturb_program(folder, tensor)
    assert check_bundle(folder).failures[0].error == "BundleError"  # the stale hash first
    rehash(folder)
    report = check_bundle(folder)
    assert not report.passed and not report.failures
    failed = [c for c in report.comparisons if not c.passed]
    assert failed and all(c.fault == "numeric" for c in failed)
    atol = report.atol
    assert f"> {atol:g}" in failed[0].problem and failed[0].problem.startswith("max abs"), failed[0].problem


@pytest.mark.slow
def test_et_swapped_task_file_names_the_task(et_bundles, tmp_path):
    folder = copy_bundle(et_bundles["swappable"], tmp_path / "b")
    shutil.copyfile(folder / "tasks/t1.ptd", folder / "tasks/t2.ptd")
    rehash(folder)
    report = check_bundle(folder)
    t2 = [c for c in report.comparisons if c.task == "t2"]
    assert not report.passed and t2 and all(c.fault == "wrong-task" for c in t2)
    assert "outputs match task 't1' rather than 't2' (wrong task's mixers?)" in t2[0].problem


@pytest.mark.slow
def test_et_mixers_of_other_bases_refused_and_reported(et_bundles, tmp_path):
    folder = copy_bundle(et_bundles["swappable"], tmp_path / "b")
    other = crisp_toy(seed=5)
    et_other_bases_task(folder, other, make_task_file(other, tmp_path / "o.safetensors", "t2", 3, 4), "t2")
    rehash(folder)
    report = check_bundle(folder)
    [f] = report.failures
    assert (f.task, f.stage, f.error) == ("t2", "set_task", "BasisMismatchError") and "other bases" in f.message
    assert not report.passed and all(c.passed for c in report.comparisons)


@pytest.mark.slow
def test_et_device_outputs_faults_named(et_bundles):
    """ExecuTorch bundles have one output and static shapes: reordering shows across cases, and the
    dtype fault in outputs written by a device (the C++ runner's .npy files)."""
    b = et_bundles["swappable"]
    outs = run_outputs(b)
    assert check_outputs(b, outs).passed
    swapped = {**outs, "output.t1.0.logits": outs["output.t1.1.logits"], "output.t1.1.logits": outs["output.t1.0.logits"]}
    assert "outputs reordered: case 0 matches the reference of case 1" in problems(check_outputs(b, swapped))
    half = {k: v.astype(np.float16) for k, v in outs.items()}
    assert "dtype float16 != reference float32" in problems(check_outputs(b, half))
    wrong = {**outs, "output.t2.0.logits": outs["output.t1.0.logits"]}
    assert "outputs match task 't1' rather than 't2'" in problems(check_outputs(b, wrong))
    bumped = {**outs, "output.t2.1.logits": outs["output.t2.1.logits"] + 0.3}
    assert "max abs 0.3 > 0.0001" in problems(check_outputs(b, bumped))  # portable recipe: 1e-4


@pytest.fixture(scope="module")
def et_runner(tmp_path_factory):
    """The C++ runner (export/executorch/runner), built with its build.sh when this checkout has no binary yet or
    one older than its sources (the runner's and the crisp kernels it compiles in: a program calling crisp::fold_
    does not load in a runner built before it)."""
    import subprocess
    import sys

    from crisp_edge.export.executorch.custom_ops import kernel_sources
    from crisp_edge.export.native import is_stale

    root = Path(__file__).resolve().parents[2] / "export" / "executorch" / "runner"
    binary = root / "build" / "crisp_et_runner"
    if is_stale(binary, [*root.glob("*.[ch]*"), *kernel_sources()]):
        binary = tmp_path_factory.mktemp("runner") / "crisp_et_runner"
        subprocess.run(["bash", str(root / "build.sh"), sys.executable, str(binary)], check=True, timeout=600,
                       capture_output=True)
    return binary


@pytest.mark.slow
def test_et_cpp_runner_outputs_checked(et_bundles, et_runner, tmp_path):
    """Outputs written by the C++ runner (.npy files) pass ``check_outputs``; the runner fed t1's task
    file as t2 is caught as the wrong task."""
    import subprocess

    b = et_bundles["swappable"]
    ref = read_reference(b, json.loads((b / "manifest.json").read_text())["reference"])
    (tmp_path / "in").mkdir()
    for i, case in enumerate(ref.inputs):
        for name, a in case.items():
            np.save(tmp_path / "in" / f"input.{i}.{name}.npy", np.ascontiguousarray(a, np.float32))

    def run(out: str, *tasks: str) -> Path:
        args = [str(et_runner), str(b), str(tmp_path / out), "--inputs", str(tmp_path / "in"),
                "--cases", str(len(ref.inputs))]
        for t in tasks:
            args += ["--task", t]
        (tmp_path / out).mkdir()  # the runner writes into an existing folder
        subprocess.run(args, check=True, timeout=300, capture_output=True)
        return tmp_path / out

    good = run("good", f"t1={b}/tasks/t1.ptd", f"t2={b}/tasks/t2.ptd")
    report = check_outputs(b, good)
    assert report.passed and report.tasks == ["t1", "t2"], problems(report)
    bad = run("bad", f"t1={b}/tasks/t1.ptd", f"t2={b}/tasks/t1.ptd")
    assert "outputs match task 't1' rather than 't2' (wrong task's mixers?)" in problems(check_outputs(b, bad))

"""The parity library, the ``crisp-edge parity`` command and its reports (JSON, JUnit XML, PNG).

Runs on a toy CRISP ViT exported to ONNX Runtime (swappable, two tasks); fault injection is in
test_parity_faults.py, the architecture x mode x runtime x task matrix in test_matrix.py.
"""
from __future__ import annotations

import copy
import io
import json
import math
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
import torch
from crisp_edge.export import export_onnx, validate_bundle
from crisp_edge.export.errors import BundleError, ParityError
from crisp_edge.export.parity.check import (
    check_bundle,
    check_outputs,
    load_device_outputs,
    run_outputs,
)
from crisp_edge.export.parity.compare import TOLERANCES, compare, tolerance_for
from crisp_edge.export.parity.reference import (
    Reference,
    read_reference,
    reference_inputs,
    reference_outputs,
    resolve_device,
    resolve_reference,
    write_reference,
)
from crisp_edge.export.parity.report import (
    REPORT_FORMAT,
    REPORT_VERSION,
    junit_xml,
    report_json,
    write_reports,
)

import crisp_edge as ce
from crisp_edge.cli import main as crisp_edge_main
from crisp_edge.errors import ConfigError
from crisp_edge.testing import make_task_file, toy_model


def parity_main(argv: list[str]) -> int:
    """``crisp-edge parity ARGV``, exit status and all."""
    return crisp_edge_main(["parity", *argv])

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)
CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))


@pytest.fixture(scope="module")
def model():
    m = toy_model("timm-vit", seed=0)
    ce.retrofit_(m, CONFIG, progress=False)
    return m


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    tasks = []
    for name, seed, classes in (("t1", 1, 4), ("t2", 2, 6)):
        tasks.append(make_task_file(model, d / f"{name}.safetensors", name, seed, classes))
    return export_onnx(model, d / "bundle", mode="swappable", tasks=tasks).path


# ------------------------------------------------------------------------------------ reference.py
def test_reference_inputs_fixed_and_shaped():
    example = {"x": torch.zeros(5, 1, 16, 16), "ids": torch.tensor([[3, 9]])}
    a, b = reference_inputs(example), reference_inputs(example)
    assert [c["x"].shape[0] for c in a] == [2, 3] and a[1]["ids"].shape == (3, 2)
    assert all(torch.equal(x[n], y[n]) for x, y in zip(a, b) for n in x)
    assert a[0]["ids"].dtype == torch.int64 and 0 <= int(a[0]["ids"].min()) and int(a[0]["ids"].max()) <= 9
    assert not torch.equal(reference_inputs(example, seed=1)[0]["x"], a[0]["x"])


def test_reference_device_and_dtype(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="dtype"):
        resolve_reference("cpu", "float16")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"  # the GPU reference when a GPU is present


def test_reference_outputs_float64_is_tighter(model):
    cases = reference_inputs({"x": torch.zeros(1, 1, 16, 16)})
    f32 = reference_outputs(model, cases, device="cpu", dtype="float32")
    f64 = reference_outputs(model, cases, device="cpu", dtype="float64")
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        truth = exact(cases[0]["x"].double()).numpy()
    assert f64[0]["logits"].dtype == np.float64 and f32[0]["logits"].dtype == np.float32
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not cast
    err64, err32 = np.abs(f64[0]["logits"] - truth).max(), np.abs(f32[0]["logits"] - truth).max()
    assert err64 < 1e-12 < err32 < 1e-4


def test_reference_file_roundtrip_and_no_pickle(tmp_path):
    inputs = [{"x": np.ones((2, 3), np.float32)}]
    outputs = {"default": [{"y": np.arange(4.0)}], "a.b": [{"y": np.zeros(4)}]}
    write_reference(tmp_path, inputs, outputs)
    record = {"inputs": ["x"], "outputs": ["y"], "tasks": ["default", "a.b"], "cases": 1}
    ref = read_reference(tmp_path, record)
    assert isinstance(ref, Reference) and ref.tasks == ["default", "a.b"]
    np.testing.assert_array_equal(ref.outputs["default"][0]["y"], np.arange(4.0))
    with pytest.raises(BundleError, match="lacks 'input.1.x'"):
        read_reference(tmp_path, {**record, "cases": 3})
    with pytest.raises(BundleError, match="plain .npz"):
        read_reference(tmp_path, {**record, "file": "../reference.npz"})
    np.savez(tmp_path / "reference.npz", **{"input.0.x": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(BundleError, match="no pickled objects"):
        read_reference(tmp_path, record)


def test_export_records_reference_device_and_dtype(model, tmp_path):
    b = export_onnx(model, tmp_path / "f64", mode="dense", reference_device="cpu", reference_dtype="float64")
    rec = b.manifest["reference"]
    assert (rec["device"], rec["dtype"]) == ("cpu", "float64")
    ref = read_reference(b.path, rec)
    assert ref.outputs["default"][0]["logits"].dtype == np.float64
    report = check_bundle(b.path)
    assert report.passed and report.reference["dtype"] == "float64"
    assert all(c.dtype == "float32" and c.ref_dtype == "float32" for c in report.comparisons)  # the manifest's dtype


# ------------------------------------------------------------------------------------ comparisons
def test_compare_metrics():
    ref = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], np.float32)
    got = ref.copy()
    got[1, 2] = 1.0  # changes row 1's argmax
    c = compare(got, ref, task="t", case=0, output="y")
    assert not c.passed and c.max_abs == 1.0 and math.isclose(c.max_rel, 1 / 3) and c.top1 == 0.5
    assert c.problem.startswith("max abs 1 > 0.0001") and "cosine" in c.problem and c.fault == "numeric"
    assert compare(ref, ref, task="t", case=0, output="y").passed
    assert compare(ref[:1], ref, task="t", case=0, output="y").fault == "shape"
    bad = ref.copy()
    bad[0, 0] = np.nan
    assert compare(bad, ref, task="t", case=0, output="y").problem == "1 non-finite values (NaN/inf)"
    assert compare(ref.astype(np.float64), ref, task="t", case=0, output="y").problem == \
        "dtype float64 != reference float32"


def test_tolerance_table_named_with_reasons():
    assert tolerance_for("onnxruntime", "swappable").atol == 1e-4
    assert tolerance_for("executorch", "dense").atol == 1e-3
    assert tolerance_for("onnxruntime", "dense", "float16").min_top1 == 0.99  # the "*" mode entry
    for key, tol in TOLERANCES.items():
        assert tol.reason and tol.atol > 0 and 0 < tol.min_cosine <= 1, key
    with pytest.raises(ConfigError, match="no parity tolerance"):
        tolerance_for("tflite", "dense")


# ------------------------------------------------------------------------------------ check_bundle / check_outputs
def test_check_bundle_compares_every_output(bundle):
    report = check_bundle(bundle)
    assert report.passed and report.runtime == "onnxruntime" and report.mode == "swappable"
    assert report.tasks == ["default", "t1", "t2"] and len(report.comparisons) == 3 * 2
    assert {c.shape[1] for c in report.comparisons if c.task == "t2"} == {6}
    assert report.tolerance["reason"].startswith("fp32 ONNX Runtime")
    only = check_bundle(bundle, tasks=["t1"])
    assert only.tasks == ["t1"] and len(only.comparisons) == 2
    with pytest.raises(ConfigError, match="no reference outputs for task"):
        check_bundle(bundle, tasks=["nope"])
    assert validate_bundle(bundle).passed  # the compatibility layer
    with pytest.raises(ParityError, match="max abs"):
        validate_bundle(bundle, atol=1e-12)


def test_check_bundle_refusals_are_failures(tmp_path):
    report = check_bundle(tmp_path / "missing")
    assert not report.passed and report.failures[0].error == "BundleError"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text(json.dumps({"format": "someone/else", "version": 1}))
    report = check_bundle(tmp_path / "x")
    assert not report.passed and "not a crisp-edge bundle format" in report.failures[0].message
    with pytest.raises(ParityError, match="cannot be loaded"):
        check_bundle(tmp_path / "x", raise_on_failure=True)


def test_device_outputs_npz_and_npy_folder(bundle, tmp_path):
    outs = run_outputs(bundle)
    assert sorted(outs) == sorted(f"output.{t}.{i}.logits" for t in ("default", "t1", "t2") for i in (0, 1))
    np.savez(tmp_path / "outs.npz", **outs)
    assert check_outputs(bundle, tmp_path / "outs.npz").passed
    folder = tmp_path / "npy"
    folder.mkdir()
    for k, v in outs.items():
        if k.startswith("output.t1."):  # a device that ran one task only
            np.save(folder / f"{k}.npy", v)
    report = check_outputs(bundle, folder)
    assert report.passed and report.tasks == ["t1"] and report.outputs_path == str(folder)
    assert sorted(load_device_outputs(folder)) == ["output.t1.0.logits", "output.t1.1.logits"]
    np.save(folder / "output.t1.0.logit.npy", outs["output.t1.0.logits"])  # a misnamed output
    report = check_outputs(bundle, folder)
    assert not report.passed and "'output.t1.0.logit' is not in the reference" in report.problems()[0]
    report = check_outputs(bundle, folder, tasks=["t2"])  # asked for a task the device did not run
    assert not report.passed and "output 'logits' was not produced" in "\n".join(report.problems())
    report = check_outputs(bundle, tmp_path / "none.npz")
    assert not report.passed and report.failures[0].stage == "outputs"
    np.savez(tmp_path / "obj.npz", **{"output.t1.0.logits": np.array([None], dtype=object)})
    assert "no pickled objects" in check_outputs(bundle, tmp_path / "obj.npz").failures[0].message


# ------------------------------------------------------------------------------------ reports
def test_reports_json_junit_png(bundle, tmp_path):
    outs = run_outputs(bundle)
    outs["output.t1.1.logits"] = outs["output.t1.1.logits"][:1]  # a shape fault: inf errors in the JSON
    outs["output.t2.0.logits"] = outs["output.t2.0.logits"] + 0.3
    report = check_outputs(bundle, outs)
    written = write_reports(report, tmp_path / "r")
    assert sorted(written) == ["json", "junit", "plot"]
    doc = json.loads(written["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert (doc["format"], doc["version"], doc["passed"]) == (REPORT_FORMAT, REPORT_VERSION, False)
    assert doc["bundle"]["runtime"] == "onnxruntime" and doc["source"] == "outputs"
    assert doc["summary"]["compared"] == 6 and doc["summary"]["failed_comparisons"] == 2
    assert set(doc["summary"]["faults"]) == {"shape", "numeric"}
    shape_fault = next(c for c in doc["comparisons"] if c["fault"] == "shape")
    assert shape_fault["max_abs"] is None and shape_fault["cosine"] == 0.0
    assert any("max abs 0.3 > 0.0001" in p for p in doc["problems"])
    root = ET.fromstring(written["junit"].read_bytes())
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("6", "2", "0")
    fails = [tc for tc in suite.iter("testcase") if tc.find("failure") is not None]
    assert {tc.get("classname") for tc in fails} == {"parity.onnxruntime.swappable.t1", "parity.onnxruntime.swappable.t2"}
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a failure before comparison is a JUnit <error>
    report = check_bundle(tmp_path / "missing")
    root = ET.fromstring(junit_xml(report))
    assert root.get("errors") == "1" and root.find(".//error").get("type") == "BundleError"
    assert report_json(report)["failures"][0]["error"] == "BundleError"


# ------------------------------------------------------------------------------------ the command
def test_cli_pass_fail_and_bad_arguments(bundle, tmp_path, capsys):
    rc = parity_main([str(bundle), "--report-dir", str(tmp_path / "ok"), "--save-outputs", str(tmp_path / "o.npz"),
                      "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("PASS ") and "6 outputs compared over 3 task(s)" in out
    assert {p.name for p in (tmp_path / "ok").iterdir()} == {"parity.json", "parity.junit.xml", "parity.png"}
    with np.load(tmp_path / "o.npz", allow_pickle=False) as z:
        outs = {k: z[k] for k in z.files}
    assert parity_main([str(bundle), "--outputs", str(tmp_path / "o.npz"), "--report-dir", str(tmp_path / "dev"),
                        "--no-plot"]) == 0
    assert not (tmp_path / "dev" / "parity.png").exists()
    outs["output.t1.0.logits"] = outs["output.t2.0.logits"][:, :4]
    buf = io.BytesIO()
    np.savez(buf, **outs)
    (tmp_path / "bad.npz").write_bytes(buf.getvalue())
    capsys.readouterr()
    rc = parity_main([str(bundle), "--outputs", str(tmp_path / "bad.npz"), "--json", str(tmp_path / "bad.json"),
                      "--report-dir", str(tmp_path / "bad")])
    out = capsys.readouterr().out
    assert rc == 1 and out.startswith("FAIL ") and "FAIL task 't1', case 0, output 'logits'" in out
    assert not json.loads((tmp_path / "bad.json").read_text())["passed"]
    assert parity_main([str(bundle), "--task", "nope", "--report-dir", str(tmp_path / "x")]) == 2
    assert "no reference outputs for task" in capsys.readouterr().err
    zipfile.ZipFile(tmp_path / "bad.npz").close()  # still a plain npz (nothing rewritten it)


def test_ci_workflow_example_uses_the_real_command():
    """examples/ci/parity-workflow.yml: valid YAML, and every `crisp-edge parity` call parses with the
    command's own parser (so the example cannot drift from the CLI)."""
    import argparse
    import re
    import shlex
    from pathlib import Path

    import yaml

    from crisp_edge.cli.parity import add_parser as add_parity_parser

    path = Path(__file__).resolve().parents[2] / "examples" / "ci" / "parity-workflow.yml"
    doc = yaml.safe_load(path.read_text())
    runs = [step["run"] for job in doc["jobs"].values() for step in job["steps"] if "run" in step]
    calls = [" ".join(block.replace("\\\n", " ").split()) for block in runs if "crisp-edge parity" in block]
    assert len(calls) == 2
    parser = argparse.ArgumentParser()
    add_parity_parser(parser.add_subparsers(dest="command"))
    for call in calls:
        call = re.sub(r"\$\{\{[^}]*\}\}", "X", call)
        argv = shlex.split(call[call.index("crisp-edge parity"):])[1:]
        args = parser.parse_args(argv)
        assert args.command == "parity" and args.report_dir.startswith("parity-")
    assert any("--outputs" in c for c in calls)
    uses = [step.get("uses", "") for job in doc["jobs"].values() for step in job["steps"]]
    assert any("junit" in u for u in uses)
    # every extra the install lines name (crisp-edge[all], ...) is one pyproject.toml declares
    import tomllib

    pyproject = tomllib.loads((path.parents[2] / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    named = {e.strip() for block in runs for group in re.findall(r"crisp-edge\[([^\]]*)\]", block)
             for e in group.split(",")}
    assert named and named <= extras, f"the workflow installs extras {sorted(named - extras)} that do not exist"


def test_recomputed_reference_float64_from_checkpoint(model, bundle, tmp_path, capsys):
    """The reference made again (float64, on the GPU when present: here the CPU) from the checkpoint the
    bundle came from and a task's mixer file; a reference from another model fails the check."""
    ce.save_checkpoint(model, tmp_path / "ckpt")
    rc = parity_main([str(bundle), "--checkpoint", str(tmp_path / "ckpt"), "--mixers", str(bundle.parent / "t1.safetensors"),
                      "--reference-dtype", "float64", "--reference-device", "cpu", "--report-dir", str(tmp_path / "r"),
                      "--no-plot", "--no-progress"])
    doc = json.loads((tmp_path / "r" / "parity.json").read_text())
    # t1 recomputed in float64; t2 (no mixer file given) still checked, against its stored reference
    assert rc == 0 and doc["passed"] and doc["summary"]["tasks"] == ["default", "t1", "t2"]
    assert doc["reference"] == {**doc["reference"], "dtype": "float64", "device": "cpu", "recomputed": True,
                                "recomputed_tasks": ["default", "t1"]}
    other = toy_model("timm-vit", seed=3)
    ce.retrofit_(other, CONFIG, progress=False)
    from crisp_edge.export.parity.check import recompute_reference

    report = check_bundle(bundle, reference=recompute_reference(bundle, other, device="cpu"))
    assert not report.passed and report.comparisons[0].fault == "numeric"
    capsys.readouterr()
    assert parity_main([str(bundle), "--reference-dtype", "float64", "--report-dir", str(tmp_path / "x")]) == 2
    assert "pass --checkpoint" in capsys.readouterr().err


def documented(heading: str) -> set[str]:
    """The field names (in backticks) of the first table under ``heading`` in docs/parity-report.md."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "parity-report.md").read_text()
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    table = section[section.index("\n|"):].split("\n\n", 1)[0]  # the section's first table
    names = set()
    for row in re.findall(r"^\| ([^|]+) \|", table, flags=re.MULTILINE):
        names.update(re.findall(r"`([a-z_0-9]+)`", row))
    return names


def test_report_schema_documented(bundle):
    """Every field the JSON report writes is documented in docs/parity-report.md, and vice versa."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "parity-report.md").read_text()
    assert f"version {REPORT_VERSION}" in text and REPORT_FORMAT in text

    outs = run_outputs(bundle)
    outs["output.t1.0.logits"] = outs["output.t1.0.logits"] + 1.0
    doc = report_json(check_outputs(bundle, {**outs, "output.x.0.y": outs["output.t2.0.logits"]}))
    assert set(doc) == documented("## Top level")
    assert set(doc["summary"]) == documented("### `summary`")
    assert set(doc["comparisons"][0]) == documented("### `comparisons[]`")
    assert set(doc["failures"][0]) == documented("### `failures[]`")

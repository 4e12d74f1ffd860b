"""Parity on the user's own inputs (``--inputs``: top-1 agreement, label accuracy, ExecuTorch's static batch)
and where a failing bundle diverged (``--per-layer``: the first layer over tolerance, named in the JSON,
the JUnit message and the plot), with a fault injected into one block's weight."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from crisp_edge.export.bundle import file_record
from crisp_edge.export.executorch.export import export_executorch
from crisp_edge.export.onnx.export import export_onnx
from crisp_edge.export.parity.check import check_bundle, recompute_reference
from crisp_edge.export.parity.data import check_inputs
from crisp_edge.export.parity.layers import locate_divergence
from onnx import numpy_helper

import crisp_edge as ce
from crisp_edge.cli import main as crisp_edge_main
from crisp_edge.testing import make_task_file, toy_model

from runtime_tests.parity.conftest import CONFIG  # noqa: E402

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five labelled examples shaped like the toy's input (float, model-ready), as an .npz."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("data") / "val.npz"
    np.savez(path, x=rng.standard_normal((5, 1, 16, 16)).astype(np.float32), y=np.array([0, 1, 2, 0, 1]))
    return path


@pytest.fixture(scope="module")
def bundles(model, ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("b")
    task = make_task_file(model, d / "t1.safetensors", "t1", 1, 4)
    return {"onnx": export_onnx(model, d / "onnx", mode="swappable", tasks=[task], checkpoint=ckpt).path,
            "dense": export_onnx(model, d / "dense", mode="dense", checkpoint=ckpt).path,
            "et": export_executorch(model, d / "et", mode="swappable", recipe="portable", tasks=[task],
                                    checkpoint=ckpt).path,
            "task": task}


@pytest.mark.parametrize("kind", ["onnx", "et"])
def test_inputs_checked_with_top1_agreement_and_labels(kind, bundles, model, data):
    b = bundles[kind]
    report = check_bundle(b, reference=recompute_reference(b, model, [bundles["task"]], device="cpu"))
    check_inputs(report, b, data, model, [bundles["task"]], device="cpu")
    assert report.passed, report.problems()
    d = report.data
    assert d["examples"] == 5 and d["labels"] and set(d["tasks"]) == {"default", "t1"}
    for entry in d["tasks"].values():
        assert entry["top1_agreement"] == 1.0
        assert entry["runtime_accuracy"] == entry["pytorch_accuracy"] is not None
    chunks = [c for c in report.comparisons if c.inputs == "data" and c.task == "default"]
    if kind == "et":  # the program's static batch (2): 5 rows = 3 chunks, the last zero-padded and cut back
        assert d["static_batch"] and d["chunk"] == 2 and [c.shape[0] for c in chunks] == [2, 2, 1]
    else:
        assert not d["static_batch"] and [c.shape[0] for c in chunks] == [5]


def test_inputs_expose_a_runtime_that_disagrees_on_real_data(bundles, model, data, tmp_path):
    """The check on the user's data compares against PyTorch: a model other than the exported one fails it."""
    other = toy_model("timm-vit", seed=3, depth=2)
    ce.retrofit_(other, CONFIG, progress=False)
    report = check_bundle(bundles["dense"])
    check_inputs(report, bundles["dense"], data, other, device="cpu")
    data_comps = [c for c in report.comparisons if c.inputs == "data"]
    assert data_comps and not any(c.passed for c in data_comps) and not report.passed
    assert all(c.passed for c in report.comparisons if c.inputs == "reference")  # the stored cases still pass


def test_cli_inputs_from_an_image_folder(bundles, ckpt, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L").save(tmp_path / "imgs" / cls / f"{i}.png")
    rc = crisp_edge_main(["parity", str(bundles["et"]), "--checkpoint", str(ckpt), "--inputs", str(tmp_path / "imgs"),
                          "--report-dir", str(tmp_path / "r"), "--no-plot", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "your data (6 examples), task 'default': top-1 agreement 100.0%" in out
    doc = json.loads((tmp_path / "r" / "parity.json").read_text())
    assert doc["data"]["examples"] == 6 and doc["data"]["tasks"]["default"]["top1_agreement"] == 1.0
    assert crisp_edge_main(["parity", str(bundles["et"]), "--inputs", str(tmp_path / "imgs")]) == 2  # needs --checkpoint


def perturb_linear(folder: Path, scope: str, seed: int = 0) -> None:
    """Add noise to the weight of the MatMul/Gemm in ``scope`` of a bundle's model.onnx; rehash it."""
    proto = onnx.load(str(folder / "model.onnx"))
    node = next(n for n in proto.graph.node if n.name.startswith(scope) and n.op_type in ("MatMul", "Gemm"))
    for init in proto.graph.initializer:
        if init.name in node.input:
            a = numpy_helper.to_array(init).copy()
            a += 0.3 * np.random.default_rng(seed).standard_normal(a.shape).astype(a.dtype)
            init.CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(proto, str(folder / "model.onnx"))
    m = json.loads((folder / "manifest.json").read_text())
    m["files"]["model.onnx"] = file_record(folder, "model.onnx")
    (folder / "manifest.json").write_text(json.dumps(m))


def test_fault_in_one_block_is_named_first(bundles, tmp_path):
    b = Path(shutil.copytree(bundles["dense"], tmp_path / "b"))
    perturb_linear(b, "/model/blocks/blocks.1/mlp/fc1/")
    rc = crisp_edge_main(["parity", str(b), "--report-dir", str(tmp_path / "r"), "--no-progress"])  # FAIL: per-layer
    assert rc == 1
    doc = json.loads((tmp_path / "r" / "parity.json").read_text())
    layers = doc["layers"]
    assert layers["available"] and layers["first_over"]["layer"] == "blocks.1.mlp.fc1"
    order = [r["layer"] for r in layers["layers"]]
    assert order.index("blocks.1.mlp.fc1") > order.index("blocks.0")  # execution order: block 0 first, and clean
    assert not any(r["over"] for r in layers["layers"][:order.index("blocks.1.mlp.fc1")])
    assert any("diverged first at layer 'blocks.1.mlp.fc1'" in p for p in doc["problems"])
    junit = ET.parse(tmp_path / "r" / "parity.junit.xml").getroot()
    msgs = [f.get("message") for f in junit.iter("failure")]
    assert any("diverged first at layer 'blocks.1.mlp.fc1'" in m for m in msgs)
    assert (tmp_path / "r" / "parity.png").stat().st_size > 1000


def test_clean_swappable_bundle_per_layer_all_within(bundles, model):
    report = check_bundle(bundles["onnx"])
    layers = locate_divergence(report, bundles["onnx"], model, task="t1")
    assert layers["available"] and layers["first_over"] is None and not layers["unmatched"]
    assert {r["kind"] for r in layers["layers"]} == {"block", "linear"} and len(layers["layers"]) == 2 + 8
    assert report.passed


def test_executorch_per_layer_debug_program(bundles, model, monkeypatch):
    """ExecuTorch: a debug program lowered like the bundle matches PyTorch layer by layer; a fault injected
    into one linear of what ExecuTorch runs (standing in for a kernel that computes it wrong) is named first."""
    import torch
    from crisp_edge.export.executorch import probe

    report = check_bundle(bundles["et"])
    clean = locate_divergence(report, bundles["et"], model, task="t1")
    assert clean["available"] and clean["first_over"] is None and len(clean["layers"]) == 2 + 8
    made = probe.debug_model

    def faulty(m):
        m = made(m)
        w = m.get_submodule("blocks.1.attn.proj").weight
        with torch.no_grad():
            w.add_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        return m

    monkeypatch.setattr(probe, "debug_model", faulty)
    layers = locate_divergence(report, bundles["et"], model)
    assert layers["first_over"]["layer"] == "blocks.1.attn.proj"
    assert not any(r["over"] for r in layers["layers"][:[r["layer"] for r in layers["layers"]].index("blocks.1.attn.proj")])


def test_per_layer_without_a_model_says_why(bundles, tmp_path):
    b = Path(shutil.copytree(bundles["dense"], tmp_path / "b"))
    m = json.loads((b / "manifest.json").read_text())
    del m["source"]
    (b / "manifest.json").write_text(json.dumps(m))
    layers = locate_divergence(check_bundle(b), b)
    assert layers["available"] is False and "no PyTorch model" in layers["reason"]


def test_new_report_records_documented(bundles, model, data, tmp_path):
    """The ``unchecked[]``, ``data`` and ``layers`` records (and each layer row) are documented field by field."""
    from crisp_edge.export.parity.report import report_json

    from .test_parity import documented

    b = Path(shutil.copytree(bundles["dense"], tmp_path / "b"))
    perturb_linear(b, "/model/blocks/blocks.0/attn/qkv/")
    report = check_bundle(b)
    check_inputs(report, b, data, model, device="cpu")
    locate_divergence(report, b, model)
    report.unchecked.append({"task": "t9", "reason": "no checkpoint", "allowed": False})
    doc = report_json(report)
    assert doc["layers"]["first_over"]["layer"] == "blocks.0.attn.qkv"
    assert set(doc["unchecked"][0]) == documented("### `unchecked[]`")
    assert set(doc["data"]) == documented("### `data`")
    assert set(doc["data"]["tasks"]["default"]) == documented("### `data.tasks[TASK]`")
    assert set(doc["layers"]) | {"reason"} == documented("### `layers`")
    assert set(doc["layers"]["layers"][0]) == documented("### `layers.layers[]`")
    assert "inputs" in documented("### `comparisons[]`")

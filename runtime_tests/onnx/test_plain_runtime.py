"""An ONNX bundle run without crisp-edge, with plain ``onnxruntime.InferenceSession``s: every way either
computes the right task or fails loudly.

* ``model.onnx`` of a swappable bundle takes every CRISP weight as a graph *input* (no initializer
  behind it): a session fed only the model inputs fails ("Required inputs ... are missing"), it never
  runs on zeros or stale weights.
* ``fold.onnx`` run as it is gives the exported (``default``) task's weights; with a task's
  ``.onnx_adapter`` active (``RunOptions.add_active_adapter``) that task's: feeding them to
  ``model.onnx`` reproduces the stored reference of each.
* dense and factored ``model.onnx`` hold their weights: a plain session reproduces the reference.

The trap ORT itself sets (DESIGN.md section 4): ``run_with_iobinding`` silently ignores an active
adapter, so a fold run that way gives the default task; crisp-edge never folds that way, and the
README says so for anyone who writes their own loader.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from crisp_edge.export.onnx.export import export_onnx
from crisp_edge.export.parity.reference import read_reference

import crisp_edge as ce
from crisp_edge.testing import make_task_file, toy_model

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    m = toy_model("timm-vit", seed=0, depth=2)
    ce.retrofit_(m, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    d = tmp_path_factory.mktemp("plain")
    task = make_task_file(m, d / "t1.safetensors", "t1", 1, 4)
    return {mode: export_onnx(m, d / mode, mode=mode, tasks=[task] if mode == "swappable" else ()).path
            for mode in ("swappable", "dense", "factored")}


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_swappable_model_alone_fails_loudly(bundles):
    ref = read_reference(bundles["swappable"], _manifest(bundles["swappable"])["reference"])
    with pytest.raises(Exception, match="[Rr]equired inputs|[Mm]issing"):
        _session(bundles["swappable"] / "model.onnx").run(None, {"x": ref.inputs[0]["x"]})


@pytest.mark.parametrize("task", ["default", "t1"])
def test_fold_then_model_with_plain_sessions_computes_the_task(bundles, task):
    b = bundles["swappable"]
    ref = read_reference(b, _manifest(b)["reference"])
    fold, model = _session(b / "fold.onnx"), _session(b / "model.onnx")
    opts = ort.RunOptions()
    if task != "default":
        adapter = ort.LoraAdapter()
        adapter.Load(str(b / "tasks" / f"{task}.onnx_adapter"))
        opts.add_active_adapter(adapter)
    names = [o.name for o in fold.get_outputs()]
    weights = dict(zip(names, fold.run(names, {}, opts)))
    for i, case in enumerate(ref.inputs):
        got = model.run(["logits"], {"x": case["x"], **weights})[0]
        assert np.abs(got - ref.outputs[task][i]["logits"]).max() <= 1e-4
    if task != "default":  # the adapter really changed the answer
        assert got.shape != ref.outputs["default"][i]["logits"].shape or \
            np.abs(got - ref.outputs["default"][i]["logits"]).max() > 1e-2


@pytest.mark.parametrize("mode", ["dense", "factored"])
def test_dense_and_factored_run_plain(bundles, mode):
    ref = read_reference(bundles[mode], _manifest(bundles[mode])["reference"])
    sess = _session(bundles[mode] / "model.onnx")
    for i, case in enumerate(ref.inputs):
        assert np.abs(sess.run(["logits"], case)[0] - ref.outputs["default"][i]["logits"]).max() <= 1e-4


def _manifest(folder):
    import json

    return json.loads((folder / "manifest.json").read_text())

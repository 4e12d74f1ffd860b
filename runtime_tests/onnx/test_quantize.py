"""int8 ONNX bundles (``export_onnx(..., quantize="int8")``): ONNX Runtime's dynamic quantization of the
dense graph, recorded in the manifest, checked by parity with the int8 tolerance, and refused where ORT
cannot run it (factored)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import crisp_edge as ce
from crisp_edge.errors import ConfigError
from crisp_edge.export import check_bundle, check_outputs, export_onnx, load_bundle
from crisp_edge.export.errors import BundleError
from crisp_edge.export.onnx.quantize import WEIGHT_QMAX
from crisp_edge.export.parity.compare import ATOL_INT8, MIN_COSINE_INT8
from crisp_edge.files.io import atomic_write_json
from crisp_edge.testing import toy_model

pytestmark = pytest.mark.runtime


def crisp_toy(seed: int = 0):
    model = toy_model("timm-vit", seed=seed)
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    return model


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    return export_onnx(crisp_toy(), tmp_path_factory.mktemp("q") / "int8", mode="dense", quantize="int8")


def test_int8_dense_bundle_is_quantized_recorded_and_passes_parity(int8_bundle, tmp_path):
    m = int8_bundle.manifest
    assert m["quantize"]["scheme"] == "int8" and m["quantize"]["tool"]["per_channel"] is True
    assert m["tolerance"]["dtype"] == "int8" and m["tolerance"]["atol"] == ATOL_INT8
    graph = onnx.load(str(int8_bundle.path / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    weights = {t.name for t in graph.initializer}
    float_weight_matmuls = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]
    assert not float_weight_matmuls, "every weight matmul is integer (attention's activation matmuls stay float)"
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 4 * 4  # every block's qkv, proj, fc1 and fc2 weight
    # 7-bit codes: a pair of uint8 x int8 products fits ORT's int16 sums on x86-64 CPUs without VNNI
    assert m["quantize"]["tool"]["reduce_range"] is True and WEIGHT_QMAX == 64 and 2 * 255 * WEIGHT_QMAX <= 2**15 - 1
    assert max(int(np.abs(onnx.numpy_helper.to_array(t).astype(int)).max()) for t in int8) == WEIGHT_QMAX
    fp32 = export_onnx(crisp_toy(), tmp_path / "fp32", mode="dense")
    assert m["params"]["weights_bytes"] < 0.5 * fp32.manifest["params"]["weights_bytes"]
    report = check_bundle(load_bundle(int8_bundle.path))
    assert report.passed and report.tolerance["dtype"] == "int8" and report.min_cosine == MIN_COSINE_INT8
    assert 0 < report.max_abs <= ATOL_INT8


def test_int8_tolerance_still_catches_a_wrong_model(int8_bundle):
    """The wider tolerance is not blind: the outputs of another model fail it."""
    other = crisp_toy(seed=1).eval()
    ref = np.load(int8_bundle.path / "reference.npz")
    inputs = sorted(k for k in ref.files if k.startswith("input."))
    outs = {}
    with torch.no_grad():
        for key in inputs:
            i = int(key.split(".")[1])
            outs[f"output.default.{i}.logits"] = other(torch.from_numpy(ref[key])).numpy()
    report = check_outputs(int8_bundle, outs)
    assert not report.passed


def test_int8_is_refused_where_weights_change_at_every_forward(tmp_path):
    """The refusal says why for this runtime and mode, and what to use instead; nothing is written (a swappable
    int8 bundle is exported: test_swap_int8.py)."""
    with pytest.raises(ConfigError, match="every forward") as e:
        export_onnx(crisp_toy(), tmp_path / "b", mode="factored", quantize="int8")
    assert "mode='dense' with quantize='int8'" in str(e.value) and "float32 swappable" in str(e.value)
    assert not (tmp_path / "b").exists()


def test_unknown_scheme_and_edited_record_are_refused(int8_bundle, tmp_path):
    with pytest.raises(ConfigError, match="quantize must be one of"):
        export_onnx(crisp_toy(), tmp_path / "b", mode="dense", quantize="int3")
    import json
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(int8_bundle.path, copy)
    meta = json.loads((copy / "manifest.json").read_text())
    meta["quantize"] = {"scheme": "int3"}
    atomic_write_json(copy / "manifest.json", meta)
    with pytest.raises(BundleError, match="quantize"):
        load_bundle(copy)

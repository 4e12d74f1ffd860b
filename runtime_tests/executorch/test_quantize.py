"""int8 ExecuTorch bundles (``export_executorch(..., quantize="int8")``): XNNPACK's dynamically quantized
linears through PT2E, recorded in the manifest, delegated, checked by parity with the int8 tolerance,
and refused where the runtime cannot run them."""
from __future__ import annotations

import pytest

import crisp_edge as ce
from crisp_edge.errors import ConfigError
from crisp_edge.export import check_bundle, export_executorch, load_et_bundle
from crisp_edge.export.parity.compare import ATOL_INT8
from crisp_edge.testing import toy_model

pytestmark = pytest.mark.runtime


def crisp_toy(seed: int = 0):
    model = toy_model("timm-vit", seed=seed)
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    return model


@pytest.mark.slow
def test_int8_dense_program_is_smaller_delegated_and_passes_parity(tmp_path):
    model = crisp_toy()
    fp32 = export_executorch(model, tmp_path / "fp32", mode="dense")
    int8 = export_executorch(model, tmp_path / "int8", mode="dense", quantize="int8")
    m = int8.manifest
    assert m["quantize"]["scheme"] == "int8" and m["tolerance"]["dtype"] == "int8"
    assert m["params"]["program_bytes"] < 0.6 * fp32.manifest["params"]["program_bytes"]
    left = " ".join(m["non_delegated_ops"]["forward"])
    assert "linear" not in left and "quantize" not in left and "mm" not in left, left  # all in XNNPACK
    report = check_bundle(load_et_bundle(int8.path))
    assert report.passed and report.tolerance["dtype"] == "int8" and report.max_abs <= ATOL_INT8


@pytest.mark.parametrize("mode, recipe, why", [
    ("swappable", "xnnpack", "int8 weights once, at load.*float32 only.*Reloading a dense int8 program"),
    ("factored", "xnnpack", "every forward, and XNNPACK's quantized linear takes only weights it packs once"),
    ("dense", "portable", "recipe")])
def test_int8_is_refused_where_the_runtime_cannot_run_it(mode, recipe, why, tmp_path):
    """The refusal says why for this runtime, mode and recipe; nothing is written."""
    with pytest.raises(ConfigError, match=why):
        export_executorch(crisp_toy(), tmp_path / "b", mode=mode, recipe=recipe, quantize="int8")
    assert not (tmp_path / "b").exists()

"""Quantized ONNX Runtime language-model bundles (``quantize="int8"`` / ``"int4"``, dense): a CRISP toy LLaMA with
confident predictions (``toy_confident_llama``) exported with a key/value cache through ONNX Runtime's own
quantizers; the graph holds the integer kernels, the bytes shrink, generation runs, parity passes under the
named quantized tolerance and fails for another model, the manifest records the scheme, and what cannot be
quantized is refused with nothing written."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from crisp_edge.export import export_onnx, load_bundle
from crisp_edge.export.parity.check import check_bundle
from crisp_edge.export.parity.compare import TOLERANCES
from crisp_edge.export.parity.generation import check_generation, record_generation

import crisp_edge as ce
from crisp_edge.cli import main as crisp_edge_main
from crisp_edge.errors import ConfigError
from crisp_edge.generation import TorchStepper
from crisp_edge.testing import toy_confident_llama, toy_model

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)
SEQ = 32
#: every linear of the toy (2 layers x q, k, v, o, gate, up, down) and the lm_head
LINEARS = 2 * 7 + 1
#: the body's bits per scheme (the lm_head is 8-bit in both)
BITS = {"int8": 8, "int4": 4}


def crisp_llama(seed: int = 0) -> torch.nn.Module:
    model = toy_confident_llama(seed=seed)
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    return model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmq")
    model = crisp_llama()
    return {"root": root, "model": model,
            **{q: export_onnx(model, root / q, mode="dense", max_seq_len=SEQ, quantize=q) for q in ("int8", "int4")}}


def _nbits(graph) -> dict[str, dict]:
    return {n.name: {**{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}, "inputs": len(n.input)}
            for n in graph.node if n.op_type == "MatMulNBits"}


def test_the_graph_runs_every_linear_in_the_schemes_kernel(lm):
    """One MatMulNBits per linear with int8 activations (accuracy_level 4), blocks of 32: int8 all 8-bit symmetric;
    int4 4-bit codes for the body (no zero points: the min..max offset of each block is a float added from block
    sums) and the lm_head at 8 bits. No original weight is left in a float MatMul; the embedding's Gather stays
    float32."""
    for q in ("int8", "int4"):
        graph = onnx.load(str(lm[q].path / "model.onnx")).graph
        ops = Counter(n.op_type for n in graph.node)
        nbits = _nbits(graph)
        assert ops["MatMulNBits"] == LINEARS and "MatMulInteger" not in ops
        [head] = [k for k in nbits if k.startswith("/lm_head/")]
        assert (nbits[head]["bits"], nbits[head]["block_size"], nbits[head]["inputs"]) == (8, 32, 3)
        body = [v for k, v in nbits.items() if k != head]
        assert {(v["bits"], v["block_size"], v["accuracy_level"], v["inputs"]) for v in body} == {(BITS[q], 32, 4, 3)}
        inits = {t.name: t for t in graph.initializer}
        float_mm = [n for n in graph.node if n.op_type == "MatMul" and any(i in inits for i in n.input)]
        # int4: per linear, x @ J (block sums) and its product with the (blocks, N) offsets; nothing else
        assert len(float_mm) == (2 * (LINEARS - 1) if q == "int4" else 0)
        assert all(n.name.endswith(("_block_sums", "_offsets")) for n in float_mm)
        [gather] = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                    and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT and len(inits[n.input[0]].dims) == 2]
        assert list(inits[gather.input[0]].dims) == [64, 256]  # the token embedding


def test_manifest_records_the_scheme_and_its_tolerance(lm):
    for q in ("int8", "int4"):
        m = lm[q].manifest
        tool = m["quantize"]["tool"]
        assert m["quantize"]["scheme"] == q and tool["op"] == "MatMulNBits" and m["quantize"]["dtype"] == q
        assert (tool["bits"], tool["block_size"], tool["accuracy_level"]) == (BITS[q], 32, 4)
        assert (tool["lm_head"]["bits"], tool["lm_head"]["is_symmetric"]) == (8, True)
        named = TOLERANCES[("onnxruntime-lm", "dense", q)]
        assert (m["tolerance"]["atol"], m["tolerance"]["min_top1"], m["tolerance"]["dtype"]) == (named.atol, named.min_top1, q)
        assert m["parity"]["passed"] is True
    assert lm["int8"].manifest["quantize"]["weights"].startswith("int8, symmetric, one scale per block of 32")
    assert (lm["int4"].manifest["quantize"]["tool"]["is_symmetric"], lm["int4"].manifest["quantize"]["tool"]["zero_points"]) \
        == (False, "float32 offsets from block sums (min + 8 * scale)")
    assert lm["int4"].manifest["quantize"]["weights"].startswith("int4, asymmetric") and \
        "lm_head int8" in lm["int4"].manifest["quantize"]["weights"]


def test_int4_offsets_hold_a_4bit_min_max_grid_exactly(tmp_path):
    """A weight whose blocks of 32 already sit on a 4-bit min..max grid (GGUF Q4_1's layout) comes back exactly
    from ``offset_pass`` with float activations (accuracy_level 0); ORT's integer-zero-point and symmetric
    4-bit blocks cannot (they round every value to their own grid)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from crisp_edge.export.onnx.quantize import nbits_pass

    rng = np.random.default_rng(0)
    k, n = 96, 40
    lo, step = rng.standard_normal((n, k // 32, 1)) * 0.05, rng.random((n, k // 32, 1)) * 0.01
    codes = rng.integers(0, 16, (n, k // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # each block spans its grid
    w = np.ascontiguousarray((lo + step * codes).reshape(n, k).T, dtype=np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)

    def run(**kw):
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                                  [numpy_helper.from_array(w, "w")])
        proto = nbits_pass(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 4, 32,
                           accuracy_level=0, **kw)
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    ref = x @ w
    assert np.abs(run(symmetric=False, offsets=True) - ref).max() < 1e-4 * np.abs(ref).max()
    for kw in ({"symmetric": False}, {"symmetric": True}):
        assert np.abs(run(**kw) - ref).max() > 1e-2 * np.abs(ref).max(), kw


def test_bytes_shrink(lm):
    """Against the float32 weights (4 bytes per stored parameter; a float32 bundle holds at least that). Per weight,
    int8 stores 1 byte + a float32 scale per 32 (1.125 bytes); int4's body half a byte + a float32 scale and offset
    per 32 (0.75 bytes, 2/3 of int8), its lm_head int8's 1.125."""
    fp32 = lm["int8"].manifest["params"]["stored_bytes_fp32"]
    size = {q: sum(r["bytes"] for f, r in lm[q].manifest["files"].items() if f.startswith("model.onnx"))
            for q in ("int8", "int4")}
    assert size["int8"] < 0.35 * fp32 and size["int4"] < 0.8 * size["int8"], (size, fp32)


def test_generate_runs_and_parity_passes_under_the_named_tolerance(lm):
    for q in ("int8", "int4"):
        sess = lm[q].session(threads=1)
        out = sess.generate([5, 9, 14, 3], 8, stop_at_eos=False)
        assert len(out["token_ids"]) == 8 and all(0 <= t < 64 for t in out["token_ids"])
        report = check_bundle(lm[q].path)
        assert report.passed, report.summary()
        [gen] = report.generation
        assert gen["tokens_required"] is False and gen["top1_agreement"] >= TOLERANCES[("onnxruntime-lm", "dense", q)].min_top1
        assert report.tolerance["dtype"] == q


def test_parity_fails_against_another_models_reference(lm):
    """The loose quantized tolerance still tells models apart: the bundle checked against another model's greedy
    reference fails on top-1 agreement and logits."""
    other = toy_confident_llama(seed=1).eval()
    rng = np.random.default_rng(0)
    record = record_generation(TorchStepper(other, SEQ), [[int(t) for t in rng.integers(0, 64, 5)]], 16)
    tol = TOLERANCES[("onnxruntime-lm", "dense", "int8")]
    result = check_generation(lm["int8"].session(threads=1).lm_stepper(), record, tol)
    assert not result.passed and result.top1_agreement < tol.min_top1, result.summary()


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_swappable_lm_quantized_is_refused_with_nothing_written(lm, q, tmp_path):
    with pytest.raises(ConfigError, match="MatMulNBits.* only as constants.*outliers") as e:
        export_onnx(lm["model"], tmp_path / "b", mode="swappable", max_seq_len=SEQ, quantize=q)
    assert f"quantize={q!r}" in str(e.value)
    with pytest.raises(ConfigError, match="every forward"):
        export_onnx(lm["model"], tmp_path / "b", mode="factored", max_seq_len=SEQ, quantize=q)
    assert not any(tmp_path.iterdir())


def test_a_vit_asking_for_int4_is_told_to_use_int8(tmp_path):
    with pytest.raises(ConfigError, match="causal language models only.*quantize='int8'"):
        export_onnx(toy_model("hf-vit"), tmp_path / "v", mode="dense", quantize="int4")
    assert not any(tmp_path.iterdir())


def test_cli_exports_int4_and_parity_passes(lm, tmp_path, capsys):
    ce.save_checkpoint(lm["model"], tmp_path / "ckpt")
    out = tmp_path / "bundle"
    assert crisp_edge_main(["export", str(tmp_path / "ckpt"), "--mode", "dense", "--quantize", "int4",
                            "--out", str(out), "--max-seq-len", str(SEQ)]) == 0
    assert "int4" in capsys.readouterr().out
    assert load_bundle(out).manifest["quantize"]["scheme"] == "int4"
    report = tmp_path / "report"
    assert crisp_edge_main(["parity", str(out), "--no-plot", "--report-dir", str(report)]) == 0
    import json

    [gen] = json.loads((report / "parity.json").read_text())["generation"]
    assert gen["passed"] and gen["tokens_required"] is False

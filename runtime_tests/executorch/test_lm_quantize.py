"""Quantized ExecuTorch language-model bundles (``quantize="int8"`` / ``"int4"``, dense, XNNPACK): a CRISP toy
LLaMA with confident predictions (``toy_confident_llama``) quantized with ExecuTorch's own LLM recipe (torchao
8da8w / 8da4w) over a static key/value cache; every quantized linear is delegated to XNNPACK, the program
shrinks, generation runs, parity passes under the named quantized tolerance and fails for another model, the
manifest records the scheme, and what cannot be quantized is refused with nothing written."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import crisp_edge as ce
from crisp_edge.errors import ConfigError
from crisp_edge.export.executorch.export import export_executorch
from crisp_edge.export.parity.check import check_bundle
from crisp_edge.export.parity.compare import TOLERANCES
from crisp_edge.export.parity.generation import check_generation, record_generation
from crisp_edge.generation import TorchStepper
from crisp_edge.testing import toy_confident_llama, toy_model

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)
SEQ = 32


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("etlmq")
    model = toy_confident_llama()
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    return {"model": model,
            **{q: export_executorch(model, root / q, mode="dense", max_seq_len=SEQ, quantize=q) for q in ("int8", "int4")}}


def test_every_quantized_linear_is_delegated_to_xnnpack(lm):
    """No linear, quantize / dequantize or matmul runs outside XNNPACK (the portable kernels would run the
    quantized graph in float, or not at all); the embedding lookup is the one float32 weight outside it."""
    for q in ("int8", "int4"):
        ops = lm[q].manifest["non_delegated_ops"]["forward"]
        outside = [op for op in ops if any(k in op for k in ("linear", "mm", "quantize", "choose_qparams"))]
        assert not outside, (q, outside)
        assert ops.get("aten.embedding.default") == 1


def test_manifest_records_the_scheme_and_its_tolerance(lm):
    for q, recipe in (("int8", "8da8w"), ("int4", "8da4w")):
        m = lm[q].manifest
        assert m["quantize"]["scheme"] == q and m["quantize"]["tool"]["recipe"] == recipe
        assert ("lm_head" in m["quantize"]["tool"]) == (q == "int4")
        named = TOLERANCES[("executorch-lm", "dense", q)]
        assert (m["tolerance"]["atol"], m["tolerance"]["min_top1"], m["tolerance"]["dtype"]) == (named.atol, named.min_top1, q)
        assert m["parity"]["passed"] is True


def test_int4_keeps_the_lm_head_at_8_bits_and_4bit_codes_symmetric():
    """int4 turns every body linear into a BlockOffsetLinear whose codes are 4-bit groups of 32 with zero points 0
    (XNNPACK's blockwise kernel takes none) and keeps the lm_head at 8 bits per output channel."""
    from crisp_edge.export.executorch.quantize import BlockOffsetLinear, quantize_lm_

    model = toy_confident_llama().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    record = quantize_lm_(model, "int4")
    assert record["lm_head"]["bits"] == 8 and "SYMMETRIC_NO_CLIPPING_ERR" in record["config"]
    head = model.lm_head.weight
    assert tuple(head.block_size) == (1, head.shape[1])  # per output channel
    assert int(head.qdata.min()) < -8 and int(head.qdata.max()) > 7  # codes beyond 4 bits
    body = {n: m for n, m in model.named_modules() if isinstance(m, BlockOffsetLinear)}
    assert len(body) == 14 and not [n for n, m in model.named_modules()
                                    if type(m) is torch.nn.Linear and not n.startswith(tuple(body)) and n != "lm_head"]
    for name, m in body.items():
        w = m.codes.weight
        assert tuple(w.block_size) == (1, 32) and -8 <= int(w.qdata.min()) and int(w.qdata.max()) <= 7, name
        assert not bool(w.zero_point.any()), name


def test_int4_blocks_hold_a_4bit_min_max_grid_exactly():
    """A linear whose blocks of 32 already sit on a 4-bit min..max grid (GGUF Q4_1's layout) is held exactly:
    the codes' dequantized weight plus each block's offset gives the weight back (torchao's symmetric 4-bit alone
    cannot: its grid is centred on zero)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from crisp_edge.export.executorch.quantize import BlockOffsetLinear, quantize_lm_

    g = torch.Generator().manual_seed(0)
    n, k = 24, 96
    lo, step = torch.randn(n, k // 32, 1, generator=g) * 0.05, torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-3
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15
    weight = (lo + step * codes).reshape(n, k)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.lm_head = torch.nn.Linear(k, n, bias=False), torch.nn.Linear(n, 8, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

    model = Two()
    model.body.weight.data.copy_(weight)
    quantize_lm_(model, "int4")
    assert isinstance(model.body, BlockOffsetLinear)
    q = model.body.codes.weight
    back = (q.qdata.float().reshape(n, k // 32, 32) * q.scale.reshape(n, k // 32, 1)).reshape(n, k)
    back = back + model.body.offsets.weight.repeat_interleave(32, dim=1)
    assert (back - weight).abs().max() < 1e-3 * step.min()
    plain = torch.nn.Linear(k, n, bias=False)
    plain.weight.data.copy_(weight)
    quantize_(plain, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    p = plain.weight
    sym = (p.qdata.float().reshape(n, k // 32, 32) * p.scale.reshape(n, k // 32, 1)).reshape(n, k)
    assert (sym - weight).abs().max() > 0.1 * step.min()


def test_program_bytes_shrink(lm):
    """Against the float32 weights (4 bytes per stored parameter; a float32 program holds at least that). Per weight,
    int8 stores about 1 byte (one scale per output channel); int4's body half a byte + a float32 scale and offset
    per 32 (0.75 bytes), its lm_head int8's byte."""
    fp32 = lm["int8"].manifest["params"]["stored_bytes_fp32"]
    size = {q: lm[q].manifest["params"]["program_bytes"] for q in ("int8", "int4")}
    assert size["int8"] < 0.35 * fp32 and size["int4"] < 0.8 * size["int8"], (size, fp32)


def test_generate_runs_and_parity_passes_under_the_named_tolerance(lm):
    for q in ("int8", "int4"):
        out = lm[q].session(threads=1).generate([5, 9, 14, 3], 8, stop_at_eos=False)
        assert len(out["token_ids"]) == 8 and all(0 <= t < 64 for t in out["token_ids"])
        report = check_bundle(lm[q].path)
        assert report.passed, report.summary()
        [gen] = report.generation
        assert gen["tokens_required"] is False and gen["top1_agreement"] >= TOLERANCES[("executorch-lm", "dense", q)].min_top1


def test_parity_fails_against_another_models_reference(lm):
    other = toy_confident_llama(seed=1).eval()
    rng = np.random.default_rng(0)
    record = record_generation(TorchStepper(other, SEQ), [[int(t) for t in rng.integers(0, 64, 5)]], 16)
    tol = TOLERANCES[("executorch-lm", "dense", "int4")]
    result = check_generation(lm["int4"].session(threads=1).lm_stepper(), record, tol)
    assert not result.passed and result.top1_agreement < tol.min_top1, result.summary()


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_swappable_lm_quantized_is_refused_with_nothing_written(lm, q, tmp_path):
    with pytest.raises(ConfigError, match="XNNPACK packs a quantized linear's weights once") as e:
        export_executorch(lm["model"], tmp_path / "b", mode="swappable", max_seq_len=SEQ, quantize=q)
    assert f"quantize={q!r}" in str(e.value)
    with pytest.raises(ConfigError, match="computes its weights on every forward"):
        export_executorch(lm["model"], tmp_path / "b", mode="factored", max_seq_len=SEQ, quantize=q)
    with pytest.raises(ConfigError, match="portable kernels have no quantized linear"):
        export_executorch(lm["model"], tmp_path / "b", mode="dense", recipe="portable", max_seq_len=SEQ, quantize=q)
    assert not any(tmp_path.iterdir())


def test_a_vit_asking_for_int4_is_told_to_use_int8(tmp_path):
    with pytest.raises(ConfigError, match="causal language models only.*quantize='int8'"):
        export_executorch(toy_model("timm-vit"), tmp_path / "v", mode="dense", quantize="int4")
    assert not any(tmp_path.iterdir())

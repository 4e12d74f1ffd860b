"""Benchmark: our ExecuTorch LM export against ExecuTorch's own Llama export of the same weights, 1 thread.

Issue 18's anchor for the ExecuTorch language-model bundles. One LLaMA (``--quick``: a small config built
in code, CRISP-retrofitted at full capacity; default: SmolLM2-135M-Instruct, the same) is exported twice:

* ours: ``export_executorch(model, mode="dense", max_seq_len=...)`` (transformers' static cache, the
  plain ``index_copy_`` / SDPA ops, XNNPACK, fp32);
* the anchor: ExecuTorch's ``examples/models/llama`` export (``export_llama`` with an ``LlmConfig``:
  its own Llama transformer, the KV cache and SDPA replaced by the ``llama::update_cache`` /
  ``llama::custom_sdpa`` custom ops, XNNPACK with extended ops, fp32, no quantization) of the same
  weights: the materialized CRISP model's, converted to Meta's layout as ExecuTorch's
  ``smollm2/convert_weights.py`` does (q / k rows un-permuted for Meta's interleaved RoPE), with the
  params JSON written from the HF config.

Then in one process, interleaved, 1 thread, through ExecuTorch's Python runtime: prefill tokens/s (a
``--prompt-tokens`` prompt into an empty cache) and decode tokens/s (``--decode`` greedy steps after it),
ratios ours / anchor; parity (PyTorch's greedy tokens of ``--new-tokens`` on a fixed prompt, fed
teacher-forced to both programs: every argmax must equal PyTorch's, max |logit diff| of each against
PyTorch and between the two); ``.pte`` bytes; and the instructions of each ``forward`` (operators run by
ExecuTorch's kernels vs XNNPACK delegate calls), read from the ``.pte`` itself, and an ETDump profile of
each (a warmed-up prefill and 8 decode steps: milliseconds in XNNPACK and in kernels, the costliest
operators): the why of the ratio.

Writes bench/results/lm_et_anchor.json (``--quick``: lm_et_anchor_quick.json, unless ``--out``).

    .venv/bin/python bench/bench_lm_et_anchor.py --quick      # under 3 minutes (runtime_tests run it)
    .venv/bin/python bench/bench_lm_et_anchor.py              # SmolLM2-135M: ~9.5 GB peak, ~35 minutes loaded
"""
from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import tempfile
from pathlib import Path

from _common import RESULTS_DIR, interleave, machine_info, pin_threads, summarize, timed, write_json

THREADS = pin_threads(1)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from crisp_edge.generation.loop import CachedStepper  # noqa: E402

SCHEMA = 1
#: The CRISP layout of the quick model: full capacity (exact), as bench_lm_executorch's toy.
QUICK_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True, rms_norm_eps=1e-5,
                    initializer_range=0.2)  # wider than the default 0.02: greedy tokens vary, parity means something


def build_model(quick: bool):
    """(CRISP causal LM, tokenizer or None, description)."""
    import crisp_edge as ce

    if quick:
        import transformers

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**QUICK_CONFIG)).eval()
        ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
        return model, None, ("small LLaMA (hidden 64, 2 layers, 4 query / 2 key-value heads, vocabulary 256, tied "
                             "embeddings), CRISP s=4 group 2, full capacity")
    from crisp_edge.models.causal_lm import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    ce.retrofit_(model, ce.CrispConfig(), progress=False)  # r unset: full capacity, exact
    return model, tok, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised), CRISP full capacity"


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q / k rows (RoPE on halves) back to Meta's (RoPE on interleaved pairs): the inverse of
    transformers' ``convert_llama_weights_to_hf.permute``, what torchtune's HF checkpointer undoes."""
    d_out, d_in = w.shape
    return w.view(heads, 2, d_out // heads // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def meta_checkpoint(plain) -> tuple[dict, dict]:
    """(state dict in Meta's Llama layout, params JSON) of a plain HF ``LlamaForCausalLM``."""
    cfg, sd = plain.config, plain.state_dict()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size or getattr(cfg, "rope_scaling", None):
        raise SystemExit("this anchor covers LLaMA configs with head_dim = hidden / heads and no RoPE scaling")
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = _unpermute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        out[f"layers.{i}.attention.wk.weight"] = _unpermute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        for meta, hf in names.items():
            out[f"layers.{i}.{meta}.weight"] = sd[f"{p}{hf}.weight"]
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "hidden_dim": cfg.intermediate_size,
              "ffn_dim_multiplier": 1, "norm_eps": cfg.rms_norm_eps, "rope_theta": float(getattr(cfg, "rope_theta", 1e4)),
              "use_scaled_rope": False, "use_hf_rope": False, "attention_qkv_bias": False}
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}, params


def export_anchor(plain, folder: Path, max_seq_len: int) -> Path:
    """ExecuTorch's own Llama export (``export_llama``) of ``plain``'s weights: KV cache + custom SDPA, XNNPACK, fp32."""
    from executorch.examples.models.llama.export_llama_lib import export_llama
    from executorch.extension.llm.export.config.llm_config import LlmConfig, ModelType

    folder.mkdir(parents=True, exist_ok=True)
    sd, params = meta_checkpoint(plain)
    torch.save(sd, folder / "model.pth")  # read back by export_llama (torch.load, weights only by default)
    (folder / "params.json").write_text(json.dumps(params, indent=1))
    del sd
    c = LlmConfig()
    c.base.model_class = ModelType.smollm2  # what `--model smollm2` selects: the Llama transformer
    c.base.checkpoint, c.base.params = str(folder / "model.pth"), str(folder / "params.json")
    c.model.use_kv_cache = c.model.use_sdpa_with_kv_cache = c.model.enable_dynamic_shape = True
    c.export.max_seq_length = c.export.max_context_length = max_seq_len
    c.export.output_dir, c.export.output_name = str(folder), str(folder / "anchor.pte")
    c.backend.xnnpack.enabled = c.backend.xnnpack.extended_ops = True
    return Path(export_llama(c))


def instruction_counts(pte: Path) -> dict:
    """The ``forward`` plan's instructions by kind: ExecuTorch kernel calls per operator, XNNPACK delegate calls."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes()).program
    plan = next(p for p in program.execution_plan if p.name == "forward")
    kernels: collections.Counter = collections.Counter()
    delegates = 0
    for chain in plan.chains:
        for ins in chain.instructions:
            kind = type(ins.instr_args).__name__
            if kind == "KernelCall":
                op = plan.operators[ins.instr_args.op_index]
                kernels[op.name + (f".{op.overload}" if op.overload else "")] += 1
            elif kind == "DelegateCall":
                delegates += 1
    return {"delegate_calls": delegates, "kernel_calls": sum(kernels.values()),
            "kernels": dict(sorted(kernels.items(), key=lambda kv: (-kv[1], kv[0])))}


class AnchorStepper(CachedStepper):
    """ExecuTorch's Llama program as a stepper: ``forward(tokens [1, n], input_pos [1] = start) -> logits [1, vocab]``
    (its custom ops write the cache at ``start`` and attend to positions up to the last one written)."""

    def __init__(self, method, max_seq_len: int) -> None:
        super().__init__()
        self.method, self.max_seq_len = method, max_seq_len

    def _run(self, ids: np.ndarray, start_pos: int) -> np.ndarray:
        out = self.method.execute([torch.from_numpy(np.ascontiguousarray(ids.reshape(1, -1))),
                                   torch.tensor([start_pos], dtype=torch.long)])
        return out[0].detach().numpy().reshape(-1).copy()


def teacher_forced(stepper, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), vocab] of ``stepper`` fed ``prompt`` then ``tokens[:-1]`` one at a time."""
    stepper.reset()
    out = [stepper.step(prompt, 0)]
    for i, t in enumerate(tokens[:-1]):
        out.append(stepper.step([t], len(prompt) + i))
    return np.stack(out)


def parity(steppers: dict, torch_stepper, prompt: list[int], n: int) -> dict:
    """PyTorch's greedy ``n`` tokens after ``prompt``, and each program's argmax / logits fed the same tokens."""
    tokens, logits = [], []
    torch_stepper.reset()
    step = torch_stepper.step(prompt, 0)
    for i in range(n):
        logits.append(step)
        tokens.append(int(np.argmax(step)))
        if i + 1 < n:
            step = torch_stepper.step([tokens[-1]], len(prompt) + i)
    ref = np.stack(logits)
    got = {k: teacher_forced(s, prompt, tokens) for k, s in steppers.items()}
    out = {"prompt_tokens": len(prompt), "new_tokens": n, "torch_tokens": tokens}
    for k, lg in got.items():
        out[k] = {"tokens_equal_torch": [int(t) for t in lg.argmax(-1)] == tokens,
                  "max_abs_logit_diff_vs_torch": float(np.abs(lg - ref).max())}
    a, b = list(got)
    out[f"max_abs_logit_diff_{a}_vs_{b}"] = float(np.abs(got[a] - got[b]).max())
    out["same_tokens"] = all(out[k]["tokens_equal_torch"] for k in got)
    return out


def speed(steppers: dict, prompt: list[int], decode: int, repeats: int) -> dict:
    def prefill(st):
        def case() -> float:
            st.reset()
            return timed(lambda: st.step(prompt, 0))[0]
        return case

    def decoding(st):
        def case() -> float:
            st.reset()
            logits = st.step(prompt, 0)

            def steps():
                nonlocal logits
                for i in range(decode):
                    logits = st.step([int(np.argmax(logits))], len(prompt) + i)
            return timed(steps)[0] / decode
        return case

    cases = {}
    for k, st in steppers.items():
        cases[f"{k}_prefill"], cases[f"{k}_decode"] = prefill(st), decoding(st)
    for case in cases.values():  # warm-up: first calls allocate, fault pages in
        case()
    t = interleave(cases, repeats)
    med = {k: float(np.median(v)) for k, v in t.items()}
    return {"prefill_tok_s": {k: round(len(prompt) / med[f"{k}_prefill"], 1) for k in steppers},
            "decode_tok_s": {k: round(1 / med[f"{k}_decode"], 1) for k in steppers},
            "ratio_ours_over_anchor": {"prefill": round(med["anchor_prefill"] / med["ours_prefill"], 3),
                                       "decode": round(med["anchor_decode"] / med["ours_decode"], 3)},
            "timings": {k: summarize(v) for k, v in t.items()}}


def profile(pte: Path, positions, prompt: list[int], decode: int, top: int = 8) -> dict:
    """ETDump of one prefill of ``prompt`` and ``decode`` decode steps of a program (a fresh load, warmed up by one
    prefill and one decode step; ``positions(start, n)`` is its ``input_pos``): milliseconds in XNNPACK and in ExecuTorch's kernels, and the costliest operators
    (kernels by name, XNNPACK operators by kind), for the prefill and for the mean decode step. Profiling adds
    its own overhead: these are shares, the timings above are the speeds."""
    import re
    import warnings

    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    data = pte.read_bytes()  # kept referenced: the runtime points into it
    m = portable_lib._load_for_executorch_from_buffer(data, enable_etdump=True, debug_buffer_size=0)
    for steps in (1, decode):  # a warm-up sequence (first calls set XNNPACK's workspaces up), then the profiled one
        m.forward([torch.tensor([prompt]), positions(0, len(prompt))])
        for i in range(steps):
            m.forward([torch.tensor([[prompt[i % len(prompt)]]]), positions(len(prompt) + i, 1)])
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.write_etdump_result_to_file(f"{d}/run.etdp")
        block = next(b for b in Inspector(etdump_path=f"{d}/run.etdp").event_blocks if b.name == "Execute")
    phases = {"prefill": collections.Counter(), "decode": collections.Counter()}
    for ev in block.events:
        raw = ev.perf_data.raw[2:] if ev.perf_data is not None else []  # after the warm-up's two calls
        if len(raw) != decode + 1:
            continue
        name = {"Method::execute": "total", "DELEGATE_CALL": "xnnpack", "OPERATOR_CALL": "kernels"}.get(ev.name)
        name = name or re.sub(r" (GEMM )?#\d+$", "", ev.name.removeprefix("native_call_"))
        phases["prefill"][name] += raw[0]
        phases["decode"][name] += sum(raw[1:]) / decode
    out = {}
    for phase, c in phases.items():
        ops = [(k, v) for k, v in c.most_common() if k not in ("total", "xnnpack", "kernels")]
        out[phase] = {"ms": {k: round(c[k], 3) for k in ("total", "xnnpack", "kernels")},
                      "top_ops_ms": [[k, round(v, 3)] for k, v in ops[:top]]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small LLaMA built in code (a test runs this)")
    ap.add_argument("--max-seq-len", type=int, default=128, help="cache length of both programs (default 128)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prefill length timed (default 64)")
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed per round (default 32)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared for parity (default 32)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    ap.add_argument("--work", default=None, help="folder for the programs (default: a temporary one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    q = args.quick
    seq, repeats = args.max_seq_len, args.repeats or (3 if q else 7)
    if args.prompt_tokens + args.decode > seq or args.new_tokens + 8 > seq:
        raise SystemExit("--prompt-tokens + --decode and --new-tokens + 8 must fit --max-seq-len")
    out = Path(args.out) if args.out else RESULTS_DIR / ("lm_et_anchor_quick.json" if q else "lm_et_anchor.json")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_lm_et_anchor_"))
    work.mkdir(parents=True, exist_ok=True)

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401 - the anchor's llama:: ops (export and runtime)
    from crisp_edge.export.executorch.bundle import PROGRAM
    from crisp_edge.export.executorch.export import export_executorch
    from crisp_edge.export.executorch.lm_session import EtLMSession
    from crisp_edge.export.executorch.session import load_program
    from crisp_edge.generation import TorchStepper
    from crisp_edge.method.convert import materialize_

    model, tok, described = build_model(q)
    plain = materialize_(copy.deepcopy(model)).eval()  # the dense weights both programs hold
    result: dict = {"schema": SCHEMA, "quick": q, "machine": machine_info(), "threads": THREADS, "model": described,
                    "max_seq_len": seq, "repeats": repeats, "exports": {}}
    secs, bundle = timed(lambda m=model: export_executorch(m, work / "ours", mode="dense", tokenizer=tok,
                                                   max_seq_len=seq, overwrite=True))
    ours_pte = bundle.file(PROGRAM)
    result["exports"]["ours"] = {"seconds": round(secs, 1), "pte_bytes": ours_pte.stat().st_size,
                                 "how": "crisp_edge export_executorch dense: transformers StaticCache (index_copy_), "
                                        "torch SDPA, XNNPACK, fp32", "instructions": instruction_counts(ours_pte)}
    del model
    gc.collect()
    with torch.no_grad():
        secs, anchor_pte = timed(lambda: export_anchor(plain, work / "anchor", seq))
    result["exports"]["anchor"] = {"seconds": round(secs, 1), "pte_bytes": anchor_pte.stat().st_size,
                                   "how": "executorch examples/models/llama export_llama: use_kv_cache, "
                                          "use_sdpa_with_kv_cache (llama::update_cache + llama::custom_sdpa), "
                                          "XNNPACK extended ops, fp32, no quantization, dynamic shape",
                                   "instructions": instruction_counts(anchor_pte)}
    (work / "anchor" / "model.pth").unlink()
    write_json(out, {**result, "complete": False})
    gc.collect()

    ours = EtLMSession(bundle, threads=THREADS).lm_stepper()
    anchor_data = anchor_pte.read_bytes()  # kept referenced: the runtime may point into it
    anchor = AnchorStepper(load_program(anchor_data, str(anchor_pte)).load_method("forward"), seq)
    steppers = {"ours": ours, "anchor": anchor}
    vocab = int(plain.config.vocab_size)
    if tok is not None:
        fixed = [int(t) for t in tok("In the beginning God created the heaven and the earth.")["input_ids"]]
    else:
        fixed = [int(t) for t in np.random.default_rng(1).integers(1, vocab, 8)]
    with torch.no_grad():
        result["parity"] = parity(steppers, TorchStepper(plain, seq), fixed, args.new_tokens)
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, vocab, args.prompt_tokens)]
    result["speed"] = {"prompt_tokens": args.prompt_tokens, "decode_steps": args.decode,
                       **speed(steppers, prompt, args.decode, repeats)}
    positions = {"ours": lambda start, n: torch.arange(start, start + n),
                 "anchor": lambda start, n: torch.tensor([start])}
    result["profile"] = {"decode_steps": 8, **{k: profile(pte, positions[k], prompt, 8)
                                               for k, pte in (("ours", ours_pte), ("anchor", anchor_pte))}}
    result["complete"] = True
    write_json(out, result)
    p = result["parity"]
    print(json.dumps({"ratio_ours_over_anchor": result["speed"]["ratio_ours_over_anchor"],
                      "prefill_tok_s": result["speed"]["prefill_tok_s"], "decode_tok_s": result["speed"]["decode_tok_s"],
                      "same_tokens": p["same_tokens"], "max_abs_logit_diff": p["max_abs_logit_diff_ours_vs_anchor"],
                      "pte_bytes": {k: v["pte_bytes"] for k, v in result["exports"].items()}}, indent=1))
    print(f"wrote {out}")
    return 0 if p["same_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

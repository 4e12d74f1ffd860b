"""Benchmark: quantized language-model bundles, float32 vs int8 vs int4, dense, both runtimes, 1 thread.

One CRISP causal LM (``--quick``: ``toy_confident_llama`` with the toy character tokenizer; default:
SmolLM2-135M retrofitted at full capacity, exact, as bench_lm_executorch.py does) is exported dense in float32,
``quantize="int8"`` and ``quantize="int4"`` to each runtime (ONNX Runtime: ``quantize_dynamic`` /
``MatMulNBits``; ExecuTorch: torchao 8da8w / 8da4w on XNNPACK). Per runtime and precision, in one run:

* bundle bytes (the model file(s): ``model.onnx`` + its data, or ``program.pte``) and the ratio to float32;
* perplexity on held-out text, computed by the exported bundle's session (not PyTorch): the KJV New Testament
  (``kjv-nt``) and a non-Bible text (``devil``, the Devil's Dictionary), ``--tokens`` tokens each in
  non-overlapping windows of ``--window`` (each window predicts its tokens 2..window from the ones before).
  ONNX Runtime scores a window in one run of the with-past graph (empty cache, logits at every position);
  ExecuTorch's program returns the last position's logits, so a window is a prefill of one token then
  teacher-forced decode steps through its static cache. The PyTorch float32 model's perplexity on the same
  windows is the anchor. Goals (issue 19): int8 within 3% of float32, int4 within 10%;
* prefill tokens/s (a prompt of ``--prompt-tokens``) and decode tokens/s (steady state), each as a ratio to
  float32, interleaved rounds across the three precisions of a runtime;
* generation parity of each bundle under its named tolerance (greedy tokens, teacher-forced logits, top-1
  agreement along the float reference).

Writes bench/results/lm_quantize.json (``--quick``: lm_quantize_quick.json, unless ``--out``), after each
step with ``complete: false`` so a long run keeps what it measured; ``cut`` lists what a reduced run left out.

    .venv/bin/python bench/bench_lm_quantize.py [--quick] [--runtimes onnxruntime executorch] [--precisions int8 int4]
        [--tokens 2048]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS_DIR, interleave, machine_info, pin_threads, steady, summarize, timed, write_json

THREADS = pin_threads(1)

import numpy as np  # noqa: E402
import torch  # noqa: E402

SCHEMA = 1
PRECISIONS = ("float32", "int8", "int4")
RUNTIMES = ("onnxruntime", "executorch")
#: issue 19: perplexity of the quantized bundle at most this much above float32's (relative).
TARGETS = {"int8_perplexity_rel": 0.03, "int4_perplexity_rel": 0.10}
TEXTS = ("kjv-nt", "devil")
DEFAULT_TOKENS = 2048


def build_model(quick: bool):
    """(CRISP causal LM, tokenizer, description)."""
    import crisp_edge as ce

    if quick:
        from crisp_edge.testing import toy_char_tokenizer, toy_confident_llama

        model = toy_confident_llama(seed=0).eval()
        ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
        return model, toy_char_tokenizer(), "toy_confident_llama (hidden 256, 2 layers, vocabulary 64), CRISP s=4 group 2"
    from crisp_edge.models.causal_lm import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    t0 = time.perf_counter()
    ce.retrofit_(model, ce.CrispConfig(), progress=False)  # r unset: full capacity, exact
    return model, tok, f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantised), CRISP full capacity (retrofit {time.perf_counter() - t0:.0f} s)"


def heldout_ids(tok, tokens: int, window: int) -> dict[str, torch.Tensor]:
    """(windows, window) token ids of each held-out text: its first ``tokens`` tokens (chunks in hash order)."""
    from crisp_edge.data.english import heldout_texts
    from crisp_edge.models.causal_lm import tokenize, windows

    texts = heldout_texts(max_chars=max(20 * tokens, 20000))
    return {name: windows(tokenize(tok, texts[name].text, max_tokens=tokens), window) for name in TEXTS}


def model_bytes(manifest: dict) -> int:
    """The bytes a device loads for the model: ``program.pte``, or ``model.onnx`` and its external data."""
    if "program_bytes" in manifest["params"]:
        return int(manifest["params"]["program_bytes"])
    return sum(int(r["bytes"]) for f, r in manifest["files"].items() if f.startswith("model.onnx"))


def window_logits(sess, runtime: str, row: np.ndarray) -> np.ndarray:
    """(window - 1, vocab) logits predicting ``row[1:]``, computed by the bundle's session."""
    if runtime == "onnxruntime":  # one run of the with-past graph from an empty cache: every position's logits
        n = row.size
        out = sess.run({"input_ids": row[None], "attention_mask": np.ones((1, n), np.int64),
                        "position_ids": np.arange(n, dtype=np.int64)[None]})
        return np.asarray(out["logits"][0, :-1], np.float64)
    from crisp_edge.generation.loop import forced_logits  # the program returns the last position only: step it

    return np.stack(forced_logits(sess.lm_stepper(), [int(row[0])], [int(t) for t in row[1:]])).astype(np.float64)


def bundle_perplexity(sess, runtime: str, rows: torch.Tensor) -> dict:
    total, count = 0.0, 0
    for row in rows.numpy().astype(np.int64):
        logits = window_logits(sess, runtime, row)
        top = logits.max(-1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(logits - top).sum(-1)))
        total += float((logz - logits[np.arange(row.size - 1), row[1:]]).sum())
        count += row.size - 1
    return {"perplexity": math.exp(total / count), "tokens": count, "windows": int(rows.shape[0])}


def export(runtime: str, model, tok, folder: Path, precision: str, seq: int):
    quantize = None if precision == "float32" else precision
    if runtime == "onnxruntime":
        from crisp_edge.export.onnx.export import export_onnx

        return export_onnx(model, folder, mode="dense", tokenizer=tok, max_seq_len=seq, quantize=quantize, overwrite=True)
    from crisp_edge.export.executorch.export import export_executorch

    return export_executorch(model, folder, mode="dense", tokenizer=tok, max_seq_len=seq, quantize=quantize,
                             overwrite=True)


def speed(sessions: dict, prompt: list[int], repeats: int) -> dict:
    """Prefill and decode seconds per precision, interleaved rounds."""
    def prefill(s):
        return lambda: s.lm_stepper().reset() or s.lm_stepper().step(prompt, 0)

    def decode(s):
        st = s.lm_stepper()

        def one():
            if st.position == 0 or st.position >= st.max_seq_len - 1:  # (re)start before the cache is full
                st.reset()
                st.step(prompt[:1], 0)
            st.step([1], st.position)
        return one

    cases = {}
    for p, s in sessions.items():
        cases[f"prefill_{p}"] = steady(prefill(s))
        cases[f"decode_{p}"] = steady(decode(s))
    return {k: summarize(v) for k, v in interleave(cases, repeats).items()}


def run_runtime(runtime: str, model, tok, ids: dict, work: Path, args, result: dict, out: Path) -> None:
    from crisp_edge.export.errors import ParityError
    from crisp_edge.export.parity.compare import Tolerance

    r = result["runtimes"].setdefault(runtime, {"bundles": {}})
    sessions = {}
    for p in args.precisions:
        try:
            secs, b = timed(lambda: export(runtime, model, tok, work / f"{runtime}-{p}", p, args.max_seq_len))
        except ParityError as e:  # the export's validation refused it: keep what it measured, go on
            r["bundles"][p] = {"export_failed": str(e)[:4000]}
            write_json(out, {**result, "complete": False})
            continue
        m = b.manifest
        sess = b.session(threads=1)
        t = m["tolerance"]
        tol = Tolerance(t["atol"], t["min_cosine"], t["reason"], t.get("min_top1"))
        gen = sess.check_generation(tol)
        entry = {"export_s": round(secs, 1), "model_bytes": model_bytes(m), "quantize": m.get("quantize"),
                 "tolerance": t, "parity_at_export": m.get("parity"),
                 "generation": [{"task": g.task, "passed": g.passed, "tokens_match": g.tokens_match,
                                 "top1_agreement": round(g.top1_agreement, 4),
                                 "max_logit_diff": max(c.max_abs_diff for c in g.cases),
                                 "first_divergence": [c.first_divergence for c in g.cases]} for g in gen],
                 "perplexity": {}}
        r["bundles"][p] = entry
        write_json(out, {**result, "complete": False})
        for name, rows in ids.items():
            t0 = time.perf_counter()
            entry["perplexity"][name] = {**bundle_perplexity(sess, runtime, rows), "seconds": round(time.perf_counter() - t0, 1)}
            write_json(out, {**result, "complete": False})
        sessions[p] = sess
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(1, int(model.config.vocab_size), args.prompt_tokens)]
    timings = speed(sessions, prompt, args.repeats)
    med = {k: v["median"] for k, v in timings.items()}
    r["timings"] = timings
    r["rates"] = {"prefill_tokens_per_s": {p: round(args.prompt_tokens / med[f"prefill_{p}"], 1) for p in sessions},
                  "decode_tokens_per_s": {p: round(1 / med[f"decode_{p}"], 1) for p in sessions}}
    base = r["bundles"]["float32"]
    r["ratios"] = {p: {"bytes": round(r["bundles"][p]["model_bytes"] / base["model_bytes"], 4),
                       "perplexity": {n: round(r["bundles"][p]["perplexity"][n]["perplexity"]
                                               / base["perplexity"][n]["perplexity"], 4) for n in ids},
                       "prefill_speed": round(med["prefill_float32"] / med[f"prefill_{p}"], 3),
                       "decode_speed": round(med["decode_float32"] / med[f"decode_{p}"], 3)}
                   for p in args.precisions[1:] if p in sessions}
    write_json(out, {**result, "complete": False})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the toy model (a test runs this)")
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS[1:], default=list(PRECISIONS[1:]),
                    help="quantized precisions to export beside float32 (default: both)")
    ap.add_argument("--tokens", type=int, default=None, help="held-out tokens per text (default 2048, toy 128)")
    ap.add_argument("--window", type=int, default=None, help="perplexity window (default 128, toy 32)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="cache length (default 256, toy 32)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prefill length (default 64, toy 8)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, toy 2)")
    ap.add_argument("--work", default=None, help="folder for the bundles (default: a temporary one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.precisions = ["float32", *[p for p in PRECISIONS[1:] if p in args.precisions]]
    q = args.quick
    args.tokens = args.tokens or (128 if q else DEFAULT_TOKENS)
    args.window = args.window or (32 if q else 128)
    args.max_seq_len = args.max_seq_len or (32 if q else 256)
    args.prompt_tokens = args.prompt_tokens or (8 if q else 64)
    args.repeats = args.repeats or (2 if q else 5)
    out = Path(args.out) if args.out else RESULTS_DIR / ("lm_quantize_quick.json" if q else "lm_quantize.json")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_lm_quantize_"))
    work.mkdir(parents=True, exist_ok=True)

    from crisp_edge.models.causal_lm import perplexity

    model, tok, described = build_model(q)
    ids = heldout_ids(tok, args.tokens, args.window)
    cut = [f"runtime {r}: not run (--runtimes)" for r in RUNTIMES if r not in args.runtimes]
    cut += [f"precision {p}: not run (--precisions)" for p in PRECISIONS if p not in args.precisions]
    if not q and args.tokens < DEFAULT_TOKENS:
        cut.append(f"tokens: {args.tokens:,} per text, not {DEFAULT_TOKENS:,} (--tokens; ExecuTorch scores a window by "
                   "decode steps, the slow part)")
    if q:
        cut.insert(0, "quick: the toy model and character tokenizer; perplexities and speeds say nothing about a real LM")
    result: dict = {"schema": SCHEMA, "machine": machine_info(), "threads": THREADS, "model": described, "quick": q,
                    "window": args.window, "max_seq_len": args.max_seq_len, "prompt_tokens": args.prompt_tokens,
                    "repeats": args.repeats, "targets": TARGETS, "cut": cut,
                    "texts": {n: {"tokens": int(r.numel()), "windows": int(r.shape[0])} for n, r in ids.items()},
                    "pytorch_float32_perplexity": {}, "runtimes": {}}
    for name, rows in ids.items():  # the anchor: the same windows through the PyTorch model
        flat = rows.reshape(-1)
        result["pytorch_float32_perplexity"][name] = perplexity(model, flat, window=args.window,
                                                                max_tokens=flat.numel(), progress=False)["perplexity"]
    for runtime in args.runtimes:
        run_runtime(runtime, model, tok, ids, work, args, result, out)
    result["meets_targets"] = {
        f"{rt}_{p}_{n}": p in v["ratios"] and v["ratios"][p]["perplexity"][n] <= 1 + TARGETS[f"{p}_perplexity_rel"]
        for rt, v in result["runtimes"].items() for p in args.precisions[1:] for n in ids}
    result["meets_targets"]["parity"] = all("generation" in b and all(g["passed"] for g in b["generation"])
                                            for v in result["runtimes"].values() for b in v["bundles"].values())
    result["complete"] = True
    write_json(out, result)
    print(json.dumps({rt: {"ratios": v["ratios"], "rates": v["rates"]} for rt, v in result["runtimes"].items()}, indent=1))
    print(f"wrote {out}")
    missed = sorted(k for k, ok in result["meets_targets"].items() if not ok)
    if missed:
        print(f"missed targets: {missed}" + (" (the toy: informative only)" if q else ""))
    if missed and not q:
        sys.exit(1)


if __name__ == "__main__":
    main()

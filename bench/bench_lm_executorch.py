"""Benchmark: ExecuTorch language-model bundles, swappable vs the dense export of the same weights, 1 thread.

One CRISP causal LM (``--quick``: the toy LLaMA; default: SmolLM2-135M retrofitted at full capacity,
exact) is exported ``dense`` (materialized) and ``swappable`` with two task files (its mixers perturbed,
seeded: stand-ins that visibly change the text), both XNNPACK with a static key/value cache. Measured
side by side, interleaved, in one run:

* prefill tokens/s (a prompt of ``--prompt-tokens``) and decode tokens/s (one token per step, steady
  state) of each program; ratios swappable / dense (issue 18: >= 0.95);
* task switch: ``set_task`` from the ``.ptd`` file (read, SHA-256, tag and digest checked, dense weights
  rebuilt), in decode steps (goal <= 5), vs reloading the dense program (a new session: read, hash,
  load, first method);
* resident memory (peak RSS of a fresh process that loads the bundle and decodes), swappable / dense
  (goal <= 1.1);
* sizes: ``.pte`` vs stored parameters x 4 bytes; each task ``.ptd`` vs its mixers' raw bytes (goal
  within 10% + 1 KB);
* generation parity of every task (greedy tokens equal, max |logit diff| teacher-forced) and export
  seconds and bytes.

Writes bench/results/lm_executorch.json (``--quick``: lm_executorch_quick.json, unless ``--out``).
``--shaped LAYERS``: SmolLM2's shapes with LAYERS layers and random (confident) weights, under the 100M
parameters that need the SmolLM2 lock, when a full run cannot fit (lm_executorch_shaped<LAYERS>.json; its
vocabulary projection weighs more against fewer layers than in SmolLM2, so its ratios are not SmolLM2's).

    .venv/bin/python bench/bench_lm_executorch.py [--quick | --shaped 8] [--max-seq-len 256] [--repeats 10]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS_DIR, interleave, machine_info, pin_threads, steady, summarize, timed, write_json

THREADS = pin_threads(1)

import numpy as np  # noqa: E402

SCHEMA = 1
TARGETS = {"prefill_ratio": 0.95, "decode_ratio": 0.95, "switch_decode_steps": 5.0, "rss_ratio": 1.1,
           "task_rel": 0.10, "task_slack_bytes": 1024}


def build_model(quick: bool, shaped: int | None = None):
    """(CRISP causal LM, tokenizer or None, description)."""
    import crisp_edge as ce

    if shaped:
        return shaped_model(shaped), None, (f"SmolLM2-135M-shaped LLaMA with {shaped} of its 30 layers (hidden 576, "
                                            "9 / 3 heads, MLP 1536, vocabulary 49,152, tied head; seeded random "
                                            "weights, embedding x 15: confident), CRISP full capacity")
    if quick:
        from crisp_edge.testing import toy_hf_llama

        model = toy_hf_llama(seed=0).eval()
        ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
        return model, None, "toy LLaMA (hidden 32, 2 layers, vocabulary 64), CRISP s=4 group 2"
    from crisp_edge.models.causal_lm import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    t0 = time.perf_counter()
    ce.retrofit_(model, ce.CrispConfig(), progress=False)  # r unset: full capacity, exact
    return model, tok, f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantised), CRISP full capacity (retrofit {time.perf_counter() - t0:.0f} s)"


def shaped_model(layers: int):
    """SmolLM2-135M's shapes with ``layers`` layers, seeded random weights, the (tied) embedding scaled so the
    greedy tokens have clear margins (a random model's near-ties reorder under any rounding, as
    ``crisp_edge.testing.toy_confident_llama``'s head does), retrofitted at full capacity (exact)."""
    import torch
    import transformers

    import crisp_edge as ce

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(15.0)
    ce.retrofit_(model, ce.CrispConfig(), progress=False)
    return model


def rss_child(bundle: str, task: str | None, tokens: int) -> None:
    """Run in a fresh process: load ``bundle``, generate, print peak RSS (KiB)."""
    from crisp_edge.export.executorch.bundle import load_et_bundle
    from crisp_edge.training.compress.distill import peak_rss_mb

    sess = load_et_bundle(bundle).session(threads=1)
    sess.generate(list(range(1, 9)), tokens, task=task)
    print(json.dumps({"maxrss_kib": round(peak_rss_mb() * 1024)}))  # VmHWM: this process's own peak


def peak_rss(bundle: Path, task: str | None, tokens: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(bundle), "--rss-task", task or "",
                          "--rss-tokens", str(tokens)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kib"] * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the toy model (a test runs this)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="cache length (default: 256, toy 32)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prefill length (default 64, toy 8)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 10, toy 3)")
    ap.add_argument("--scale", type=float, default=None, help="mixer perturbation of the task files (default 0.5, SmolLM2 0.05)")
    ap.add_argument("--shaped", type=int, default=None, metavar="LAYERS",
                    help="SmolLM2's shapes with LAYERS layers, random weights (under the SmolLM2 lock's 100M parameters; "
                         "writes lm_executorch_shaped<LAYERS>.json)")
    ap.add_argument("--work", default=None, help="folder for the bundles (default: a temporary one)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-task", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rss-tokens", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.rss_task or None, args.rss_tokens)
    q = args.quick
    seq = args.max_seq_len or (32 if q else 256)
    prompt_n = args.prompt_tokens or (8 if q else 64)
    repeats = args.repeats or (3 if q else 10)
    scale = args.scale if args.scale is not None else (0.5 if q else 0.05)
    name = ("lm_executorch_quick.json" if q else f"lm_executorch_shaped{args.shaped}.json" if args.shaped
            else "lm_executorch.json")
    out = Path(args.out) if args.out else RESULTS_DIR / name
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_lm_et_"))
    work.mkdir(parents=True, exist_ok=True)

    from crisp_edge.export.executorch.export import export_executorch
    from crisp_edge.export.parity.compare import Tolerance
    from crisp_edge.files.mixers import read_mixers
    from crisp_edge.testing import make_lm_task_file

    model, tok, described = build_model(q, args.shaped)
    tasks = [make_lm_task_file(model, work / f"{name}.mixers.safetensors", task=name, seed=i + 1, scale=scale)
             for i, name in enumerate(("alpha", "beta"))]
    result: dict = {"schema": SCHEMA, "machine": machine_info(), "threads": THREADS, "model": described,
                    "max_seq_len": seq, "prompt_tokens": prompt_n, "repeats": repeats, "task_scale": scale,
                    "targets": TARGETS, "exports": {}, "parity": {}}
    bundles, sessions = {}, {}
    for mode in ("dense", "swappable"):
        secs, b = timed(lambda: export_executorch(model, work / mode, mode=mode, tasks=tasks if mode == "swappable" else (),
                                                  tokenizer=tok, max_seq_len=seq, overwrite=True))
        bundles[mode] = b
        m = b.manifest
        result["exports"][mode] = {"seconds": round(secs, 1), "program_bytes": m["params"]["program_bytes"],
                                   "stored_params": m["params"]["stored"],
                                   "pte_vs_stored_fp32": round(m["params"]["program_bytes"] / m["params"]["stored_bytes_fp32"], 4),
                                   "files": {f: r["bytes"] for f, r in m["files"].items()},
                                   "tasks": {t: r["bytes"] for t, r in m["tasks"].items()},
                                   "parity_at_export": m["parity"]}
        s = b.session(threads=1)
        tol = Tolerance(m["tolerance"]["atol"], m["tolerance"]["min_cosine"], m["tolerance"]["reason"])
        result["parity"][mode] = [r.to_dict() for r in s.check_generation(tol)]
        sessions[mode] = s
        write_json(out, {**result, "complete": False})  # a long run keeps what it measured so far
    for mf_path in tasks:  # task file vs its mixers' raw bytes
        mf = read_mixers(mf_path)
        raw = sum(t.numel() * 4 for t in mf.tensors.values())
        got = bundles["swappable"].manifest["tasks"][mf.task]["bytes"]
        result["exports"]["swappable"]["tasks"][mf.task] = {"bytes": got, "mixer_bytes": raw,
                                                            "within_target": got <= raw * 1.1 + 1024}

    dense, swap = sessions["dense"], sessions["swappable"]
    swap.set_task("alpha")
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, int(model.config.vocab_size), prompt_n)]

    def prefill(s):
        return lambda: s.lm_stepper().reset() or s.lm_stepper().step(prompt, 0)

    def decode(s):
        st = s.lm_stepper()

        def one():
            if st.position >= st.max_seq_len - 1:  # start over before the cache is full
                st.reset()
                st.step(prompt[:1], 0)
            st.step([1], st.position)
        return one

    cases = {"prefill_dense": steady(prefill(dense)), "prefill_swappable": steady(prefill(swap)),
             "decode_dense": steady(decode(dense)), "decode_swappable": steady(decode(swap))}

    def switch():  # as the user pays it, from the file: read, hash, tag, check, set_task
        path = bundles["swappable"].task_path("beta" if swap.task == "alpha" else "alpha")
        return timed(lambda: swap.set_task(path))[0]

    def reload():
        return timed(lambda: bundles["dense"].session(threads=1).lm_stepper().step(prompt[:1], 0))[0]

    cases.update({"switch_from_file": switch, "reload_dense": reload})
    times = interleave(cases, repeats)
    t = {k: summarize(v) for k, v in times.items()}
    med = {k: v["median"] for k, v in t.items()}
    result["timings"] = t
    result["rates"] = {"prefill_tokens_per_s": {m: round(prompt_n / med[f"prefill_{m}"], 1) for m in ("dense", "swappable")},
                       "decode_tokens_per_s": {m: round(1 / med[f"decode_{m}"], 1) for m in ("dense", "swappable")}}
    rss = {m: peak_rss(work / m, None if m == "dense" else "alpha", 8) for m in ("dense", "swappable")}
    result["memory"] = {"peak_rss_bytes": rss}
    result["ratios"] = {
        "prefill_swappable_vs_dense": round(med["prefill_dense"] / med["prefill_swappable"], 3),
        "decode_swappable_vs_dense": round(med["decode_dense"] / med["decode_swappable"], 3),
        "switch_in_decode_steps": round(med["switch_from_file"] / med["decode_swappable"], 2),
        "reload_in_decode_steps": round(med["reload_dense"] / med["decode_dense"], 2),
        "rss_swappable_vs_dense": round(rss["swappable"] / rss["dense"], 3),
    }
    r, task_ok = result["ratios"], all(t["within_target"] for t in result["exports"]["swappable"]["tasks"].values())
    result["meets_targets"] = {
        "prefill_ratio": r["prefill_swappable_vs_dense"] >= TARGETS["prefill_ratio"],
        "decode_ratio": r["decode_swappable_vs_dense"] >= TARGETS["decode_ratio"],
        "switch_decode_steps": r["switch_in_decode_steps"] <= TARGETS["switch_decode_steps"],
        "rss_ratio": r["rss_swappable_vs_dense"] <= TARGETS["rss_ratio"], "task_bytes": task_ok,
        "parity": all(p["passed"] for v in result["parity"].values() for p in v)}
    result["complete"] = True
    write_json(out, result)
    print(json.dumps({"ratios": result["ratios"], "rates": result["rates"],
                      "parity": {m: [(r["task"], r["tokens_match"], max(c["max_abs_diff"] for c in r["cases"]))
                                     for r in v] for m, v in result["parity"].items()}}, indent=1))
    print(f"wrote {out}")
    missed = sorted(k for k, ok in result["meets_targets"].items() if not ok)
    if missed:
        print(f"missed targets: {missed}" + (" (the toy's timings are overhead, not the model: informative only)"
                                             if q else ""))
    if missed and not q and not args.shaped:
        sys.exit(1)


if __name__ == "__main__":
    main()

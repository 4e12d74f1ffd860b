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


def render_adapt(d: dict) -> str:
    names = {"crisp": "CRISP mixers (s=4) + head", "crisp_s8": "CRISP mixers (s=8) + head", "head": "head only", "lora_r1": "LoRA r=1 + head",
             "lora_r8": "LoRA r=8 + head", "full": "full fine-tuning"}
    rows = []
    for task, t in d["tasks"].items():
        for method, r in t["methods"].items():
            size = f"{r['file_bytes'] / 1024:.1f} KiB" if r.get("file_bytes") else f"{r['raw_bytes'] / 2**20:.1f} MiB (model)"
            rows.append([task, names.get(method, method), f"{100 * r['accuracy']:.2f}", f"{r['trainable']:,}", size,
                         f"{r['seconds_per_epoch']:.1f}"])
    s = d["task_switch"]
    p = d["protocol"]
    return (_table(["task", "method", "test acc. %", "trainable", "task file", "s/epoch"], rows)
            + f"\n\n{p['epochs']} epochs, batch {p['batch_size']}, seed {p['seed']}, {d['threads_training']} threads, "
              f"same data for every method (`bench/results/adapt.json`). "
              f"Task switch on a live {s['model'].split(' ')[0]} CRISP model, 1 thread: "
              f"**{s['switch_ms_median']:.2f} ms** median ({s['switch_over_forward']:.3f} of a forward pass); "
              f"its mixer file is {s['mixer_file_bytes']:,} bytes for {s['mixer_raw_bytes']:,} bytes of tensors.")


def render_onnx(d: dict) -> str:
    t = d["targets"]
    rows = []
    for r in d["results"]:
        q = r["ratios_to_plain"]
        adapters = max((a["ratio"] for a in r["adapters"].values()), default=float("nan"))
        rows.append([r["model"], f"{q['dense']:.2f}x", f"{q['factored']:.2f}x", f"{q['swappable']:.2f}x",
                     f"{q['switch_in_forwards']:.2f}", f"{q['recreate_session_in_forwards']:.1f}",
                     f"{100 * r['sizes']['swappable']['rel_diff']:+.2f}%", f"{adapters:.3f}x",
                     f"{max(r['parity_max_abs'].values()):.1e}"])
    m = d["machine"]
    return (_table(["model", "dense", "factored", "swappable (task active)", "task switch (forwards)",
                    "recreate session (forwards)", "swappable weights vs stored x 4 B", "adapter / raw mixers",
                    "parity max abs"], rows)
            + f"\n\nLatency as a ratio to the plain dense export of the same model, same run, batch 1, 1 thread, median of "
              f"{d['protocol']['repeats']} interleaved rounds ({m['date'][:10]}, load average {m['load_average_1_5_15'][0]}). "
              f"Targets: dense <= {t['dense_ratio']}x, swappable <= {t['swappable_ratio']}x, switch <= "
              f"{t['switch_forwards']} forward, parity <= {t['parity_atol']:g} (`bench/results/onnx.json`).")


def render_reliability(d: dict) -> str:
    rows = [[name, f"{r['cases']:,}", f"{r['refused']:,}", f"{r['accepted']:,}", str(r["escapes"])]
            for name, r in d["fuzz"].items()]
    rows += [[f"SIGKILL during save ({name})", f"{k['kills']} kills", "-", "-", str(len(k["problems"]))]
             for name, k in d["kill"].items()]
    return (_table(["loader / scenario", "cases", "refused (typed error)", "accepted", "escapes / bad files"], rows)
            + f"\n\n{d['failures_found_and_fixed']} escapes found and fixed on the way (listed in "
              "`bench/results/reliability.json`); open now: "
              f"{d['fuzz_escapes_open']} fuzz escapes, {d['kill_problems_open']} kill problems.")


RENDERERS = {"retrofit": render_retrofit, "adapt": render_adapt, "onnx": render_onnx,
             "reliability": render_reliability}


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

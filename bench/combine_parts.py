"""Combine the JSON parts of one benchmark configuration run as parallel processes (e.g. on a GPU machine,
``bench/device/``) into the one file the README renders.

    .venv/bin/python bench/combine_parts.py minilm_adapt bench/results/minilm_adapt.json PART.json ...
    .venv/bin/python bench/combine_parts.py minilm_compress bench/results/minilm_compress.json PART.json ...

``minilm_adapt`` (``bench_minilm.py`` parts): the parts must share every setting but ``tasks`` and
``methods``; the result holds every task's methods (in the model's method order) and its ``cut`` is
recomputed against the full configuration. ``minilm_compress`` (``bench_compress_minilm.py`` parts): the
parts must share every setting but ``keeps``, ``methods`` and ``distill_lr`` (a learning-rate sweep) and the
same original model's judgement; their runs are concatenated (each run records its distillation rate).
Either way the parts' machines, wall times and files are kept under ``parts``; a part is never rerun.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import write_json

#: Settings that may differ between the parts of one combined result, per benchmark.
FREE = {"minilm_adapt": ("tasks", "methods"), "minilm_compress": ("keeps", "methods", "distill_lr")}


def _same_settings(parts: list[dict], free: tuple[str, ...], paths: list[Path]) -> None:
    def fixed(d):
        return {k: v for k, v in d["config"].items() if k not in free}

    for d, p in zip(parts[1:], paths[1:]):
        if fixed(d) != fixed(parts[0]) or d.get("model", "minilm") != parts[0].get("model", "minilm"):
            diff = sorted(k for k in fixed(d) if fixed(d)[k] != fixed(parts[0]).get(k))
            raise SystemExit(f"{p} was run with other settings than {paths[0]} ({diff or 'model'}): not parts of "
                             "one configuration.")


def _union(values: list[list], order: list | None = None) -> list:
    seen = list(dict.fromkeys(v for vs in values for v in vs))
    return [v for v in order if v in seen] + [v for v in seen if v not in order] if order else seen


def _parts_record(parts: list[dict], paths: list[Path]) -> list[dict]:
    return [{"file": p.name, "machine": d["machine"], "wall_seconds": d.get("wall_seconds"),
             "config": dict(d["config"])} for d, p in zip(parts, paths)]


def combine_adapt(parts: list[dict], paths: list[Path], name: str) -> dict:
    _same_settings(parts, FREE["minilm_adapt"], paths)
    base = parts[0]
    methods = _union([d["config"]["methods"] for d in parts], base["full_config"]["methods"])
    tasks: dict[str, dict] = {}
    for d in parts:
        for task, t in d["tasks"].items():
            into = tasks.setdefault(task, {k: v for k, v in t.items() if k not in ("methods", "sweep_seed0")}
                                    | {"methods": {}, "sweep_seed0": {}})
            clash = set(into["methods"]) & set(t["methods"])
            if clash:
                raise SystemExit(f"{task}: methods {sorted(clash)} appear in two parts; keep one run of each.")
            into["methods"].update(t["methods"])
            into["sweep_seed0"].update(t["sweep_seed0"])
    for t in tasks.values():
        t["methods"] = {m: t["methods"][m] for m in methods if m in t["methods"]}
        t["completed_methods"] = list(t["methods"])
        t.pop("wall_seconds", None)
    task_order = _union([d["config"]["tasks"] for d in parts], base["full_config"]["tasks"])
    cfg = {**base["config"], "tasks": task_order, "methods": methods}
    cut = [f"{k}: {cfg[k]} instead of {v}" for k, v in base["full_config"].items() if cfg[k] != v]
    return {**{k: v for k, v in base.items() if k not in ("merged_from", "completed_tasks")}, "benchmark": name,
            "config": cfg, "cut": cut, "tasks": {k: tasks[k] for k in task_order if k in tasks},
            "completed_tasks": [k for k in task_order if k in tasks],
            "wall_seconds": max(d.get("wall_seconds") or 0 for d in parts), "parts": _parts_record(parts, paths)}


def combine_compress(parts: list[dict], paths: list[Path], name: str) -> dict:
    _same_settings(parts, FREE["minilm_compress"], paths)
    base = parts[0]
    for d, p in zip(parts[1:], paths[1:]):
        if d["original"]["head_acc"] != base["original"]["head_acc"]:
            raise SystemExit(f"{p} judged the original model differently from {paths[0]}: not one configuration.")
    runs = [{**r, "distill_lr": d["config"]["distill_lr"]} for d in parts for r in d["runs"]]
    cfg = {**base["config"], "keeps": _union([d["config"]["keeps"] for d in parts]),
           "methods": _union([d["config"]["methods"] for d in parts], base["full_config"]["methods"]),
           "distill_lr": _union([[d["config"]["distill_lr"]] for d in parts])}
    rates = cfg["distill_lr"]
    cfg["distill_lr"] = rates[0] if len(rates) == 1 else rates
    cut = [f"{k}: {cfg[k]} instead of {v}" for k, v in base["full_config"].items() if cfg[k] != v]
    out = {**{k: v for k, v in base.items() if k != "alg6"}, "benchmark": name, "config": cfg, "cut": cut,
           "runs": runs, "wall_seconds": max(d.get("wall_seconds") or 0 for d in parts),
           "parts": _parts_record(parts, paths)}
    alg6 = [d["alg6"] for d in parts if "alg6" in d]
    if alg6:
        out["alg6"] = {**alg6[0], "compressed": {k: v for a in alg6 for k, v in a["compressed"].items()}}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=sorted(FREE))
    ap.add_argument("out", type=Path)
    ap.add_argument("parts", type=Path, nargs="+")
    ap.add_argument("--note", default=None, help="how the parts were run (recorded as device_run)")
    a = ap.parse_args()
    parts = [json.loads(p.read_text()) for p in a.parts]
    fn = combine_adapt if a.kind == "minilm_adapt" else combine_compress
    result = fn(parts, a.parts, a.out.stem)
    if a.note:
        result["device_run"] = a.note
    write_json(a.out, result)
    print(f"wrote {a.out} from {len(parts)} parts")
    return 0


if __name__ == "__main__":
    sys.exit(main())

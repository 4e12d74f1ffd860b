"""Benchmark: the joint pipeline (Alg. 6) - do per-task mixers on compressed bases keep their accuracy?

Runs ``run_pipeline`` twice on the embedded Fashion-MNIST ViT with the same tasks, adaptation
settings and seed: once without compression (mixers on the full-capacity bases) and once with the
bases compressed to half the targeted weights (greedy ranks, SVD init, distillation on 3% of the
Fashion-MNIST training split). Goal (issue 4): every task within 2 points of its uncompressed result.
Writes ``bench/results/pipeline.json``.

    .venv/bin/python bench/bench_pipeline.py [--keep 0.5] [--tasks mnist,digits,fmnist5] [--epochs 8]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import RESULTS_DIR, machine_info, pin_threads, write_json

THREADS = pin_threads(2)

from crisp_edge.training.adapt import AdaptConfig  # noqa: E402
from crisp_edge.models.sources import load_embedded_vit  # noqa: E402
from crisp_edge.training.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from crisp_edge.training.loop import TrainConfig  # noqa: E402

GOAL_POINTS = 2.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--tasks", default="mnist,digits,fmnist5")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS_DIR / "pipeline.json"))
    args = ap.parse_args(argv)
    adapt = AdaptConfig(train=TrainConfig(epochs=args.epochs, batch_size=64, seed=0))
    tasks = tuple(args.tasks.split(","))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, keep in (("uncompressed", None), ("compressed", args.keep)):
            config = PipelineConfig(keep_fraction=keep, tasks=tasks, adapt=adapt)
            res = run_pipeline(load_embedded_vit(), Path(tmp) / label, config, progress=False)
            print(res.summary(), flush=True)
            runs[label] = {"config": config.to_dict(), "stages": res.stages}
    rows = {}
    for task in tasks:
        full = runs["uncompressed"]["stages"]["adapt"]["tasks"][task]
        small = runs["compressed"]["stages"]["adapt"]["tasks"][task]
        drop = 100 * (full["accuracy"] - small["accuracy"])
        rows[task] = {"uncompressed": full["accuracy"], "compressed": small["accuracy"], "drop_points": drop,
                      "within_goal": drop <= GOAL_POINTS, "trainable_uncompressed": full["trainable"],
                      "trainable_compressed": small["trainable"], "mixer_bytes_compressed": small["bytes"]}
        print(f"{task:8s} uncompressed {100 * full['accuracy']:.2f}%  compressed {100 * small['accuracy']:.2f}%  "
              f"drop {drop:+.2f} points", flush=True)
    c = runs["compressed"]["stages"]["compress"]
    write_json(args.out, {"schema": 1, "benchmark": "pipeline", "machine": machine_info(), "threads": THREADS,
                          "goal_points": GOAL_POINTS, "protocol": {"keep_fraction": args.keep, "epochs": args.epochs,
                                                                   "batch_size": 64, "seed": 0, "tasks": list(tasks)},
                          "compress": c, "tasks": rows, "runs": runs,
                          "all_within_goal": all(r["within_goal"] for r in rows.values())})
    return 0 if all(r["within_goal"] for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

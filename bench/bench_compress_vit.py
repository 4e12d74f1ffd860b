"""Compression of the embedded Fashion-MNIST ViT (Alg. 4) against baselines at the same stored budget.

    python bench/bench_compress_vit.py            # keep 50% and 25% (50% / 75% reduction), every method
    python bench/bench_compress_vit.py --quick    # a smoke run: tiny data, 1 epoch, 1,000 test images

Every method gets the same distillation data (a seeded slice of the Fashion-MNIST *train* split), the
same loss (logit KL + per-block feature MSE from the full-capacity CRISP teacher) and the same steps,
and is evaluated on the full 10,000-image test split before and after that training. Methods:

* ``crisp``        : greedy rank allocation, SVD init from the teacher, distillation (Alg. 4);
* ``crisp-uniform``: the same with uniform ranks (which allocator wins);
* ``crisp-random`` : greedy ranks, random init (Alg. 2's N(0, 0.01)), distillation ("without SVD init");
* ``crisp-mimicry``: greedy ranks, SVD init, no distillation (data-free "mimicry only");
* ``svd``          : per-layer truncated SVD of the original weights (``baselines.svd_``);
* ``basis-sharing``: cross-layer shared input basis, calibration-whitened (``baselines.basis_sharing_``);
* ``fips``         : shared basis + sparse per-layer projections (``fips.fips_``).

The baselines get the budget ``crisp`` stores at that kept fraction (``stored_params`` counts every
method alike). Each run is its own subprocess, so its time and peak RSS (``ru_maxrss``) are its own.
Writes ``bench/results/compress_vit.json`` (merging with runs already there unless ``--fresh``) and
``bench/results/compress_vit.png`` (test accuracy vs kept fraction, one line per method).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, RESULTS_DIR, machine_info, pin_threads, write_json

METHODS = ("crisp", "crisp-uniform", "crisp-random", "crisp-mimicry", "crisp-s192", "svd", "basis-sharing", "fips")
CRISP_METHODS = {"crisp": ("greedy", "svd", True), "crisp-uniform": ("uniform", "svd", True),
                 "crisp-random": ("greedy", "random", True), "crisp-mimicry": ("greedy", "svd", False),
                 "crisp-s192": ("greedy", "svd", True)}
#: The wide-mixer layout of ``crisp-s192``: s = 192 (= the model width), so u = d_out for qkv/proj/fc1, the
#: Basis Sharing structure (DESIGN.md section 2); its mixers are r x 192 per layer, not a tiny task file.
WIDE_CONFIG = {"default": {"s": 192, "group_size": 3}}
JSON_PATH = RESULTS_DIR / "compress_vit.json"
PNG_PATH = RESULTS_DIR / "compress_vit.png"


def run_one(method: str, keep: float, args: argparse.Namespace) -> dict:
    """One compression run (in this process): build, evaluate, distil, evaluate; returns its record."""
    pin_threads(1)

    from crisp_edge.training.compress import (
        DistillConfig,
        allocate_ranks,
        distill_,
        init_student,
    )
    from crisp_edge.cli.compress import distillation_slice
    from crisp_edge.training.compress.distill import peak_rss_mb
    from crisp_edge.data.fashion_mnist import load_fashion_mnist
    from crisp_edge.training.evaluate import accuracy, predict
    from crisp_edge.models.sources import EMBEDDED_CRISP_CONFIG, load_embedded_vit
    from crisp_edge.training.retrofit import retrofit_

    x, _, _ = distillation_slice(args.fraction, seed=0)
    xt, yt = load_fashion_mnist("test", limit=args.test_limit)
    teacher = load_embedded_vit()
    retrofit_(teacher, EMBEDDED_CRISP_CONFIG, progress=False)
    config = DistillConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lambda_feat=args.lambda_feat)
    start = time.perf_counter()
    # the budget every method is held to: what CRISP (greedy, Alg. 4) stores at this kept fraction
    budget = allocate_ranks(teacher, keep, "greedy", calib=x[:64]).stored
    record: dict = {"method": method, "keep_fraction": keep, "budget": budget}
    if method in CRISP_METHODS:
        alloc, init, distil = CRISP_METHODS[method]
        if method == "crisp-s192":  # the same function (an exact retrofit), another layout; held to the same budget
            from crisp_edge.method.config import CrispConfig, RoleConfig

            teacher = load_embedded_vit()
            retrofit_(teacher, CrispConfig(default=RoleConfig(**WIDE_CONFIG["default"])), progress=False)
            plan = allocate_ranks(teacher, budget / record_original(), alloc, calib=x[:64])
        else:
            plan = allocate_ranks(teacher, keep, alloc, calib=x[:64])
        student = init_student(teacher, plan, init=init)
        record.update(ranks=plan.role_ranks, allocation=alloc, init=init)
    else:
        from crisp_edge.training.compress import baselines as bl

        distil = True
        student = load_embedded_vit()
        if method == "svd":
            rep = bl.svd_(student, budget, progress=False)
        elif method == "basis-sharing":
            calib = bl.capture_linear_inputs(student, list(x[:args.calib_images].split(64)))
            rep = bl.basis_sharing_(student, budget, calib_inputs=calib, group_size=3, progress=False)
        else:
            calib = bl.capture_linear_inputs(student, list(x[:args.calib_images].split(64)))
            rep = bl.fips_(student, budget, calib_inputs=calib, group_size=3, progress=False)
        record.update(baseline=rep.to_dict() | {"layer_errors": None})
    init_seconds = time.perf_counter() - start
    from crisp_edge.training.compress.baselines import stored_params

    record["stored"] = stored_params(student)
    if record["stored"] > budget:
        raise AssertionError(f"{method} stores {record['stored']} numbers, over the budget {budget}")
    record["original"] = stored_params(load_embedded_vit())
    record["kept_fraction"] = record["stored"] / record["original"]
    record["accuracy_before"] = accuracy(predict(student, xt), yt)
    record["accuracy_teacher"] = accuracy(predict(teacher, xt), yt)
    if distil:
        rep = distill_(student, teacher, x, config, progress=False)
        record["distill"] = {k: v for k, v in rep.to_dict().items() if k != "config"}
        record["accuracy_after"] = accuracy(predict(student, xt), yt)
    else:
        record["accuracy_after"] = record["accuracy_before"]
    record["accuracy"] = record["accuracy_after"]
    record["seconds"] = init_seconds + (record["distill"]["seconds"] if distil else 0.0)
    record["peak_rss_mb"] = peak_rss_mb()
    record["test_images"] = len(xt)
    return record


def record_original() -> int:
    """The targeted dense weights of the embedded ViT (every method's denominator)."""
    from crisp_edge.training.compress.baselines import stored_params
    from crisp_edge.models.sources import load_embedded_vit

    return stored_params(load_embedded_vit())


def _child(method: str, keep: float, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--run-one", method, str(keep), "--fraction", str(args.fraction),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--lambda-feat", str(args.lambda_feat), "--calib-images", str(args.calib_images)]
    if args.test_limit:
        cmd += ["--test-limit", str(args.test_limit)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if done.returncode != 0:
        print(f"  {method} @ {keep}: FAILED\n{done.stderr[-2000:]}", flush=True)
        return {"method": method, "keep_fraction": keep, "error": done.stderr[-2000:]}
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    rec["wall_seconds"] = time.perf_counter() - t0
    print(f"  {method:14s} keep {keep:.2f}: stored {rec['stored']:,} ({rec['kept_fraction']:.2%}) "
          f"acc before {rec['accuracy_before']:.2%} after {rec['accuracy_after']:.2%}  "
          f"{rec['seconds']:.0f} s, peak RSS {rec['peak_rss_mb']:.0f} MiB", flush=True)
    return rec


def best(run: dict) -> float:
    """A method's accuracy: the better of before and after distillation (a user keeps the better one)."""
    return max(run["accuracy_before"], run["accuracy_after"])


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    teacher = [r["accuracy_teacher"] for r in runs if "accuracy_teacher" in r]
    for method in METHODS:
        pts = sorted((r["kept_fraction"], best(r)) for r in runs if r.get("method") == method and "accuracy" in r)
        if pts:
            ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
    if teacher:
        ax.axhline(100 * teacher[0], color="grey", ls="--", lw=1, label="original (100%)")
    ax.set_xlabel("kept fraction of the targeted linear weights (%)")
    ax.set_ylabel("test accuracy (%), better of before/after distillation")
    ax.set_title("Embedded ViT compressed at equal stored parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1%% of train, 1 epoch, 1,000 test images")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--fraction", type=float, default=0.03, help="distillation slice of the train split")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lambda-feat", type=float, default=0.2)
    p.add_argument("--calib-images", type=int, default=256, help="calibration images for the whitened baselines")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each single-threaded)")
    p.add_argument("--fresh", action="store_true", help="drop earlier runs from the JSON instead of merging")
    p.add_argument("--render", action="store_true", help="only re-render the table and plot from the JSON")
    p.add_argument("--run-one", nargs=2, metavar=("METHOD", "KEEP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(args.run_one[0], float(args.run_one[1]), args)))
        return 0
    if args.render:
        data = json.loads(JSON_PATH.read_text())
        data["table"] = table(data["runs"])
        write_json(JSON_PATH, data)
        plot([r for r in data["runs"] if "error" not in r], PNG_PATH)
        print(data["table"])
        return 0
    if args.quick:
        args.fraction, args.epochs, args.test_limit = 0.01, 1, args.test_limit or 1000
    pin_threads(1)
    cases = [(m, k) for k in args.keeps for m in args.methods]
    print(f"{len(cases)} runs, {args.jobs} at a time; distillation: {args.fraction:.1%} of train, "
          f"{args.epochs} epochs, batch {args.batch_size}", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        new = list(pool.map(lambda c: _child(c[0], c[1], args), cases))
    settings = {"fraction": args.fraction, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "lambda_kl": 1.0, "lambda_feat": args.lambda_feat, "calib_images": args.calib_images,
                "test_limit": args.test_limit, "quick": args.quick}
    old = []
    if JSON_PATH.exists() and not args.fresh:
        prev = json.loads(JSON_PATH.read_text())
        if prev.get("settings") == settings:
            done = {(r["method"], r["keep_fraction"]) for r in new}
            old = [r for r in prev.get("runs", []) if (r.get("method"), r.get("keep_fraction")) not in done]
    runs = sorted(old + new, key=lambda r: (-r["keep_fraction"], METHODS.index(r["method"])))
    write_json(JSON_PATH, {"benchmark": "compress_vit", "machine": machine_info(), "settings": settings,
                           "runs": runs, "table": table(runs)})
    plot([r for r in runs if "error" not in r], PNG_PATH)
    print(table(runs))
    print(f"wrote {JSON_PATH} and {PNG_PATH}")
    return 0


def table(runs: list[dict]) -> str:
    """A markdown table: one row per run."""
    lines = ["| kept | method | stored | acc. before distill | acc. after | time (s) | peak RSS (MiB) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    teacher = next((r["accuracy_teacher"] for r in runs if "accuracy_teacher" in r), None)
    if teacher is not None:
        original = next(r["original"] for r in runs if "original" in r)
        lines.append(f"| 100% | original (full-capacity CRISP teacher) | {original:,} | {teacher:.2%} | | | |")
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['keep_fraction']:.0%} | {r['method']} | failed | | | | |")
            continue
        lines.append(f"| {r['kept_fraction']:.1%} | {r['method']} | {r['stored']:,} | {r['accuracy_before']:.2%} | "
                     f"{r['accuracy_after']:.2%} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

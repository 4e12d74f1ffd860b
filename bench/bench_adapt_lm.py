"""Benchmark: language-model tasks as mixer files (Alg. 3 for a causal LM, issue 18 item 4): SmolLM2-135M
retrofitted to CRISP (full capacity, exact), then mixers trained per text domain by next-token prediction
(``adapt_lm_``; bases and LM head frozen), each saved as a mixer file bound to the bases.

Two domains of visibly different style (``DOMAINS``): the King James Bible (train on Old Testament windows,
judge on New Testament windows) and the Debian Reference (technical documentation; train and held-out
windows are disjoint chunks of it, in hash order). The result is a table of held-out perplexity: each task
(and the untouched model) on each domain; each task should be best on its own domain. Also: trainable
numbers and file bytes per task, and LoRA r=8 (peft, alpha 16) on the same seven projections of the plain
model, trained on the same windows with the same loop, as a comparison point.

    .venv/bin/python bench/bench_adapt_lm.py              # SmolLM2-135M, 1 thread (~30 min on a busy core)
    .venv/bin/python bench/bench_adapt_lm.py --quick      # the toy LLaMA + character tokenizer, seconds
    .venv/bin/python bench/bench_adapt_lm.py --keep-files out/   # also keep the task files

Writes bench/results/adapt_lm.json (``--out``), after every stage (``completed`` says which), with ``cut``:
how the run is smaller than a real adaptation run.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS_DIR, machine_info, pin_threads, write_json

THREADS = pin_threads(1)

import torch  # noqa: E402

from crisp_edge.data.english import load_english, spread  # noqa: E402
from crisp_edge.files.mixers import apply_mixers_, read_mixers, save_mixers, task_tensors, write_task_tensors_  # noqa: E402
from crisp_edge.method.config import CrispConfig  # noqa: E402
from crisp_edge.models.causal_lm import perplexity, tokenize, windows  # noqa: E402
from crisp_edge.training.adapt_lm import AdaptLMConfig, adapt_lm_, next_token_loss  # noqa: E402
from crisp_edge.training.loop import TrainConfig, train_classifier  # noqa: E402
from crisp_edge.training.retrofit import retrofit_  # noqa: E402

SCHEMA = 1
#: domain -> (training source, held-out source or None = disjoint windows of the training source); names of
#: ``crisp_edge.data.english.ENGLISH_SOURCES``.
DOMAINS = {"kjv": ("kjv-ot", "kjv-nt"), "debian-reference": ("debian-reference", None)}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = {"model": "smollm2", "window": 128, "train_windows": 96, "eval_windows": 32, "batch_size": 2, "epochs": 1,
        "mixer_lr": 3e-4, "lora_lr": 1e-3}
QUICK = {"model": "toy", "window": 16, "train_windows": 48, "eval_windows": 8, "batch_size": 8, "epochs": 2,
         "mixer_lr": 3e-2, "lora_lr": 1e-2}
#: Characters of each source read before hash-ordering its chunks (enough for every window asked here).
SOURCE_CHARS = 2_000_000


def load_model(name: str):
    if name == "toy":
        from crisp_edge.testing import toy_char_tokenizer, toy_hf_llama

        return toy_hf_llama(seed=0), toy_char_tokenizer()
    from crisp_edge.models.causal_lm import load_causal_lm

    return load_causal_lm(name)


def domain_windows(name: str, tok, window: int, n_train: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows) of a domain; chunks in hash order, so both sample the whole text."""
    train_src, eval_src = DOMAINS[name]

    def rows(source: str, n: int) -> torch.Tensor:
        text = spread(load_english(source).text[:SOURCE_CHARS])
        return windows(tokenize(tok, text, max_tokens=n * window), window)

    if eval_src is None:
        both = rows(train_src, n_train + n_eval)
        return both[n_eval:], both[:n_eval]
    return rows(train_src, n_train), rows(eval_src, n_eval)


def ppl(model, held: torch.Tensor, cfg: dict) -> float:
    return round(perplexity(model, held.reshape(-1), window=cfg["window"], max_tokens=None,
                            batch_size=cfg["batch_size"], progress=False)["perplexity"], 4)


def train_lora(dense, train: torch.Tensor, cfg: dict):
    """The plain model with LoRA r=8 on ``LORA_TARGETS``, trained with adapt_lm_'s loop and loss."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(dense)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS), model)
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    history = train_classifier(model, [{"params": params, "lr": cfg["lora_lr"]}], train, train,
                               TrainConfig(epochs=cfg["epochs"], batch_size=cfg["batch_size"]), None, False,
                               loss_fn=next_token_loss)
    return model, sum(p.numel() for p in params), history


def cuts(cfg: dict, quick: bool) -> list[str]:
    out = [f"training: {cfg['train_windows']} windows of {cfg['window']} tokens per domain "
           f"({cfg['train_windows'] * cfg['window']:,} tokens), {cfg['epochs']} epoch(s), batch {cfg['batch_size']} "
           f"({cfg['epochs'] * -(-cfg['train_windows'] // cfg['batch_size'])} steps): minutes on one shared CPU "
           "thread, not a converged adaptation",
           f"held-out: {cfg['eval_windows']} windows of {cfg['window']} tokens per domain",
           "one seed; learning rates not swept on this run (mixers: a 16-step pilot on KJV, see the README; LoRA: "
           "a common default)"]
    if quick:
        out.insert(0, "quick: the toy LLaMA (random weights) with a character tokenizer, not SmolLM2")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS_DIR / "adapt_lm.json"))
    ap.add_argument("--keep-files", help="a folder to keep the task (mixer) files in")
    ap.add_argument("--no-lora", action="store_true")
    for key, value in FULL.items():
        if key != "model":
            ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    args = ap.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    cfg |= {k: v for k, v in vars(args).items() if k in cfg and v is not None}
    result = {"schema": SCHEMA, "config": cfg, "cut": cuts(cfg, args.quick), "domains": {
        d: {"train": f"{src} (the windows after the held-out ones, chunks in hash order)" if held is None else src,
            "heldout": held or f"{src} (its first windows, chunks in hash order)"} for d, (src, held) in DOMAINS.items()},
        "completed": [], "machine": machine_info()}

    def log(stage: str) -> None:
        result["completed"].append(stage)
        write_json(args.out, result)
        print(f"[{time.strftime('%H:%M:%S')}] {stage} done", file=sys.stderr, flush=True)

    model, tok = load_model(cfg["model"])
    model.float()
    data = {d: domain_windows(d, tok, cfg["window"], cfg["train_windows"], cfg["eval_windows"]) for d in DOMAINS}
    dense = None if args.no_lora else copy.deepcopy(model)
    t = time.perf_counter()
    rep = retrofit_(model, CrispConfig(), progress=False)
    result["retrofit"] = {"config": "CrispConfig(): s=4, groups of 4 blocks, full capacity r = 4*n (exact)",
                          "max_rel_error": rep.max_error, "seconds": round(time.perf_counter() - t, 1)}
    result["perplexity"] = {"original": {d: ppl(model, held, cfg) for d, (_, held) in data.items()}}
    log("original")

    folder = Path(args.keep_files) if args.keep_files else Path(tempfile.mkdtemp(prefix="adapt_lm_"))
    folder.mkdir(parents=True, exist_ok=True)
    init, files, tasks = task_tensors(model, head=False), {}, {}
    config = AdaptLMConfig(window=cfg["window"], mixer_lr=cfg["mixer_lr"],
                           train=TrainConfig(epochs=cfg["epochs"], batch_size=cfg["batch_size"]))
    for d, (train, held) in data.items():
        write_task_tensors_(model, init)
        r = adapt_lm_(model, train, eval_data=held, config=config, progress=False)
        files[d] = save_mixers(model, folder / f"{d}.mixers.safetensors", task=d, head=False,
                               extra={"objective": "causal-lm", "window": cfg["window"]})
        mf = read_mixers(files[d])
        tasks[d] = {"trainable": r.trainable_total, "file_bytes": mf.nbytes, "tensor_bytes": mf.raw_bytes,
                    "bases_unchanged": r.bases_unchanged, "train_seconds": round(r.history.seconds, 1),
                    "seconds_per_step": round(r.history.seconds / (cfg["epochs"] * -(-len(train) // cfg["batch_size"])), 2),
                    "train_loss": [round(e["train_loss"], 4) for e in r.history.epochs]}
        result["crisp_tasks"] = tasks
        log(f"crisp {d}")
    table = {}
    for task, path in files.items():
        write_task_tensors_(model, init)
        apply_mixers_(model, path)  # from the file: the table is what a user of the file gets
        table[task] = {d: ppl(model, held, cfg) for d, (_, held) in data.items()}
    result["perplexity"]["crisp"] = table
    result["crisp_own_domain_best"] = {t: min(table, key=lambda k: table[k][t]) == t for t in table}
    log("crisp table")
    if dense is not None:
        del model
        lora, lora_tasks = {}, {}
        for d, (train, _) in data.items():
            m, n, hist = train_lora(dense, train, cfg)
            lora[d] = {e: ppl(m, held, cfg) for e, (_, held) in data.items()}
            lora_tasks[d] = {"trainable": n, "adapter_bytes_fp32": 4 * n, "train_seconds": round(hist.seconds, 1),
                             "train_loss": [round(e["train_loss"], 4) for e in hist.epochs]}
            result["perplexity"]["lora_r8"], result["lora_tasks"] = lora, lora_tasks
            log(f"lora {d}")
    print(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

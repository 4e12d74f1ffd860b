"""Benchmark: per-task adaptation of the embedded Fashion-MNIST ViT, CRISP mixers vs the baselines.

For each real transfer task (``crisp_edge.data.tasks``: mnist, digits, fmnist5) and each method, on the
same data, epochs, batch size and seeds (``--seeds 0,1,2``: the mean accuracy, every seed's kept):

* ``crisp``    CRISP mixers + a new head (bases frozen), from the full-capacity retrofit;
* ``head``     head only (linear probe on the frozen dense model);
* ``lora_r1``, ``lora_r8``  LoRA through Hugging Face peft on the same linears (qkv, proj, fc1, fc2)
               + a new head;
* ``full``     full fine-tuning.

Records test accuracy, trainable parameters, the size of the file a task needs (mixer file, head,
peft adapter, whole model), its raw tensor bytes, and wall time per epoch (all methods on the same
2 threads, in one run). Then times a task switch on a live ``vit_small_patch16_224``-size CRISP model
on 1 thread (``TaskSwitcher.switch``: copy a task's mixers and head into the model). Writes
``bench/results/adapt.json``.

    .venv/bin/python bench/bench_adapt.py [--epochs 16] [--tasks mnist,digits,fmnist5] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

from _common import RESULTS_DIR, machine_info, pin_threads, timed, write_json

THREADS = pin_threads(2)

import torch

import crisp_edge as ce
from crisp_edge.training.adapt import AdaptConfig, adapt_, new_head_
from crisp_edge.training.evaluate import accuracy, predict
from crisp_edge.files.mixers import read_mixers, save_mixers
from crisp_edge.files.switcher import TaskSwitcher
from crisp_edge.models.sources import EMBEDDED_CRISP_CONFIG
from crisp_edge.data.tasks import load_task
from crisp_edge.training.loop import TrainConfig, train_classifier

SCHEMA = 1
LORA_TARGETS = ["qkv", "proj", "fc1", "fc2"]
#: CRISP layouts compared: the embedded default (s=4, 48 mixer numbers per layer) and s=8 (192 per
#: layer, still under the paper's 200), both in groups of 3 blocks at full rank (exact retrofit).
CRISP_CONFIGS = {
    "crisp": EMBEDDED_CRISP_CONFIG,
    "crisp_s8": ce.CrispConfig(default=ce.RoleConfig(s=8, group_size=3)),
}
#: Learning rates per method (AdamW): head-only uses the CRISP head's rate; LoRA and full fine-tuning the
#: usual ones for their method. CRISP uses AdaptConfig's defaults.
LR = {"head": 1e-2, "lora": 3e-3, "full": 3e-4}


def file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_accuracy(model, data) -> float:
    return accuracy(predict(model, data.x_test), data.y_test)


def run_crisp(base_crisp, data, train_cfg, tmp: Path) -> dict:
    model = copy.deepcopy(base_crisp)
    report = adapt_(model, data.x_train, data.y_train, num_classes=data.task.num_classes,
                    config=AdaptConfig(train=train_cfg), progress=False)
    path = save_mixers(model, tmp / f"{data.task.name}.safetensors", task=data.task.name)
    mf = read_mixers(path)
    return {"accuracy": test_accuracy(model, data), "trainable": report.trainable_total,
            "trainable_detail": report.trainable, "max_trainable_per_layer": ce.budget(model).max_trainable_per_layer,
            "file_bytes": path.stat().st_size, "raw_bytes": mf.raw_bytes, "bases_unchanged": report.bases_unchanged,
            "seconds_per_epoch": report.history.seconds_per_epoch, "history": report.history.epochs}


def _dense_with_head(base, num_classes: int, seed: int) -> torch.nn.Module:
    model = copy.deepcopy(base)
    model.reset_classifier(num_classes)
    torch.manual_seed(seed)
    torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
    torch.nn.init.zeros_(model.head.bias)
    return model


def _train(model, params, data, train_cfg, lr):
    hist = train_classifier(model, [{"params": params, "lr": lr}], data.x_train, data.y_train, train_cfg,
                            progress=False)
    hist.epochs[-1]["eval_accuracy"] = test_accuracy(model, data)  # evaluated once, after training
    return hist


def run_head(base, data, train_cfg, tmp: Path) -> dict:
    model = _dense_with_head(base, data.task.num_classes, train_cfg.seed)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    hist = _train(model, list(model.head.parameters()), data, train_cfg, LR["head"])
    from safetensors.torch import save_file

    path = tmp / "head.safetensors"
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(path))
    raw = sum(p.numel() * 4 for p in model.head.parameters())
    return _summary(hist, sum(p.numel() for p in model.head.parameters()), path.stat().st_size, raw)


def run_lora(base, data, train_cfg, tmp: Path, r: int) -> dict:
    from peft import LoraConfig, get_peft_model

    model = _dense_with_head(base, data.task.num_classes, train_cfg.seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                  modules_to_save=["head"]))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    hist = _train(peft_model, params, data, train_cfg, LR["lora"])
    out = tmp / f"lora_r{r}"
    peft_model.save_pretrained(str(out))
    raw = sum(p.numel() * 4 for p in params)
    return _summary(hist, sum(p.numel() for p in params), file_bytes(out), raw)


def run_full(base, data, train_cfg, tmp: Path) -> dict:
    model = _dense_with_head(base, data.task.num_classes, train_cfg.seed)
    model.requires_grad_(True)
    hist = _train(model, list(model.parameters()), data, train_cfg, LR["full"])
    n = sum(p.numel() for p in model.parameters())
    return _summary(hist, n, None, n * 4)


def _summary(hist, trainable: int, file_size: int | None, raw: int) -> dict:
    return {"accuracy": hist.final_accuracy, "trainable": trainable, "file_bytes": file_size, "raw_bytes": raw,
            "seconds_per_epoch": hist.seconds_per_epoch, "history": hist.epochs}


def merge_seeds(runs: list[dict], seeds: list[int]) -> dict:
    """One method's runs over seeds: the first seed's record, with the mean accuracy and time per epoch,
    every seed's accuracy and the spread (population standard deviation)."""
    out = dict(runs[0])
    accs = [r["accuracy"] for r in runs]
    out.update({"accuracy": statistics.fmean(accs), "accuracy_per_seed": [round(a, 4) for a in accs],
                "accuracy_std": statistics.pstdev(accs), "seeds": seeds,
                "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs)})
    return out


def time_task_switch(repeats: int = 200) -> dict:
    """Switch tasks on a live ViT-S-size CRISP model (random weights), 1 thread."""
    torch.set_num_threads(1)
    model = ce.build_model({"library": "timm", "name": "vit_small_patch16_224", "kwargs": {}}).eval()
    ce.retrofit_(model, ce.CrispConfig(), progress=False)
    x = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(2):
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for layer in ce.crisp_layers(model).values():
                    layer.crisp_mixer.add_(0.01 * torch.randn(layer.crisp_mixer.shape, generator=g))
                new_head_(model, 10, seed=i)
            paths.append(save_mixers(model, Path(d) / f"task{i}.safetensors", task=f"task{i}"))
        switcher = TaskSwitcher(model)
        load_s = [timed(lambda p=p: switcher.add(p))[0] for p in paths]
        switches = [timed(lambda i=i: switcher.switch(f"task{i % 2}"))[0] for i in range(repeats)]
        with torch.no_grad():
            forwards = [timed(lambda: model(x))[0] for _ in range(5)]
        mf = read_mixers(paths[0])
    torch.set_num_threads(THREADS)
    return {"model": "vit_small_patch16_224 (random weights), CrispConfig() default: s=4, groups of 4, r=16",
            "threads": 1, "switch_ms_median": 1e3 * statistics.median(switches), "switch_ms_max": 1e3 * max(switches),
            "read_and_check_ms": [1e3 * s for s in load_s], "forward_ms_median": 1e3 * statistics.median(forwards),
            "switch_over_forward": statistics.median(switches) / statistics.median(forwards),
            "mixer_file_bytes": mf.nbytes, "mixer_raw_bytes": mf.raw_bytes, "target_ms": 5.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tasks", default="mnist,digits,fmnist5")
    ap.add_argument("--methods", default="crisp,crisp_s8,head,lora_r1,lora_r8,full")
    ap.add_argument("--seeds", default="0", help="comma list; every method runs once per seed (data order, new "
                    "head, LoRA init); accuracy is the mean, with every seed's kept")
    ap.add_argument("--out", default=str(RESULTS_DIR / "adapt.json"))
    args = ap.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    base = ce.load_embedded_vit()
    crisp_bases = {}
    for name, config in CRISP_CONFIGS.items():
        crisp_bases[name] = copy.deepcopy(base)
        ce.retrofit_(crisp_bases[name], config, progress=False)
    runners = {"crisp": lambda d, t, c: run_crisp(crisp_bases["crisp"], d, c, t),
               "crisp_s8": lambda d, t, c: run_crisp(crisp_bases["crisp_s8"], d, c, t),
               "head": lambda d, t, c: run_head(base, d, c, t),
               "lora_r1": lambda d, t, c: run_lora(base, d, c, t, 1),
               "lora_r8": lambda d, t, c: run_lora(base, d, c, t, 8),
               "full": lambda d, t, c: run_full(base, d, c, t)}
    results = {}
    for task in args.tasks.split(","):
        data = load_task(task)
        results[task] = {"train_size": len(data.x_train), "test_size": len(data.x_test), "methods": {}}
        for method in args.methods.split(","):
            runs = []
            for seed in seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(runners[method](data, Path(tmp), TrainConfig(epochs=args.epochs,
                                                                             batch_size=args.batch_size, seed=seed)))
            res = merge_seeds(runs, seeds)
            results[task]["methods"][method] = res
            print(f"{task:8s} {method:8s} acc {100 * res['accuracy']:.2f}% (seeds {res['accuracy_per_seed']})  "
                  f"trainable {res['trainable']:>9,}  file {res['file_bytes'] or 0:>10,} B  "
                  f"{res['seconds_per_epoch']:.1f} s/epoch", flush=True)
    switch = time_task_switch()
    print(f"task switch on ViT-S: {switch['switch_ms_median']:.3f} ms median (1 thread), "
          f"{switch['switch_over_forward']:.4f} of a forward pass")
    write_json(args.out, {"schema": SCHEMA, "machine": machine_info(), "threads_training": THREADS,
                          "protocol": {"epochs": args.epochs, "batch_size": args.batch_size, "seeds": seeds, "lr": LR,
                                       "crisp": {"configs": {k: v.to_dict() for k, v in CRISP_CONFIGS.items()},
                                                 "adapt": {"mixer_lr": AdaptConfig().mixer_lr,
                                                           "head_lr": AdaptConfig().head_lr}},
                                       "lora": {"alpha": "2r", "targets": LORA_TARGETS, "dropout": 0.0}},
                          "tasks": results, "task_switch": switch})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

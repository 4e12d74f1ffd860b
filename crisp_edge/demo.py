"""The main job: the CRISP path on the embedded Fashion-MNIST ViT, printed for a person to read."""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from .adapt import AdaptConfig, adapt_
from .checkpoint import load_checkpoint, save_checkpoint
from .data import load_fashion_mnist
from .errors import MixerFileError
from .mixers import TaskSwitcher, apply_mixers_, read_mixers, save_mixers
from .evaluate import accuracy, max_abs_diff, predict, top1_agreement
from .models import EMBEDDED_CRISP_CONFIG, EMBEDDED_VIT_NAME, embedded_vit_card, load_embedded_vit
from .report import format_table
from .retrofit import retrofit_
from .tasks import load_task
from .train import TrainConfig

#: Two real transfer tasks adapted in the demo (see crisp_edge.tasks).
DEMO_TASKS = ("mnist", "digits")



def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 72 - len(title)))


def run_demo(out_dir: str | Path = "crisp-edge-demo", limit: int | None = None, threads: int | None = None,
             adapt_epochs: int = 3) -> dict:
    """Run the demo, print what it finds, and return the numbers as a dict."""
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    results: dict = {}

    _section("1. the embedded model")
    card = embedded_vit_card()
    model = load_embedded_vit()
    x, y = load_fashion_mnist("test", limit=limit)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{EMBEDDED_VIT_NAME}: timm VisionTransformer, {n_params:,} parameters, trained by this project on "
          f"Fashion-MNIST (recorded test accuracy {100 * card['test_accuracy']:.2f}%).")
    ref = predict(model, x, progress=True, desc="original")
    results["original_accuracy"] = accuracy(ref, y)
    print(f"original model: {100 * results['original_accuracy']:.2f}% on {len(x):,} test images")

    _section("2. retrofit at full capacity (closed form, Alg. 2)")
    crisp = copy.deepcopy(model)
    report = retrofit_(crisp, EMBEDDED_CRISP_CONFIG)
    print(report.format())
    out = predict(crisp, x, progress=True, desc="CRISP")
    results.update(crisp_accuracy=accuracy(out, y), top1_agreement=top1_agreement(out, ref),
                   max_abs_logit_diff=max_abs_diff(out, ref), worst_layer_error=report.max_error,
                   retrofit_seconds=report.seconds)
    print(f"CRISP model: {100 * results['crisp_accuracy']:.2f}% accuracy; top-1 agreement with the original "
          f"{100 * results['top1_agreement']:.2f}%; max |logit diff| {results['max_abs_logit_diff']:.1e}")

    _section("3. checkpoint: safetensors + JSON, reloaded")
    ckpt = save_checkpoint(crisp, out_dir / "checkpoint", extra={"retrofit": report.to_dict(), "model": EMBEDDED_VIT_NAME})
    reloaded = load_checkpoint(ckpt)
    same = torch.equal(predict(reloaded, x[:256]), predict(crisp, x[:256]))
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    results["checkpoint_roundtrip_identical"] = same
    print(f"wrote {ckpt}/ ({size / 1e6:.2f} MB); reloaded outputs identical: {same}")

    _section("4. adapt two tasks: mixers + a new head, bases frozen (Alg. 3)")
    tasks, rows = {}, []
    for name in DEMO_TASKS:
        data = load_task(name)
        task_model = copy.deepcopy(crisp)
        rep = adapt_(task_model, data.x_train, data.y_train, num_classes=data.task.num_classes,
                     config=AdaptConfig(train=TrainConfig(epochs=adapt_epochs)), eval_data=(data.x_test, data.y_test))
        path = save_mixers(task_model, out_dir / f"{name}.mixers.safetensors", task=name,
                           labels=list(data.task.class_names))
        mf = read_mixers(path)
        tasks[name] = (data, path)
        rows.append([name, f"{len(data.x_train):,}/{len(data.x_test):,}", f"{100 * rep.accuracy:.2f}%",
                     rep.trainable["mixers"], rep.trainable["head"], f"{mf.nbytes:,} B ({mf.raw_bytes:,} raw)",
                     str(rep.bases_unchanged)])
        results.setdefault("tasks", {})[name] = {"accuracy": rep.accuracy, "trainable": rep.trainable,
                                                 "file_bytes": mf.nbytes, "raw_bytes": mf.raw_bytes}
    print(format_table(["task", "train/test", "accuracy", "mixers", "head", "mixer file", "bases unchanged"], rows))

    _section("5. one model, many tasks: switch by loading a mixer file")
    live = load_checkpoint(ckpt)
    switcher = TaskSwitcher(live)
    for name, (_, path) in tasks.items():
        switcher.add(path)
    rows, first_logits, identical = [], {}, []
    for name in [*DEMO_TASKS, *DEMO_TASKS]:
        data = tasks[name][0]
        t = time.perf_counter()
        switcher.switch(name)
        ms = 1e3 * (time.perf_counter() - t)
        logits = predict(live, data.x_test)
        identical.append(torch.equal(logits, first_logits.setdefault(name, logits)))
        rows.append([name, f"{ms:.2f} ms", f"{100 * accuracy(logits, data.y_test):.2f}%", str(identical[-1])])
    results["switch_back_identical"] = all(identical)
    print(format_table(["switch to", "switch time", "test accuracy", "same outputs as first visit"], rows))
    other = copy.deepcopy(model)
    retrofit_(other, replace(EMBEDDED_CRISP_CONFIG, default=replace(EMBEDDED_CRISP_CONFIG.default, group_size=2)),
              progress=False)
    try:
        apply_mixers_(other, tasks[DEMO_TASKS[0]][1])
    except MixerFileError as e:
        print(f"a mixer file on a model with another layout is refused: {type(e).__name__}: {e}")

    _section("6. export to ONNX Runtime (swappable: one session, a .onnx_adapter per task)")
    from .export import export_onnx  # the deploy side; imports onnx / onnxruntime

    t = time.perf_counter()
    bundle = export_onnx(crisp, out_dir / "onnx", mode="swappable", tasks=[p for _, p in tasks.values()],
                         overwrite=True)
    print(f"exported {out_dir / 'onnx'}/ in {time.perf_counter() - t:.1f} s, validated against PyTorch "
          f"(max abs {bundle.manifest['parity']['max_abs']:.1e})")
    session, rows = bundle.session(threads=1), []
    for name, (data, _) in tasks.items():
        t = time.perf_counter()
        session.set_task(name)
        ms = 1e3 * (time.perf_counter() - t)
        ort_logits = torch.from_numpy(session(data.x_test.numpy()))
        switcher.switch(name)
        ref_logits = predict(live, data.x_test)
        rows.append([name, f"{bundle.tasks[name]['bytes']:,} B", f"{ms:.2f} ms",
                     f"{100 * accuracy(ort_logits, data.y_test):.2f}%", f"{100 * top1_agreement(ort_logits, ref_logits):.2f}%",
                     f"{max_abs_diff(ort_logits, ref_logits):.1e}"])
        results.setdefault("onnx", {})[name] = {"accuracy": accuracy(ort_logits, data.y_test),
                                                "top1_agreement": top1_agreement(ort_logits, ref_logits),
                                                "max_abs_diff": max_abs_diff(ort_logits, ref_logits)}
    print(format_table(["task", "adapter", "switch", "ORT accuracy", "top-1 vs PyTorch", "max abs diff"], rows))

    _section("7. data-free compression preview (closed form below full rank)")
    rows = []
    full = EMBEDDED_CRISP_CONFIG.default
    for r in (full.s * full.group_size, full.s * full.group_size // 2, full.s * full.group_size // 4):
        student = copy.deepcopy(model)
        rep = retrofit_(student, replace(EMBEDDED_CRISP_CONFIG, default=replace(full, r=r)), progress=False)
        acc = accuracy(predict(student, x), y)
        rows.append([f"r={r}", f"{100 * rep.budget.kept_fraction:.0f}%", rep.max_error, f"{100 * acc:.2f}%"])
        results.setdefault("preview", []).append({"r": r, "kept_fraction": rep.budget.kept_fraction,
                                                  "worst_layer_error": rep.max_error, "accuracy": acc})
    print(format_table(["rank", "kept weights", "worst layer err", "Fashion-MNIST accuracy"], rows))
    print("(data-free best rank-r fits: at s=4 they lose accuracy fast, which is why compression is\n"
          " trained by distillation from the full-capacity model, DESIGN.md section 2)")

    results["seconds"] = time.perf_counter() - t0
    _section(f"done in {results['seconds']:.0f} s")
    return results

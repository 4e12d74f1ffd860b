"""The main job: the whole CRISP path on the embedded Fashion-MNIST ViT, printed for a person to read.

retrofit -> compress -> adapt two tasks (Alg. 6, ``run_pipeline``) -> switch tasks in PyTorch ->
export to ONNX Runtime and ExecuTorch (swappable: one model, a small file per task) -> switch tasks
in each runtime -> parity reports (JSON, JUnit, PNG) for both bundles.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from crisp_edge.data.fashion_mnist import load_fashion_mnist
from crisp_edge.data.tasks import load_task
from crisp_edge.errors import MixerFileError
from crisp_edge.files.checkpoint import load_checkpoint
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.files.switcher import TaskSwitcher
from crisp_edge.models.sources import (
    EMBEDDED_CRISP_CONFIG,
    EMBEDDED_VIT_NAME,
    embedded_vit_card,
    load_embedded_vit,
)
from crisp_edge.report import format_table
from crisp_edge.training.adapt import AdaptConfig
from crisp_edge.training.evaluate import accuracy, max_abs_diff, predict, top1_agreement
from crisp_edge.training.loop import TrainConfig
from crisp_edge.training.pipeline import PipelineConfig, run_pipeline
from crisp_edge.training.retrofit import retrofit_

#: Two real transfer tasks adapted in the demo (see crisp_edge.data.tasks).
DEMO_TASKS = ("mnist", "digits")
#: The ExecuTorch program's static batch (the test sets run through it in batches of this size).
ET_BATCH = 100


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 72 - len(title)))


def run_demo(out_dir: str | Path = "crisp-edge-demo", limit: int | None = None, threads: int | None = None,
             adapt_epochs: int = 3, keep_fraction: float = 0.5, distill_fraction: float = 0.02,
             distill_epochs: int = 3, train_limit: int | None = None) -> dict:
    """Run the demo, print what it finds, and return the numbers as a dict.

    ``limit`` evaluates on the first N test images; ``train_limit`` adapts on at most N images per task;
    the distillation settings are deliberately short (the benchmark's recipe is 3% for 4 epochs).
    """
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

    _section(f"2. retrofit -> compress to {100 * keep_fraction:.0f}% -> adapt {' + '.join(DEMO_TASKS)} (Alg. 6)")
    config = PipelineConfig(crisp=EMBEDDED_CRISP_CONFIG, keep_fraction=keep_fraction, distill_fraction=distill_fraction,
                            distill_epochs=distill_epochs, tasks=DEMO_TASKS, train_limit=train_limit,
                            adapt=AdaptConfig(train=TrainConfig(epochs=adapt_epochs, batch_size=64)))
    run = run_pipeline(model, out_dir / "run", config, restart=True, eval_data=(x, y))
    teacher = load_checkpoint(out_dir / "run" / "retrofit")
    crisp_out = predict(teacher, x)
    results.update(top1_agreement=top1_agreement(crisp_out, ref), max_abs_logit_diff=max_abs_diff(crisp_out, ref),
                   worst_layer_error=run.stages["retrofit"]["max_error"], pipeline=run.stages)
    print(f"\nfull-capacity CRISP (closed form): worst layer error {results['worst_layer_error']:.1e}, top-1 agreement "
          f"with the original {100 * results['top1_agreement']:.2f}%, max |logit diff| {results['max_abs_logit_diff']:.1e}")
    print(run.summary())

    _section("3. one model, many tasks: switch by loading a mixer file (PyTorch)")
    live = load_checkpoint(run.checkpoint)  # the compressed bases: what ships
    switcher = TaskSwitcher(live)
    paths = run.mixer_files
    tasks = {name: load_task(name, train_limit=train_limit) for name in DEMO_TASKS}
    for path in paths.values():
        switcher.add(path)
    rows, first_logits, identical, torch_logits = [], {}, [], {}
    for name in [*DEMO_TASKS, *DEMO_TASKS]:
        data = tasks[name]
        t = time.perf_counter()
        switcher.switch(name)
        ms = 1e3 * (time.perf_counter() - t)
        logits = predict(live, data.x_test)
        torch_logits.setdefault(name, logits)
        identical.append(torch.equal(logits, first_logits.setdefault(name, logits)))
        rows.append([name, f"{ms:.2f} ms", f"{100 * accuracy(logits, data.y_test):.2f}%", str(identical[-1])])
    results["switch_back_identical"] = all(identical)
    print(format_table(["switch to", "switch time", "test accuracy", "same outputs as first visit"], rows))
    other = copy.deepcopy(model)
    retrofit_(other, replace(EMBEDDED_CRISP_CONFIG, default=replace(EMBEDDED_CRISP_CONFIG.default, group_size=2)),
              progress=False)
    try:
        apply_mixers_(other, paths[DEMO_TASKS[0]])
    except MixerFileError as e:
        print(f"a mixer file on a model with another layout is refused: {type(e).__name__}: {str(e)[:110]}...")

    base = load_checkpoint(run.checkpoint)  # the exporters take the bases with their default mixers
    sizes = {name: read_mixers(p).nbytes for name, p in paths.items()}
    bundles = {}

    _section("4. export to ONNX Runtime (swappable: one session, an .onnx_adapter per task)")
    from crisp_edge.export import (
        export_onnx,  # the deploy side; imports onnx / onnxruntime
    )

    t = time.perf_counter()
    bundles["onnx"] = export_onnx(base, out_dir / "onnx", mode="swappable", tasks=list(paths.values()), overwrite=True)
    print(f"exported {out_dir / 'onnx'}/ in {time.perf_counter() - t:.1f} s (parity checked before it was written: "
          f"max abs {bundles['onnx'].manifest['parity']['max_abs']:.1e})")
    session, rows = bundles["onnx"].session(threads=1), []
    for name, data in tasks.items():
        t = time.perf_counter()
        session.set_task(name)
        ms = 1e3 * (time.perf_counter() - t)
        got = torch.from_numpy(session(data.x_test.numpy()))
        rows.append(_runtime_row(results, "onnx", name, bundles["onnx"].tasks[name]["bytes"], sizes[name], ms, got,
                                 torch_logits[name], data.y_test))
    print(format_table(["task", "adapter", "mixer file", "switch", "accuracy", "top-1 vs PyTorch", "max abs diff"], rows))

    _section("5. export to ExecuTorch (XNNPACK, swappable: one program, a .ptd per task)")
    from crisp_edge.export import export_executorch

    t = time.perf_counter()
    bundles["executorch"] = export_executorch(base, out_dir / "executorch", mode="swappable", recipe="xnnpack",
                                              tasks=list(paths.values()), overwrite=True,
                                              example_input=torch.zeros(ET_BATCH, *x.shape[1:]))
    m = bundles["executorch"].manifest
    print(f"exported {out_dir / 'executorch'}/ in {time.perf_counter() - t:.1f} s: model.pte "
          f"{m['params']['program_bytes'] / 1e6:.2f} MB for {m['params']['stored']:,} stored parameters (parity "
          f"checked before it was written: max abs {m['parity']['max_abs']:.1e})")
    session, rows = bundles["executorch"].session(threads=1), []
    for name, data in tasks.items():
        t = time.perf_counter()
        session.set_task(name)
        ms = 1e3 * (time.perf_counter() - t)
        got = torch.from_numpy(session.predict(data.x_test))  # in batches of the program's static ET_BATCH
        rows.append(_runtime_row(results, "executorch", name, bundles["executorch"].tasks[name]["bytes"], sizes[name],
                                 ms, got, torch_logits[name], data.y_test))
    print(format_table(["task", ".ptd", "mixer file", "switch", "accuracy", "top-1 vs PyTorch", "max abs diff"], rows))

    _section("6. parity reports (what CI reads: crisp-edge parity BUNDLE)")
    from crisp_edge.export import check_bundle, write_reports

    rows = []
    for runtime, bundle in bundles.items():
        report = check_bundle(bundle.path)
        files = write_reports(report, out_dir / f"parity-{runtime}")
        results.setdefault("parity", {})[runtime] = {"passed": report.passed, "max_abs": report.max_abs,
                                                     "outputs": len(report.comparisons)}
        rows.append([runtime, "PASS" if report.passed else "FAIL", len(report.comparisons), f"{report.max_abs:.1e}",
                     f"{report.atol:g}",
                     ", ".join(p.name for p in files.values())])
    print(format_table(["bundle", "parity", "outputs checked", "max abs", "tolerance", f"reports in {out_dir}/parity-*/"],
                       rows))

    results["seconds"] = time.perf_counter() - t0
    _section(f"done in {results['seconds']:.0f} s")
    return results


def _runtime_row(results: dict, runtime: str, name: str, task_bytes: int, mixer_bytes: int, ms: float,
                 got: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> list:
    rec = {"accuracy": accuracy(got, labels), "top1_agreement": top1_agreement(got, ref),
           "max_abs_diff": max_abs_diff(got, ref), "task_bytes": task_bytes, "switch_ms": ms}
    results.setdefault(runtime, {})[name] = rec
    return [name, f"{task_bytes:,} B", f"{mixer_bytes:,} B", f"{ms:.2f} ms", f"{100 * rec['accuracy']:.2f}%",
            f"{100 * rec['top1_agreement']:.2f}%", f"{rec['max_abs_diff']:.1e}"]

"""Export the embedded ViT as a swappable ONNX bundle with three tasks, and switch tasks in one session.

    .venv/bin/python examples/onnx_switch_tasks.py [--mixers a.safetensors b.safetensors ...] [--out DIR]

Retrofits the embedded Fashion-MNIST ViT with ``EMBEDDED_CRISP_CONFIG``, takes the tasks' mixer files
(from ``crisp-edge adapt``; without ``--mixers`` it makes them here with one quick epoch of
``adapt_`` per task on a training subset), exports a swappable bundle, then, in ONE ONNX Runtime
session, switches task after task and prints each task's accuracy on its real test data with the
switch time and the agreement with PyTorch.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import crisp_edge as ce
from crisp_edge.training.adapt import AdaptConfig, adapt_
from crisp_edge.training.evaluate import predict
from crisp_edge.export import export_onnx
from crisp_edge.files.mixers import apply_mixers_, read_mixers, save_mixers
from crisp_edge.models.sources import EMBEDDED_CRISP_CONFIG
from crisp_edge.data.tasks import load_task
from crisp_edge.training.loop import TrainConfig

TASKS = ("mnist", "digits", "fmnist5")


def quick_mixers(model, folder: Path, train_limit: int) -> list[Path]:
    paths = []
    for name in TASKS:
        data = load_task(name, train_limit=train_limit)
        m = copy.deepcopy(model)
        adapt_(m, data.x_train, data.y_train, num_classes=data.task.num_classes,
               config=AdaptConfig(train=TrainConfig(epochs=1, batch_size=64)), progress=False)
        paths.append(save_mixers(m, folder / f"{name}.mixers.safetensors", task=name,
                                 labels=list(data.task.class_names)))
        print(f"adapted {name} for 1 epoch on {len(data.x_train):,} images")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixers", nargs="*", help="mixer files (default: make three with 1 epoch of adapt_)")
    ap.add_argument("--out", help="bundle folder (default: a temporary folder)")
    ap.add_argument("--train-limit", type=int, default=2000, help="training images per task for the quick adapt")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = ce.load_embedded_vit()
    ce.retrofit_(model, EMBEDDED_CRISP_CONFIG, progress=False)
    work = Path(tempfile.mkdtemp(prefix="onnx_switch."))
    mixers = [Path(p) for p in args.mixers] if args.mixers else quick_mixers(model, work, args.train_limit)
    out = Path(args.out) if args.out else work / "bundle"
    t0 = time.perf_counter()
    bundle = export_onnx(model, out, mode="swappable", tasks=mixers, overwrite=True)
    print(f"exported {out} in {time.perf_counter() - t0:.1f} s: weights {bundle.weights_bytes():,} bytes, "
          f"parity max abs {bundle.manifest['parity']['max_abs']:.1e}")

    sess = bundle.session(threads=1)  # one ORT session (fold + inference) for every task
    print(f"\n{'task':<9} {'adapter':>9} {'switch':>9} {'ORT acc':>8} {'torch acc':>9} {'top-1 agree':>11} {'max abs':>9}")
    for path in mixers:
        mf = read_mixers(path)
        data = load_task(mf.task)
        t0 = time.perf_counter()
        sess.set_task(mf.task)
        switch_ms = 1e3 * (time.perf_counter() - t0)
        logits = np.concatenate([sess(data.x_test[i:i + 500]) for i in range(0, len(data.x_test), 500)])
        ref_model = copy.deepcopy(model)
        apply_mixers_(ref_model, mf)
        ref = predict(ref_model, data.x_test).numpy()
        acc = float((logits.argmax(-1) == data.y_test.numpy()).mean())
        ref_acc = float((ref.argmax(-1) == data.y_test.numpy()).mean())
        agree = float((logits.argmax(-1) == ref.argmax(-1)).mean())
        size = bundle.tasks[mf.task]["bytes"]
        print(f"{mf.task:<9} {size:>8,}B {switch_ms:>7.2f}ms {100 * acc:>7.2f}% {100 * ref_acc:>8.2f}% "
              f"{100 * agree:>10.2f}% {np.abs(logits - ref).max():>9.1e}")


if __name__ == "__main__":
    main()

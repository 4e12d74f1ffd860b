"""Export the embedded ViT as a swappable ExecuTorch bundle with three tasks; switch tasks in Python and in C++.

    .venv/bin/python examples/executorch_switch_tasks.py [--mixers a.safetensors b.safetensors ...] [--out DIR]
        [--recipe xnnpack|portable] [--batch 100] [--no-cpp]

Retrofits the embedded Fashion-MNIST ViT with ``EMBEDDED_CRISP_CONFIG``, takes the tasks' mixer files
(from ``crisp-edge adapt``; without ``--mixers`` it makes them with one quick epoch of ``adapt_`` per task,
as examples/onnx_switch_tasks.py does), exports a swappable XNNPACK bundle, then:

1. Python: in ONE ExecuTorch program, switches task after task and prints each task's accuracy on its
   real test data, the switch time and the top-1 agreement / max abs difference with PyTorch;
2. C++: builds ``export/executorch/runner`` (g++, against the executorch wheel) and runs the same test sets
   through ``crisp_et_runner`` (``model.pte`` + ``default.ptd`` + the task's ``.ptd``), reading its
   ``.npy`` outputs back for the same accuracy and agreement figures.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from crisp_edge.export.executorch.export import export_executorch

import crisp_edge as ce
from crisp_edge.training.evaluate import predict
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.models.sources import EMBEDDED_CRISP_CONFIG
from crisp_edge.data.tasks import load_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_switch_tasks import quick_mixers

REPO = Path(__file__).resolve().parents[1]


def batches(x: torch.Tensor, batch: int) -> list[np.ndarray]:
    """``x`` in batches of exactly ``batch`` (ExecuTorch programs have static shapes; the last is zero-padded)."""
    out = []
    for i in range(0, len(x), batch):
        b = x[i:i + batch].numpy()
        if len(b) < batch:
            b = np.concatenate([b, np.zeros((batch - len(b), *b.shape[1:]), np.float32)])
        out.append(np.ascontiguousarray(b, dtype=np.float32))
    return out


def build_runner() -> Path:
    exe = REPO / "export/executorch/runner/build/crisp_et_runner"
    subprocess.run(["bash", str(REPO / "export/executorch/runner/build.sh"), sys.executable, str(exe)], check=True,
                   capture_output=True)
    return exe


def run_cpp(exe: Path, bundle: Path, task: str, xs: list[np.ndarray], work: Path, n: int) -> np.ndarray:
    """The C++ runner's logits for every batch of ``xs`` with task ``task`` (first ``n`` rows)."""
    ins, outs = work / f"in_{task}", work / f"out_{task}"
    ins.mkdir(parents=True, exist_ok=True)
    outs.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(xs):
        np.save(ins / f"input.{i}.x.npy", b)
    subprocess.run([str(exe), str(bundle), str(outs), "--inputs", str(ins), "--cases", str(len(xs)),
                    "--task", f"{task}={bundle / 'tasks' / (task + '.ptd')}"], check=True, capture_output=True)
    return np.concatenate([np.load(outs / f"output.{task}.{i}.logits.npy") for i in range(len(xs))])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixers", nargs="*", help="mixer files (default: make three with 1 epoch of adapt_)")
    ap.add_argument("--out", help="bundle folder (default: a temporary folder)")
    ap.add_argument("--recipe", default="xnnpack", choices=["xnnpack", "portable"])
    ap.add_argument("--batch", type=int, default=100, help="the program's static batch size")
    ap.add_argument("--train-limit", type=int, default=2000, help="training images per task for the quick adapt")
    ap.add_argument("--no-cpp", action="store_true", help="skip the C++ runner")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = ce.load_embedded_vit()
    ce.retrofit_(model, EMBEDDED_CRISP_CONFIG, progress=False)
    work = Path(tempfile.mkdtemp(prefix="et_switch."))
    mixers = [Path(p) for p in args.mixers] if args.mixers else quick_mixers(model, work, args.train_limit)
    out = Path(args.out) if args.out else work / "bundle"
    t0 = time.perf_counter()
    bundle = export_executorch(model, out, mode="swappable", recipe=args.recipe, tasks=mixers, overwrite=True,
                               example_input=torch.zeros(args.batch, 1, 28, 28))
    m = bundle.manifest
    print(f"exported {out} in {time.perf_counter() - t0:.1f} s: model.pte {m['params']['program_bytes']:,} bytes "
          f"({m['params']['stored']:,} stored parameters), parity max abs {m['parity']['max_abs']:.1e}")
    print("not delegated: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in m["non_delegated_ops"].items() if v))

    exe = None if args.no_cpp else build_runner()
    sess = bundle.session(threads=1)  # one program for every task
    print(f"\n{'task':<9} {'.ptd':>8} {'switch':>9} {'ET acc':>7} {'torch acc':>9} {'agree':>7} {'max abs':>8}"
          + ("" if exe is None else f" {'C++ acc':>8} {'C++ agree':>9} {'C++ max abs':>11}"))
    for path in mixers:
        mf = read_mixers(path)
        data = load_task(mf.task)
        n = len(data.x_test)
        t0 = time.perf_counter()
        sess.set_task(mf.task)
        switch_ms = 1e3 * (time.perf_counter() - t0)
        xs = batches(data.x_test, args.batch)
        logits = np.concatenate([sess(b) for b in xs])[:n]
        ref_model = copy.deepcopy(model)
        apply_mixers_(ref_model, mf)
        ref = predict(ref_model, data.x_test).numpy()
        y = data.y_test.numpy()
        line = (f"{mf.task:<9} {bundle.tasks[mf.task]['bytes']:>7,}B {switch_ms:>7.2f}ms "
                f"{100 * (logits.argmax(-1) == y).mean():>6.2f}% {100 * (ref.argmax(-1) == y).mean():>8.2f}% "
                f"{100 * (logits.argmax(-1) == ref.argmax(-1)).mean():>6.2f}% {np.abs(logits - ref).max():>8.1e}")
        if exe is not None:
            cpp = run_cpp(exe, bundle.path, mf.task, xs, work, n)
            line += (f" {100 * (cpp.argmax(-1) == y).mean():>7.2f}% {100 * (cpp.argmax(-1) == ref.argmax(-1)).mean():>8.2f}% "
                     f"{np.abs(cpp - ref).max():>11.1e}")
        print(line, flush=True)


if __name__ == "__main__":
    main()

"""Parity on the user's own inputs: the bundle and the PyTorch model run on real data, compared.

    report = check_bundle("bundle/", reference=recompute_reference("bundle/", model))
    check_inputs(report, "bundle/", "val_images/", model, mixers=["mnist.mixers.safetensors"])
    report.data["tasks"]["default"]["top1_agreement"]

The inputs go through the same data path as adaptation (``crisp_edge.data.formats.load_dataset`` with
the model's ``input_spec_of``): an image folder (class folders give labels), ``.npz`` /
``.safetensors`` tensors (``x``, optional ``y``), or JSONL / CSV text (with a ``tokenizer``). They run
in chunks: of the program's static batch for ExecuTorch (the manifest's ``batch``; the last chunk is
zero-padded and the padding rows dropped), of ``DATA_CHUNK`` rows for ONNX Runtime. Every chunk's
output is compared with PyTorch's like a stored case (``Comparison.inputs == "data"``), and the
report's ``data`` record adds, per task, the top-1 agreement between runtime and PyTorch over every
example and, when the data has labels, both accuracies.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from crisp_edge.export.bundle import open_bundle
from crisp_edge.export.parity.compare import Failure, ParityReport, compare
from crisp_edge.export.parity.reference import DEFAULT_TASK, reference_outputs

from crisp_edge.errors import CrispEdgeError, DataError

#: Rows per run on a runtime with a dynamic batch axis (ONNX Runtime): bounded memory, few calls.
DATA_CHUNK = 32


def load_inputs(path: str | os.PathLike, model: Any, input_names: list[str], *, tokenizer: Any = None,
                max_items: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """(inputs by the bundle's input names, labels or None, a description) of the data at ``path``."""
    from crisp_edge.data.formats import load_dataset
    from crisp_edge.data.input_spec import input_spec_of

    data = load_dataset(path, input_spec_of(model), labels="optional", tokenizer=tokenizer, max_items=max_items,
                        progress=False)
    if data.x is None:
        raise DataError(f"{path}: text needs the model's tokenizer to become token ids; pass a local Hugging Face "
                        "tokenizer folder (--tokenizer DIR), or give token ids as .npz / .safetensors (x: int64 N x L).")
    feeds = {input_names[0]: data.x.numpy()}
    if data.attention_mask is not None and "attention_mask" in input_names:
        feeds["attention_mask"] = data.attention_mask.numpy()
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise DataError(f"{path}: the bundle takes {input_names}; the data gives {sorted(feeds)} (missing {missing}).")
    y = None if data.y is None else data.y.numpy()
    return feeds, y, data.source or str(path)


def _chunks(feeds: dict[str, np.ndarray], size: int, static: bool) -> Iterable[tuple[dict[str, np.ndarray], int]]:
    """(chunk, rows that are real) of at most ``size`` rows; with ``static`` the last is zero-padded to ``size``."""
    n = len(next(iter(feeds.values())))
    for i in range(0, n, size):
        part = {k: v[i:i + size] for k, v in feeds.items()}
        rows = len(next(iter(part.values())))
        if static and rows < size:
            part = {k: np.concatenate([v, np.zeros((size - rows, *v.shape[1:]), v.dtype)]) for k, v in part.items()}
        yield part, rows


def check_inputs(report: ParityReport, bundle: Any, path: str | os.PathLike, model: Any, mixers: Iterable[Any] = (),
                 *, threads: int = 1, tokenizer: Any = None, max_items: int | None = None, device: str = "auto",
                 dtype: str = "float32") -> ParityReport:
    """Add to ``report`` the comparison of ``bundle`` with ``model`` (the CRISP model it was exported from)
    on the inputs at ``path``: task ``default`` and one task per mixer file (a task of the bundle)."""
    from crisp_edge.files.mixers import MixerFile, apply_mixers_, read_mixers

    _, b = open_bundle(bundle)
    m = b.manifest
    names = [i["name"] for i in m["inputs"]]
    out_names = [o["name"] for o in m["outputs"]]
    feeds, y, source = load_inputs(path, model, names, tokenizer=tokenizer, max_items=max_items)
    static = "batch" in m  # ExecuTorch programs: static shapes
    size = int(m["batch"]) if static else DATA_CHUNK
    models = {DEFAULT_TASK: model}
    for mf in mixers:
        mf = mf if isinstance(mf, MixerFile) else read_mixers(mf)
        task_model = copy.deepcopy(model)
        apply_mixers_(task_model, mf)
        models[mf.task] = task_model
    record: dict[str, Any] = {"path": str(path), "source": source, "examples": int(len(next(iter(feeds.values())))),
                              "chunk": size, "static_batch": static, "labels": y is not None, "tasks": {}}
    report.data = record
    sess = b.session(threads=threads)
    tol_atol, tol_cos = report.atol, report.min_cosine
    min_top1 = report.tolerance.get("min_top1") if isinstance(report.tolerance, dict) else None
    for task, task_model in models.items():
        try:
            if sess.swappable:
                sess.set_task(task)
            elif task != DEFAULT_TASK:
                raise DataError(f"a {b.mode!r} bundle has one fixed set of weights; it has no task {task!r}.")
        except CrispEdgeError as e:
            report.failures.append(Failure(task, "data", type(e).__name__, str(e)))
            continue
        got_top, ref_top = [], []
        for k, (chunk, rows) in enumerate(_chunks(feeds, size, static)):
            real = {n: torch.from_numpy(np.ascontiguousarray(v[:rows])) for n, v in chunk.items()}
            want = reference_outputs(task_model, [real], output_names=out_names, device=device, dtype=dtype)[0]
            try:
                got = sess.run(chunk)
            except CrispEdgeError as e:
                report.failures.append(Failure(task, "data", type(e).__name__, f"chunk {k}: {e}"))
                break
            for name in out_names:
                g = np.asarray(got[name])[:rows]
                c = compare(g, want[name], task=task, case=k, output=name, atol=tol_atol, min_cosine=tol_cos,
                            min_top1=min_top1, dtype="float32")
                report.comparisons.append(dataclasses.replace(c, inputs="data"))
                if g.shape == want[name].shape:
                    diff = np.abs(g.astype(np.float64) - want[name].astype(np.float64)).ravel()
                    report.diffs.setdefault(name, []).append((f"{task} (your data)", k, diff))
            g = np.asarray(got[out_names[0]])[:rows]
            if g.ndim >= 2 and g.shape == want[out_names[0]].shape:  # top-1 per row (per token for LM logits)
                got_top.append(g.argmax(-1))
                ref_top.append(want[out_names[0]].argmax(-1))
        entry: dict[str, Any] = {"top1_agreement": None, "pytorch_accuracy": None, "runtime_accuracy": None}
        if got_top:
            g, r = np.concatenate(got_top), np.concatenate(ref_top)
            entry["top1_agreement"] = float((g == r).mean())
            if y is not None and g.ndim == 1 and len(y) == len(g):
                entry.update(pytorch_accuracy=float((r == y).mean()), runtime_accuracy=float((g == y).mean()))
        record["tasks"][task] = entry
    report.tasks = list(dict.fromkeys([*report.tasks, *models]))
    return report

"""Where a bundle diverged from PyTorch: intermediate outputs compared layer by layer.

    report = check_bundle("bundle/")
    if not report.passed:
        locate_divergence(report, "bundle/", model)      # model: the CRISP model it was exported from
        report.layers["first_over"]                      # {"layer": "blocks.1", "max_abs": ..., ...}

The probed layers are every block of the architecture (``ArchSpec.blocks``) and every CRISP linear,
in the order PyTorch runs them. PyTorch's outputs come from forward hooks on those modules; the
runtime's from its probe (``Runtime.probe`` in ``crisp_edge.export.bundle.RUNTIMES``: for ONNX
Runtime, a copy of the bundle's own graph with the intermediate tensors as extra outputs,
``export/onnx/probe.py``; for ExecuTorch, a debug program lowered from the task's PyTorch model as the
bundle was, with those outputs as extra outputs, ``export/executorch/probe.py``), both on the first
stored case of the failing task. A layer is over tolerance when its max abs error
exceeds ``atol * max(1, max |reference|)`` (intermediate activations are larger than logits, and fp32
rounding grows with magnitude) or its cosine is below the report's ``min_cosine``; the first such
layer in execution order is where the runtime went wrong, since every later one inherits the error.

A runtime without a probe (or no PyTorch model to compare with) leaves ``report.layers`` saying why the
per-layer check was not done.
"""
from __future__ import annotations

import copy
import importlib
from typing import Any

import numpy as np
import torch
from crisp_edge.export.bundle import open_bundle, runtime_of
from crisp_edge.export.parity.compare import ParityReport
from crisp_edge.export.parity.reference import DEFAULT_TASK, read_bundle_reference

from crisp_edge.errors import CrispEdgeError


def probe_modules(model: torch.nn.Module) -> dict[str, str]:
    """Module name -> kind ("block" or "linear") of the layers to probe (blocks, CRISP linears)."""
    from crisp_edge.method.convert import crisp_layers
    from crisp_edge.method.specs import detect_architecture, get_architecture, resolve_blocks

    arch = getattr(model, "crisp_arch", None)
    spec = get_architecture(arch) if isinstance(arch, str) else detect_architecture(model)
    blocks = resolve_blocks(model, spec)
    out = {f"{spec.blocks}.{i}": "block" for i in range(len(blocks))}
    out.update({name: "linear" for name in crisp_layers(model)})
    return out


@torch.no_grad()
def torch_intermediates(model: torch.nn.Module, feeds: dict[str, np.ndarray], modules: list[str]) -> dict[str, np.ndarray]:
    """Outputs of ``modules`` for ``model(**feeds)``, in the order PyTorch runs them (forward hooks)."""
    seen: dict[str, np.ndarray] = {}
    hooks = []

    def hook(name: str):
        def fn(_m, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor) and name not in seen:
                seen[name] = t.detach().float().cpu().numpy()
        return fn

    for name in modules:
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        model.eval()(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()})
    finally:
        for h in hooks:
            h.remove()
    return seen


def _task_model(model: torch.nn.Module, probe_module: Any, bundle: Any, task: str) -> torch.nn.Module:
    if task == DEFAULT_TASK:
        return model
    from crisp_edge.files.mixers import write_task_tensors_

    m = copy.deepcopy(model)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in probe_module.task_tensors(bundle, task).items()}
    with torch.no_grad():
        write_task_tensors_(m, tensors)
    return m


def _failing_task(report: ParityReport) -> str:
    for c in report.comparisons:
        if not c.passed and c.inputs == "reference":
            return c.task
    return DEFAULT_TASK


def locate_divergence(report: ParityReport, bundle: Any, model: torch.nn.Module | None = None, *, threads: int = 1,
                      checkpoint: Any = None, task: str | None = None, case: int = 0) -> dict:
    """Compare ``bundle``'s intermediate outputs with ``model``'s (found from ``checkpoint`` or the bundle's
    recorded source when None) on one stored case of ``task`` (default: the first failing one); record
    the per-layer errors and the first layer over tolerance in ``report.layers`` and return it."""
    from crisp_edge.export.parity.task_reference import find_checkpoint

    try:
        _, b = open_bundle(bundle)
        runtime = runtime_of(b.manifest.get("format"), str(b.path))
        if not runtime.probe:
            report.layers = {"available": False, "reason": f"{runtime.name} bundles have no per-layer probe yet "
                             "(see docs/parity-report.md)"}
            return report.layers
        if model is None:
            swap = b.manifest.get("swappable") or {}
            fp = swap.get("bases_sha256") or (b.manifest.get("source") or {}).get("bases_sha256")
            model, why = find_checkpoint(b.manifest, fp, checkpoint)
            if model is None:
                report.layers = {"available": False, "reason": f"no PyTorch model to compare with: {why}"}
                return report.layers
        probe = runtime.resolve("probe")
        task = task or _failing_task(report)
        ref = read_bundle_reference(b.path, b.manifest)
        feeds = ref.inputs[case]
        task_model = _task_model(model, importlib.import_module(probe.__module__), b, task)
        kinds = probe_modules(task_model)
        want = torch_intermediates(task_model, feeds, list(kinds))
        got = probe(b, task, feeds, list(want), threads, model=task_model)
    except CrispEdgeError as e:
        report.layers = {"available": False, "reason": f"{type(e).__name__}: {e}"}
        return report.layers
    atol, min_cos = report.atol, report.min_cosine
    rows, first = [], None
    for name, r in want.items():  # PyTorch's execution order
        if name not in got:
            continue
        g = np.asarray(got[name], np.float64)
        r64 = r.astype(np.float64)
        if g.shape != r64.shape:
            row = {"layer": name, "kind": kinds[name], "max_abs": None, "max_rel": None, "cosine": None,
                   "limit": None, "over": True, "problem": f"shape {list(g.shape)} != PyTorch {list(r64.shape)}"}
        else:
            scale = float(np.abs(r64).max(initial=0.0))
            max_abs = float(np.abs(g - r64).max(initial=0.0)) if np.isfinite(g).all() else float("inf")
            denom = float(np.linalg.norm(g) * np.linalg.norm(r64))
            cos = float((g.ravel() @ r64.ravel()) / denom) if denom > 0 and np.isfinite(denom) else 0.0
            limit = atol * max(1.0, scale)
            over = not (max_abs <= limit and cos >= min_cos)
            row = {"layer": name, "kind": kinds[name], "max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-12),
                   "cosine": cos, "limit": limit, "over": over, "problem": None}
        rows.append(row)
        if row["over"] and first is None:
            first = row
    report.layers = {"available": True, "task": task, "case": case, "layers": rows, "first_over": first,
                     "unmatched": [n for n in want if n not in got]}
    return report.layers

"""Intermediate outputs of an ExecuTorch bundle's lowering, by PyTorch module name (per-layer parity).

A bundle's ``model.pte`` cannot show its intermediate values: inside the XNNPACK delegate they never
leave it, and ExecuTorch 1.5.1's ETDump intermediate outputs (``executorch.devtools.Inspector``) cover
non-delegated ops only and need an ETRecord written at export to name them (bundles carry none; the
legacy loader that records ETDump does not share arenas between ``set_task`` and ``forward`` either).
So the probe is a *debug program*: the task's PyTorch model (its mixers folded) lowered exactly as the
bundle was (the manifest's recipe and mode: the same partitioners, the same ``lower``), with the
output of every probed module (forward hooks, captured by ``torch.export``) as extra outputs, run in
ExecuTorch on the bundle's stored case. It locates where ExecuTorch's kernels and delegate compute
something other than PyTorch; damage to the bundle's own files is what their SHA-256 catches.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from crisp_edge.export.errors import BundleError
from torch import nn


class _Probe(nn.Module):
    """``model(**inputs)`` returning (logits, the output of each probed module), via forward hooks."""

    def __init__(self, model: nn.Module, input_names: list[str], modules: list[str]) -> None:
        super().__init__()
        from crisp_edge.export.model_io import _Forward

        self.fwd, self.modules_ = _Forward(model, input_names), list(modules)
        self._seen: dict[str, torch.Tensor] = {}
        for name in self.modules_:
            model.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def fn(_m, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            self._seen.setdefault(name, t)
        return fn

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._seen = {}
        y = self.fwd(*xs)
        return (y, *[self._seen[m] for m in self.modules_])


def debug_model(model: nn.Module) -> nn.Module:
    """The model the debug program is lowered from: the task's CRISP model with its weights folded, as a
    swappable program's ``set_task`` would write them (tests patch this to inject a fault)."""
    from crisp_edge.export.executorch.programs import _unfuse_attention
    from crisp_edge.method.convert import is_crisp, materialize_

    m = copy.deepcopy(model).eval()
    if is_crisp(m):
        materialize_(m)
    for p in m.parameters():
        p.requires_grad_(False)
    _unfuse_attention(m)
    return m


def intermediate_outputs(bundle: Any, task: str, feeds: dict[str, np.ndarray], modules: list[str],
                         threads: int = 1, model: nn.Module | None = None) -> dict[str, np.ndarray]:
    """Outputs of ``modules`` when a debug program, lowered from ``model`` (the task's PyTorch model) as
    ``bundle`` was, runs ``feeds`` in ExecuTorch."""
    from crisp_edge.export.executorch.lowering import lower
    from crisp_edge.export.executorch.session import load_program, set_threads

    if model is None:
        raise BundleError("the ExecuTorch probe lowers a debug program from the PyTorch model: pass model=.")
    m = bundle.manifest
    names = [i["name"] for i in m["inputs"]]
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n], dtype=np.float32)) for n in names)
    probe = _Probe(debug_model(model), names, modules).eval()
    # A swappable bundle's linears read non-constant weights: its partitioners (forced non-static
    # linears) are the ones that matter; dense and factored lower as they did.
    pte, _ = lower({"forward": probe}, {"forward": args}, m["recipe"], m["mode"])
    set_threads(threads)
    outs = load_program(pte, "debug program").load_method("forward").execute(list(args))
    return {name: o.detach().numpy().copy() for name, o in zip(modules, list(outs)[1:])}


def task_tensors(bundle: Any, task: str) -> dict[str, np.ndarray]:
    """The task tensors (mixer file names) of one of the bundle's tasks, checked (``check_task_ptd``)."""
    from crisp_edge.export.executorch.tasks import check_task_ptd, read_ptd_bytes

    path = bundle.task_path(task)
    arrays, _ = check_task_ptd(read_ptd_bytes(path), bundle.manifest["swappable"], str(path))
    return arrays

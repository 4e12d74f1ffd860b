"""Intermediate outputs of an ONNX bundle's inference graph, by PyTorch module name (per-layer parity).

A copy of ``model.onnx`` is made in memory with the chosen intermediate tensors added as extra graph
outputs (``onnx.ValueInfoProto`` by name: ONNX Runtime infers their types, and keeps a graph output
whatever it fuses) and run on one case; the bundle's files are not touched. For a swappable bundle the
task's dense weights come from the bundle's own fold run (``OnnxCrispSession.set_task``).

Tensor names map back to module names through the exporter's node names: the TorchScript exporter
names each node by its module scope, ``/fwd/model/blocks/blocks.1/mlp/fc2/Add`` for a node inside
``blocks.1.mlp.fc2`` (a ``Sequential`` child's segment repeats its parent's: ``blocks``,
``blocks.1``). A module's output is the first output of the last node (in graph order, which is
topological) inside its scope: the residual ``Add`` of a block, the bias ``Add`` of a linear.
Graphs written by optimum (other scope names) map too where their node names follow that scheme;
modules that cannot be found are reported as unmatched, not guessed.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from crisp_edge.export.errors import BundleError
from crisp_edge.export.onnx.session import session_options

#: Scopes of the exporters' wrapper modules (``_Forward.model``, ``_WeightsAsInputs.fwd.model``).
WRAPPER_PREFIXES = ("fwd.model.", "model.")


def module_of(node_name: str) -> str | None:
    """The PyTorch module path of a TorchScript-exported node name (``None`` for a node outside any scope)."""
    parts = node_name.split("/")[1:-1]
    if not parts:
        return None
    path: list[str] = []
    for seg in parts:
        if path and seg.startswith(path[-1] + "."):  # a Sequential / ModuleList child: "blocks", "blocks.1"
            path[-1] = seg
        else:
            path.append(seg)
    name = ".".join(path)
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def module_outputs(graph: onnx.GraphProto, modules: list[str]) -> dict[str, str]:
    """PyTorch module name -> the ONNX tensor holding its output, for each module found in ``graph``."""
    wanted = set(modules)
    last: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Constant" or not node.output:
            continue
        mod = module_of(node.name)
        while mod:  # the node lies in this module and every enclosing one: the last one seen wins
            if mod in wanted:
                last[mod] = node.output[0]
            mod = mod.rpartition(".")[0]
    return {m: last[m] for m in modules if m in last}


def intermediate_outputs(bundle: Any, task: str, feeds: dict[str, np.ndarray], modules: list[str],
                         threads: int = 1, model: Any = None) -> dict[str, np.ndarray]:
    """Outputs of ``modules`` (PyTorch names) when ``bundle`` runs ``feeds`` on ``task``; modules not found
    in the graph are left out. (``model`` is not needed: the bundle's own graph is probed.)"""
    sess = bundle.session(threads=threads)
    if sess.swappable:
        sess.set_task(task)
    path = bundle.file(bundle.manifest["models"]["model"]["file"])
    proto = onnx.load(str(path))
    found = module_outputs(proto.graph, modules)
    have = {o.name for o in proto.graph.output}
    for tensor in dict.fromkeys(found.values()):
        if tensor not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=tensor))
    try:
        probe = ort.InferenceSession(proto.SerializeToString(), session_options(threads), providers=sess.providers)
    except Exception as e:  # noqa: BLE001 - ORT's own (untyped) errors
        raise BundleError(f"{path}: ONNX Runtime cannot run the graph with intermediate outputs "
                          f"({type(e).__name__}: {str(e)[:300]}).") from None
    inputs = {k: np.asarray(v) for k, v in feeds.items()}
    if sess.swappable:
        inputs.update({k: v.numpy() for k, v in sess._weights.items()})
    names = list(dict.fromkeys(found.values()))
    values = dict(zip(names, probe.run(names, inputs)))
    return {m: values[t] for m, t in found.items()}


def task_tensors(bundle: Any, task: str) -> dict[str, np.ndarray]:
    """The task tensors (mixer file names) of one of the bundle's tasks, checked (``read_adapter``)."""
    from crisp_edge.export.onnx.adapter import read_adapter

    return read_adapter(bundle.task_path(task), bundle.manifest["swappable"])

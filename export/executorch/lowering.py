"""Lowering PyTorch modules to an ExecuTorch program: ``torch.export`` of each method, the recipe's
partitioners (XNNPACK, or portable kernels only), and the record of which operators stayed outside
the delegate. Shared by every ExecuTorch exporter."""
from __future__ import annotations

import collections
import functools
import warnings

import torch
from torch import nn

from crisp_edge.export.logs import quiet_loggers

_CONTROL = {"executorch_call_delegate", "getitem"}


def _partitioners(recipe: str, mode: str, method: str = "forward") -> tuple[list, list]:
    """(partitioners for ``to_edge_transform_and_lower``, partitioners applied after it, in order, by
    ``to_backend``) of one method."""
    if recipe == "portable":
        return [], []
    from executorch.backends.xnnpack.partition.config.gemm_configs import (
        AddmmConfig,
        ConvolutionConfig,
        LinearConfig,
        MMConfig,
    )
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )

    if mode == "dense":
        return [XnnpackPartitioner()], []
    if method == "set_task":
        # Only the products go to XNNPACK: the reshape of each product to its layer's (d_out, d_in) is a copy
        # of every weight inside XNNPACK (its static reshape) and an alias outside it (ExecuTorch plans a
        # view_copy as a view of its input); the gates on the small mixers cost nothing either way. Measured on
        # ViT-S: set_task 0.76 -> 0.64 forwards (bench/results/executorch_vit_small_switch.json). Its constants
        # are the bases: they stay unpacked (a packed copy would double the program).
        return [XnnpackPartitioner(configs=[MMConfig, AddmmConfig, LinearConfig],
                                   force_non_static_weights_for_f32_linear=True)], []
    # Weights that are not constants (computed in the graph, or buffers set by set_task) need the
    # forced flag, which breaks the conv patch embedding: convs go first, to a conv-only partitioner.
    rest = [XnnpackPartitioner(configs=[ConvolutionConfig]),
            XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)]
    if method != "forward":
        return rest, []
    # The forced flag also makes XNNPACK pack a constant weight at every call. In forward, linears whose
    # weight is a constant (an LM's vocabulary projection) go first to a partitioner that packs them once,
    # at load; it alone lowers with the decomposition (each partitioner of to_edge_transform_and_lower
    # decomposes what the ones before it kept: the linear would become a matrix product the forced
    # partitioner takes), the others follow on the edge program. Not in set_task, whose constants are the
    # bases: a packed copy of them would double the program.
    return [XnnpackPartitioner(configs=[_constant_linear_config()])], rest


@functools.cache
def _constant_linear_config() -> type:
    """XNNPACK's linear partitioner config restricted to linears whose weight and bias are constants.

    XNNPACK's own check takes a buffer as a static weight (``is_param_node``) and would pack the weights
    that ``set_task`` rewrites once, at load: every task would then run the load-time weights."""
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from torch._export.utils import is_buffer

    class ConstantWeightLinearConfig(LinearConfig):
        def check_constraints(self, node: torch.fx.Node, ep) -> bool:
            operands = [a for a in node.args[1:3] if isinstance(a, torch.fx.Node)]
            return not any(is_buffer(ep, a) for a in operands) and super().check_constraints(node, ep)

    return ConstantWeightLinearConfig


def non_delegated_ops(edge) -> dict[str, dict[str, int]]:
    """Per method, the operators left outside any delegate after lowering (name -> count)."""
    out = {}
    for name in edge.methods:
        counts: collections.Counter = collections.Counter()
        for node in edge.exported_program(name).graph_module.graph.nodes:
            if node.op == "call_function":
                target = getattr(node.target, "__name__", str(node.target))
                if target not in _CONTROL and "getitem" not in target:
                    counts[target] += 1
        out[name] = dict(sorted(counts.items()))
    return out


def partition(exported: dict, recipe: str, mode: str, constant_methods: dict | None = None):
    """The edge program of ``exported`` (method -> ``torch.export`` program) with the recipe's partitioners
    applied, method by method."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    parts = {k: _partitioners(recipe, mode, k) for k in exported}
    edge = to_edge_transform_and_lower(exported, partitioner={k: p[0] for k, p in parts.items()},
                                       constant_methods=constant_methods,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    with quiet_loggers("executorch.backends.xnnpack.partition.xnnpack_partitioner"):  # to_backend's deprecation
        for i in range(max(len(p[1]) for p in parts.values())):
            edge = edge.to_backend({k: p[1][i] for k, p in parts.items() if len(p[1]) > i})
    return edge


def lower(programs: dict[str, nn.Module], example: dict[str, tuple], recipe: str, mode: str,
          constant_methods: dict | None = None, dynamic_shapes: dict | None = None, strict: bool = False,
          reinplace: bool = False):
    """``torch.export`` each method, lower with the recipe's partitioners; returns (pte bytes, non-delegated ops).

    ``dynamic_shapes``: method -> ``torch.export`` dynamic shapes of its inputs (a language model's token
    count); ``strict``: trace with TorchDynamo (what Hugging Face's static key/value cache needs: the
    non-strict trace of its in-place cache updates fails in ``run_decompositions``); ``reinplace``: write
    ``index_put`` on a mutable buffer in place (ExecuTorch's reinplace pass: a key/value cache update then
    writes the new positions, not a copy of the whole cache plus a copy back)."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = {k: torch.export.export(m, example[k], dynamic_shapes=(dynamic_shapes or {}).get(k), strict=strict)
                    for k, m in programs.items()}
        edge = partition(exported, recipe, mode, constant_methods)
        ops = non_delegated_ops(edge)
        options = {"run_reinplace_pass": True} if reinplace else {}
        if mode == "swappable":
            options.update(memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
                           emit_mutable_buffer_names=True)
        prog = edge.to_executorch(ExecutorchBackendConfig(**options)) if options else edge.to_executorch()
    return prog.buffer, ops

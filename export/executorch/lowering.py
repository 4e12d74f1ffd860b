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
        # are the bases: they stay unpacked (a packed copy would double the program). One delegate per
        # product (``per_op_mode``): each layer's weight then leaves XNNPACK alone and is written to its
        # buffer at once (``_write_back_early``), so set_task plans one product, not every layer's at once.
        return [XnnpackPartitioner(configs=[MMConfig, AddmmConfig, LinearConfig],
                                   force_non_static_weights_for_f32_linear=True, per_op_mode=True)], []
    # Weights that are not constants (computed in the graph, or buffers set by set_task) need the
    # forced flag, which breaks the conv patch embedding: convs go first, to a conv-only partitioner.
    rest = [XnnpackPartitioner(configs=[ConvolutionConfig]),
            XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)]
    # The forced flag also makes XNNPACK pack a constant weight at every call. In forward (and an LM's
    # decode), linears whose weight is a constant (an LM's vocabulary projection) go first to a partitioner
    # that packs them once, at load; it alone lowers with the decomposition (each partitioner of
    # to_edge_transform_and_lower decomposes what the ones before it kept: the linear would become a matrix
    # product the forced partitioner takes), the others follow on the edge program. Not in set_task, whose
    # constants are the bases: a packed copy of them would double the program.
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


def _is_write_back(node: torch.fx.Node) -> bool:
    """``copy_(buffer, value)``: the write-back of a mutated buffer that ExecuTorch inserts before the output."""
    return (node.op == "call_function" and node.target == torch.ops.aten.copy_.default
            and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "placeholder")


def _write_back_early(gm: torch.fx.GraphModule):
    """Schedule each buffer write-back, and the nodes that only feed write-backs (a product's delegate call,
    its ``getitem``, the reshape to the layer's weight), as early as their inputs allow; a write-back also
    after every node that reads the buffer's old value (through views too). Memory planning then frees each
    rebuilt weight at its copy instead of holding all of them until the copies at the end of the graph
    (with ``_shared_buffer_planning``, ``set_task`` then plans one layer's product, not the dense weights:
    SmolLM2-135M 425 MB). Sound: a node moves earlier only past nodes it does not depend on, and a
    write-back past none that reads its buffer; a method with in-place operators of its own (a reinplaced
    cache update) keeps its order but for the write-backs. ``crisp::fold_`` (a group's weights written in place)
    does not count as one: it writes buffers that nothing else in ``set_task`` reads or writes."""
    from executorch.exir.memory_planning import _is_inplace_node
    from executorch.exir.pass_base import PassResult

    nodes = list(gm.graph.nodes)
    backs = [n for n in nodes if _is_write_back(n)]
    feeds: set = set()  # nodes whose every use is (eventually) a write-back
    if backs and not any(_is_inplace_node(n) and not _is_write_back(n) and not _is_fold(n) for n in nodes):
        for n in reversed(nodes):
            if n.op == "call_function" and n.users and all(u in feeds or _is_write_back(u) for u in n.users):
                feeds.add(n)
    moved = False
    for node in nodes:
        if node not in feeds and node not in backs:
            continue
        after = [a for a in node.all_input_nodes]
        if node in backs:  # after everything computed from the buffer's old value
            todo = [u for u in node.args[0].users if u is not node]
            while todo:
                n = todo.pop()
                if n not in after and n.op != "output":
                    after.append(n)
                    todo.extend(n.users)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}  # afresh: earlier nodes have moved
        last = max(after, key=order.__getitem__)
        if last.next is not node:
            last.append(node)
            moved = True
    if moved:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, moved)


def _is_fold(node: torch.fx.Node) -> bool:
    from crisp_edge.export.executorch.custom_ops import IN_PLACE_FOLDS

    return node.op == "call_function" and any(op in (node.target, getattr(node.target, "_op", None))  # edge op: ._op
                                              for op in IN_PLACE_FOLDS)


@functools.cache
def _shared_buffer_planning() -> type:
    """ExecuTorch's memory planning with mutable buffers shared between methods, minus the arena it reserves
    for a method's buffer write-backs as if they were outputs of their own.

    A write-back ``copy_(buffer, value)`` is an output of the method. ExecuTorch plans a method's outputs in its
    activation arena from the specs the output node got when the write-back was still a value of its own
    (``SpecPropPass``); the planner then aliases the write-back onto the buffer (``_alias_inplace_result_specs``)
    and the shared buffers go to their own arena, but the output node keeps the stale specs: ``set_task``'s
    arena held a second copy of every rebuilt weight, never used. Here the write-backs are aliased first and
    the output node takes their specs again, so the planner sees them as the shared buffers they are.

    An in-place operator that returns nothing (``crisp::fold_``: its outputs are its list argument's buffers)
    gets an empty list as its result's spec: ExecuTorch's emitter wants a spec for every operator's result, and
    emits an empty list as an empty tensor list."""
    from executorch.exir.memory_planning import _alias_inplace_result_specs, _is_inplace_node
    from executorch.exir.passes import MemoryPlanningPass
    from torch.utils import _pytree as pytree

    class SharedBufferPlanning(MemoryPlanningPass):
        def run(self, graph_module: torch.fx.GraphModule, graph_signature=None):
            for node in graph_module.graph.nodes:
                if _is_fold(node) and node.meta.get("spec") is None:
                    node.meta["spec"] = []
                elif _is_inplace_node(node):
                    _alias_inplace_result_specs(node)
            out = graph_module.graph.output_node()
            out.meta["spec"] = pytree.tree_map(lambda a: a.meta.get("spec") if isinstance(a, torch.fx.Node) else None,
                                               out.args[0])
            return super().run(graph_module, graph_signature)

    return SharedBufferPlanning


def non_delegated_ops(edge) -> dict[str, dict[str, int]]:
    """Per method, the operators left outside any delegate after lowering (name -> count)."""
    out = {}
    for name in edge.methods:
        counts: collections.Counter = collections.Counter()
        for node in edge.exported_program(name).graph_module.graph.nodes:
            if node.op == "call_function":
                target = getattr(node.target, "__name__", str(node.target))
                if target.startswith("auto_functionalized"):  # a mutating op (crisp::fold_): name the op itself
                    target = str(node.args[0])
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

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = {k: torch.export.export(m, example[k], dynamic_shapes=(dynamic_shapes or {}).get(k), strict=strict)
                    for k, m in programs.items()}
        edge = partition(exported, recipe, mode, constant_methods)
        ops = non_delegated_ops(edge)
        options = {"run_reinplace_pass": True} if reinplace else {}
        if mode == "swappable":
            options.update(memory_planning_pass=_shared_buffer_planning()(share_mutable_buffers=True),
                           emit_mutable_buffer_names=True, passes=[_write_back_early])
        prog = edge.to_executorch(ExecutorchBackendConfig(**options)) if options else edge.to_executorch()
    return prog.buffer, ops

"""ExecuTorch side of ``bench_fold_layouts.py --executorch``: ways a swappable program's ``set_task`` method can
write one group of each ViT-S role (n = 4 layers, s = 4, r = 16) into the dense weight buffers its ``forward``
reads, each lowered as a swappable program is (XNNPACK for the products, the weights mutable buffers shared
between the methods), its weights checked through ``forward`` against PyTorch:

- ``narrow``: ``B @ gate(A_i)`` a layer, (u, r) @ (r, s), viewed as (d_out, d_in): ``programs._SwapProgram``'s;
- ``wide_cols``: ``B @ [gate(A_1) .. gate(A_n)]`` once a group (16 output columns), each layer's columns
  copied into its buffer;
- ``transposed``: ``[gate(A_1) .. gate(A_n)]^T @ B^T`` once a group (u output columns), each layer's rows
  transposed into its buffer by XNNPACK's transpose.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("narrow", "wide_cols", "transposed")


class _Groups(nn.Module):
    def __init__(self, roles, n: int, s: int, r: int, kind: str) -> None:
        super().__init__()
        self.roles, self.n, self.s, self.r, self.kind = roles, n, s, r, kind
        gen = torch.Generator().manual_seed(0)
        for role, d_out, d_in in roles:
            basis = torch.randn(d_out * d_in // s, r, generator=gen) / r ** 0.5
            self.register_parameter(f"{role}_b", nn.Parameter(basis, requires_grad=False))
            self.register_parameter(f"{role}_bt", nn.Parameter(basis.t().contiguous(), requires_grad=False))
            for i in range(n):
                self.register_buffer(f"{role}_w{i}", torch.zeros(d_out, d_in))

    def forward(self, x384: torch.Tensor, x1536: torch.Tensor) -> torch.Tensor:
        xs = {384: x384, 1536: x1536}
        return torch.cat([F.linear(xs[d_in], getattr(self, f"{role}_w{i}")).flatten()
                          for role, _, d_in in self.roles for i in range(self.n)])

    def set_task(self, *mixers: torch.Tensor) -> torch.Tensor:
        n, s, r = self.n, self.s, self.r
        for (role, d_out, d_in), a in zip(self.roles, mixers):
            g, basis, u = F.silu(a), getattr(self, f"{role}_b"), d_out * d_in // s
            ws = [getattr(self, f"{role}_w{i}") for i in range(n)]
            if self.kind == "narrow":
                for i, w in enumerate(ws):
                    w.copy_((basis @ g[i]).view(d_out, d_in))
            elif self.kind == "wide_cols":
                wide = basis @ g.permute(1, 0, 2).reshape(r, n * s)
                for i, w in enumerate(ws):
                    w.view(u, s).copy_(wide[:, i * s:(i + 1) * s])
            else:
                t = (g.transpose(1, 2).reshape(n * s, r) @ getattr(self, f"{role}_bt")).view(n, s, d_out, d_in // s)
                for i, w in enumerate(ws):
                    w.view(d_out, d_in // s, s).copy_(t[i].permute(1, 2, 0))
        return torch.zeros(1)


class _SetTask(_Groups):
    def forward(self, *mixers: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.set_task(*mixers)


def _lower(module: _Groups, example: dict, kind: str) -> bytes:
    """The program of ``forward`` and ``set_task``, lowered as ``export.executorch.lowering`` lowers a swappable
    one, with XNNPACK's transpose added to ``set_task``'s partitioner for the ``transposed`` kind."""
    from executorch.backends.xnnpack.partition.config.gemm_configs import AddmmConfig, LinearConfig, MMConfig
    from executorch.backends.xnnpack.partition.config.generic_node_configs import PermuteConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    view = copy.copy(module)
    view.__class__ = _SetTask  # shares the buffers
    configs = [MMConfig, AddmmConfig, LinearConfig] + ([PermuteConfig] if kind == "transposed" else [])
    with torch.no_grad():
        exported = {"forward": torch.export.export(module, example["forward"]),
                    "set_task": torch.export.export(view, example["set_task"])}
        edge = to_edge_transform_and_lower(
            exported, partitioner={"forward": [XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)],
                                   "set_task": [XnnpackPartitioner(configs=configs,
                                                                   force_non_static_weights_for_f32_linear=True)]},
            compile_config=EdgeCompileConfig(_check_ir_validity=False))
        prog = edge.to_executorch(ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
                                                          emit_mutable_buffer_names=True))
    return prog.buffer


def executorch_cases(roles, n: int, s: int, r: int) -> dict:
    """``set_task_<kind>`` -> one timed ``set_task`` call (CPU time); every kind's weights checked first."""
    from executorch.runtime import Runtime

    gen = torch.Generator().manual_seed(1)
    mixers = [0.3 * torch.randn(n, r, s, generator=gen) for _ in roles]
    xs = (torch.randn(2, 384, generator=gen), torch.randn(2, 1536, generator=gen))
    cases, alive = {}, []
    for kind in KINDS:
        module = _Groups(roles, n, s, r, kind).eval()
        data = _lower(module, {"forward": xs, "set_task": tuple(mixers)}, kind)
        program = Runtime.get().load_program(data)
        alive.append((data, program))  # a method needs its program, and the program its bytes, while it runs
        set_task, forward = program.load_method("set_task"), program.load_method("forward")
        set_task.execute(mixers)
        with torch.no_grad():
            module.set_task(*mixers)
            want = module(*xs)
        got = forward.execute(list(xs))[0]
        err = float((got - want).abs().max() / want.abs().max())
        if not err < 1e-5:
            raise SystemExit(f"ExecuTorch {kind}: forward after set_task differs from PyTorch (relative {err:.3g})")

        def case(m=set_task, keep=alive) -> float:
            start = time.thread_time()
            m.execute(mixers)
            return time.thread_time() - start
        cases[f"set_task_{kind}"] = case
    return cases

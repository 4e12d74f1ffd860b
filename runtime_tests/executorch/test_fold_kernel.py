"""crisp::fold_ (export/executorch/kernels/fold.cpp): a CRISP group's dense weights rebuilt in one kernel call,
written in place into a program's mutable buffers, against PyTorch's fold (sizes that reach every tail)."""
from __future__ import annotations

import pytest
import torch
from executorch.runtime import Runtime
from torch import nn

from crisp_edge.export.executorch import custom_ops
from crisp_edge.export.executorch.lowering import lower
from crisp_edge.method.gates import get_gate

pytestmark = pytest.mark.runtime


class _Group(nn.Module):
    """``forward`` returns the group's weights; ``set_task`` folds them with ``crisp::fold_``."""

    def __init__(self, shapes: list[tuple[int, int]], r: int, s: int) -> None:
        super().__init__()
        u = shapes[0][0] * shapes[0][1] // s
        self.n = len(shapes)
        for i, shape in enumerate(shapes):
            self.register_buffer(f"w{i}", torch.zeros(shape))
        self.basis = nn.Parameter(torch.randn(u, r, generator=torch.Generator().manual_seed(1)), requires_grad=False)

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"w{i}") for i in range(self.n)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([w.reshape(-1) for w in self.weights()]) * x

    def set_task(self, mixers: torch.Tensor) -> torch.Tensor:
        torch.ops.crisp.fold_(self.weights(), self.basis, get_gate("silu").fn(mixers))
        return torch.zeros(1)


class _SetTask(_Group):
    def forward(self, mixers: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.set_task(mixers)


def _expected(basis: torch.Tensor, mixers: torch.Tensor, shapes) -> torch.Tensor:
    g = get_gate("silu").fn(mixers.double())
    return torch.cat([(basis.double() @ g[i]).reshape(shape).reshape(-1) for i, shape in enumerate(shapes)])


@pytest.mark.parametrize("shapes,r,s", [
    ([(6, 10)] * 4, 16, 4),     # ViT-S's layout: n * s = 16 product columns, one chunk
    ([(7, 9)] * 3, 5, 3),       # odd r, s, u (21) and 9 columns: a partial chunk
    ([(10, 13)] * 5, 3, 5),     # 25 columns: a second, partial chunk; a layer's s values split across chunks
    ([(4, 6), (6, 4)], 7, 2),   # layers of different (d_out, d_in) with the same u * s
    ([(3, 3)], 1, 9),           # r = 1, one layer, s = 9
])
def test_fold_writes_every_weight_as_torch_folds_it(shapes, r, s):
    custom_ops.load_kernels()
    prog = _Group(shapes, r, s).eval()
    view = _SetTask.__new__(_SetTask)
    view.__dict__ = prog.__dict__  # the same buffers, set_task as forward
    mixers = torch.randn(len(shapes), r, s, generator=torch.Generator().manual_seed(2))
    x = torch.ones(1)
    pte, ops = lower({"forward": prog, "set_task": view}, {"forward": (x,), "set_task": (mixers,)},
                     "portable", "swappable")
    assert ops["set_task"].get("crisp.fold_.default") == 1, ops  # one call for the whole group
    program = Runtime.get().load_program(bytes(pte))
    program.load_method("set_task").execute([mixers])
    got = program.load_method("forward").execute([x])[0]
    want = _expected(prog.basis, mixers, shapes)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    view.set_task(mixers)  # PyTorch's implementation of the op: the same weights
    torch.testing.assert_close(prog(x).double(), want, rtol=1e-5, atol=1e-5)


def test_fold_plans_no_weight_sized_memory():
    """crisp::fold_ writes the buffers themselves: set_task's planned memory (its inputs, the gated mixers)
    holds not even one layer's weight, where a product per layer plans at least one."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    shapes, r, s = [(64, 96)] * 4, 16, 4
    prog = _Group(shapes, r, s).eval()
    view = _SetTask.__new__(_SetTask)
    view.__dict__ = prog.__dict__
    mixers = torch.randn(len(shapes), r, s)
    pte, _ = lower({"forward": prog, "set_task": view}, {"forward": (torch.ones(1),), "set_task": (mixers,)},
                   "portable", "swappable")
    plans = {p.name: list(p.non_const_buffer_sizes) for p in deserialize_pte_binary(bytes(pte)).program.execution_plan}
    weight_bytes = 4 * 64 * 96
    assert plans["set_task"][1] < weight_bytes, plans  # index 1: the method's own arena
    assert plans["set_task"][2] >= len(shapes) * weight_bytes  # index 2: the shared buffers, written in place

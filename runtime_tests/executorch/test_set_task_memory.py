"""The swappable recipe's lowering plans ``set_task`` in one layer's worth of memory, not the dense weights'.

``set_task`` rebuilds every layer's weight into a buffer shared with ``forward``. ExecuTorch writes a buffer
back at the end of the method (``copy_(buffer, value)``) and plans the write-backs as outputs of their own:
unchanged, the method's activation arena held every rebuilt weight at once, as many bytes as the buffers
(425 MB of SmolLM2-135M's swappable peak RSS). ``lowering._write_back_early`` and
``lowering._shared_buffer_planning`` make each weight's product, reshape and write-back follow one another
and plan the write-backs as the buffers they are.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from crisp_edge.export.executorch.lowering import lower

pytestmark = pytest.mark.runtime
LAYERS, D, S = 4, 96, 4


class _Swap(nn.Module):
    """``forward`` reads LAYERS weight buffers; ``set_task`` writes each from the shared basis and its mixers
    (a product in XNNPACK and a reshape, as the swappable programs do)."""

    def __init__(self) -> None:
        super().__init__()
        for i in range(LAYERS):
            self.register_buffer(f"w{i}", torch.zeros(D, D))
        self.basis = nn.Parameter(torch.randn(D * D, S), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(LAYERS):
            x = torch.nn.functional.linear(x, getattr(self, f"w{i}")).tanh()
        return x

    def set_task(self, mixers: torch.Tensor) -> torch.Tensor:
        for i in range(LAYERS):
            getattr(self, f"w{i}").copy_((self.basis @ torch.sigmoid(mixers[i])).reshape(D, D))
        return torch.zeros(1)


class _SetTask(_Swap):
    def forward(self, mixers: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.set_task(mixers)


def _arenas(pte: bytes) -> dict[str, list[int]]:
    """Each method's planned buffer sizes (index 1: its activations; 2: the buffers shared between methods)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte).program
    return {plan.name: list(plan.non_const_buffer_sizes) for plan in program.execution_plan}


def test_set_task_plans_one_weight_at_a_time_and_writes_every_weight():
    torch.manual_seed(0)
    prog = _Swap().eval()
    view = _SetTask.__new__(_SetTask)
    view.__dict__ = prog.__dict__  # the same buffers under the same names, set_task as forward
    mixers = torch.randn(LAYERS, S, 1)
    pte, _ = lower({"forward": prog, "set_task": view}, {"forward": (torch.randn(2, D),), "set_task": (mixers,)},
                   "xnnpack", "swappable")
    weight = D * D * 4
    sizes = _arenas(pte)
    assert sizes["forward"][2] == sizes["set_task"][2] >= LAYERS * weight  # the shared buffers: every weight
    # one product and its copy at a time (unchanged: every weight at once, >= LAYERS * weight)
    assert sizes["set_task"][1] < 2 * weight, sizes

    from executorch.runtime import Runtime

    program = Runtime.get().load_program(pte)
    program.load_method("set_task").execute([mixers])
    x = torch.randn(2, D)
    with torch.no_grad():
        view.set_task(mixers)  # the same weights in PyTorch
        want = prog(x)
    got = program.load_method("forward").execute([x])[0]
    # every buffer holds its own layer's weight (XNNPACK's float32 products: the recipe's tolerance, 1e-3; a
    # weight written to another layer's buffer, or not at all, changes the output by about its own size)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)

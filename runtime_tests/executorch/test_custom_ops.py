"""crisp-edge's own ExecuTorch operators (export/executorch/custom_ops.py, kernels/*.cpp): exported, lowered
beside XNNPACK, run in ExecuTorch's Python runtime against PyTorch."""
from __future__ import annotations

import pytest
import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
from executorch.runtime import Runtime

from crisp_edge.export.executorch import custom_ops


class _Decode(torch.nn.Module):
    """Two products by buffers (as a swappable bundle's task weights), one through XNNPACK's linear."""

    def __init__(self, d_in: int, d_mid: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w1", torch.randn(d_mid, d_in, generator=g))
        self.register_buffer("w2", torch.randn(d_in, d_mid, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.ops.crisp.rowmajor_linear(x, self.w1))
        return torch.ops.crisp.rowmajor_linear(h, self.w2) + torch.nn.functional.linear(x, self.w2 @ self.w1)


@pytest.mark.parametrize("shape", [(1, 1, 37), (3, 5, 37), (1, 37)])
def test_rowmajor_linear_runs_in_executorch(shape):
    custom_ops.load_kernels()
    model = _Decode(37, 13).eval()  # 13 and 37: odd sizes reach the kernel's tail loops
    x = torch.randn(*shape)
    ep = torch.export.export(model, (x,))
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    ops = {str(n.target) for n in edge.exported_program().graph.nodes if n.op == "call_function"}
    assert any("crisp.rowmajor_linear" in o for o in ops), ops  # not decomposed or claimed by XNNPACK
    data = bytes(edge.to_executorch().buffer)
    got = Runtime.get().load_program(data).load_method("forward").execute([x])[0]
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-4)


def test_build_kernels_writes_the_library_whole(tmp_path):
    lib = custom_ops.build_kernels(tmp_path / "lib.so")
    assert lib.stat().st_size > 0 and not list(tmp_path.glob("*.tmp.*"))  # built whole, no temporary left

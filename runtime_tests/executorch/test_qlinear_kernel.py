"""crisp::qlinear and crisp::fold_quant_ (export/executorch/kernels/qlinear.cpp, fold_quant.cpp): the int8 linear of
an int8 swappable bundle, reading its packed weight buffer in place, and its set_task's fold + quantize, against
their PyTorch references at sizes that reach every tail (K not a multiple of 4, N not a multiple of 16, rows not a
multiple of the kernel's row tile)."""
from __future__ import annotations

import pytest
import torch
from executorch.runtime import Runtime
from torch import nn

from crisp_edge.export import fold_kernel
from crisp_edge.export.executorch import custom_ops
from crisp_edge.export.executorch.lowering import lower
from crisp_edge.method.gates import get_gate

pytestmark = pytest.mark.runtime


class _QLinear(nn.Module):
    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.n = w.shape[0]
        self.register_buffer("w", custom_ops.quantize_weight(w))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.crisp.qlinear(x, self.w, self.bias, self.n)


@pytest.mark.parametrize("m,k,n,bias", [
    (197, 384, 1152, True),   # ViT-S's qkv: 24 full 8-row tiles and a 5-row tail, 24 whole 48-output panels
    (13, 37, 21, True),       # K % 4 = 1 (a padded group), N % 16 = 5 (a masked block)
    (9, 6, 50, False),        # K < one group's worth past 4, no bias, 3 full blocks + 2 lanes
    (1, 1, 1, True),          # one row, one input, one output
    (7, 130, 33, True),       # rows under one tile, panels of 1 and 2 blocks
])
def test_qlinear_equals_its_reference(m, k, n, bias):
    custom_ops.load_kernels()
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    x = torch.randn(1, m, k, generator=gen) * 3 + 0.5  # not centred: the zero point matters
    pte, ops = lower({"forward": _QLinear(w, b)}, {"forward": (x,)}, "portable", "dense")
    assert ops["forward"] == {"crisp.qlinear.default": 1}, ops
    got = Runtime.get().load_program(bytes(pte)).load_method("forward").execute([x])[0]
    ref = custom_ops._qlinear(x, custom_ops.quantize_weight(w), b, n)
    # the same integer sums; float32 rounding of the epilogue only
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    exact = nn.functional.linear(x, w, b)  # and it is a linear: int8 error only (~1% of the output's scale)
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()


def test_pack_round_trips():
    w = torch.randn(21, 37, generator=torch.Generator().manual_seed(0))
    buf = custom_ops.quantize_weight(w)
    assert buf.numel() == custom_ops.packed_bytes(21, 37) and buf.dtype == torch.int8
    codes, scales, sums = custom_ops.unpack_int8(buf, 21, 37)
    torch.testing.assert_close(codes.float() * scales[:, None], w, atol=float(scales.max()) / 2 + 1e-7, rtol=0)
    assert torch.equal(sums, codes.to(torch.int32).sum(1, dtype=torch.int32))
    assert int(codes.abs().max()) == 127  # the per-row max maps to +-127


class _Group(nn.Module):
    """``forward`` returns the group's float weights (crisp::fold_) and int8 buffers (crisp::fold_quant_), both
    folded from the same int8 basis codes (``codes``, (r, u), as an int8 swappable program stores them; ``basis``:
    the same values as float32 (u, r), crisp::fold_'s layout) and the same mixers, each term's scale multiplied in
    (``scales``, as the program's set_task does)."""

    def __init__(self, d_out: int, d_in: int, n: int, r: int, s: int, cm: bool = False) -> None:
        super().__init__()
        self.n, self.d_in, self.cm = n, d_in, cm
        for i in range(n):
            self.register_buffer(f"f{i}", torch.zeros(d_out, d_in))
            self.register_buffer(f"q{i}", torch.full((custom_ops.packed_bytes(d_out, d_in),), 7, dtype=torch.int8))
        gen = torch.Generator().manual_seed(1)
        codes = torch.randint(-127, 128, (r, d_out * d_in // s), generator=gen, dtype=torch.int8)
        self.basis = nn.Parameter(codes.T.float().contiguous(), requires_grad=False)
        if cm:  # the columns in channel-major order, as a program stores them where the shapes allow
            codes = torch.from_numpy(fold_kernel.channel_major(codes.numpy(), d_out, d_in, s))
        self.codes = nn.Parameter(codes, requires_grad=False)
        self.scales = nn.Parameter(torch.rand(r, generator=gen) * 0.02 + 0.001, requires_grad=False)

    def bufs(self, p: str) -> list[torch.Tensor]:
        return [getattr(self, f"{p}{i}") for i in range(self.n)]

    def forward(self, x: torch.Tensor):
        return torch.cat([w.reshape(-1) for w in self.bufs("f")]) * x, torch.cat(self.bufs("q"))

    def set_task(self, mixers: torch.Tensor) -> torch.Tensor:
        g = get_gate("silu").fn(mixers) * self.scales[:, None]
        torch.ops.crisp.fold_(self.bufs("f"), self.basis, g)
        torch.ops.crisp.fold_quant_(self.bufs("q"), self.codes, g, self.d_in, self.cm)
        return torch.zeros(1)


class _SetTask(_Group):
    def forward(self, mixers: torch.Tensor):  # type: ignore[override]
        return self.set_task(mixers)


@pytest.mark.parametrize("d_out,d_in,n,r,s,cm", [
    (40, 12, 3, 5, 4, False),    # 3 blocks, the last one 8 rows (its padding lanes must be zeroed: buffers start at 7)
    (33, 10, 2, 3, 5, False),    # d_in % 4 = 2: a padded input group; a 1-row last block; odd s
    (17, 7, 4, 6, 7, False),     # s = d_in: one product row per output row; N = 17: a 1-row last block
    (48, 20, 1, 2, 8, False),    # 16 rows of d_in = 20 are 40 product rows of s = 8: whole; one layer
    (64, 36, 4, 16, 4, False),   # u = 576: 36 passes of 16 transposed rows (the AVX-512 widening), ViT-like r and s
    (64, 36, 4, 16, 4, True),    # the same codes stored channel-major: one whole group of 64 channels
    (32, 10, 2, 3, 5, True),     # channel-major, d_in % 4 = 2 (a padded input group), a group of 64 cut to 32
    (144, 8, 3, 16, 4, True),    # channel-major, two groups of 64 and one of 16
])
def test_fold_quant_writes_the_quantized_fold(d_out, d_in, n, r, s, cm):
    """The codes, scales and sums crisp::fold_quant_ writes from an int8 (r, u) basis are quantize_weight of the float
    weights crisp::fold_ writes from the same values as a float (u, r) basis, exactly, the padding included: each
    product element is the same float32 sum in both kernels (fold_core.h: the terms t = 0..r-1 in order, one
    multiply-add each, from zero; the codes are exact in float32), whichever layout it reads, so the same rounding
    gives the same codes; a basis stored channel-major (``cm``) folds to them too. PyTorch's reference of the op
    (codes as float times the scaled mixers) sums in its own order: within one code of the kernel's (a rounding tie
    that float32 rounding tips)."""
    custom_ops.load_kernels()
    prog = _Group(d_out, d_in, n, r, s, cm).eval()
    view = _SetTask.__new__(_SetTask)
    view.__dict__ = prog.__dict__
    mixers = torch.randn(n, r, s, generator=torch.Generator().manual_seed(2))
    x = torch.ones(1)
    pte, ops = lower({"forward": prog, "set_task": view}, {"forward": (x,), "set_task": (mixers,)},
                     "portable", "swappable")
    assert ops["set_task"].get("crisp.fold_quant_.default") == 1, ops
    program = Runtime.get().load_program(bytes(pte))
    program.load_method("set_task").execute([mixers])
    floats, codes = program.load_method("forward").execute([x])
    size = custom_ops.packed_bytes(d_out, d_in)
    for i in range(n):
        want = custom_ops.quantize_weight(floats[i * d_out * d_in:(i + 1) * d_out * d_in].reshape(d_out, d_in))
        assert torch.equal(codes[i * size:(i + 1) * size], want), f"layer {i}"
    view.set_task(mixers)  # PyTorch's implementation of the op
    for i in range(n):
        a, sa, _ = custom_ops.unpack_int8(codes[i * size:(i + 1) * size], d_out, d_in)
        b, sb, _ = custom_ops.unpack_int8(prog.bufs("q")[i], d_out, d_in)
        assert (a.int() - b.int()).abs().max() <= 1
        torch.testing.assert_close(sa, sb, rtol=1e-5, atol=0)


@pytest.mark.parametrize("change,message", [
    ({"codes": "float"}, "crisp::fold_quant_: codes must be the int8 basis stored transposed, (r, u)"),
    ({"cm": True}, "crisp::fold_quant_: channel-major codes need 16 | d_out and s | d_in"),  # 16 does not divide 24
])
def test_fold_quant_refuses_codes_it_cannot_read(change, message, capfd):
    """crisp::fold_quant_ takes int8 codes (r, u) only, and channel-major codes only where 16 | d_out and s | d_in:
    anything else fails the call with the kernel's message (ExecuTorch logs it to stderr) instead of being read."""
    custom_ops.load_kernels()
    prog = _Group(24, 8, 1, 3, 4).eval()
    if "codes" in change:
        prog.codes = nn.Parameter(prog.codes.float(), requires_grad=False)
    prog.cm = change.get("cm", False)
    view = _SetTask.__new__(_SetTask)
    view.__dict__ = prog.__dict__
    mixers = torch.randn(1, 3, 4)
    pte, _ = lower({"forward": prog, "set_task": view}, {"forward": (torch.ones(1),), "set_task": (mixers,)},
                   "portable", "swappable")
    with pytest.raises(RuntimeError):
        Runtime.get().load_program(bytes(pte)).load_method("set_task").execute([mixers])
    assert message in capfd.readouterr().err


def test_portable_paths_equal_the_x86_paths(tmp_path):
    """The portable loops (an aarch64 build's, the runner's cross build) compute what the x86-64 paths this machine
    has compute (AVX-512 VNNI, AVX2): weight and activation codes byte for byte, the products to float rounding
    (qlinear_paths.cpp)."""
    import subprocess
    from pathlib import Path

    import executorch

    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("the x86-64 paths (AVX2, AVX-512 VNNI) need a CPU that has them; the portable ones are what runs here")
    et = Path(list(executorch.__path__)[0])
    exe = tmp_path / "paths"
    subprocess.run(["g++", "-std=c++17", "-O2", "-fopenmp-simd", "-Wno-deprecated-declarations", "-o", str(exe),
                    str(Path(__file__).with_name("qlinear_paths.cpp")), f"-I{et}/include",
                    f"-I{et}/include/executorch/runtime/core/portable_type/c10", "-DC10_USING_CUSTOM_GENERATED_MACROS",
                    f"-L{et}/lib", f"-Wl,-rpath,{et}/lib", "-lexecutorch"], check=True, capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr

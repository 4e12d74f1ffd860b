"""Probe for issue 19 (a swappable int8 ExecuTorch ViT): crisp::qlinear (kernels/qlinear.cpp, int8 weights read in
place from crisp-edge's packed layout) against XNNPACK's dynamically quantized linear (qd8: int8 per-channel
weights, int8 per-token activations, packed at load) on ViT-S's linear shapes, both as one-operator ExecuTorch
programs, 1 thread, interleaved.

    PYTHONPATH=. python bench/probe_qlinear.py [--repeats 30] [--out bench/results/probe_qlinear.json]

XNNPACK's side is the dense int8 exporter's own quantization (``export/executorch/quantize.quantize_module``) of
one ``nn.Linear`` lowered by the plain XNNPACK partitioner (``lowering.lower(..., "xnnpack", "dense")``).
"""
from __future__ import annotations

import argparse
import sys

from _common import interleave, machine_info, pin_threads, steady, summarize, write_json

pin_threads(1)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from crisp_edge.export.executorch import custom_ops  # noqa: E402
from crisp_edge.export.executorch.lowering import lower  # noqa: E402
from crisp_edge.export.executorch.quantize import quantize_module  # noqa: E402
from crisp_edge.export.executorch.session import load_program  # noqa: E402

#: ViT-S (d 384, MLP 1536) at 224 px: 197 tokens; name -> (tokens, d_in, d_out). Per layer: one of each.
SHAPES = {"qkv": (197, 384, 1152), "proj": (197, 384, 384), "fc1": (197, 384, 1536), "fc2": (197, 1536, 384)}


class QLinear(nn.Module):
    """One linear through crisp::qlinear, its int8 weights buffers in the packed layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.n = linear.out_features
        self.register_buffer("w", custom_ops.quantize_weight(linear.weight))
        self.register_buffer("bias", linear.bias.detach().clone())

    def forward(self, x):
        return torch.ops.crisp.qlinear(x, self.w, self.bias, self.n)


def programs(tokens: int, d_in: int, d_out: int):
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out).eval()
    x = torch.randn(1, tokens, d_in)
    xnn, _ = quantize_module(lin, (x,), "int8")
    pte_x, ops_x = lower({"forward": xnn}, {"forward": (x,)}, "xnnpack", "dense")
    pte_c, ops_c = lower({"forward": QLinear(lin)}, {"forward": (x,)}, "xnnpack", "dense")
    return x, lin, (pte_x, ops_x), (pte_c, ops_c)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    custom_ops.load_kernels()
    cases, rows, keep = {}, {}, []
    for name, (t, k, n) in SHAPES.items():
        x, lin, (pte_x, ops_x), (pte_c, ops_c) = programs(t, k, n)
        keep.extend([load_program(pte_x, name), load_program(pte_c, name)])  # a method lives on its program
        fx, fc = (p.load_method("forward") for p in keep[-2:])
        yx, yc = fx.execute([x])[0], fc.execute([x])[0]
        ref = lin(x).detach()
        yr = custom_ops._qlinear(x, custom_ops.quantize_weight(lin.weight), lin.bias.detach(), n)
        rows[name] = {"tokens": t, "d_in": k, "d_out": n, "xnnpack_ops_outside": ops_x["forward"],
                      "crisp_ops_outside": ops_c["forward"],
                      "max_abs_crisp_vs_reference": float((yc - yr).abs().max()),
                      "max_abs_crisp_vs_float": float((yc - ref).abs().max()),
                      "max_abs_xnnpack_vs_float": float((yx - ref).abs().max()),
                      "max_abs_crisp_vs_xnnpack": float((yc - yx).abs().max())}
        cases[f"{name}/xnnpack"] = steady(lambda f=fx, x=x: f.execute([x]))
        cases[f"{name}/crisp"] = steady(lambda f=fc, x=x: f.execute([x]))
    times = interleave(cases, args.repeats)
    total = {"xnnpack": 0.0, "crisp": 0.0}
    for name, row in rows.items():
        for who in ("xnnpack", "crisp"):
            s = summarize(times[f"{name}/{who}"])
            row[who] = s
            total[who] += s["median"]
        row["ratio_crisp_over_xnnpack"] = round(row["crisp"]["median"] / row["xnnpack"]["median"], 3)
        print(f"{name:5s} xnnpack {row['xnnpack']['median']*1e3:7.3f} ms  crisp {row['crisp']['median']*1e3:7.3f} ms"
              f"  ratio {row['ratio_crisp_over_xnnpack']:.3f}  |crisp-ref| {row['max_abs_crisp_vs_reference']:.2e}")
    ratio = total["crisp"] / total["xnnpack"]
    print(f"sum   xnnpack {total['xnnpack']*1e3:7.3f} ms  crisp {total['crisp']*1e3:7.3f} ms  ratio {ratio:.3f}")
    if args.out:
        write_json(args.out, {"machine": machine_info(), "repeats": args.repeats, "shapes": rows,
                              "sum_per_layer_s": total, "ratio_sum": round(ratio, 3), "goal_ratio": 1.10})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``crisp-edge export``: the command-line face of ``export_onnx``.

    crisp-edge export --target onnx --mode swappable ckpt/ --out bundle/ --task mnist.mixers.safetensors

Hooked into ``crisp_edge/cli.py`` with ``add_export_parser(sub)``.
"""
from __future__ import annotations

import argparse

TARGETS = ("onnx",)


def cmd_export(args: argparse.Namespace) -> int:
    from crisp_edge.checkpoint import load_checkpoint

    from .onnx_export import export_onnx

    model = load_checkpoint(args.checkpoint)
    bundle = export_onnx(model, args.out, mode=args.mode, tasks=args.task or (), opset=args.opset,
                         overwrite=args.overwrite, threads=args.threads)
    m = bundle.manifest
    p = m["params"]
    print(f"wrote {args.out}: {args.mode} ONNX bundle (opset {m['opset']}), weights {p['weights_bytes']:,} bytes "
          f"for {p['stored']:,} stored parameters")
    for name, t in m["tasks"].items():
        print(f"  task {name}: {t['file']} ({t['bytes']:,} bytes)")
    print(f"parity vs PyTorch: max abs {m['parity']['max_abs']:.2e} over {m['parity']['checked_cases']} outputs "
          f"(tolerance {m['tolerance']['atol']:g})")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` command to ``crisp-edge``'s subparsers; returns its parser."""
    e = subparsers.add_parser("export", help="export a CRISP checkpoint to an edge runtime bundle (validated)")
    e.add_argument("checkpoint", help="a CRISP checkpoint folder")
    e.add_argument("--target", default="onnx", choices=TARGETS, help="runtime (default onnx)")
    e.add_argument("--mode", default="swappable", choices=["dense", "factored", "swappable"],
                   help="dense: folded weights; factored: bases stored once; swappable (default): per-task adapters")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--task", action="append", help="a mixer file to ship as a task adapter (repeatable; swappable)")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    e.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for validation")
    e.set_defaults(func=cmd_export)
    return e

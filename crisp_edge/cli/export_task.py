"""crisp-edge export-task: add a task (mixer file) to a swappable bundle, no re-export."""
from __future__ import annotations

import argparse


def cmd_export_task(args: argparse.Namespace) -> int:
    from crisp_edge.export.bundle import bundle_runtime

    runtime, _ = bundle_runtime(args.bundle)  # the manifest's format says which runtime's task file to write
    if runtime == "executorch":
        from crisp_edge.export.executorch.tasks import add_task

        path = add_task(args.bundle, args.mixers, name=args.name)
    else:
        from crisp_edge.export.onnx.adapter import mixers_to_onnx_adapter

        path = mixers_to_onnx_adapter(args.mixers, args.bundle, name=args.name)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``export-task`` (a mixer file -> a task file of an existing swappable bundle); returns its parser."""
    e = subparsers.add_parser("export-task", help="add a task (mixer file) to a swappable bundle, no re-export")
    e.add_argument("bundle", help="a swappable bundle folder (ONNX: writes .onnx_adapter; ExecuTorch: .ptd)")
    e.add_argument("mixers", help="the task's mixer file")
    e.add_argument("--name", help="task name (default: the mixer file's)")
    e.set_defaults(func=cmd_export_task)
    return e

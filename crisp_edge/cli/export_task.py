"""crisp-edge export-task: add a task (mixer file) to a swappable bundle, no re-export, with the task's
PyTorch reference computed from the checkpoint it was trained on (``--checkpoint``, or the one the
bundle records it was exported from), or the task recorded as unchecked."""
from __future__ import annotations

import argparse
import sys


def cmd_export_task(args: argparse.Namespace) -> int:
    from crisp_edge.export.bundle import bundle_runtime, open_bundle
    from crisp_edge.files.mixers import read_mixers

    runtime, _ = bundle_runtime(args.bundle)  # the manifest's format says which runtime's task file to write
    mf = read_mixers(args.mixers)
    task = args.name or mf.task
    if runtime == "executorch":
        from crisp_edge.export.executorch.tasks import add_task

        path = add_task(args.bundle, mf, name=task, checkpoint=args.checkpoint)
    else:
        from crisp_edge.export.onnx.adapter import mixers_to_onnx_adapter

        path = mixers_to_onnx_adapter(mf, args.bundle, name=task, checkpoint=args.checkpoint)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    rec = open_bundle(args.bundle)[1].tasks[task]
    if isinstance(rec.get("reference"), dict):
        print(f"PyTorch reference for {task!r} computed from {rec['reference']['checkpoint']} "
              f"({rec['reference']['file']})")
    else:
        print(f"warning: task {task!r} is UNCHECKED: {rec.get('unchecked')}. `crisp-edge parity` fails on it unless "
              f"given --allow-unchecked {task}; add it again with --checkpoint CK (the checkpoint the task was trained "
              "on) to compute its reference.", file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``export-task`` (a mixer file -> a task file of an existing swappable bundle); returns its parser."""
    e = subparsers.add_parser("export-task", help="add a task (mixer file) to a swappable bundle, no re-export")
    e.add_argument("bundle", help="a swappable bundle folder (ONNX: writes .onnx_adapter; ExecuTorch: .ptd)")
    e.add_argument("mixers", help="the task's mixer file")
    e.add_argument("--name", help="task name (default: the mixer file's)")
    e.add_argument("--checkpoint", default=None,
                   help="the CRISP checkpoint the task was trained on (its bases must be the bundle's): the task's "
                        "PyTorch reference outputs are computed from it (default: the checkpoint the bundle records "
                        "it was exported from; without one the task is recorded as unchecked)")
    e.set_defaults(func=cmd_export_task)
    return e

"""crisp-edge apply: apply mixer files to a checkpoint, switching tasks, and evaluate each."""
from __future__ import annotations

import argparse


def cmd_apply(args: argparse.Namespace) -> int:
    import time

    from crisp_edge.data.tasks import TASKS, load_task
    from crisp_edge.files.checkpoint import load_checkpoint
    from crisp_edge.files.switcher import TaskSwitcher
    from crisp_edge.report import format_table
    from crisp_edge.training.evaluate import accuracy, predict

    if args.out:  # refused before any work, not after
        from crisp_edge.files.checkpoint import check_checkpoint_target

        check_checkpoint_target(args.out, args.overwrite)
    model = load_checkpoint(args.checkpoint)
    switcher = TaskSwitcher(model)
    names = [switcher.add(path) for path in args.mixers]
    rows = []
    for name in names:
        t0 = time.perf_counter()
        switcher.switch(name)
        ms = 1e3 * (time.perf_counter() - t0)
        acc = "-"
        if name in TASKS and not args.no_eval:
            data = load_task(name)
            acc = f"{100 * accuracy(predict(model, data.x_test), data.y_test):.2f}%"
        rows.append([name, f"{ms:.2f} ms", acc])
    print(format_table(["task", "switch", "test accuracy"], rows))
    if args.out:
        from crisp_edge.files.checkpoint import save_checkpoint

        save_checkpoint(model, args.out, extra={"task": names[-1]})
        print(f"saved the model with task {names[-1]!r} applied to {args.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("apply", help="apply mixer files to a checkpoint, switching tasks, and evaluate each")
    ap.add_argument("checkpoint")
    ap.add_argument("mixers", nargs="+", help="mixer files, applied in order")
    ap.add_argument("--no-eval", action="store_true", help="do not evaluate on the tasks' test data")
    ap.add_argument("--out", help="save a checkpoint with the last task applied")
    ap.add_argument("--overwrite", action="store_true", help="replace the checkpoint already in --out")
    ap.set_defaults(func=cmd_apply)
    return ap

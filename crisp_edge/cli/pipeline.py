"""``crisp-edge pipeline``: Alg. 6 (retrofit -> compress -> adapt each task) as one resumable command.

    crisp-edge pipeline fmnist-vit --out run/ --keep 0.5 --task mnist --task digits
    crisp-edge pipeline fmnist-vit --out run/ ...      # again: resumes, skipping the stages done
    crisp-edge pipeline timm:deit_tiny_patch16_224 --weights deit.safetensors --data shoes=shoes/ --out run/
"""
from __future__ import annotations

import argparse
from dataclasses import replace


def cmd_pipeline(args: argparse.Namespace) -> int:
    from crisp_edge.cli.data_args import task_name
    from crisp_edge.cli.retrofit import model_from_args
    from crisp_edge.errors import ConfigError
    from crisp_edge.files.io import check_writable
    from crisp_edge.models.sources import EMBEDDED_CRISP_CONFIG
    from crisp_edge.training.pipeline import PipelineConfig, run_pipeline

    base = PipelineConfig()
    data = []
    for item in args.data or []:
        name, eq, path = item.partition("=")
        data.append((name, path) if eq and name and "/" not in name else (task_name(item), item))
    check_writable(args.out, ConfigError, folder=True, what="--out")
    config = PipelineConfig(
        crisp=EMBEDDED_CRISP_CONFIG,
        keep_fraction=None if args.keep >= 1 else args.keep,
        allocator=args.allocator,
        distill_fraction=args.distill_fraction or (1.0 if data or args.distill_data else base.distill_fraction),
        distill_epochs=args.distill_epochs,
        tasks=tuple(args.task or (() if data else base.tasks)), data=tuple(data),
        val_fraction=args.val_fraction, distill_data=args.distill_data,
        adapt=replace(base.adapt, train=replace(base.adapt.train, epochs=args.adapt_epochs, seed=args.seed)),
        train_limit=args.train_limit, seed=args.seed)
    result = run_pipeline(model_from_args(args), args.out, config, restart=args.restart,
                          progress=not args.no_progress)
    print(result.summary())
    print(f"deployable checkpoint: {result.checkpoint}/; mixer files: "
          + ", ".join(str(p) for p in result.mixer_files.values()))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``pipeline`` command to ``crisp-edge``'s subparsers; returns its parser."""
    from crisp_edge.cli.retrofit import add_model_arguments

    p = subparsers.add_parser("pipeline", help="retrofit -> compress -> adapt tasks (Alg. 6), resumable")
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="the run folder (resumed when it holds a run with the same settings)")
    p.add_argument("--keep", type=float, default=0.5,
                   help="kept fraction of the targeted weights (default 0.5 = 50%% reduction; 1 = no compression)")
    p.add_argument("--allocator", default="greedy", choices=["greedy", "uniform"], help="budget -> per-role ranks")
    p.add_argument("--distill-fraction", type=float, default=None,
                   help="slice of the distillation inputs to distil on (default: 0.03 of Fashion-MNIST's 60,000; "
                        "all of --distill-data / --data)")
    p.add_argument("--distill-epochs", type=int, default=4)
    p.add_argument("--task", action="append", help="a built-in task to adapt (repeatable; default mnist and digits "
                                                   "when no --data is given)")
    p.add_argument("--data", action="append", metavar="[NAME=]PATH",
                   help="your own task's data (repeatable): an image folder in class subfolders, a .safetensors / .npz "
                        "with x and y, or a .jsonl / .csv; read with the model's own input spec")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out of each --data task for validation")
    p.add_argument("--distill-data", help="distillation inputs (default: Fashion-MNIST for 28x28 grey models, "
                                          "else the --data tasks' training inputs)")
    p.add_argument("--adapt-epochs", type=int, default=8)
    p.add_argument("--train-limit", type=int, default=None, help="at most N training images per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="start over; the earlier run's own files are kept until the new run "
                                                       "completes, and put back if it fails")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pipeline)
    return p

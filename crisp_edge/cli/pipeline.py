"""``crisp-edge pipeline``: Alg. 6 (retrofit -> compress -> adapt each task) as one resumable command.

    crisp-edge pipeline fmnist-vit --out run/ --keep 0.5 --task mnist --task digits
    crisp-edge pipeline fmnist-vit --out run/ ...      # again: resumes, skipping the stages done
"""
from __future__ import annotations

import argparse
from dataclasses import replace


def cmd_pipeline(args: argparse.Namespace) -> int:
    from crisp_edge.models.sources import EMBEDDED_CRISP_CONFIG, create_model
    from crisp_edge.training.pipeline import PipelineConfig, run_pipeline

    base = PipelineConfig()
    config = PipelineConfig(
        crisp=EMBEDDED_CRISP_CONFIG,
        keep_fraction=None if args.keep >= 1 else args.keep,
        allocator=args.allocator, distill_fraction=args.distill_fraction, distill_epochs=args.distill_epochs,
        tasks=tuple(args.task or base.tasks),
        adapt=replace(base.adapt, train=replace(base.adapt.train, epochs=args.adapt_epochs, seed=args.seed)),
        train_limit=args.train_limit, seed=args.seed)
    result = run_pipeline(create_model(args.model), args.out, config, restart=args.restart,
                          progress=not args.no_progress)
    print(result.summary())
    print(f"deployable checkpoint: {result.checkpoint}/; mixer files: "
          + ", ".join(str(p) for p in result.mixer_files.values()))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``pipeline`` command to ``crisp-edge``'s subparsers; returns its parser."""
    p = subparsers.add_parser("pipeline", help="retrofit -> compress -> adapt tasks (Alg. 6), resumable")
    p.add_argument("model", help="fmnist-vit (the embedded ViT) | timm:<name> | a local Hugging Face model folder")
    p.add_argument("--out", required=True, help="the run folder (resumed when it holds a run with the same settings)")
    p.add_argument("--keep", type=float, default=0.5,
                   help="kept fraction of the targeted weights (default 0.5 = 50%% reduction; 1 = no compression)")
    p.add_argument("--allocator", default="greedy", choices=["greedy", "uniform"], help="budget -> per-role ranks")
    p.add_argument("--distill-fraction", type=float, default=0.03, help="slice of the base training set to distil on")
    p.add_argument("--distill-epochs", type=int, default=4)
    p.add_argument("--task", action="append", help="a task to adapt (repeatable; default mnist and digits)")
    p.add_argument("--adapt-epochs", type=int, default=8)
    p.add_argument("--train-limit", type=int, default=None, help="at most N training images per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="start over; the earlier run's own files are kept until the new run "
                                                       "completes, and put back if it fails")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pipeline)
    return p

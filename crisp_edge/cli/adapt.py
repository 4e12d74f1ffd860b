"""crisp-edge adapt: train a task's mixers (bases frozen) and write its mixer file."""
from __future__ import annotations

import argparse

from crisp_edge.cli.options import BATCH, COUNT
from crisp_edge.training.adapt import AdaptConfig

_ADAPT = AdaptConfig()  # the library's defaults are the command's defaults

def cmd_adapt(args: argparse.Namespace) -> int:
    import torch

    from crisp_edge.data.tasks import load_task
    from crisp_edge.files.checkpoint import load_checkpoint
    from crisp_edge.files.mixers import check_mixer_target, read_mixers, save_mixers
    from crisp_edge.training.adapt import adapt_
    from crisp_edge.training.loop import TrainConfig

    out = args.out or f"{args.task}.mixers.safetensors"
    check_mixer_target(out, args.overwrite)  # before training: a refused path costs nothing
    data = load_task(args.task, seed=args.seed, train_limit=args.train_limit)
    model = load_checkpoint(args.checkpoint)
    config = AdaptConfig(train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed),
                         mixer_lr=args.lr, head_lr=args.head_lr, train_head=not args.no_head,
                         train_biases=args.train_biases)
    report = adapt_(model, data.x_train, data.y_train, num_classes=data.task.num_classes, config=config,
                    eval_data=(data.x_test, data.y_test), progress=not args.no_progress)
    save_mixers(model, out, task=args.task, head=not args.no_head, biases=args.train_biases,
                storage_dtype=torch.float16 if args.fp16 else None, labels=list(data.task.class_names))
    mf = read_mixers(out)
    print(f"task {args.task}: test accuracy {100 * report.accuracy:.2f}% on {len(data.x_test):,} images "
          f"after {args.epochs} epochs ({report.history.seconds_per_epoch:.1f} s/epoch)")
    print("trainable: " + ", ".join(f"{k} {v:,}" for k, v in report.trainable.items())
          + f" (total {report.trainable_total:,}); bases unchanged: {report.bases_unchanged}")
    print(f"wrote {out}: {mf.nbytes:,} bytes ({mf.raw_bytes:,} bytes of tensors)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser("adapt", help="train a task's mixers (bases frozen) and write its mixer file")
    a.add_argument("checkpoint", help="a CRISP checkpoint folder (from `crisp-edge retrofit`)")
    a.add_argument("--task", required=True, help="mnist | digits | fmnist5")
    a.add_argument("--out", help="mixer file to write (default: TASK.mixers.safetensors)")
    a.add_argument("--overwrite", action="store_true", help="replace the mixer file already at --out")
    a.add_argument("--epochs", type=COUNT, default=_ADAPT.train.epochs)
    a.add_argument("--batch-size", type=BATCH, default=_ADAPT.train.batch_size)
    a.add_argument("--lr", type=float, default=_ADAPT.mixer_lr, help="mixer learning rate")
    a.add_argument("--head-lr", type=float, default=_ADAPT.head_lr)
    a.add_argument("--no-head", action="store_true", help="keep the model's head (do not train a new one)")
    a.add_argument("--train-biases", action="store_true", help="also train the CRISP layers' biases")
    a.add_argument("--fp16", action="store_true", help="store the mixer file in float16")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_adapt)
    return a

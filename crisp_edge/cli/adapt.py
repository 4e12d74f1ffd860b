"""crisp-edge adapt: train a task's mixers (bases frozen) and write its mixer file.

    crisp-edge adapt ckpt/ --data my-images/ --val-fraction 0.1 --out mine.mixers.safetensors
    crisp-edge adapt ckpt/ --task mnist                      # a built-in task
    crisp-edge adapt ckpt/ --data reviews.jsonl              # text + label; the model's own tokenizer
    crisp-edge adapt llama-ckpt/ --data domain.txt           # a language model: see cli/adapt_lm.py
"""
from __future__ import annotations

import argparse

from crisp_edge.cli.adapt_lm import add_lm_arguments, cmd_adapt_lm, is_lm_text
from crisp_edge.cli.data_args import add_data_arguments, add_tokenizer_argument
from crisp_edge.cli.options import BATCH, COUNT
from crisp_edge.training.adapt import AdaptConfig
from crisp_edge.training.adapt_lm import AdaptLMConfig

_ADAPT = AdaptConfig()
_LM = AdaptLMConfig()  # the library's defaults are the command's defaults


def cmd_adapt(args: argparse.Namespace) -> int:
    import torch

    from crisp_edge.cli.data_args import data_tokenizer, load_train_val, task_name
    from crisp_edge.data.input_spec import input_spec_of
    from crisp_edge.errors import ConfigError
    from crisp_edge.files.checkpoint import load_checkpoint
    from crisp_edge.files.mixers import check_mixer_target, read_mixers, save_mixers
    from crisp_edge.training.adapt import adapt_
    from crisp_edge.training.loop import TrainConfig

    if (args.task is None) == (args.data is None):
        raise ConfigError("pass --data PATH (your data) or --task NAME (a built-in task: mnist | digits | fmnist5).")
    if is_lm_text(args):  # a causal LM and a .txt: language-model adaptation, its own defaults
        return cmd_adapt_lm(args)
    args.epochs = _ADAPT.train.epochs if args.epochs is None else args.epochs
    args.batch_size = _ADAPT.train.batch_size if args.batch_size is None else args.batch_size
    args.lr = _ADAPT.mixer_lr if args.lr is None else args.lr
    if args.task is not None and (args.val is not None or args.val_fraction is not None or args.tokenizer):
        raise ConfigError("--val, --val-fraction and --tokenizer go with --data; a built-in task has its own test split.")
    name = args.name or args.task or task_name(args.data)
    out = args.out or f"{name}.mixers.safetensors"
    check_mixer_target(out, args.overwrite)  # before training: a refused path costs nothing
    config = AdaptConfig(train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed),
                         mixer_lr=args.lr, head_lr=args.head_lr, train_head=not args.no_head,
                         train_biases=args.train_biases)
    model = load_checkpoint(args.checkpoint)
    if args.task is not None:
        from crisp_edge.data.labeled import LabeledData
        from crisp_edge.data.tasks import load_task

        data = load_task(args.task, seed=args.seed, train_limit=args.train_limit)
        names = tuple(data.task.class_names)
        train = LabeledData(data.x_train, data.y_train, class_names=names, source=f"task {args.task} (train)")
        val = LabeledData(data.x_test, data.y_test, class_names=names, source=f"task {args.task} (test)")
    else:
        spec = input_spec_of(model)
        tokenizer = data_tokenizer(args, model, spec, (args.data, args.val))
        train, val = load_train_val(args, spec, max_items=args.train_limit, progress=not args.no_progress,
                                    tokenizer=tokenizer)
        print(f"data: {train.describe()}; validation: {len(val):,} examples ({spec.describe()})")
    num_classes = None if args.no_head else train.num_classes  # --no-head: labels must fit the model's head
    report = adapt_(model, train, num_classes=num_classes, config=config, eval_data=val,
                    progress=not args.no_progress)
    labels = list(train.class_names) if train.class_names else None
    save_mixers(model, out, task=name, head=not args.no_head, biases=args.train_biases,
                storage_dtype=torch.float16 if args.fp16 else None, labels=labels)
    mf = read_mixers(out)
    split = "test" if args.task is not None else "validation"
    print(f"task {name}: {split} accuracy {100 * report.accuracy:.2f}% on {len(val):,} examples "
          f"after {args.epochs} epochs ({report.history.seconds_per_epoch:.1f} s/epoch)")
    print("trainable: " + ", ".join(f"{k} {v:,}" for k, v in report.trainable.items())
          + f" (total {report.trainable_total:,}); bases unchanged: {report.bases_unchanged}")
    print(f"wrote {out}: {mf.nbytes:,} bytes ({mf.raw_bytes:,} bytes of tensors)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser("adapt", help="train a task's mixers (bases frozen) and write its mixer file")
    a.add_argument("checkpoint", help="a CRISP checkpoint folder (from `crisp-edge retrofit`)")
    add_data_arguments(a, what="your task's training data")
    add_tokenizer_argument(a)
    a.add_argument("--task", help="a built-in task instead of --data: mnist | digits | fmnist5")
    a.add_argument("--name", help="the task's name in the mixer file (default: --task, or the data's folder/file name)")
    a.add_argument("--out", help="mixer file to write (default: NAME.mixers.safetensors)")
    a.add_argument("--overwrite", action="store_true", help="replace the mixer file already at --out")
    a.add_argument("--epochs", type=COUNT, default=None,
                   help=f"default {_ADAPT.train.epochs} ({_LM.train.epochs} for a language model's text)")
    a.add_argument("--batch-size", type=BATCH, default=None,
                   help=f"default {_ADAPT.train.batch_size} ({_LM.train.batch_size} windows for a language model)")
    a.add_argument("--lr", type=float, default=None,
                   help=f"mixer learning rate (default {_ADAPT.mixer_lr}; {_LM.mixer_lr} for a language model)")
    a.add_argument("--head-lr", type=float, default=_ADAPT.head_lr)
    a.add_argument("--no-head", action="store_true", help="keep the model's head (do not train a new one)")
    a.add_argument("--train-biases", action="store_true", help="also train the CRISP layers' biases")
    a.add_argument("--fp16", action="store_true", help="store the mixer file in float16")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--train-limit", type=int, default=None, help="train on the first N training examples (windows) only")
    a.add_argument("--no-progress", action="store_true")
    add_lm_arguments(a)
    a.set_defaults(func=cmd_adapt)
    return a

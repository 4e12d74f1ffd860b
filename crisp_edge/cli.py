"""The ``crisp-edge`` command line.

    crisp-edge demo                                  # the whole path on the embedded ViT
    crisp-edge retrofit fmnist-vit --out ckpt/       # convert + fit, save a checkpoint
    crisp-edge retrofit timm:vit_small_patch16_224 --s 4 --r 8 --group-size 4 --out ckpt/
    crisp-edge info ckpt/                            # what was converted, budgets, errors
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace

from . import __version__
from .adapt import AdaptConfig
from .config import CrispConfig, RoleConfig
from .errors import ConfigError, CrispEdgeError

_ADAPT = AdaptConfig()  # the library's defaults are the command's defaults


def _parse_group_size(text: str) -> int | None:
    return None if text == "all" else int(text)


def _parse_role_override(text: str) -> tuple[str, dict]:
    """``fc1:s=8,r=32,group_size=all`` -> ("fc1", {"s": 8, "r": 32, "group_size": None})."""
    role, sep, rest = text.partition(":")
    if not sep or not role:
        raise ConfigError(f"--role expects ROLE:key=value[,key=value], got {text!r}.")
    known = {f.name for f in fields(RoleConfig)}
    changes: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in known:
            raise ConfigError(f"--role {text!r}: {item!r} is not key=value with key in {sorted(known)}.")
        if key in ("s", "r", "group_size"):
            try:
                changes[key] = None if value in ("all", "full", "none") and key != "s" else int(value)
            except ValueError:
                raise ConfigError(f"--role {text!r}: {key} must be an integer, got {value!r}.") from None
        else:
            changes[key] = value
    return role, changes


def _config_from_args(args: argparse.Namespace) -> CrispConfig:
    if args.config:
        with open(args.config) as f:
            return CrispConfig.from_json(f.read())
    default = RoleConfig(s=args.s, r=args.r, group_size=args.group_size, gate=args.gate, placement=args.placement)
    roles = {}
    for text in args.role or []:
        role, changes = _parse_role_override(text)
        roles[role] = replace(default, **changes)
    targets = tuple(t for t in args.targets.split(",") if t) if args.targets else None
    return CrispConfig(default=default, roles=roles, targets=targets)


def cmd_retrofit(args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .models import create_model
    from .retrofit import retrofit_

    config = _config_from_args(args)
    print(f"loading {args.model} ...", file=sys.stderr)
    model = create_model(args.model)
    report = retrofit_(model, config, method=args.method, refine_steps=args.refine_steps, steps=args.steps,
                       progress=not args.no_progress)
    print(report.format())
    if args.out:
        save_checkpoint(model, args.out, extra={"retrofit": report.to_dict(), "model": args.model})
        print(f"saved checkpoint to {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .budget import budget
    from .checkpoint import load_checkpoint, read_checkpoint_meta
    from .report import format_budget

    meta = read_checkpoint_meta(args.checkpoint)
    model = load_checkpoint(args.checkpoint)
    b = budget(model)
    fit = meta.get("extra", {}).get("retrofit")
    errors = None
    if isinstance(fit, dict):
        errors = {}
        for layer in fit.get("layers", []):
            errors[layer["group"]] = max(errors.get(layer["group"], 0.0), layer["rel_error"])
    if args.json:
        print(json.dumps({"arch": meta["arch"], "config": meta["config"], "budget": b.to_dict(),
                          "retrofit": fit, "source": meta.get("source")}, indent=2))
        return 0
    print(f"checkpoint {args.checkpoint}: architecture {meta['arch']}, crisp-edge format v{meta['version']}")
    if meta.get("extra", {}).get("model"):
        print(f"converted from: {meta['extra']['model']}")
    print(format_budget(b, errors))
    if isinstance(fit, dict):
        print(f"retrofit: method={fit.get('method')}, worst layer error {fit.get('max_rel_error', float('nan')):.2e}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    import torch

    from .adapt import adapt_
    from .checkpoint import load_checkpoint
    from .mixers import read_mixers, save_mixers
    from .tasks import load_task
    from .train import TrainConfig

    data = load_task(args.task, seed=args.seed, train_limit=args.train_limit)
    model = load_checkpoint(args.checkpoint)
    config = AdaptConfig(train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed),
                         mixer_lr=args.lr, head_lr=args.head_lr, train_head=not args.no_head,
                         train_biases=args.train_biases)
    report = adapt_(model, data.x_train, data.y_train, num_classes=data.task.num_classes, config=config,
                    eval_data=(data.x_test, data.y_test), progress=not args.no_progress)
    out = args.out or f"{args.task}.mixers.safetensors"
    save_mixers(model, out, task=args.task, head=not args.no_head, biases=args.train_biases,
                storage_dtype=torch.float16 if args.fp16 else None, labels=list(data.task.class_names))
    mf = read_mixers(out)
    print(f"task {args.task}: test accuracy {100 * report.accuracy:.2f}% on {len(data.x_test):,} images "
          f"after {args.epochs} epochs ({report.history.seconds_per_epoch:.1f} s/epoch)")
    print("trainable: " + ", ".join(f"{k} {v:,}" for k, v in report.trainable.items())
          + f" (total {report.trainable_total:,}); bases unchanged: {report.bases_unchanged}")
    print(f"wrote {out}: {mf.nbytes:,} bytes ({mf.raw_bytes:,} bytes of tensors)")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    import time

    from .checkpoint import load_checkpoint
    from .evaluate import accuracy, predict
    from .mixers import TaskSwitcher
    from .report import format_table
    from .tasks import TASKS, load_task

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
        from .checkpoint import save_checkpoint

        save_checkpoint(model, args.out, extra={"task": names[-1]})
        print(f"saved the model with task {names[-1]!r} applied to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, limit=args.limit, threads=args.threads, adapt_epochs=args.adapt_epochs,
             keep_fraction=args.keep, distill_fraction=args.distill_fraction, distill_epochs=args.distill_epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crisp-edge", description="CRISP: shared bases + tiny gated mixers for edge deployment.")
    p.add_argument("--version", action="version", version=f"crisp-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole path on the embedded Fashion-MNIST ViT")
    d.add_argument("--out", default="crisp-edge-demo", help="folder for the artifacts (default: ./crisp-edge-demo)")
    d.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    d.add_argument("--adapt-epochs", type=int, default=3, help="epochs per task adaptation (default 3)")
    d.add_argument("--keep", type=float, default=0.5, help="kept fraction of the targeted weights (default 0.5)")
    d.add_argument("--distill-fraction", type=float, default=0.02, help="training slice to distil on (default 0.02)")
    d.add_argument("--distill-epochs", type=int, default=3, help="distillation epochs (default 3)")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("retrofit", help="convert a model to CRISP form and fit it to its weights")
    r.add_argument("model", help="fmnist-vit | timm:<name> | a local Hugging Face model folder")
    r.add_argument("--out", help="checkpoint folder to write")
    r.add_argument("--config", help="a CRISP config JSON file (overrides the flags below)")
    r.add_argument("--s", type=int, default=4, help="mixer width s (must divide d_in*d_out; default 4)")
    r.add_argument("--r", type=int, default=None, help="basis rank (default: full capacity n*s, exact)")
    r.add_argument("--group-size", type=_parse_group_size, default=4, help="blocks per shared basis, or 'all' (default 4)")
    r.add_argument("--gate", default="silu", help="silu (default) | gelu | relu | none")
    r.add_argument("--placement", default="pre", help="pre (default) | post | temp")
    r.add_argument("--targets", help="comma-separated roles to convert (default: all of the architecture's)")
    r.add_argument("--role", action="append", help="per-role override, e.g. fc1:s=8,r=32,group_size=all (repeatable)")
    r.add_argument("--method", default="svd", choices=["svd", "gradient"], help="closed form (default) or Alg. 2 descent")
    r.add_argument("--refine-steps", type=int, default=0, help="smooth-L1 refinement steps after the closed form")
    r.add_argument("--steps", type=int, default=2000, help="descent steps per group for --method gradient")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_retrofit)

    a = sub.add_parser("adapt", help="train a task's mixers (bases frozen) and write its mixer file")
    a.add_argument("checkpoint", help="a CRISP checkpoint folder (from `crisp-edge retrofit`)")
    a.add_argument("--task", required=True, help="mnist | digits | fmnist5")
    a.add_argument("--out", help="mixer file to write (default: TASK.mixers.safetensors)")
    a.add_argument("--epochs", type=int, default=_ADAPT.train.epochs)
    a.add_argument("--batch-size", type=int, default=_ADAPT.train.batch_size)
    a.add_argument("--lr", type=float, default=_ADAPT.mixer_lr, help="mixer learning rate")
    a.add_argument("--head-lr", type=float, default=_ADAPT.head_lr)
    a.add_argument("--no-head", action="store_true", help="keep the model's head (do not train a new one)")
    a.add_argument("--train-biases", action="store_true", help="also train the CRISP layers' biases")
    a.add_argument("--fp16", action="store_true", help="store the mixer file in float16")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_adapt)

    ap = sub.add_parser("apply", help="apply mixer files to a checkpoint, switching tasks, and evaluate each")
    ap.add_argument("checkpoint")
    ap.add_argument("mixers", nargs="+", help="mixer files, applied in order")
    ap.add_argument("--no-eval", action="store_true", help="do not evaluate on the tasks' test data")
    ap.add_argument("--out", help="save a checkpoint with the last task applied")
    ap.set_defaults(func=cmd_apply)

    from .compress.cli import add_compress_parser
    from .compress.llama import add_compress_llm_parser
    from .export.cli import add_export_parser, add_export_task_parser  # the deploy side
    from .export.parity_cli import add_parity_parser
    from .pipeline_cli import add_pipeline_parser

    add_compress_parser(sub)
    add_compress_llm_parser(sub)
    add_export_parser(sub)
    add_export_task_parser(sub)
    add_parity_parser(sub)
    add_pipeline_parser(sub)

    i = sub.add_parser("info", help="describe a CRISP checkpoint: groups, budgets, errors")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CrispEdgeError as e:
        print(f"crisp-edge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

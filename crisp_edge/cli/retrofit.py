"""crisp-edge retrofit: convert a model to CRISP form and fit it to its weights."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace

from crisp_edge.errors import ConfigError
from crisp_edge.method.config import CrispConfig, RoleConfig


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
        from crisp_edge.files.io import read_regular

        return CrispConfig.from_json(read_regular(args.config, ConfigError, "--config file", 1 << 20).decode("utf-8", "replace"))
    default = RoleConfig(s=args.s, r=args.r, group_size=args.group_size, gate=args.gate, placement=args.placement)
    roles = {}
    for text in args.role or []:
        role, changes = _parse_role_override(text)
        roles[role] = replace(default, **changes)
    targets = tuple(t for t in args.targets.split(",") if t) if args.targets else None
    return CrispConfig(default=default, roles=roles, targets=targets)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model and where its weights come from (shared by retrofit and pipeline)."""
    p.add_argument("model", help="fmnist-vit | timm:<name> (also timm:local-dir:DIR, timm:hf-hub:ID) | a local "
                                 "Hugging Face model folder | hf-hub:ORG/NAME (Hugging Face cache) | a .gguf file")
    p.add_argument("--weights", help="timm:<name>: a weights file (.safetensors, or .pth/.pt read with weights_only)")
    p.add_argument("--model-arg", action="append", metavar="NAME=VALUE",
                   help="timm:<name>: a keyword argument of timm.create_model, e.g. num_classes=7 (repeatable); "
                        "a LLaMA model (.gguf, smollm2, HF folder): num_labels=K makes it a K-class text classifier "
                        "(max_length=L: tokens per example, default the model's window up to 512)")
    p.add_argument("--random-init", action="store_true",
                   help="build the architecture with random weights, on purpose (tests, benchmarks)")
    p.add_argument("--tokenizer", help="a text model's tokenizer (a Hugging Face folder or a .gguf file), recorded "
                                       "with the weights; default: the one in the model's own folder or GGUF file")


def model_from_args(args: argparse.Namespace):
    """The plain model the arguments name, with its weights; says on stderr where they came from."""
    from crisp_edge.models.sources import create_model
    from crisp_edge.models.weights import describe_origin, origin_of, parse_model_args

    print(f"loading {args.model} ...", file=sys.stderr)
    model = create_model(args.model, weights=args.weights, model_args=parse_model_args(args.model_arg),
                         random_init=args.random_init)
    if args.tokenizer is not None:
        from crisp_edge.models.tokenizers import attach_tokenizer

        attach_tokenizer(model, args.tokenizer)
    print(f"  {describe_origin(origin_of(model))}", file=sys.stderr)
    return model


def cmd_retrofit(args: argparse.Namespace) -> int:
    from crisp_edge.files.checkpoint import save_checkpoint
    from crisp_edge.method.convert import check_capacity, plan_groups
    from crisp_edge.training.retrofit import retrofit_


    config = _config_from_args(args)
    if args.out:  # refused before minutes of work, not after
        from crisp_edge.files.checkpoint import check_checkpoint_target

        check_checkpoint_target(args.out, args.overwrite)
    model = model_from_args(args)
    for note in check_capacity(plan_groups(model, config)[1]):  # accepted, with a word: see check_capacity
        print(note, file=sys.stderr)
    report = retrofit_(model, config, method=args.method, refine_steps=args.refine_steps, steps=args.steps,
                       progress=not args.no_progress)
    print(report.format())
    if args.out:
        save_checkpoint(model, args.out, extra={"retrofit": report.to_dict(), "model": args.model})
        print(f"saved checkpoint to {args.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    r = subparsers.add_parser("retrofit", help="convert a model to CRISP form and fit it to its weights")
    add_model_arguments(r)
    r.add_argument("--out", help="checkpoint folder to write")
    r.add_argument("--overwrite", action="store_true", help="replace the checkpoint already in --out")
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
    return r

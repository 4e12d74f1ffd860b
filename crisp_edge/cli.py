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
from .config import CrispConfig, RoleConfig
from .errors import ConfigError, CrispEdgeError


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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, limit=args.limit, threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crisp-edge", description="CRISP: shared bases + tiny gated mixers for edge deployment.")
    p.add_argument("--version", action="version", version=f"crisp-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole path on the embedded Fashion-MNIST ViT")
    d.add_argument("--out", default="crisp-edge-demo", help="folder for the artifacts (default: ./crisp-edge-demo)")
    d.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
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

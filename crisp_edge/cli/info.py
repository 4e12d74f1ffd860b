"""crisp-edge info: describe a CRISP checkpoint (groups, budgets, errors)."""
from __future__ import annotations

import argparse
import json


def cmd_info(args: argparse.Namespace) -> int:
    from crisp_edge.files.checkpoint import load_checkpoint, read_checkpoint_meta
    from crisp_edge.method.budget import budget
    from crisp_edge.report import format_budget

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
                          "retrofit": fit, "source": meta.get("source"), "origin": meta.get("origin")}, indent=2))
        return 0
    print(f"checkpoint {args.checkpoint}: architecture {meta['arch']}, crisp-edge format v{meta['version']}")
    if meta.get("extra", {}).get("model"):
        print(f"converted from: {meta['extra']['model']}")
    if "origin" in meta:  # checkpoints written before origins were recorded have none
        from crisp_edge.models.weights import describe_origin

        print(f"weights: {describe_origin(meta['origin'])}")
    print(format_budget(b, errors))
    if isinstance(fit, dict):
        print(f"retrofit: method={fit.get('method')}, worst layer error {fit.get('max_rel_error', float('nan')):.2e}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    i = subparsers.add_parser("info", help="describe a CRISP checkpoint: groups, budgets, errors")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)
    return i

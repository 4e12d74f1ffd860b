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
    extra, fit, errors = _notes(meta, args.checkpoint)
    if args.json:
        print(json.dumps({"arch": meta["arch"], "config": meta["config"], "budget": b.to_dict(),
                          "retrofit": fit, "source": meta.get("source"), "origin": meta.get("origin")}, indent=2))
        return 0
    print(f"checkpoint {args.checkpoint}: architecture {meta['arch']}, crisp-edge format v{meta['version']}")
    if isinstance(extra.get("model"), str):
        print(f"converted from: {extra['model']}")
    if "origin" in meta:  # checkpoints written before origins were recorded have none
        from crisp_edge.models.weights import describe_origin

        print(f"weights: {describe_origin(meta['origin'])}")
    print(format_budget(b, errors))
    if isinstance(fit, dict):
        worst = fit.get("max_rel_error")
        worst = f"{worst:.2e}" if _is_number(worst) else "not recorded"
        print(f"retrofit: method={fit.get('method')!s:.40}, worst layer error {worst}")
    return 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _notes(meta: dict, where: str) -> tuple[dict, dict | None, dict | None]:
    """crisp.json's free-form notes (``extra``) and the retrofit report in them, checked: the weights
    verify without them, so malformed notes are named in a CheckpointError, not a traceback."""
    from crisp_edge.errors import CheckpointError

    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{where}: crisp.json field 'extra' must be an object, found {type(extra).__name__}; "
                              "the file was edited. Restore it from the original checkpoint.")
    fit = extra.get("retrofit")
    if fit is None:
        return extra, None, None
    layers = fit.get("layers", []) if isinstance(fit, dict) else None
    if not isinstance(layers, list) or not all(
            isinstance(x, dict) and isinstance(x.get("group"), str) and _is_number(x.get("rel_error")) for x in layers):
        raise CheckpointError(f"{where}: crisp.json's extra.retrofit must be an object whose 'layers' are "
                              "{group, rel_error} records; the file was edited. Restore it from the original checkpoint.")
    errors: dict = {}
    for layer in layers:
        errors[layer["group"]] = max(errors.get(layer["group"], 0.0), layer["rel_error"])
    return extra, fit, errors


def add_parser(subparsers) -> argparse.ArgumentParser:
    i = subparsers.add_parser("info", help="describe a CRISP checkpoint: groups, budgets, errors")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)
    return i

"""The ``crisp-edge`` command: one subcommand per module of this package (``VERBS``), each exposing
``add_parser(subparsers)`` that sets ``func``; every crisp-edge error becomes a message and exit status 2."""
from __future__ import annotations

import argparse
import importlib
import sys

from crisp_edge._version import __version__
from crisp_edge.errors import CrispEdgeError

#: Subcommand modules under crisp_edge.cli, in the order ``crisp-edge --help`` lists them.
VERBS = ("demo", "retrofit", "adapt", "apply", "compress", "compress_llm", "export", "export_task", "parity",
         "pipeline", "info")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crisp-edge", description="CRISP: shared bases + tiny gated mixers for edge deployment.")
    p.add_argument("--version", action="version", version=f"crisp-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        importlib.import_module(f"crisp_edge.cli.{verb}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CrispEdgeError as e:
        print(f"crisp-edge {args.command}: error: {e}", file=sys.stderr)
        return 2

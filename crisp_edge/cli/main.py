"""The ``crisp-edge`` command: one subcommand per module of this package (``VERBS``), each exposing
``add_parser(subparsers)`` that sets ``func``; every crisp-edge error becomes a message and exit status 2."""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from crisp_edge._version import __version__
from crisp_edge.errors import CrispEdgeError

#: Subcommand modules under crisp_edge.cli, in the order ``crisp-edge --help`` lists them.
VERBS = ("demo", "retrofit", "adapt", "apply", "compress", "compress_llm", "export", "export_task", "parity",
         "generate", "pipeline", "info")


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
    except OSError as e:
        hint = _OS_HINTS.get(e.errno)
        if hint is None:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"crisp-edge {args.command}: error: cannot use{where}: {e.strerror}; {hint}", file=sys.stderr)
        return 2


#: File system errors that come from where the user pointed a command (not from a bug), with how to fix them.
_OS_HINTS = {
    errno.EROFS: "the file system is read-only: choose an --out (or report path) on a writable one.",
    errno.ENOSPC: "the disk is full: free space or choose another --out; nothing half-written was left in place.",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another --out.",
    errno.EACCES: "permission denied: choose a path you can read and write.",
    errno.EPERM: "operation not permitted: choose a path you can read and write.",
    errno.EISDIR: "a folder is there where a file is needed: give a file path.",
    errno.ENOTDIR: "a file is there where a folder is needed: give a folder path (or a new name).",
    errno.EEXIST: "something is already there: choose another path.",
    errno.ENOENT: "no such file or folder: check the path.",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one.",
}

"""Argument types shared by the subcommands: numbers are checked where they are parsed, so a bad one
is a usage error (exit status 2) naming the option and the range, never a traceback later."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer from ``lo`` to ``hi`` inclusive."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range; give an integer from {lo} to {hi}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def float_in(lo: float, hi: float = math.inf) -> Callable[[str], float]:
    """A finite number from ``lo`` to ``hi`` inclusive (``nan`` and ``inf`` are refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            top = "" if math.isinf(hi) else f" and at most {hi:g}"
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of at least {lo:g}{top}")
        return value

    parse.__name__ = "number"
    return parse


#: Runtime threads, training batches and the like.
THREADS = int_in(1, 1024)
BATCH = int_in(1, 1 << 16)
COUNT = int_in(1, 1 << 31)

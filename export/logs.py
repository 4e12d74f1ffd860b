"""Quieting third-party loggers while an exporter runs them (optimum, ORT's quantizers, ExecuTorch's
partitioners log warnings and progress at every call that say nothing to a crisp-edge user)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator


@contextlib.contextmanager
def quiet_loggers(*names: str, python_warnings: bool = False) -> Iterator[None]:
    """Only errors from the loggers ``names`` ("" is the root logger) while the block runs, their levels
    restored afterwards; ``python_warnings``: Python's warnings off too."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        if python_warnings:
            warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)

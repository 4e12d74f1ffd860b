"""Building and loading crisp-edge's native libraries (g++ on first use), once for every library.

Two libraries are built from the C++ sources in this checkout: ExecuTorch's kernels
(``export/executorch/custom_ops.py``: crisp's operators, registered into ExecuTorch's runtime) and the fused
fold as a plain C library (``export/fold_kernel.py``: ONNX Runtime's Python session). Each is (re)built when
it is missing or older than one of its sources, into a temporary file renamed over the old one, so no reader
ever sees half a library; ``make setup`` builds both ahead of time.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from crisp_edge.export.errors import ExportError

NEEDS = "It needs g++ (Debian package g++, which `make setup` installs)"


def is_stale(library: Path, sources: Iterable[Path]) -> bool:
    """True when ``library`` is missing or older than one of ``sources``."""
    if not library.is_file():
        return True
    built = library.stat().st_mtime
    return any(p.stat().st_mtime > built for p in sources)


def build_library(command: Callable[[Path], list[str]], out: Path, what: str) -> Path:
    """Run ``command(tmp)`` (a compiler writing the library to ``tmp``), then rename ``tmp`` to ``out``.

    ``what`` names the library in errors; an ``ExportError`` says why when the build fails.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp.{os.getpid()}")
    try:
        r = subprocess.run(command(tmp), capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise ExportError(f"building {what} failed (exit {r.returncode}):\n{(r.stderr or r.stdout)[-2000:]}\n{NEEDS}.")
        tmp.replace(out)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExportError(f"cannot build {what} ({e}). {NEEDS}.") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_library(library: Path, sources: Iterable[Path], build: Callable[[], Path], what: str,
                 mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL:
    """``library`` loaded with ctypes, built first by ``build()`` when it is stale against ``sources``."""
    if is_stale(library, sources):
        build()
    try:
        return ctypes.CDLL(str(library), mode=mode)
    except OSError as e:
        raise ExportError(f"cannot load {what} from {library} ({e}); delete it to have it built again.") from None

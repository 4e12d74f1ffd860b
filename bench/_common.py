"""Shared helpers for the benchmarks in bench/: thread pinning, machine info, timing, JSON output.

Import this module *before* torch (directly or through crisp_edge): ``pin_threads`` has to set the
thread environment variables before the OpenMP / MKL runtimes inside torch start.
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: Environment variables read once by the math libraries torch links against.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                   "NUMEXPR_NUM_THREADS")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def pin_threads(n: int = 1) -> int:
    """Run everything on ``n`` threads: set the environment, then import torch and pin it.

    Must be called before torch is imported anywhere in the process (raises otherwise), because the
    OpenMP and MKL runtimes read their thread counts when torch's libraries load.
    """
    if "torch" in sys.modules:
        raise RuntimeError("pin_threads() must run before torch is imported (import bench/_common.py first).")
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    torch.set_num_interop_threads(n)
    return n


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what a benchmark ran: date, CPU, threads, load, library versions, git commit."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_env": {v: os.environ.get(v) for v in THREAD_ENV_VARS},
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())``, wall clock, with garbage collected beforehand and paused during the call."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result
    finally:
        gc.enable()


def interleave(cases: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each case ``repeats`` times, round-robin, rotating the order every round, so that the
    cases share the machine's noise. Each case does its own untimed set-up and returns the seconds
    it measured (usually with ``timed``)."""
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(cases[name]())
    return times


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Median, min and every run of a list of timings (seconds)."""
    return {"median": round(statistics.median(seconds), 4), "min": round(min(seconds), 4),
            "runs": [round(s, 4) for s in seconds]}


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as pretty-printed JSON, atomically (the library's own atomic writer)."""
    from crisp_edge.io import atomic_write_json  # imported late: crisp_edge loads torch

    atomic_write_json(path, data)
    return Path(path)


def load_bench_model(name: str):
    """(plain model, CRISP model, CRISP config, example input) for a benchmark model: ``embedded`` (the
    Fashion-MNIST ViT, its own layout) or a timm ``vit_small`` / ``vit_base`` with random weights and the
    default ``CrispConfig()``; the CRISP model is the plain one retrofitted at full capacity."""
    import copy

    import torch

    import crisp_edge as ce
    from crisp_edge.models import EMBEDDED_CRISP_CONFIG

    if name == "embedded":
        plain = ce.load_embedded_vit()
        config, x = EMBEDDED_CRISP_CONFIG, torch.randn(1, 1, 28, 28)
    else:
        torch.manual_seed(0)
        plain = ce.build_model({"library": "timm", "name": f"{name}_patch16_224", "kwargs": {}}).eval()
        config, x = ce.CrispConfig(), torch.randn(1, 3, 224, 224)
    model = copy.deepcopy(plain)
    ce.retrofit_(model, config, progress=False)
    return plain, model.eval(), config, x


def bench_task(model, path: Path, task: str, seed: int) -> Path:
    """A benchmark task's mixer file: slightly perturbed mixers and a new head of the same class count."""
    from crisp_edge.testing import make_task_file

    return make_task_file(model, path, task, seed, model.get_submodule("head").out_features, scale=0.01)

"""Shared helpers for the benchmarks in bench/: thread pinning, machine info, timing, JSON output.

Import this module *before* torch (directly or through crisp_edge): ``pin_threads`` has to set the
thread environment variables before the OpenMP / MKL runtimes inside torch start.
"""
from __future__ import annotations

import datetime
import gc
import math
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


#: The x86-64 vector extensions the int8 and fold kernels pick between at run time, widest first; amx_int8: the
#: matrix tiles ONNX Runtime's int8 products run on where the CPU has them (MLAS, `tdpbusd`), not crisp-edge's kernels.
VECTOR_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def vector_isa() -> list[str]:
    """Which of ``VECTOR_FLAGS`` this CPU has (its /proc/cpuinfo flags; empty where there are none, or no x86-64):
    the int8 kernels' speed depends on it (VNNI: 4 int8 products a lane an instruction; AVX2 alone: 2)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in VECTOR_FLAGS if f in flags]
    except OSError:
        pass
    return []


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
        "vector_isa": vector_isa(),
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
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    for lib in ("timm", "transformers"):
        try:
            info[lib] = __import__(lib).__version__
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


def steady(fn: Callable[[], Any], min_seconds: float = 0.02) -> Callable[[], float]:
    """A case for ``interleave`` timing ``fn`` in steady state: k consecutive calls (warm caches, as
    consecutive frames of an app), returning seconds per call. k is fixed on first use so that one
    case lasts about ``min_seconds`` (k = 1 for calls longer than that): a sub-millisecond forward
    timed alone, right after another case has evicted the caches, measures the eviction."""
    state: dict[str, int] = {}

    def case() -> float:
        if "k" not in state:
            fn()
            state["k"] = max(1, math.ceil(min_seconds / max(timed(fn)[0], 1e-6)))
        k = state["k"]
        return timed(lambda: [fn() for _ in range(k)])[0] / k

    return case


def copy_floor(nbytes: int) -> Callable[[], float]:
    """A case timing one copy of ``nbytes`` (read + write, numpy): the floor under any task switch that
    writes that many bytes of dense weights, whatever computes them."""
    import numpy as np

    src, dst = np.ones(nbytes // 4, np.float32), np.empty(nbytes // 4, np.float32)
    return lambda: timed(lambda: np.copyto(dst, src))[0]


def switch_written_bytes(model) -> int:
    """Bytes of dense weights a task switch writes: every CRISP layer's W (fp32)."""
    from crisp_edge.method.convert import crisp_bases

    return sum(4 * b.d_out * b.d_in * len(b.layer_names) for b in crisp_bases(model).values())


def task_switch_cases(set_task: Callable[[str], Any], forward: Callable[[], Any], model) -> dict[str, Callable[[], float]]:
    """The cases a runtime benchmark times on a swappable session with tasks ``t1`` and ``t2``:
    ``swappable`` (``t1`` active, forwards in steady state), ``switch`` (one ``set_task``, alternating
    the two tasks, a single cold call) and ``copy_dense_weights`` (the floor under any switch)."""
    state = {"i": 0}

    def switch() -> float:
        state["i"] += 1
        return timed(lambda: set_task("t2" if state["i"] % 2 else "t1"))[0]

    steady_forward = steady(forward)

    def swappable() -> float:  # t1 active for the forward timing
        set_task("t1")
        return steady_forward()

    return {"swappable": swappable, "switch": switch, "copy_dense_weights": copy_floor(switch_written_bytes(model))}


#: How the cases of ``task_switch_cases`` are timed, for the benchmarks' JSON ``protocol``.
SWITCH_PROTOCOL = {
    "batch": "1, or B for a model named model@B",
    "forwards": "steady state: consecutive calls per round (about 20 ms of them), seconds per call",
    "copy_dense_weights": "np.copyto of as many bytes as the switch writes (every CRISP layer's dense W): the "
                          "floor under any switch that materialises the weights",
}


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Median, min and every run of a list of timings (seconds, to 0.1 microsecond: ratios of
    sub-millisecond medians rounded to 0.1 ms were off by up to 6%)."""
    return {"median": round(statistics.median(seconds), 7), "min": round(min(seconds), 7),
            "runs": [round(s, 7) for s in seconds]}


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as pretty-printed JSON, atomically (the library's own atomic writer)."""
    from crisp_edge.files.io import atomic_write_json  # imported late: crisp_edge loads torch

    atomic_write_json(path, data)
    return Path(path)


def load_bench_model(name: str):
    """(plain model, CRISP model, CRISP config, example input) for a benchmark model: ``embedded`` (the
    Fashion-MNIST ViT, its own layout) or a timm ``vit_small`` / ``vit_base`` with random weights and the
    default ``CrispConfig()``; the CRISP model is the plain one retrofitted at full capacity. A name
    ``model@B`` (e.g. ``embedded@16``) is the same model with an example input of batch B."""
    import copy

    import torch

    import crisp_edge as ce
    from crisp_edge.models.sources import EMBEDDED_CRISP_CONFIG

    name, _, batch = name.partition("@")
    if batch:
        plain, model, config, x = load_bench_model(name)
        return plain, model, config, torch.randn(int(batch), *x.shape[1:])
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

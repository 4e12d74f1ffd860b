"""Parity of an exported artifact with its PyTorch reference, for every runtime.

    report = check_bundle("bundle/")                          # run it in its runtime (ORT, ExecuTorch)
    report = check_outputs("bundle/", "device_outputs.npz")   # outputs produced elsewhere (a phone, C++)
    report.passed, report.format(), report.worst

A bundle (``manifest.json`` + ``reference.npz``, see ``reference.py``) stores fixed seeded inputs and
the PyTorch outputs for them, per task. ``check_bundle`` opens the bundle with its runtime's loader
(dispatched on the manifest's ``format`` through ``RUNTIMES``), runs every stored case for every
task, and compares *every* output: max absolute error, max relative error (against the reference's
largest magnitude), cosine similarity and top-1 agreement, against the named tolerance of
(runtime, mode, dtype) in ``TOLERANCES``. ``check_outputs`` compares arrays keyed
``output.{task}.{i}.{name}`` (an ``.npz`` or a folder of ``.npy`` files) instead of running anything.

A failed comparison is diagnosed, so the message names the fault: a wrong output dtype
("dtype float16 != reference float32"), outputs that match another output's reference ("outputs
reordered: 'a' matches the reference of 'b'"), outputs that match another task's reference ("outputs
match task 'mnist' rather than 'digits' (wrong task's mixers?)"), or plain numeric drift ("max abs
0.3 > 0.0001"). An artifact its loader refuses (a mixer file made for other bases, a damaged file)
is a failed check naming the loader's typed error, not a crash.
"""
from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crisp_edge.errors import ConfigError, CrispEdgeError
from crisp_edge.io import read_json

from .errors import BundleError, ParityError
from .reference import DEFAULT_TASK, REFERENCE, Reference, load_arrays, read_reference

MANIFEST = "manifest.json"
#: Relative error is reported against the reference's largest magnitude (element-wise relative error
#: is meaningless for outputs near zero); informative, not a pass criterion.
_EPS = 1e-12
#: At most this many device output arrays are read (a sanity bound against a folder of junk).
MAX_OUTPUT_FILES = 1 << 14


# --------------------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for one (runtime, mode, dtype): every output within ``atol`` of the reference and
    at cosine >= ``min_cosine``; top-1 agreement >= ``min_top1`` where set."""

    atol: float
    min_cosine: float
    reason: str
    min_top1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: fp32 ONNX Runtime vs eager PyTorch: same math, other kernels and summation order; measured
#: differences are ~1e-6 on ViT logits, so 1e-4 leaves room for deeper models without hiding a wrong
#: weight (one perturbed weight moves the toy logits by ~1e-1).
ATOL_FP32 = 1e-4
#: A direction check that does not depend on the output's scale (a wrong weight drops it far below).
MIN_COSINE = 0.99999
#: XNNPACK fp32 GEMMs block and fuse differently (and may use FMA where PyTorch does not): ~1e-4
#: measured on ViT logits, hence 1e-3.
ATOL_XNNPACK_FP32 = 1e-3
MIN_COSINE_XNNPACK = 0.9999
#: fp16 has an 11-bit significand: ~5e-4 relative per op, compounding over a network's depth.
ATOL_FP16 = 5e-2
MIN_COSINE_FP16 = 0.999

_ORT = "fp32 ONNX Runtime vs eager PyTorch: other kernels and summation order (~1e-6 measured on ViT logits)"
_ET = "ExecuTorch fp32 (XNNPACK where delegated): other GEMM blocking, fused ops, FMA (~1e-4 measured on ViT logits)"
_ET_PORTABLE = ("ExecuTorch fp32 portable kernels (no delegate): plain loops, other summation order than PyTorch's "
                "BLAS (~1e-6 on ViT logits), so the ONNX Runtime fp32 bound holds")
_FP16 = "fp16 activations or weights: 11-bit significand, ~5e-4 relative per op compounding with depth"

#: (runtime, mode, dtype) -> Tolerance. ``mode`` "*" applies to every mode of that runtime and dtype; a
#: runtime "<runtime>-<recipe>" (e.g. "executorch-portable") applies to bundles of that recipe first.
TOLERANCES: dict[tuple[str, str, str], Tolerance] = {
    ("onnxruntime", "dense", "float32"): Tolerance(ATOL_FP32, MIN_COSINE, _ORT + "; weights folded by PyTorch"),
    ("onnxruntime", "factored", "float32"): Tolerance(
        ATOL_FP32, MIN_COSINE, _ORT + "; W = B @ G(A) built by ORT at load, rounding like PyTorch's to ~1e-7"),
    ("onnxruntime", "swappable", "float32"): Tolerance(
        ATOL_FP32, MIN_COSINE, _ORT + "; W built by the fold graph once per task switch"),
    ("onnxruntime", "*", "float16"): Tolerance(ATOL_FP16, MIN_COSINE_FP16, _FP16, min_top1=0.99),
    ("executorch", "dense", "float32"): Tolerance(ATOL_XNNPACK_FP32, MIN_COSINE_XNNPACK, _ET + "; weights folded"),
    ("executorch", "factored", "float32"): Tolerance(
        ATOL_XNNPACK_FP32, MIN_COSINE_XNNPACK, _ET + "; W built in the program from bases and mixers"),
    ("executorch", "swappable", "float32"): Tolerance(
        ATOL_XNNPACK_FP32, MIN_COSINE_XNNPACK, _ET + "; W built by the set_task method into a shared buffer"),
    ("executorch", "*", "float32"): Tolerance(ATOL_XNNPACK_FP32, MIN_COSINE_XNNPACK, _ET),
    ("executorch-portable", "*", "float32"): Tolerance(ATOL_FP32, MIN_COSINE, _ET_PORTABLE),
    ("executorch", "*", "float16"): Tolerance(ATOL_FP16, MIN_COSINE_FP16, _FP16, min_top1=0.99),
}


def tolerance_for(runtime: str, mode: str, dtype: str = "float32", recipe: str | None = None) -> Tolerance:
    """The named tolerance of (runtime, mode, dtype) (of ``runtime-recipe`` first, when a bundle records a
    recipe); a ``ConfigError`` when the table has none."""
    keys = [(f"{runtime}-{recipe}", mode, dtype), (f"{runtime}-{recipe}", "*", dtype)] if recipe else []
    for key in keys + [(runtime, mode, dtype), (runtime, "*", dtype)]:
        if key in TOLERANCES:
            return TOLERANCES[key]
    known = sorted({f"{r}/{m}/{d}" for r, m, d in TOLERANCES})
    raise ConfigError(f"no parity tolerance for runtime {runtime!r}, mode {mode!r}, dtype {dtype!r}; known: {known}. "
                      "Pass atol= (and min_cosine=) explicitly.")


# --------------------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class Comparison:
    """One output of one case of one task against its reference."""

    task: str
    case: int
    output: str
    shape: list
    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    passed: bool
    problem: str = ""
    dtype: str = ""
    ref_dtype: str = ""
    fault: str = ""  # a short tag of the diagnosed fault: dtype, shape, reordered, wrong-task, numeric, non-finite


@dataclass(frozen=True)
class Failure:
    """A check that failed before any output could be compared (a refused file, a missing output)."""

    task: str
    stage: str  # load | set_task | run | outputs
    error: str  # the typed error's class name, or "missing" / "unexpected"
    message: str


def compare(got: np.ndarray, ref: np.ndarray, *, task: str, case: int, output: str, atol: float = ATOL_FP32,
            min_cosine: float = MIN_COSINE, min_top1: float | None = None, dtype: str | None = None) -> Comparison:
    """One output against its reference (float64 arithmetic). ``dtype``: the dtype the artifact must
    produce (default: the reference's own)."""
    got, ref = np.asarray(got), np.asarray(ref)
    want = dtype or ref.dtype.name
    shape = list(got.shape)
    if tuple(got.shape) != tuple(ref.shape):
        return Comparison(task, case, output, shape, float("inf"), float("inf"), 0.0, None, False,
                          f"shape {shape} != reference {list(ref.shape)}", got.dtype.name, want, "shape")
    if got.dtype.kind not in "fiub":
        return Comparison(task, case, output, shape, float("inf"), float("inf"), 0.0, None, False,
                          f"dtype {got.dtype.name} != reference {want} (not numeric)", got.dtype.name, want, "dtype")
    g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    if not np.isfinite(g).all():
        bad = int((~np.isfinite(g)).sum())
        return Comparison(task, case, output, shape, float("inf"), float("inf"), 0.0, None, False,
                          f"{bad} non-finite values (NaN/inf)", got.dtype.name, want, "non-finite")
    diff = np.abs(g - r)
    max_abs = float(diff.max(initial=0.0))
    max_rel = max_abs / max(float(np.abs(r).max(initial=0.0)), _EPS)
    denom = float(np.linalg.norm(g) * np.linalg.norm(r))
    cosine = float(g @ r / denom) if denom > 0 else float(np.array_equal(g, r))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean()) if got.ndim >= 2 and got.size else None
    problems, fault = [], ""
    if got.dtype.name != want:
        problems.append(f"dtype {got.dtype.name} != reference {want}")
        fault = "dtype"
    if max_abs > atol:
        problems.append(f"max abs {max_abs:.3g} > {atol:g}")
    if cosine < min_cosine:
        problems.append(f"cosine {cosine:.7f} < {min_cosine}")
    if min_top1 is not None and top1 is not None and top1 < min_top1:
        problems.append(f"top-1 agreement {top1:.3f} < {min_top1}")
    if problems and not fault:
        fault = "numeric"
    return Comparison(task, case, output, shape, max_abs, max_rel, cosine, top1, not problems, "; ".join(problems),
                      got.dtype.name, want, fault)


def _matches(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> bool:
    c = compare(got, ref, task="", case=0, output="", atol=tol.atol, min_cosine=tol.min_cosine)
    return c.fault in ("", "dtype") and c.max_abs <= tol.atol and c.cosine >= tol.min_cosine


def _diagnose(c: Comparison, got: np.ndarray, ref: Reference, tol: Tolerance) -> Comparison:
    """Name the fault behind a failed comparison: it matches another output's, another case's or another
    task's reference (within the tolerance)."""
    if c.passed or c.fault in ("dtype", "non-finite"):
        return c
    refs = ref.outputs
    for other in ref.output_names:
        if other != c.output and _matches(got, refs[c.task][c.case][other], tol):
            return _with(c, f"outputs reordered: {c.output!r} matches the reference of {other!r}", "reordered")
    for j, case in enumerate(refs[c.task]):
        if j != c.case and _matches(got, case[c.output], tol):
            return _with(c, f"outputs reordered: case {c.case} matches the reference of case {j}", "reordered")
    for task in refs:
        if task != c.task and _matches(got, refs[task][c.case][c.output], tol):
            hint = "the task's mixers were not applied?" if task == DEFAULT_TASK else "wrong task's mixers?"
            return _with(c, f"outputs match task {task!r} rather than {c.task!r} ({hint})", "wrong-task")
    return c


def _with(c: Comparison, diagnosis: str, fault: str) -> Comparison:
    d = asdict(c)
    d.update(problem=f"{diagnosis} [{c.problem}]", fault=fault)
    return Comparison(**d)


# --------------------------------------------------------------------------------------- report
@dataclass
class ParityReport:
    """Every comparison and failure of one parity check. ``passed``: something was compared, and all passed."""

    bundle: str
    atol: float
    min_cosine: float
    comparisons: list[Comparison] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    runtime: str = ""
    mode: str = ""
    source: str = "runtime"  # "runtime": run here; "outputs": arrays produced elsewhere
    outputs_path: str = ""
    tolerance: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    threads: int | None = None
    bundle_format: str = ""
    #: output name -> [(task, case, |got - ref| flattened)], for the error-distribution plot.
    diffs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and not self.failures and all(c.passed for c in self.comparisons)

    @property
    def worst(self) -> Comparison | None:
        failed = [c for c in self.comparisons if not c.passed]
        pool = failed or self.comparisons
        return max(pool, key=lambda c: (bool(c.problem), c.max_abs)) if pool else None

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.comparisons), default=float("nan"))

    def problems(self) -> list[str]:
        """One line per failure and failed comparison, naming the fault."""
        out = [f"task {f.task!r}: {f.stage}: {f.error}: {f.message}" for f in self.failures]
        out += [f"task {c.task!r}, case {c.case}, output {c.output!r}: {c.problem}" for c in self.comparisons if not c.passed]
        return out

    def summary(self) -> str:
        """One line: PASS/FAIL, what was checked, the worst error, the first problem."""
        n, bad = len(self.comparisons), sum(not c.passed for c in self.comparisons) + len(self.failures)
        head = "PASS" if self.passed else "FAIL"
        where = f"{self.runtime or '?'} {self.mode or ''}".strip()
        line = (f"{head} {self.bundle} ({where}, {self.source}): {n} outputs compared over {len(self.tasks)} task(s), "
                f"{bad} problem(s); max abs {self.max_abs:.2e} (atol {self.atol:g}, min cosine {self.min_cosine})")
        if not self.comparisons and not self.failures:
            line += "; nothing was compared"
        probs = self.problems()
        return line + (f"\n  first problem: {probs[0]}" if probs else "")

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "atol": self.atol, "min_cosine": self.min_cosine, "passed": self.passed,
                "max_abs": self.max_abs, "comparisons": [asdict(c) for c in self.comparisons],
                "failures": [asdict(f) for f in self.failures]}

    def format(self) -> str:
        lines = [f"{'task':<12} {'case':>4} {'output':<10} {'shape':<12} {'max abs':>9} {'max rel':>9} {'cosine':>10} {'top-1':>6}"]
        for c in self.comparisons:
            top1 = "-" if c.top1 is None else f"{100 * c.top1:.0f}%"
            lines.append(f"{c.task:<12} {c.case:>4} {c.output:<10} {'x'.join(map(str, c.shape)):<12} {c.max_abs:>9.2e} "
                         f"{c.max_rel:>9.2e} {c.cosine:>10.7f} {top1:>6}{'' if c.passed else '  FAIL ' + c.problem}")
        lines += [f"FAIL task {f.task!r} ({f.stage}): {f.error}: {f.message}" for f in self.failures]
        return "\n".join(lines)

    def raise_if_failed(self, what: str | None = None) -> ParityReport:
        """Raise ``ParityError`` (carrying this report) naming the first problem, unless it passed."""
        if self.passed:
            return self
        if what is None:
            refused = self.failures and self.failures[0].stage == "load"
            what = "the bundle cannot be loaded" if refused else "the artifact's outputs differ from PyTorch"
        probs = self.problems() or ["nothing was compared (no reference cases?)"]
        w = self.worst
        worst = "" if w is None else f" (max abs {w.max_abs:.3g}, cosine {w.cosine:.7f})"
        raise ParityError(f"{self.bundle}: {what}: {probs[0]}{worst}"
                          + (f"; and {len(probs) - 1} more problem(s)" if len(probs) > 1 else "")
                          + "\n" + self.format(), self)


# --------------------------------------------------------------------------------------- runtimes
#: manifest ``format`` -> (runtime name, module under crisp_edge.export, loader function). Imported
#: lazily: an ExecuTorch bundle needs executorch only when it is checked.
RUNTIMES: dict[str, tuple[str, str, str]] = {
    "crisp-edge/onnx-bundle": ("onnxruntime", "bundle", "load_bundle"),
    "crisp-edge/executorch-bundle": ("executorch", "et_bundle", "load_et_bundle"),
}


def bundle_runtime(path: str | os.PathLike) -> tuple[str, Callable[..., Any]]:
    """(runtime name, loader) for the bundle folder at ``path``, from its manifest's ``format``."""
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle folder (no such directory).")
    meta = read_json(folder / MANIFEST, BundleError, "bundle manifest")
    fmt = meta.get("format")
    if fmt not in RUNTIMES:
        raise BundleError(f"{folder / MANIFEST}: format {fmt!r:.80} is not a crisp-edge bundle format; parity knows "
                          f"{sorted(RUNTIMES)}.")
    runtime, module, func = RUNTIMES[fmt]
    try:
        mod = importlib.import_module(f"{__package__}.{module}")
    except ImportError as e:
        raise BundleError(f"{folder}: a {fmt!r} bundle needs crisp_edge.export.{module} and its runtime, which cannot "
                          f"be imported here ({type(e).__name__}: {e}); install the runtime's requirements.") from None
    return runtime, getattr(mod, func)


def open_bundle(bundle: Any) -> tuple[str, Any]:
    """(runtime name, loaded bundle) for a bundle object or a bundle folder path."""
    if isinstance(bundle, (str, os.PathLike)):
        runtime, load = bundle_runtime(bundle)
        return runtime, load(bundle)
    fmt = bundle.manifest.get("format")
    if fmt not in RUNTIMES:
        raise BundleError(f"{bundle.path}: format {fmt!r:.80} is not a bundle format parity knows ({sorted(RUNTIMES)}).")
    return RUNTIMES[fmt][0], bundle


def _expected_dtypes(manifest: dict) -> dict[str, str]:
    outs = manifest.get("outputs")
    if not isinstance(outs, list):
        return {}
    return {o["name"]: o["dtype"] for o in outs if isinstance(o, dict) and isinstance(o.get("dtype"), str)
            and isinstance(o.get("name"), str)}


def _new_report(bundle: Any, runtime: str, *, source: str, atol: float | None, min_cosine: float | None,
                ref: Reference | None) -> tuple[ParityReport, Tolerance]:
    m = bundle.manifest
    mode = str(m.get("mode", ""))
    dtypes = set(_expected_dtypes(m).values()) or {"float32"}
    dtype = "float16" if "float16" in dtypes else "float32"
    try:
        tol = tolerance_for(runtime, mode, dtype, recipe=m.get("recipe") if isinstance(m.get("recipe"), str) else None)
    except ConfigError:
        t = m.get("tolerance", {})
        tol = Tolerance(float(t.get("atol", ATOL_FP32)), float(t.get("min_cosine", MIN_COSINE)),
                        "the bundle manifest's own tolerance (no table entry for this runtime/mode/dtype)")
    if atol is not None or min_cosine is not None:
        tol = Tolerance(tol.atol if atol is None else float(atol), tol.min_cosine if min_cosine is None else float(min_cosine),
                        "set by the caller", tol.min_top1)
    report = ParityReport(str(bundle.path), tol.atol, tol.min_cosine, runtime=runtime, mode=mode, source=source,
                          bundle_format=str(m.get("format", "")),
                          tolerance={**tol.to_dict(), "runtime": runtime, "mode": mode, "dtype": dtype,
                                     "recipe": m.get("recipe")},
                          reference={} if ref is None else {k: ref.record.get(k) for k in (
                              "device", "dtype", "cases", "batch_sizes", "seed", "recomputed") if k in ref.record})
    return report, tol


def _compare_case(report: ParityReport, tol: Tolerance, ref: Reference, task: str, case: int,
                  got: dict[str, np.ndarray], dtypes: dict[str, str]) -> None:
    for name in ref.output_names:
        if name not in got:
            report.failures.append(Failure(task, "outputs", "missing", f"case {case}: output {name!r} was not produced "
                                           f"(the artifact returns {sorted(got)})"))
            continue
        want = ref.outputs[task][case][name]
        c = compare(got[name], want, task=task, case=case, output=name, atol=tol.atol, min_cosine=tol.min_cosine,
                    min_top1=tol.min_top1, dtype=dtypes.get(name))
        report.comparisons.append(_diagnose(c, np.asarray(got[name]), ref, tol))
        g = np.asarray(got[name])
        if g.shape == want.shape and g.dtype.kind in "fiub":
            diff = np.abs(g.astype(np.float64) - want.astype(np.float64)).ravel()
            report.diffs.setdefault(name, []).append((task, case, diff))
    for name in sorted(set(got) - set(ref.output_names)):
        report.failures.append(Failure(task, "outputs", "unexpected", f"case {case}: output {name!r} is not in the "
                                       f"reference ({ref.output_names})"))


def _select_tasks(ref: Reference, tasks: Iterable[str] | None) -> list[str]:
    if tasks is None:
        return ref.tasks
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in ref.outputs]
    if unknown:
        raise ConfigError(f"no reference outputs for task(s) {unknown}; the bundle has {ref.tasks}.")
    return tasks


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="parity", unit="case", leave=False)


def check_bundle(bundle: Any, *, threads: int = 1, tasks: Iterable[str] | None = None, atol: float | None = None,
                 min_cosine: float | None = None, raise_on_failure: bool = False, raise_errors: bool = False,
                 progress: bool = False, session_kwargs: dict | None = None,
                 reference: Reference | None = None) -> ParityReport:
    """Run ``bundle`` (a folder or a loaded bundle of any runtime in ``RUNTIMES``) on its stored
    inputs and compare every output of every case of every task (or of ``tasks``) with the reference.

    Files the loader refuses (damaged, edited, an adapter for other bases) become failures in the
    report, each naming the loader's typed error (with ``raise_errors`` the typed error propagates
    instead). With ``raise_on_failure`` a failed check raises ``ParityError`` (carrying the report)
    instead of returning it. ``reference``: compare with this reference (``recompute_reference``:
    the model run again, e.g. in float64 or on the GPU) instead of the one stored in the bundle.
    """
    path = str(getattr(bundle, "path", bundle))
    report = ParityReport(path, float("nan"), float("nan"), source="runtime", threads=threads)

    def failed(task: str, stage: str, e: Exception, prefix: str = "") -> None:
        if raise_errors:
            raise e
        report.failures.append(Failure(task, stage, type(e).__name__, prefix + str(e)))

    def done() -> ParityReport:
        return report.raise_if_failed() if raise_on_failure else report

    try:
        runtime, b = open_bundle(bundle)
    except CrispEdgeError as e:
        failed("*", "load", e)
        return done()
    try:
        ref = reference if reference is not None else read_reference(b.path, b.manifest.get("reference"))
    except CrispEdgeError as e:
        report, _ = _new_report(b, runtime, source="runtime", atol=atol, min_cosine=min_cosine, ref=None)
        failed("*", "load", e)
        return done()
    report, tol = _new_report(b, runtime, source="runtime", atol=atol, min_cosine=min_cosine, ref=ref)
    report.threads = threads
    selected = _select_tasks(ref, tasks)
    report.tasks = list(selected)
    dtypes = _expected_dtypes(b.manifest)
    t0 = time.perf_counter()
    try:
        sess = b.session(threads=threads, **(session_kwargs or {}))
    except CrispEdgeError as e:
        failed("*", "load", e)
        return done()
    report.timings["load_s"] = time.perf_counter() - t0
    names = list(sess.output_names)
    if names != ref.output_names:
        report.failures.append(Failure("*", "load", "OutputNames", f"the artifact's outputs are {names}; the reference "
                                       f"names {ref.output_names}"))
    bar = _bar(len(selected) * len(ref.inputs), progress)
    run_s = switch_s = 0.0
    for task in selected:
        if sess.swappable:
            t0 = time.perf_counter()
            try:
                sess.set_task(task)
            except CrispEdgeError as e:
                failed(task, "set_task", e)
                bar.update(len(ref.inputs))
                continue
            switch_s += time.perf_counter() - t0
        elif task != DEFAULT_TASK:
            report.failures.append(Failure(task, "set_task", "NotSwappable", f"a {report.mode!r} bundle has one fixed "
                                           "set of weights, but the reference has outputs for this task"))
            bar.update(len(ref.inputs))
            continue
        for i, feeds in enumerate(ref.inputs):
            t0 = time.perf_counter()
            try:
                got = sess.run(feeds)
            except CrispEdgeError as e:
                failed(task, "run", e, f"case {i}: ")
                continue
            finally:
                bar.update(1)
            run_s += time.perf_counter() - t0
            _compare_case(report, tol, ref, task, i, got, dtypes)
    bar.close()
    report.timings.update(run_s=run_s, set_task_s=switch_s)
    return done()


def load_device_outputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays keyed ``output.{task}.{i}.{name}`` from an ``.npz`` or a folder of ``<key>.npy`` files
    (never unpickled: ``allow_pickle=False``); a ``BundleError`` naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npy")
        if not files:
            raise BundleError(f"{path} holds no .npy files; device outputs are <key>.npy files keyed "
                              "output.{task}.{i}.{name}, or one .npz.")
        if len(files) > MAX_OUTPUT_FILES:
            raise BundleError(f"{path} holds {len(files)} .npy files, more than any reference ({MAX_OUTPUT_FILES}).")
        out = {}
        for p in files:
            try:
                out[p.stem] = np.load(p, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise BundleError(f"{p} is not a readable .npy array ({type(e).__name__}: {str(e)[:200]}); it must be "
                                  "a plain numeric array (no pickled objects).") from None
        return out
    if not path.exists():
        raise BundleError(f"device outputs {path} do not exist (expected an .npz or a folder of .npy files).")
    return load_arrays(path, BundleError, "device outputs file (.npz)")


def check_outputs(bundle: Any, outputs: str | os.PathLike | dict[str, np.ndarray], *,
                  tasks: Iterable[str] | None = None, atol: float | None = None, min_cosine: float | None = None,
                  runtime: str | None = None, raise_on_failure: bool = False) -> ParityReport:
    """Compare outputs produced elsewhere (keyed ``output.{task}.{i}.{name}``) with the bundle's reference.

    Every task present in ``outputs`` (or every task of ``tasks``) must have every case and output;
    a key the reference does not know is a failure (a misnamed output). ``runtime`` overrides which
    runtime's tolerance applies (default: the bundle's).
    """
    path = str(getattr(bundle, "path", bundle))
    try:
        rt, b = open_bundle(bundle)
        ref = read_reference(b.path, b.manifest.get("reference"))
    except CrispEdgeError as e:
        report = ParityReport(path, float("nan"), float("nan"), source="outputs")
        report.failures.append(Failure("*", "load", type(e).__name__, str(e)))
        return report.raise_if_failed() if raise_on_failure else report
    report, tol = _new_report(b, runtime or rt, source="outputs", atol=atol, min_cosine=min_cosine, ref=ref)
    try:
        arrays = outputs if isinstance(outputs, dict) else load_device_outputs(outputs)
    except CrispEdgeError as e:
        report.failures.append(Failure("*", "outputs", type(e).__name__, str(e)))
        return report.raise_if_failed() if raise_on_failure else report
    report.outputs_path = "" if isinstance(outputs, dict) else str(outputs)
    keys = {f"output.{t}.{i}.{n}": (t, i, n) for t in ref.tasks for i in range(len(ref.inputs)) for n in ref.output_names}
    present = [t for t in ref.tasks if any(k in arrays for k, (tt, _, _) in keys.items() if tt == t)]
    selected = _select_tasks(ref, tasks) if tasks is not None else present
    report.tasks = list(selected)
    if not selected:
        report.failures.append(Failure("*", "outputs", "missing", f"no array is keyed output.{{task}}.{{i}}.{{name}} "
                                       f"for the reference's tasks {ref.tasks}, cases 0..{len(ref.inputs) - 1} and "
                                       f"outputs {ref.output_names}; found {sorted(arrays)[:10]}"))
    dtypes = _expected_dtypes(b.manifest)
    for task in selected:
        for i in range(len(ref.inputs)):
            got = {n: arrays[f"output.{task}.{i}.{n}"] for n in ref.output_names if f"output.{task}.{i}.{n}" in arrays}
            _compare_case(report, tol, ref, task, i, got, dtypes)
    for k in sorted(set(arrays) - set(keys)):
        report.failures.append(Failure("*", "outputs", "unexpected", f"array {k!r} is not in the reference (keys are "
                                       f"output.{{task}}.{{i}}.{{name}} for tasks {ref.tasks} and outputs "
                                       f"{ref.output_names})"))
    return report.raise_if_failed() if raise_on_failure else report


def recompute_reference(bundle: Any, model: Any, mixers: Iterable[Any] = (), *, device: str = "auto",
                        dtype: str = "float32") -> Reference:
    """The bundle's reference made again from ``model`` (the CRISP model it was exported from) on the
    bundle's stored inputs: on ``device`` ("auto": CUDA when present) in ``dtype`` ("float64" for a
    tighter reference). Tasks: ``default`` (the model as given) and one per mixer file in ``mixers``
    (applied to a copy; named by the file's task). Pass it to ``check_bundle(reference=...)``."""
    import copy

    import torch

    from crisp_edge.mixers import MixerFile, apply_mixers_, read_mixers

    from .reference import reference_outputs, resolve_reference

    where = resolve_reference(device, dtype)
    _, b = open_bundle(bundle)
    stored = read_reference(b.path, b.manifest.get("reference"))
    cases = [{n: torch.from_numpy(np.array(v)) for n, v in c.items()} for c in stored.inputs]
    run = dict(output_names=stored.output_names, **where)
    outs = {DEFAULT_TASK: reference_outputs(model, cases, **run)}
    for mf in mixers:
        mf = mf if isinstance(mf, MixerFile) else read_mixers(mf)
        task_model = copy.deepcopy(model)
        apply_mixers_(task_model, mf)
        outs[mf.task] = reference_outputs(task_model, cases, **run)
    return Reference(stored.inputs, outs, {**stored.record, "tasks": list(outs), **where, "recomputed": True})


def run_outputs(bundle: Any, *, threads: int = 1, tasks: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``bundle`` in its runtime on the stored inputs and return the outputs keyed
    ``output.{task}.{i}.{name}`` (what a device run must write for ``check_outputs``)."""
    _, b = open_bundle(bundle)
    ref = read_reference(b.path, b.manifest.get("reference"))
    sess = b.session(threads=threads)
    out = {}
    for task in _select_tasks(ref, tasks):
        if sess.swappable:
            sess.set_task(task)
        elif task != DEFAULT_TASK:
            continue
        for i, feeds in enumerate(ref.inputs):
            for n, v in sess.run(feeds).items():
                out[f"output.{task}.{i}.{n}"] = np.asarray(v)
    return out


__all__ = ["ATOL_FP32", "MIN_COSINE", "REFERENCE", "RUNTIMES", "TOLERANCES", "Comparison", "Failure", "ParityReport",
           "Tolerance", "bundle_runtime", "check_bundle", "check_outputs", "compare", "load_device_outputs",
           "open_bundle", "recompute_reference", "run_outputs", "tolerance_for"]

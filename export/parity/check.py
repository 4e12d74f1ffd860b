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

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from crisp_edge.export.bundle import bundle_runtime, open_bundle
from crisp_edge.export.errors import BundleError
from crisp_edge.export.parity.compare import (
    ATOL_FP32,
    MIN_COSINE,
    Failure,
    ParityReport,
    Tolerance,
    _diagnose,
    compare,
    tolerance_for,
)
from crisp_edge.export.parity.lm_check import case_tolerance, check_lm_generation, lm_tolerance, reference_model
from crisp_edge.export.quantize import SCHEMES
from crisp_edge.export.parity.reference import (
    DEFAULT_TASK,
    MAX_REFERENCE_BYTES,
    REFERENCE,
    Reference,
    load_arrays,
    read_bundle_reference,
)

from crisp_edge.errors import ConfigError, CrispEdgeError
from crisp_edge.files.io import check_regular

MANIFEST = "manifest.json"
#: At most this many device output arrays are read (a sanity bound against a folder of junk).
MAX_OUTPUT_FILES = 1 << 14


def _expected_dtypes(manifest: dict) -> dict[str, str]:
    outs = manifest.get("outputs")
    if not isinstance(outs, list):
        return {}
    return {o["name"]: o["dtype"] for o in outs if isinstance(o, dict) and isinstance(o.get("dtype"), str)
            and isinstance(o.get("name"), str)}


def _check_override(atol: Any, min_cosine: Any) -> None:
    """A caller's tolerance: ``atol`` finite and >= 0, ``min_cosine`` finite in [-1, 1]. ``nan`` must never
    pass: every comparison with it is False, so a failing bundle would be reported as passing."""
    import math

    def bad(v: Any, lo: float, hi: float) -> bool:
        return v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not lo <= v <= hi)

    if bad(atol, 0.0, math.inf) or bad(min_cosine, -1.0, 1.0):
        raise ConfigError(f"tolerance override atol={atol!r} min_cosine={min_cosine!r}: atol must be a finite number "
                          ">= 0 and min_cosine a finite number in [-1, 1].")


def _new_report(bundle: Any, runtime: str, *, source: str, atol: float | None, min_cosine: float | None,
                ref: Reference | None) -> tuple[ParityReport, Tolerance]:
    m = bundle.manifest
    mode = str(m.get("mode", ""))
    dtypes = set(_expected_dtypes(m).values()) or {"float32"}
    dtype = "float16" if "float16" in dtypes else "float32"
    quant = m.get("quantize")
    if isinstance(quant, dict) and quant.get("scheme") in SCHEMES:  # weights quantized: the scheme's tolerance
        dtype = SCHEMES[quant["scheme"]]["dtype"]
    try:
        tol = tolerance_for(runtime, mode, dtype, recipe=m.get("recipe") if isinstance(m.get("recipe"), str) else None)
    except ConfigError:
        t = m.get("tolerance", {})
        tol = Tolerance(float(t.get("atol", ATOL_FP32)), float(t.get("min_cosine", MIN_COSINE)),
                        "the bundle manifest's own tolerance (no table entry for this runtime/mode/dtype)")
    if "lm" in m:  # a language model: the runtime's LM entry, when the table has one
        tol = lm_tolerance(runtime, mode, tol, dtype)
    if atol is not None or min_cosine is not None:
        _check_override(atol, min_cosine)
        tol = Tolerance(tol.atol if atol is None else float(atol), tol.min_cosine if min_cosine is None else float(min_cosine),
                        "set by the caller", tol.min_top1)
    report = ParityReport(str(bundle.path), tol.atol, tol.min_cosine, runtime=runtime, mode=mode, source=source,
                          bundle_format=str(m.get("format", "")),
                          tolerance={**tol.to_dict(), "runtime": runtime, "mode": mode, "dtype": dtype,
                                     "recipe": m.get("recipe")},
                          reference={} if ref is None else {k: ref.record.get(k) for k in (
                              "device", "dtype", "cases", "batch_sizes", "seed", "recomputed", "recomputed_tasks") if k in ref.record})
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


def _select_tasks(ref: Reference, tasks: Iterable[str] | None, report: ParityReport | None = None,
                  allow_unchecked: Iterable[str] = ()) -> list[str]:
    """The tasks to compare (those with reference outputs). With ``report``, every selected task that has
    no reference (``ref.unchecked``) is a failure, unless its name is in ``allow_unchecked`` (then it is
    listed in ``report.unchecked`` as skipped)."""
    allowed = list(allow_unchecked)
    stale = [t for t in allowed if t not in ref.unchecked]
    if stale:
        raise ConfigError(f"--allow-unchecked {stale}: not unchecked tasks of this bundle (tasks without a PyTorch "
                          f"reference: {sorted(ref.unchecked) or 'none'}).")
    wanted = list(ref.tasks) + sorted(ref.unchecked) if tasks is None else list(tasks)
    unknown = [t for t in wanted if t not in ref.outputs and t not in ref.unchecked]
    if unknown:
        raise ConfigError(f"no reference outputs for task(s) {unknown}; the bundle has {ref.tasks}.")
    if report is not None:
        for t in wanted:
            if t in ref.unchecked:
                report.unchecked.append({"task": t, "reason": ref.unchecked[t], "allowed": t in allowed})
                if t not in allowed:
                    report.failures.append(Failure(t, "reference", "Unchecked", unchecked_message(t, ref.unchecked[t])))
    return [t for t in wanted if t in ref.outputs]


def unchecked_message(task: str, reason: str) -> str:
    return (f"task {task!r} has no PyTorch reference ({reason}), so its outputs cannot be checked. Add it again "
            f"with `crisp-edge export-task BUNDLE MIXERS --checkpoint CK` (CK: the checkpoint the bundle was exported "
            f"from and the task trained on), or pass --allow-unchecked {task} to skip it knowingly")


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
                 reference: Reference | None = None, allow_unchecked: Iterable[str] = ()) -> ParityReport:
    """Run ``bundle`` (a folder or a loaded bundle of any runtime in ``RUNTIMES``) on its stored
    inputs and compare every output of every case of every task (or of ``tasks``) with the reference.

    Files the loader refuses (damaged, edited, an adapter for other bases) become failures in the
    report, each naming the loader's typed error (with ``raise_errors`` the typed error propagates
    instead). With ``raise_on_failure`` a failed check raises ``ParityError`` (carrying the report)
    instead of returning it. ``reference``: compare with this reference (``recompute_reference``:
    the model run again, e.g. in float64 or on the GPU) instead of the one stored in the bundle.
    A task of the bundle without a PyTorch reference (added with no checkpoint to compute one) is a
    failure unless named in ``allow_unchecked``.
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
        ref = reference if reference is not None else read_bundle_reference(b.path, b.manifest)
    except CrispEdgeError as e:
        report, _ = _new_report(b, runtime, source="runtime", atol=atol, min_cosine=min_cosine, ref=None)
        failed("*", "load", e)
        return done()
    report, tol = _new_report(b, runtime, source="runtime", atol=atol, min_cosine=min_cosine, ref=ref)
    case_tol = case_tolerance(tol, b.manifest)
    report.threads = threads
    selected = _select_tasks(ref, tasks, report, allow_unchecked)
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
            _compare_case(report, case_tol, ref, task, i, got, dtypes)
    bar.close()
    report.timings.update(run_s=run_s, set_task_s=switch_s)
    if "lm" in b.manifest:  # a language model: generation parity too, for every task
        check_lm_generation(report, sess, tol, tasks, failed)
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
            check_regular(p, BundleError, "device output", MAX_REFERENCE_BYTES)
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
                  runtime: str | None = None, raise_on_failure: bool = False,
                  allow_unchecked: Iterable[str] = ()) -> ParityReport:
    """Compare outputs produced elsewhere (keyed ``output.{task}.{i}.{name}``) with the bundle's reference.

    Every task present in ``outputs`` (or every task of ``tasks``) must have every case and output;
    a key the reference does not know is a failure (a misnamed output), and outputs of a task without a
    PyTorch reference are a failure unless it is named in ``allow_unchecked``. ``runtime`` overrides
    which runtime's tolerance applies (default: the bundle's).
    """
    path = str(getattr(bundle, "path", bundle))
    try:
        rt, b = open_bundle(bundle)
        ref = read_bundle_reference(b.path, b.manifest)
    except CrispEdgeError as e:
        report = ParityReport(path, float("nan"), float("nan"), source="outputs")
        report.failures.append(Failure("*", "load", type(e).__name__, str(e)))
        return report.raise_if_failed() if raise_on_failure else report
    report, tol = _new_report(b, runtime or rt, source="outputs", atol=atol, min_cosine=min_cosine, ref=ref)
    case_tol = case_tolerance(tol, b.manifest)
    try:
        arrays = outputs if isinstance(outputs, dict) else load_device_outputs(outputs)
    except CrispEdgeError as e:
        report.failures.append(Failure("*", "outputs", type(e).__name__, str(e)))
        return report.raise_if_failed() if raise_on_failure else report
    report.outputs_path = "" if isinstance(outputs, dict) else str(outputs)
    keys = {f"output.{t}.{i}.{n}": (t, i, n) for t in ref.tasks for i in range(len(ref.inputs)) for n in ref.output_names}
    present = [t for t in ref.tasks if any(k in arrays for k, (tt, _, _) in keys.items() if tt == t)]
    present += [t for t in sorted(ref.unchecked) if any(k.startswith(f"output.{t}.") for k in arrays)]
    selected = _select_tasks(ref, tasks if tasks is not None else present, report, allow_unchecked)
    skipped = tuple(f"output.{t}." for t in ref.unchecked)
    report.tasks = list(selected)
    if not selected:
        report.failures.append(Failure("*", "outputs", "missing", f"no array is keyed output.{{task}}.{{i}}.{{name}} "
                                       f"for the reference's tasks {ref.tasks}, cases 0..{len(ref.inputs) - 1} and "
                                       f"outputs {ref.output_names}; found {sorted(arrays)[:10]}"))
    dtypes = _expected_dtypes(b.manifest)
    for task in selected:
        for i in range(len(ref.inputs)):
            got = {n: arrays[f"output.{task}.{i}.{n}"] for n in ref.output_names if f"output.{task}.{i}.{n}" in arrays}
            _compare_case(report, case_tol, ref, task, i, got, dtypes)
    for k in sorted(k for k in set(arrays) - set(keys) if not k.startswith(skipped)):
        report.failures.append(Failure("*", "outputs", "unexpected", f"array {k!r} is not in the reference (keys are "
                                       f"output.{{task}}.{{i}}.{{name}} for tasks {ref.tasks} and outputs "
                                       f"{ref.output_names})"))
    return report.raise_if_failed() if raise_on_failure else report


def recompute_reference(bundle: Any, model: Any, mixers: Iterable[Any] = (), *, device: str = "auto",
                        dtype: str = "float32") -> Reference:
    """The bundle's reference made again from ``model`` (the CRISP model it was exported from) on the
    bundle's stored inputs: on ``device`` ("auto": CUDA when present) in ``dtype`` ("float64" for a
    tighter reference). Tasks: ``default`` (the model as given) and one per mixer file in ``mixers``
    (applied to a copy; named by the file's task). The bundle's other tasks keep their stored reference
    (``record["recomputed_tasks"]`` names the recomputed ones), so none goes unchecked. Pass it to
    ``check_bundle(reference=...)``."""
    import copy

    import torch
    from crisp_edge.export.parity.reference import reference_outputs, resolve_reference

    from crisp_edge.files.mixers import MixerFile, apply_mixers_, read_mixers

    where = resolve_reference(device, dtype)
    _, b = open_bundle(bundle)
    stored = read_bundle_reference(b.path, b.manifest)
    cases = [{n: torch.from_numpy(np.array(v)) for n, v in c.items()} for c in stored.inputs]
    run = dict(output_names=stored.output_names, **where)
    outs = {DEFAULT_TASK: reference_outputs(reference_model(model, b.manifest), cases, **run)}
    unchecked = dict(stored.unchecked)
    for mf in mixers:
        mf = mf if isinstance(mf, MixerFile) else read_mixers(mf)
        task_model = copy.deepcopy(model)
        apply_mixers_(task_model, mf)
        outs[mf.task] = reference_outputs(reference_model(task_model, b.manifest), cases, **run)
        unchecked.pop(mf.task, None)
    recomputed = list(outs)
    # the bundle's other tasks keep their stored reference (still PyTorch's): none is silently left out
    outs.update({t: v for t, v in stored.outputs.items() if t not in outs})
    return Reference(stored.inputs, outs, {**stored.record, "tasks": list(outs), **where, "recomputed": True,
                                           "recomputed_tasks": recomputed}, unchecked)


def run_outputs(bundle: Any, *, threads: int = 1, tasks: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``bundle`` in its runtime on the stored inputs and return the outputs keyed
    ``output.{task}.{i}.{name}`` (what a device run must write for ``check_outputs``)."""
    _, b = open_bundle(bundle)
    ref = read_bundle_reference(b.path, b.manifest)
    sess = b.session(threads=threads)
    out = {}
    wanted = list(ref.tasks) + sorted(ref.unchecked) if tasks is None else list(tasks)
    for task in wanted:
        if sess.swappable:
            sess.set_task(task)
        elif task != DEFAULT_TASK:
            continue
        for i, feeds in enumerate(ref.inputs):
            for n, v in sess.run(feeds).items():
                out[f"output.{task}.{i}.{n}"] = np.asarray(v)
    return out


__all__ = ["ATOL_FP32", "MIN_COSINE", "REFERENCE", "Failure", "ParityReport",
           "Tolerance", "bundle_runtime", "check_bundle", "check_outputs", "compare", "load_device_outputs",
           "open_bundle", "recompute_reference", "run_outputs", "tolerance_for"]

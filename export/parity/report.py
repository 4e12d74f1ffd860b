"""Parity reports CI can read: a versioned JSON document, a JUnit XML file and a PNG plot.

    write_reports(report, "parity-report/")   # parity.json, parity.junit.xml, parity.png

* JSON (``report_json``): format ``crisp-edge/parity-report``, version ``REPORT_VERSION``; the
  schema is documented field by field in ``docs/parity-report.md``. Non-finite numbers (an
  output with NaNs, a shape mismatch) are written as ``null``: the file is strict JSON.
* JUnit XML (``junit_xml``): one ``<testcase>`` per compared output (task x case x output) and one
  per failure before comparison (a refused file, a missing output), so any CI shows a parity
  check as tests, and a failed one with the fault named in the failure message.
* PNG (``plot_errors``): per output, the distribution of ``|artifact - reference|`` over every
  element of every case, one histogram per task on a log scale, with the tolerance as a line
  (matplotlib's ``Figure`` rendered by Agg: no display, no pyplot state).

Every file is written atomically (``crisp_edge.files.io``): a killed run leaves the previous file or the
new one, never half a report.
"""
from __future__ import annotations

import datetime
import io
import math
import os
import platform
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from crisp_edge.export.parity.compare import ParityReport

from crisp_edge._version import __version__
from crisp_edge.files.io import atomic_write_bytes

REPORT_FORMAT = "crisp-edge/parity-report"
#: Bump on any change a reader could notice (a field removed, renamed or re-typed); adding a field
#: keeps the version. Documented in docs/parity-report.md.
REPORT_VERSION = 1
JSON_NAME, JUNIT_NAME, PLOT_NAME = "parity.json", "parity.junit.xml", "parity.png"
#: The PNG's "Software" text: with the JSON's format and the JUnit suite's name, what marks a file as a
#: report this tool wrote, so a rerun replaces its own reports and never a file it did not write.
PNG_SOFTWARE = "crisp-edge parity"
_MARKS = {"json": REPORT_FORMAT.encode(), "junit": b'name="crisp-edge parity"', "plot": PNG_SOFTWARE.encode()}
#: Errors below this are drawn at this value (exact zeros have no logarithm).
PLOT_FLOOR = 1e-12


def _num(v: Any) -> Any:
    """A JSON-safe number: non-finite floats become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _num(obj)


def _versions() -> dict[str, str]:
    out = {"crisp_edge": __version__, "python": platform.python_version()}
    import importlib.metadata as md

    for mod in ("numpy", "torch", "onnxruntime", "executorch"):
        try:
            out[mod] = md.version(mod)
        except md.PackageNotFoundError:  # not installed: simply not recorded
            continue
    return out


def report_json(report: ParityReport) -> dict[str, Any]:
    """The versioned JSON document of ``report`` (schema: docs/parity-report.md)."""
    comps = report.comparisons
    finite = lambda xs: [x for x in xs if x is not None and math.isfinite(x)]
    top1 = finite([c.top1 for c in comps])
    doc = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "passed": report.passed,
        "bundle": {"path": report.bundle, "format": report.bundle_format or None, "runtime": report.runtime or None,
                   "mode": report.mode or None},
        "source": report.source,
        "outputs_path": report.outputs_path or None,
        "reference": report.reference,
        "tolerance": report.tolerance or {"atol": report.atol, "min_cosine": report.min_cosine},
        "summary": {
            "tasks": list(report.tasks),
            "compared": len(comps),
            "failed_comparisons": sum(not c.passed for c in comps),
            "failures": len(report.failures),
            "max_abs": max(finite([c.max_abs for c in comps]), default=None),
            "max_rel": max(finite([c.max_rel for c in comps]), default=None),
            "min_cosine": min(finite([c.cosine for c in comps]), default=None),
            "min_top1": min(top1, default=None),
            "faults": sorted({c.fault for c in comps if c.fault} | {f.error for f in report.failures}),
        },
        "problems": report.problems(),
        "comparisons": [
            {"task": c.task, "case": c.case, "output": c.output, "shape": c.shape, "dtype": c.dtype,
             "ref_dtype": c.ref_dtype, "max_abs": c.max_abs, "max_rel": c.max_rel, "cosine": c.cosine,
             "top1": c.top1, "passed": c.passed, "fault": c.fault or None, "problem": c.problem or None,
             "inputs": c.inputs}
            for c in comps],
        "unchecked": list(report.unchecked),
        "data": report.data or None,
        "layers": report.layers or None,
        "generation": report.generation or None,
        "failures": [{"task": f.task, "stage": f.stage, "error": f.error, "message": f.message}
                     for f in report.failures],
        "timings": report.timings,
        "environment": {**_versions(), "platform": platform.platform(), "threads": report.threads},
    }
    return _clean(doc)


def junit_xml(report: ParityReport) -> bytes:
    """A JUnit XML document: one test case per compared output and per failure."""
    name = f"crisp-edge parity {Path(report.bundle).name}"
    base = f"parity.{report.runtime or 'unknown'}.{report.mode or 'unknown'}"
    total_time = sum(v for v in report.timings.values() if isinstance(v, (int, float)))
    cases = []
    for c in report.comparisons:
        kind = "data" if c.inputs == "data" else "case"
        tc = ET.Element("testcase", classname=f"{base}.{c.task}", name=f"{kind}{c.case}.{c.output}", time="0")
        detail = (f"shape {c.shape} dtype {c.dtype} (reference {c.ref_dtype}); max abs {c.max_abs:.3g}, max rel "
                  f"{c.max_rel:.3g}, cosine {c.cosine:.7f}, top-1 {c.top1}; atol {report.atol:g}, min cosine "
                  f"{report.min_cosine}")
        if not c.passed:
            f = ET.SubElement(tc, "failure", message=c.problem, type=c.fault or "parity")
            f.text = detail
        else:
            ET.SubElement(tc, "system-out").text = detail
        cases.append(tc)
    for f in report.failures:
        tc = ET.Element("testcase", classname=f"{base}.{f.task}", name=f"{f.stage}", time="0")
        ET.SubElement(tc, "error", message=f"{f.error}: {f.message[:500]}", type=f.error).text = f.message
        cases.append(tc)
    if report.layers.get("available"):
        first = report.layers.get("first_over")
        tc = ET.Element("testcase", classname=f"{base}.{report.layers['task']}", name="per-layer", time="0")
        lines = "\n".join(f"{r['layer']}: max abs {r['max_abs']}, cosine {r['cosine']}, limit {r['limit']}"
                           + (" OVER" if r["over"] else "") for r in report.layers["layers"])
        if first:
            msg = (f"diverged first at layer {first['layer']!r} ({first['kind']}): "
                   + (first["problem"] or f"max abs {first['max_abs']:.3g} > {first['limit']:.3g}"))
            ET.SubElement(tc, "failure", message=msg, type="layer").text = lines
        else:
            ET.SubElement(tc, "system-out").text = lines
        cases.append(tc)
    if not cases:
        tc = ET.Element("testcase", classname=base, name="parity", time="0")
        ET.SubElement(tc, "failure", message="nothing was compared", type="empty").text = (
            "the reference holds no cases or tasks to compare")
        cases.append(tc)
    failures = sum(1 for tc in cases if tc.find("failure") is not None)
    errors = sum(1 for tc in cases if tc.find("error") is not None)
    suite = ET.Element("testsuite", name=name, tests=str(len(cases)), failures=str(failures), errors=str(errors),
                       skipped="0", time=f"{total_time:.3f}")
    props = ET.SubElement(suite, "properties")
    for k, v in (("bundle", report.bundle), ("runtime", report.runtime), ("mode", report.mode),
                 ("source", report.source), ("atol", report.atol), ("min_cosine", report.min_cosine),
                 ("reference_device", report.reference.get("device")),
                 ("reference_dtype", report.reference.get("dtype"))):
        ET.SubElement(props, "property", name=k, value=str(v))
    suite.extend(cases)
    root = ET.Element("testsuites", name="crisp-edge parity", tests=suite.get("tests"), failures=str(failures),
                      errors=str(errors), time=suite.get("time"))
    root.append(suite)
    ET.indent(root)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


def plot_errors(report: ParityReport) -> bytes:
    """A PNG: per output, histograms (one per task) of log10 |artifact - reference|, tolerance marked."""
    import numpy as np
    from matplotlib.figure import (
        Figure,  # no pyplot: no global state, no display; savefig renders with Agg
    )

    outputs = list(report.diffs) or ["(no outputs compared)"]
    layers = report.layers.get("layers") if report.layers.get("available") else None
    rows = len(outputs) + (1 if layers else 0)
    fig = Figure(figsize=(7, 2.8 * rows + 0.6))
    axes = fig.subplots(rows, 1, squeeze=False)
    if layers:
        _plot_layers(axes[-1, 0], report.layers)
    verdict = "PASS" if report.passed else "FAIL"
    fig.suptitle(f"{verdict}: {Path(report.bundle).name} ({report.runtime} {report.mode}, {report.source})", fontsize=10)
    for ax, name in zip(axes[:, 0], outputs):
        items = report.diffs.get(name, [])
        by_task: dict[str, list] = {}
        for task, _, d in items:
            by_task.setdefault(task, []).append(d)
        if not by_task:
            ax.text(0.5, 0.5, "nothing compared", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        logs = {t: np.log10(np.maximum(np.concatenate(ds), PLOT_FLOOR)) for t, ds in by_task.items()}
        lo = min(float(v.min()) for v in logs.values())
        hi = max(float(v.max()) for v in logs.values())
        atol = report.atol if report.atol and math.isfinite(report.atol) and report.atol > 0 else None
        if atol:
            lo, hi = min(lo, math.log10(atol)), max(hi, math.log10(atol))
        bins = np.linspace(lo - 0.25, hi + 0.25, 41)
        for task, v in logs.items():
            ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=f"{task} ({v.size:,} values)")
        if atol:
            ax.axvline(math.log10(atol), color="red", linestyle="--", linewidth=1, label=f"atol {atol:g}")
        worst = max(float(np.concatenate(ds).max(initial=0.0)) for ds in by_task.values())
        ax.set_title(f"output {name!r}: max |error| {worst:.2e}", fontsize=9)
        ax.set_xlabel(f"log10 |artifact - reference| (values below {PLOT_FLOOR:g} drawn at it)", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": PNG_SOFTWARE})  # marks the file as ours
    return buf.getvalue()


def _plot_layers(ax: Any, layers: dict) -> None:
    """Per-layer max abs error (log scale) in execution order, each layer's limit, the first over marked."""
    rows = layers["layers"]
    xs = range(len(rows))
    err = [max(r["max_abs"], PLOT_FLOOR) if r["max_abs"] is not None and math.isfinite(r["max_abs"]) else 1e30
           for r in rows]
    ax.plot(xs, err, marker="o", markersize=3, linewidth=1, label="max |runtime - PyTorch|")
    ax.plot(xs, [r["limit"] or float("nan") for r in rows], color="red", linestyle="--", linewidth=1, label="limit")
    ax.set_yscale("log")
    first = layers.get("first_over")
    if first:
        i = next(i for i, r in enumerate(rows) if r["layer"] == first["layer"])
        ax.axvline(i, color="black", linewidth=1, label=f"first over: {first['layer']}")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=5)
    ax.set_title(f"per-layer error, task {layers['task']!r}, case {layers['case']}", fontsize=9)
    ax.legend(fontsize=7)


def check_report_target(path: str | os.PathLike, kind: str) -> Path:
    """``path`` if a report of ``kind`` ("json", "junit", "plot") may be written there: a new name, or a
    report this tool wrote before (recognised by its format, suite name or PNG text). Anything else is a
    ``ConfigError``: a report never replaces a file it did not write."""
    from crisp_edge.errors import ConfigError

    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        raise ConfigError(f"report path {p} is a folder; give a file path (or --report-dir for the folder).")
    if not (p.exists() or p.is_symlink()):
        return p
    if p.is_symlink() or not p.is_file():
        raise ConfigError(f"{p} exists and is not a regular file; choose another report path.")
    with open(p, "rb") as f:
        head = f.read(1 << 16)
    if _MARKS[kind] not in head:
        raise ConfigError(f"{p} exists and is not a crisp-edge parity report; it is never replaced. Choose another "
                          "path (or --report-dir), or move the file.")
    return p


def check_outputs_target(path: str | os.PathLike) -> Path:
    """``path`` if ``--save-outputs`` may write there: a new name, or an outputs ``.npz`` this tool wrote
    (every entry ``output.*.npy``). Anything else is a ``ConfigError``, before anything runs."""
    import zipfile

    from crisp_edge.errors import ConfigError

    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return p
    ours = False
    if p.is_file() and not p.is_symlink():
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
            ours = bool(names) and all(n.startswith("output.") and n.endswith(".npy") for n in names)
        except (OSError, zipfile.BadZipFile):
            ours = False
    if not ours:
        raise ConfigError(f"--save-outputs {p} exists and is not an outputs file crisp-edge wrote; it is never "
                          "replaced. Choose another path, or move the file.")
    return p


def write_reports(report: ParityReport, out_dir: str | os.PathLike | None = None, *, json_path: str | os.PathLike | None = None,
                  junit_path: str | os.PathLike | None = None, plot_path: str | os.PathLike | None = None,
                  plot: bool = True) -> dict[str, Path]:
    """Write the JSON report, the JUnit XML and (with ``plot``) the PNG; returns {kind: path}.

    Paths default to ``out_dir/parity.json``, ``out_dir/parity.junit.xml`` and ``out_dir/parity.png``;
    a kind with neither an explicit path nor ``out_dir`` is not written.
    """
    import json

    folder = Path(out_dir) if out_dir is not None else None
    paths = {"json": json_path or (folder / JSON_NAME if folder else None),
             "junit": junit_path or (folder / JUNIT_NAME if folder else None),
             "plot": (plot_path or (folder / PLOT_NAME if folder else None)) if plot else None}
    for kind, path in paths.items():  # every target first: a refused one leaves nothing half-written
        if path is not None:
            check_report_target(path, kind)
    written = {}
    for kind, path in paths.items():
        if path is None:
            continue
        if kind == "json":
            data = (json.dumps(report_json(report), indent=2, allow_nan=False) + "\n").encode()
        elif kind == "junit":
            data = junit_xml(report)
        else:
            data = plot_errors(report)
        atomic_write_bytes(path, data)
        written[kind] = Path(path)
    return written

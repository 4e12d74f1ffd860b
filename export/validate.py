"""Parity of an export bundle with its PyTorch reference, as library code.

``validate_bundle`` runs the bundle in ONNX Runtime on the fixed seeded inputs stored in
``reference.npz`` and compares *every* output of every reference case (each task of a swappable
bundle, each batch size) with the PyTorch outputs recorded at export: names, shapes, max absolute
and relative error, cosine similarity and top-1 agreement. It collects every comparison and raises
one ``ParityError`` naming the worst. ``export_onnx`` calls it before the bundle is moved into place.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np

from .bundle import REFERENCE, Bundle, load_bundle
from .errors import BundleError, ParityError

#: fp32 ONNX Runtime vs eager PyTorch: same math, other kernels and summation order; differences
#: are ~1e-6 on ViT logits, 1e-4 leaves room for deeper models without hiding a wrong weight.
ATOL_FP32 = 1e-4
#: A direction check that does not depend on the output's scale (a wrong weight drops it far below).
MIN_COSINE = 0.99999
#: Relative error is reported against the reference's largest magnitude (element-wise relative
#: error is meaningless for outputs near zero); informative, not a pass criterion.
_EPS = 1e-12


@dataclass(frozen=True)
class Comparison:
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


@dataclass
class ParityReport:
    bundle: str
    atol: float
    min_cosine: float
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def worst(self) -> Comparison | None:
        failed = [c for c in self.comparisons if not c.passed]
        pool = failed or self.comparisons
        return max(pool, key=lambda c: (bool(c.problem), c.max_abs)) if pool else None

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.comparisons), default=float("nan"))

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "atol": self.atol, "min_cosine": self.min_cosine, "passed": self.passed,
                "max_abs": self.max_abs, "comparisons": [asdict(c) for c in self.comparisons]}

    def format(self) -> str:
        lines = [f"{'task':<12} {'case':>4} {'output':<10} {'shape':<12} {'max abs':>9} {'max rel':>9} {'cosine':>10} {'top-1':>6}"]
        for c in self.comparisons:
            top1 = "-" if c.top1 is None else f"{100 * c.top1:.0f}%"
            lines.append(f"{c.task:<12} {c.case:>4} {c.output:<10} {'x'.join(map(str, c.shape)):<12} {c.max_abs:>9.2e} "
                         f"{c.max_rel:>9.2e} {c.cosine:>10.7f} {top1:>6}{'' if c.passed else '  FAIL ' + c.problem}")
        return "\n".join(lines)


def compare(got: np.ndarray, ref: np.ndarray, *, task: str, case: int, output: str, atol: float = ATOL_FP32,
            min_cosine: float = MIN_COSINE) -> Comparison:
    """One output against its reference (float64 arithmetic)."""
    if tuple(got.shape) != tuple(ref.shape):
        return Comparison(task, case, output, list(got.shape), float("inf"), float("inf"), 0.0, None, False,
                          f"shape {list(got.shape)} != reference {list(ref.shape)}")
    g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    if not np.isfinite(g).all():
        return Comparison(task, case, output, list(got.shape), float("inf"), float("inf"), 0.0, None, False,
                          "non-finite values")
    diff = np.abs(g - r)
    max_abs = float(diff.max(initial=0.0))
    max_rel = max_abs / max(float(np.abs(r).max(initial=0.0)), _EPS)
    denom = float(np.linalg.norm(g) * np.linalg.norm(r))
    cosine = float(g @ r / denom) if denom > 0 else float(np.array_equal(g, r))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean()) if got.ndim >= 2 else None
    problems = []
    if max_abs > atol:
        problems.append(f"max abs {max_abs:.3g} > {atol:g}")
    if cosine < min_cosine:
        problems.append(f"cosine {cosine:.7f} < {min_cosine}")
    return Comparison(task, case, output, list(got.shape), max_abs, max_rel, cosine, top1, not problems,
                      "; ".join(problems))


def reference_cases(bundle: Bundle) -> tuple[list[dict[str, np.ndarray]], dict[str, list[dict[str, np.ndarray]]]]:
    """The stored inputs (one dict per case) and reference outputs per task."""
    path = bundle.file(REFERENCE)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BundleError(f"{path} is not a readable reference file ({type(e).__name__}: {e}).") from None
    m = bundle.manifest.get("reference")
    if not isinstance(m, dict):
        raise BundleError(f"{bundle.path}: the manifest records no reference data; export the bundle again.")
    try:
        inputs = [{n: data[f"input.{i}.{n}"] for n in m["inputs"]} for i in range(m["cases"])]
        outputs = {t: [{n: data[f"output.{t}.{i}.{n}"] for n in m["outputs"]} for i in range(m["cases"])]
                   for t in m["tasks"]}
    except KeyError as e:
        raise BundleError(f"{path} lacks {e} that the manifest's 'reference' record lists.") from None
    return inputs, outputs


def validate_bundle(bundle: Bundle | str | os.PathLike, *, threads: int = 1, atol: float | None = None,
                    raise_on_failure: bool = True) -> ParityReport:
    """Run ``bundle`` in ONNX Runtime against its stored PyTorch reference; raise ``ParityError`` on any failure.

    Checks the session's output names against the manifest, then every output of every stored case
    (all tasks with reference outputs, for a swappable bundle).
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    tol = b.manifest["tolerance"]
    atol = tol["atol"] if atol is None else atol
    report = ParityReport(str(b.path), atol, tol["min_cosine"])
    sess = b.session(threads=threads)
    names = [o.name for o in sess.session.get_outputs()]
    if names != sess.output_names:
        raise ParityError(f"{b.path}: the model's outputs are {names}, the manifest says {sess.output_names}.", report)
    inputs, refs = reference_cases(b)
    for task, cases in refs.items():
        if sess.swappable:
            sess.set_task(task)
        for i, (feeds, ref) in enumerate(zip(inputs, cases)):
            got = sess.run(feeds)
            for name in sess.output_names:
                report.comparisons.append(compare(got[name], ref[name], task=task, case=i, output=name,
                                                  atol=atol, min_cosine=report.min_cosine))
    if raise_on_failure and not report.passed:
        w = report.worst
        raise ParityError(
            f"{b.path}: the ONNX Runtime outputs differ from PyTorch: worst is task {w.task!r}, case {w.case}, "
            f"output {w.output!r}: {w.problem or 'comparison failed'} (max abs {w.max_abs:.3g}, cosine {w.cosine:.7f}).\n"
            + report.format(), report)
    return report

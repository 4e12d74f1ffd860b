"""What parity compares and against what: the named tolerances per (runtime, mode, dtype), one
output's comparison (max abs / relative error, cosine, top-1) with a diagnosis that names the fault,
and the report that collects every comparison of a check (``crisp_edge.export.parity.check``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from crisp_edge.errors import ConfigError
from crisp_edge.export.errors import ParityError
from crisp_edge.export.parity.reference import DEFAULT_TASK, Reference

#: Relative error is reported against the reference's largest magnitude (element-wise relative error
#: is meaningless for outputs near zero); informative, not a pass criterion.
_EPS = 1e-12


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
#: int8 weights (per output channel) and int8 activations quantized at run time, against the float32
#: PyTorch model: each matmul's inputs are rounded to 1/127 of their range, ~1% relative error per
#: matmul, compounding with depth. Measured on the embedded ViT's logits (magnitude ~10) over 2,000
#: Fashion-MNIST test images: max |diff| 0.14 (ONNX Runtime), 0.05 (XNNPACK), top-1 agreement 99.9-100%.
#: A wrong weight or task still fails: it moves logits by whole units and drops the cosine far below.
ATOL_INT8 = 0.5
MIN_COSINE_INT8 = 0.995
_INT8 = ("int8 per-channel weights and dynamically quantized int8 activations vs the float32 PyTorch model: "
         "~1% relative error per matmul (max |logit diff| 0.14 ORT / 0.05 XNNPACK measured on the embedded ViT)")

#: fp32 language models (a key/value cache, 30 layers for SmolLM2-135M, logits up to ~35): the summation-order
#: error of each matmul compounds with depth and scales with the logits. Measured, ONNX Runtime vs eager PyTorch
#: on SmolLM2-135M (CRISP, full capacity) with perturbed-mixer tasks: logits 1.1e-3, key/values 5.8e-4, 64-step
#: greedy logits 4.3e-4, every greedy token equal, cosine 1.0000000 (the plain model's own mixers: 5.8e-5).
#: A wrong task or weight moves logits by whole units and changes the greedy tokens, which must match exactly.
ATOL_LM_FP32 = 5e-3
_LM = ("fp32 deep language model: summation-order error compounds over layers and scales with logits ~35 "
       "(SmolLM2-135M: max 1.1e-3 logits, 5.8e-4 key/values measured in ONNX Runtime)")
#: The same in ExecuTorch (XNNPACK, static cache), measured on SmolLM2-135M (CRISP, full capacity): 64-step
#: greedy logits 1.1e-4 with its own mixers, 1.3e-3 with perturbed-mixer tasks (weights rebuilt by set_task in
#: ExecuTorch's kernels), every greedy token equal.
_LM_ET = ("fp32 deep language model in ExecuTorch XNNPACK: SmolLM2-135M 64-step greedy logits max 1.1e-4 (own "
          "mixers) / 1.3e-3 (perturbed-mixer tasks, weights rebuilt by set_task), every token equal")

#: Quantized language models against the float32 PyTorch model. Greedy decoding of a quantized model legitimately
#: leaves the float model's path at a near-tie, so these entries set ``min_top1``, which for a language model
#: changes what generation parity checks (``parity.generation``): the runtime is teacher-forced along the
#: float reference's tokens and (1) its logits at the reference's top ids stay within ``atol`` and (2) its
#: top-1 token agrees with the reference's at >= ``min_top1`` of the steps; its own greedy tokens are reported,
#: not required to match. A wrong weight or task still fails: it moves logits by whole units and its top-1
#: agreement falls towards chance. The bounds scale with the logits (~35 on SmolLM2-135M). Measured on
#: SmolLM2-135M (CRISP, full capacity) in ONNX Runtime: int8 (MatMulNBits 8-bit) 64-step teacher-forced logits
#: max 1.73, every greedy token equal (top-1 agreement 100%), tensor cases (random token ids) logits 1.45 /
#: cosine 0.9998, key/values cosine >= 0.9977; int4 (MatMulNBits 4-bit) 64-step teacher-forced logits max 9.9,
#: top-1 agreement 75% (greedy tokens leave the float path within 3 steps), tensor cases logits 11.1 / cosine
#: 0.988, key/values cosine down to 0.815 (a layer's values): at 4 bits the cosine is a weak check and top-1
#: agreement the discriminating one (a wrong model agrees at about chance). int4's min..max blocks (lm_head 8-bit)
#: hold SmolLM2's own Q4_1 grid, so that model now sits far inside these bounds (ORT: tensor cases logits 1.94,
#: 64-step teacher-forced logits 1.56, top-1 agreement 97.9%); they stay sized for a model trained in float, where
#: 4-bit rounding is real. ExecuTorch's 8da4w takes the same bounds (SmolLM2 bundle: top-1 agreement 97.4%).
#: ExecuTorch's 8da8w quantizes each token's activations with one scale per row (ORT's kernel: one per block of
#: 32): on SmolLM2-135M its 64-step teacher-forced logits were 1.64 / 2.62 / 3.42 off on three prompts
#: (top-1 agreement 95.3%), past ORT's 3.0, so its bound is its own (ATOL_LM_INT8_XNNPACK); top-1 agreement
#: stays the discriminating check.
ATOL_LM_INT8 = 3.0
ATOL_LM_INT8_XNNPACK = 5.0
MIN_COSINE_LM_INT8 = 0.99
MIN_TOP1_LM_INT8 = 0.85
ATOL_LM_INT4 = 16.0
MIN_COSINE_LM_INT4 = 0.75
MIN_TOP1_LM_INT4 = 0.6
_LM_INT8 = ("int8 weights (per channel / per block of 32; lm_head too) and dynamic int8 activations in a deep "
            "language model vs float32 PyTorch: SmolLM2-135M logits max 1.73 off, every greedy token equal (ORT)")
_LM_INT4 = ("int4 weights (groups of 32, lm_head 8-bit) and dynamic int8 activations in a deep language model vs "
            "float32 PyTorch: bounds measured on SmolLM2-135M with plain symmetric 4-bit blocks, logits up to 11.1 "
            "off (of ~35), key/values cosine 0.815, top-1 agreement 75% (ORT), kept for models whose weights are not "
            "already on a 4-bit grid")

#: (runtime, mode, dtype) -> Tolerance. ``mode`` "*" applies to every mode of that runtime and dtype; a
#: runtime "<runtime>-<recipe>" (e.g. "executorch-portable") applies to bundles of that recipe first.
TOLERANCES: dict[tuple[str, str, str], Tolerance] = {
    ("onnxruntime", "dense", "float32"): Tolerance(ATOL_FP32, MIN_COSINE, _ORT + "; weights folded by PyTorch"),
    ("onnxruntime", "factored", "float32"): Tolerance(
        ATOL_FP32, MIN_COSINE, _ORT + "; W = B @ G(A) built by ORT at load, rounding like PyTorch's to ~1e-7"),
    ("onnxruntime", "swappable", "float32"): Tolerance(
        ATOL_FP32, MIN_COSINE, _ORT + "; W built by the fold graph once per task switch"),
    ("onnxruntime", "*", "float16"): Tolerance(ATOL_FP16, MIN_COSINE_FP16, _FP16, min_top1=0.99),
    ("onnxruntime-lm", "*", "float32"): Tolerance(ATOL_LM_FP32, MIN_COSINE, _LM),
    ("executorch", "dense", "float32"): Tolerance(ATOL_XNNPACK_FP32, MIN_COSINE_XNNPACK, _ET + "; weights folded"),
    ("executorch", "factored", "float32"): Tolerance(
        ATOL_XNNPACK_FP32, MIN_COSINE_XNNPACK, _ET + "; W built in the program from bases and mixers"),
    ("executorch", "swappable", "float32"): Tolerance(
        ATOL_XNNPACK_FP32, MIN_COSINE_XNNPACK, _ET + "; W built by the set_task method into a shared buffer"),
    ("executorch", "*", "float32"): Tolerance(ATOL_XNNPACK_FP32, MIN_COSINE_XNNPACK, _ET),
    ("executorch-portable", "*", "float32"): Tolerance(ATOL_FP32, MIN_COSINE, _ET_PORTABLE),
    ("executorch", "*", "float16"): Tolerance(ATOL_FP16, MIN_COSINE_FP16, _FP16, min_top1=0.99),
    ("executorch-lm", "*", "float32"): Tolerance(ATOL_LM_FP32, MIN_COSINE_XNNPACK, _LM_ET),
    ("onnxruntime-lm", "dense", "int8"): Tolerance(ATOL_LM_INT8, MIN_COSINE_LM_INT8, _LM_INT8 + "; ORT MatMulNBits 8-bit",
                                                   min_top1=MIN_TOP1_LM_INT8),
    ("onnxruntime-lm", "dense", "int4"): Tolerance(ATOL_LM_INT4, MIN_COSINE_LM_INT4, _LM_INT4 + "; ORT MatMulNBits",
                                                   min_top1=MIN_TOP1_LM_INT4),
    ("executorch-lm", "dense", "int8"): Tolerance(
        ATOL_LM_INT8_XNNPACK, MIN_COSINE_LM_INT8, _LM_INT8 + "; XNNPACK 8da8w, activations per token: SmolLM2-135M "
        "64-step logits up to 3.42 off, top-1 agreement 95.3%", min_top1=MIN_TOP1_LM_INT8),
    ("executorch-lm", "dense", "int4"): Tolerance(ATOL_LM_INT4, MIN_COSINE_LM_INT4, _LM_INT4 + "; XNNPACK 8da4w",
                                                  min_top1=MIN_TOP1_LM_INT4),
    ("onnxruntime", "dense", "int8"): Tolerance(ATOL_INT8, MIN_COSINE_INT8, _INT8 + "; ORT quantize_dynamic, 7-bit "
                                                "weights (reduce_range: exact on x86-64 CPUs without VNNI)"),
    ("onnxruntime", "swappable", "int8"): Tolerance(
        ATOL_INT8, MIN_COSINE_INT8, _INT8 + "; the same integer graph, its 7-bit int8 weights and per-channel scales "
        "quantized at each task switch from the fold of int8 bases (one scale per term): two roundings of about "
        "1/254 and 1/128 of a range, measured max |logit diff| 0.16 on ViT-S (random weights) and 0.05 on the "
        "embedded ViT (bench/results/quantize_avx2.json), inside the dense int8 bound"),
    ("executorch", "dense", "int8"): Tolerance(ATOL_INT8, MIN_COSINE_INT8, _INT8 + "; XNNPACK dynamic int8 linear"),
    ("executorch", "swappable", "int8"): Tolerance(
        ATOL_INT8, MIN_COSINE_INT8, _INT8 + "; crisp::qlinear (the same per-token / per-channel arithmetic as "
        "XNNPACK's qd8 linear) over int8 weights set_task quantizes from the fold of int8 bases (one scale per "
        "term, as ONNX Runtime's): two roundings of about 1/254 of a range, measured max |logit diff| 0.11 on ViT-S "
        "(random weights) and 0.02 on the embedded ViT, inside the dense int8 bound"),
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
    inputs: str = "reference"  # "reference": a stored case (reference.npz); "data": a chunk of the user's inputs


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
    #: tasks of the bundle without a PyTorch reference: {"task", "reason", "allowed"} (allowed = skipped by name)
    unchecked: list = field(default_factory=list)
    #: the check on the user's own inputs (``check_inputs``): path, examples, top-1 agreement, label accuracy
    data: dict = field(default_factory=dict)
    #: where it diverged (``export.parity.layers``): per-layer errors and the first layer over tolerance
    layers: dict = field(default_factory=dict)
    #: language-model bundles: each task's generation parity (``GenerationParity.to_dict``; ``parity.lm_check``)
    generation: list = field(default_factory=list)
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
        out += [f"task {c.task!r}, {'chunk' if c.inputs == 'data' else 'case'} {c.case}"
                + (" of your data" if c.inputs == "data" else "") + f", output {c.output!r}: {c.problem}"
                for c in self.comparisons if not c.passed]
        first = self.layers.get("first_over") if isinstance(self.layers, dict) else None
        if first:
            out.append(f"task {self.layers['task']!r}: diverged first at layer {first['layer']!r} ({first['kind']}): "
                       + (first["problem"] or f"max abs {first['max_abs']:.3g} > {first['limit']:.3g}, cosine "
                                              f"{first['cosine']:.7f}"))
        return out

    def summary(self) -> str:
        """One line: PASS/FAIL, what was checked, the worst error, the first problem."""
        n, bad = len(self.comparisons), sum(not c.passed for c in self.comparisons) + len(self.failures)
        head = "PASS" if self.passed else "FAIL"
        where = f"{self.runtime or '?'} {self.mode or ''}".strip()
        line = (f"{head} {self.bundle} ({where}, {self.source}): {n} outputs compared over {len(self.tasks)} task(s), "
                f"{bad} problem(s); max abs {self.max_abs:.2e} (atol {self.atol:g}, min cosine {self.min_cosine})")
        if self.generation:
            same = sum(g["tokens_match"] for g in self.generation)
            worst = max(c["max_abs_diff"] for g in self.generation for c in g["cases"])
            line += (f"; generation: {same}/{len(self.generation)} task(s) with the reference's greedy tokens, max "
                     f"|logit diff| {worst:.2e}")
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

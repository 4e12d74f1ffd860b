"""ViT compression (Alg. 4) in one call: allocate ranks -> SVD-initialised student (whitened by the
calibration inputs when there are any) -> distillation.

    from crisp_edge.compress import compress_vit
    student, report = compress_vit(teacher, 0.5, x_distill)       # half the targeted weights
    save_checkpoint(student, "small/", extra={"compress": report.to_dict()})

The student is an ordinary CRISP model (its config records the new ranks), so ``save_checkpoint``,
``load_checkpoint``, ``adapt_`` and the exporters take it like any other.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from crisp_edge.errors import DataError
from crisp_edge.method.budget import budget
from crisp_edge.method.config import CrispConfig
from crisp_edge.method.convert import crisp_layers, is_crisp
from crisp_edge.training.compress.distill import (
    DistillConfig,
    DistillReport,
    distill_,
    init_student,
    peak_rss_mb,
)
from crisp_edge.training.compress.ranks import (
    RankPlan,
    allocate_ranks,
    layer_input_stats,
)
from crisp_edge.training.loop import check_inputs, check_mask
from crisp_edge.training.retrofit import retrofit_


@dataclass
class CompressReport:
    """What ``compress_vit`` did: the rank plan, the init, the distillation, the resulting budget."""

    plan: RankPlan
    init: str
    distill: DistillReport | None
    stored: int
    original: int
    seconds: float
    peak_rss_mb: float
    notes: list[str] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        return self.stored / self.original

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "init": self.init,
                "distill": self.distill.to_dict() if self.distill else None, "stored": self.stored,
                "original": self.original, "kept_fraction": self.kept_fraction, "seconds": self.seconds,
                "peak_rss_mb": self.peak_rss_mb, "notes": list(self.notes)}

    def format(self) -> str:
        ranks = ", ".join(f"{k}={v}" for k, v in self.plan.role_ranks.items())
        d = self.distill
        steps = f"{d.steps} distillation steps on {d.samples:,} inputs ({d.world_size} process(es))" if d else "no distillation"
        return (f"compressed: {self.original:,} targeted weights -> {self.stored:,} stored "
                f"(kept {self.kept_fraction:.2%}, {self.plan.method} ranks {ranks}), init={self.init}, {steps}, "
                f"{self.seconds:.1f} s, peak RSS {self.peak_rss_mb:.0f} MiB")


def compress_vit(teacher: nn.Module, keep_fraction: float, x: torch.Tensor | None, *, method: str = "greedy",
                 init: str | None = None, config: DistillConfig | None = None, crisp_config: CrispConfig | None = None,
                 calib: torch.Tensor | None = None, distill: bool = True, progress: bool = True,
                 eval_fn=None, attention_mask: torch.Tensor | None = None) -> tuple[nn.Module, CompressReport]:
    """Compress a ViT to ``keep_fraction`` of its targeted linear weights (Alg. 4).

    Args:
        teacher: a full-capacity CRISP model, or a plain one (a retrofitted copy with ``crisp_config``,
            default ``CrispConfig()``, becomes the teacher; the argument itself is never changed).
        keep_fraction: kept fraction of the targeted dense weights, in (0, 1].
        x: distillation inputs (e.g. a slice of the training images), checked against the model's input
            spec first; may be None with ``distill=False`` (data-free: greedy then measures weight error).
        method: rank allocation, "greedy" (default: it won on the embedded ViT) or "uniform" (``allocate_ranks``).
        init: student init (``init_student``): "svd" (Alg. 4, the default), "svd-whitened" (the rank-r
            factors with the least output error on ``calib``, for a layout ``whitened.whitenable`` accepts:
            better on the calibration data's distribution, worse as bases for other tasks) or "random" (ablation).
        config: the distillation settings.
        calib: inputs for the greedy allocator's output-error measure and the whitened init (default: the
            first 64 of ``x``).
        distill: False stops after the init (with init="svd": the data-free "mimicry only" student).
        attention_mask: beside padded token ids ``x`` (text models), 1 = token, 0 = padding: the
            allocator's measure and the distillation see it and leave the padding out.

    Returns:
        ``(student, CompressReport)``; the student is in eval mode.
    """
    start = time.perf_counter()
    notes = []
    if not is_crisp(teacher):
        teacher = copy.deepcopy(teacher)
        retrofit_(teacher, crisp_config or CrispConfig(), progress=False)
        notes.append("teacher: closed-form full-capacity retrofit of the given dense model")
    if x is not None or distill:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or len(x) == 0:
            raise DataError("x must be a non-empty tensor of distillation inputs (distill=False needs none).")
        check_inputs(teacher, x, what="distillation inputs")  # the model's own input spec, before any work
        check_mask(x, attention_mask, "distillation inputs")
    if calib is not None:
        check_inputs(teacher, calib, what="calibration inputs")
    calib_mask = None
    if calib is None and x is not None:
        calib, calib_mask = x[:64], None if attention_mask is None else attention_mask[:64]
    init = init or "svd"
    # greedy measures the plain SVD's output error even for the whitened init: measuring the whitened factors
    # (allocate_ranks init="svd-whitened") costs an alternating solve per rank and is not benchmarked yet
    plan = allocate_ranks(teacher, keep_fraction, method, calib=calib if method == "greedy" else None,
                          calib_mask=calib_mask)
    stats = layer_input_stats(teacher, crisp_layers(teacher), calib, calib_mask) if init == "svd-whitened" \
        and calib is not None else None  # without calib, init_student says what is missing
    student = init_student(teacher, plan, init=init, seed=(config or DistillConfig()).seed, calib_inputs=stats)
    report = distill_(student, teacher, x, config, attention_mask=attention_mask, progress=progress,
                      eval_fn=eval_fn) if distill else None
    b = budget(student)
    if b.stored != plan.stored:  # the plan's accounting is the model's, or something is badly wrong
        raise AssertionError(f"rank plan promised {plan.stored} stored numbers, the student has {b.stored}")
    return student.eval(), CompressReport(plan=plan, init=init, distill=report, stored=b.stored, original=b.original,
                                          seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(), notes=notes)

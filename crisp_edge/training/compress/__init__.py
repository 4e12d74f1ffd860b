"""Compression of CRISP models: shrink the shared bases to a parameter budget.

ViT (Alg. 4): ``allocate_ranks`` (budget -> per-role ranks, uniform or greedy), ``init_student``
(top-r SVD of each teacher group, whitened by calibration inputs when given: ``whitened``), ``distill_`` (KL on logits + per-block feature MSE, DDP-aware),
and ``compress_vit`` doing all three. LLaMA (Alg. 5): ``compress_llama_`` (data-free basis reduction,
least-squares re-solve, ``calibrate_``). Baselines at equal stored budget (``baselines``): ``svd_``,
``basis_sharing_``, ``fips_``, all counted by ``stored_params``.
"""
from crisp_edge.training.compress.baselines import (
    BaselineReport,
    basis_sharing_,
    svd_,
)
from crisp_edge.training.compress.distill import (
    DistillConfig,
    DistillReport,
    distill_,
    heldout_loss,
    init_student,
)
from crisp_edge.training.compress.fips import fips_
from crisp_edge.training.compress.linear_stats import (
    capture_linear_inputs,
    stored_params,
)
from crisp_edge.training.compress.llama import (
    CalibrationConfig,
    LlamaCompressReport,
    calibrate_,
    compress_llama_,
)
from crisp_edge.training.compress.ranks import RankPlan, allocate_ranks
from crisp_edge.training.compress.vit import CompressReport, compress_vit

__all__ = [
    "BaselineReport",
    "CalibrationConfig",
    "CompressReport",
    "DistillConfig",
    "DistillReport",
    "LlamaCompressReport",
    "RankPlan",
    "allocate_ranks",
    "basis_sharing_",
    "calibrate_",
    "capture_linear_inputs",
    "compress_llama_",
    "compress_vit",
    "distill_",
    "fips_",
    "heldout_loss",
    "init_student",
    "stored_params",
    "svd_",
]

"""Distillation of a compressed student from its teacher (Alg. 4), DDP-aware.

    student = init_student(teacher, {"qkv": 6, "proj": 6, "fc1": 6, "fc2": 6})   # SVD init
    report = distill_(student, teacher, x_train_slice, DistillConfig(epochs=4))

``init_student`` builds a CRISP student with smaller bases from a CRISP teacher: per group, the top-r
left singular vectors of the teacher group's weights ``M = B_t [G(A_1) ... G(A_n)]`` (they span a
subspace of the teacher's basis, ordered by how much the layers use them) become the student basis,
the coefficients are the projections ``C_i = U_r^T B_t G(A_i)`` (times the singular values), and the
mixers are ``A_i = G^-1(C_i)`` after the per-component rescaling ``retrofit_`` uses (its closed form is
reused as is). At the teacher's rank the student reproduces the teacher exactly. With calibration inputs
and ``init="svd-whitened"`` the rank-r factors minimise the layers' output error on those inputs instead of
the weights' error (``crisp_edge.training.compress.whitened``); not the default: it fits the calibration data
better but leaves worse bases for other tasks (Alg. 6: README, "Compress, then adapt").

``distill_`` trains any student of the teacher's architecture (a CRISP student, or a baseline whose
linears are factorised modules) with ``lambda_kl * KL(teacher || student)`` on the logits plus
``lambda_feat * sum over blocks of MSE(block output)`` (forward hooks on the architecture's blocks).
When ``torch.distributed`` is initialised it wraps the student in DDP and shards each global batch
with a ``DistributedSampler``; otherwise the very same code runs with one replica, so a run on
``k`` processes takes the same optimisation steps on the same global batches as one process.
"""
from __future__ import annotations

import copy
import math
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from crisp_edge.errors import ConfigError
from crisp_edge.method.config import CrispConfig
from crisp_edge.method.convert import (
    convert_,
    crisp_bases,
    crisp_layers,
    is_crisp,
    materialize_,
)
from crisp_edge.method.layer import BASES_NAME, MIXER_NAME
from crisp_edge.method.specs import (
    detect_architecture,
    get_architecture,
    resolve_blocks,
)
from crisp_edge.training.compress.linear_stats import LinearInputStats
from crisp_edge.training.compress.whitened import calibration_grams, whitened_factors
from crisp_edge.training.evaluate import model_logits
from crisp_edge.training.loop import check_mask
from crisp_edge.training.retrofit import _closed_form_, write_factors_

#: Student inits; "svd" is the default, "svd-whitened" needs calibration inputs.
INITS = ("svd-whitened", "svd", "random")


@dataclass(frozen=True)
class DistillConfig:
    """Settings of the distillation loop. The defaults are the ones benchmarked on the embedded ViT
    (bench/bench_compress_vit.py: 3% of Fashion-MNIST train, 4 epochs, 112 steps).

    Attributes:
        epochs: passes over the distillation data.
        batch_size: the *global* batch (split evenly over DDP processes; must be divisible by their number).
        lr: AdamW peak learning rate (linear warm-up over ``warmup_fraction`` of the steps, cosine decay to 0).
        weight_decay: AdamW weight decay.
        lambda_kl, lambda_feat: weights of the logit KL and of the per-block feature MSE.
        temperature: softens both distributions in the KL (the KL is multiplied by T^2).
        clip_grad: gradient-norm clipping (0 = none).
        seed: seeds the data order (identical on every process).
        trainable: "all" trains every student parameter; "compressed" only the factors: CRISP bases
            and mixers (Alg. 4 as written), or any parameter the teacher has no namesake of (a
            baseline's factors).
    """

    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    lambda_kl: float = 1.0
    lambda_feat: float = 0.2
    temperature: float = 1.0
    clip_grad: float = 1.0
    warmup_fraction: float = 0.05
    seed: int = 0
    trainable: str = "all"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "epochs" else 1):
                raise ConfigError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} integer, got {v!r}.")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 100:
                raise ConfigError(f"{name} must be a positive number, got {v!r}.")
        for name in ("weight_decay", "lambda_kl", "lambda_feat", "clip_grad"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e6:
                raise ConfigError(f"{name} must be a non-negative number, got {v!r}.")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}.")
        if self.lambda_kl == 0 and self.lambda_feat == 0:
            raise ConfigError("lambda_kl and lambda_feat are both 0: there is nothing to distil.")
        if self.trainable not in ("all", "compressed"):
            raise ConfigError(f"trainable must be 'all' or 'compressed', got {self.trainable!r}.")


@dataclass
class DistillReport:
    """What a distillation run did, and what it cost."""

    steps: int
    epochs: int
    samples: int
    world_size: int
    seconds: float
    peak_rss_mb: float                  # the process's peak resident memory so far (ru_maxrss)
    peak_cuda_mb: float | None          # peak CUDA memory allocated during the run, on CUDA
    trainable_params: int
    epoch_losses: list[float] = field(default_factory=list)
    epoch_evals: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb() -> float:
    """The peak resident set size of this process, in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` is not the process's own there, a
    child started by a large parent (``subprocess`` forks, then execs) reports the parent's peak until it
    outgrows it. Elsewhere ``ru_maxrss`` (macOS reports bytes).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _check_ranks(teacher: nn.Module, ranks: Mapping[str, int]) -> dict[str, int]:
    bases = crisp_bases(teacher)
    roles = {b.role for b in bases.values()}
    ranks = dict(getattr(ranks, "role_ranks", ranks))
    unknown = sorted(set(ranks) - roles)
    missing = sorted(roles - set(ranks))
    if unknown or missing:
        raise ConfigError(f"ranks must give one rank per role of the teacher {sorted(roles)}; "
                          f"unknown {unknown}, missing {missing}.")
    for role, r in ranks.items():
        full = min(b.full_rank for b in bases.values() if b.role == role)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= full:
            raise ConfigError(f"rank of role {role!r} must be an integer in [1, {full}] (its full capacity), got {r!r}.")
    return ranks


@torch.no_grad()
def init_student(teacher: nn.Module, ranks: Mapping[str, int], init: str | None = None, seed: int = 0, *,
                 calib_inputs: LinearInputStats | None = None) -> nn.Module:
    """A CRISP student with the teacher's architecture and layout and smaller bases.

    Args:
        teacher: a CRISP model (e.g. the full-capacity retrofit); left unchanged.
        ranks: one basis rank per role (a dict, or a ``RankPlan`` from ``allocate_ranks``).
        init: "svd-whitened" (the rank-r factors of each teacher group with the least output error on
            ``calib_inputs``), "svd" (top-r singular vectors of each teacher group, Alg. 4 line 1: data-free)
            or "random" (the paper's Alg. 2 random init, for the "CRISP without SVD init" ablation).
            Default: "svd" (see the module docstring for why not the whitened one).
        seed: seeds the random init.
        calib_inputs: the Gram matrices of the teacher's targeted layers' inputs on calibration data
            (``capture_linear_inputs(teacher, batches)``), for "svd-whitened".

    Every parameter outside the CRISP factors (embeddings, norms, biases, head) is copied from the teacher.
    """
    init = init or "svd"
    if init not in INITS:
        raise ConfigError(f"init must be one of {INITS}, got {init!r}.")
    if not is_crisp(teacher):
        raise ConfigError("the teacher has no CRISP layers; retrofit it first (retrofit_(model, config)).")
    ranks = _check_ranks(teacher, ranks)
    grams = calibration_grams(calib_inputs, crisp_layers(teacher)) if init == "svd-whitened" else {}
    config: CrispConfig = teacher.crisp_config
    for role, r in ranks.items():
        config = config.with_role(role, r=r)
    targets = {n: layer.weight.detach().clone() for n, layer in crisp_layers(teacher).items()}
    student = copy.deepcopy(teacher)
    arch = student.crisp_arch
    materialize_(student)
    gen = torch.Generator().manual_seed(seed)
    convert_(student, config, arch, generator=gen)
    if init != "random":
        for basis in crisp_bases(student).values():
            mixers = [student.get_submodule(n).crisp_mixer for n in basis.layer_names]
            group = [targets[n] for n in basis.layer_names]
            if init == "svd":
                _closed_form_(basis, mixers, group, config.gate_init_max, gen)
                continue
            p, q = whitened_factors(group, [grams[n] for n in basis.layer_names], basis.s,
                                    basis.transpose, min(basis.r, basis.full_rank))
            write_factors_(basis, mixers, p, q, config.gate_init_max, gen)
    student.train(teacher.training)
    return student


def _blocks(model: nn.Module) -> nn.ModuleList:
    arch = getattr(model, "crisp_arch", None)
    spec = get_architecture(arch) if arch else detect_architecture(model)
    return resolve_blocks(model, spec)


class _Features:
    """Collects every block's output on a forward pass (first element of tuple outputs)."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.active = False  # off outside the loop's own forwards (an eval_fn's forwards are not collected)
        self._hooks = [b.register_forward_hook(self._hook) for b in _blocks(model)]

    def _hook(self, _m, _args, out) -> None:
        if self.active:
            self.outputs.append(out[0] if isinstance(out, (tuple, list)) else out)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _feature_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference of two block outputs; with a token ``mask`` (batch, tokens) and outputs
    (batch, tokens, width), over real tokens only: padding is not part of what the student must copy."""
    if mask is None or a.dim() != 3 or tuple(a.shape[:2]) != tuple(mask.shape):
        return F.mse_loss(a, b)
    w = mask.to(a.dtype).unsqueeze(-1)
    return ((a - b).square() * w).sum() / (w.sum() * a.shape[-1]).clamp_min(1)


def distill_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, s_feats: list[torch.Tensor],
                 t_feats: list[torch.Tensor], config: DistillConfig,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """``(loss, kl, feat)``: lambda_kl * T^2 * KL(teacher || student) + lambda_feat * sum_l MSE(f_l)
    (with a token ``mask``, the feature MSE counts real tokens only)."""
    t = config.temperature
    kl = F.kl_div(F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1), log_target=True,
                  reduction="batchmean") * t * t
    feat = sum((_feature_mse(a, b, mask) for a, b in zip(s_feats, t_feats)), s_logits.new_zeros(()))
    return config.lambda_kl * kl + config.lambda_feat * feat, float(kl.detach()), float(feat.detach())


def distill_(student: nn.Module, teacher: nn.Module, x: torch.Tensor, config: DistillConfig | None = None, *,
             attention_mask: torch.Tensor | None = None, progress: bool = True,
             eval_fn: Callable[[nn.Module], dict] | None = None) -> DistillReport:
    """Train ``student`` (in place) to mimic ``teacher`` on inputs ``x``; returns a ``DistillReport``.

    For padded token ids pass their ``attention_mask`` (1 = token, 0 = padding): both models see each
    batch's rows of it, and the feature loss counts real tokens only.

    Under ``torch.distributed`` (e.g. launched by ``torchrun``) every process passes the same ``x``;
    each takes its shard of every global batch, and DDP averages the gradients. ``eval_fn(student)``,
    if given, runs after every epoch (on every process) and its dict is recorded.
    """
    config = config or DistillConfig()
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or len(x) == 0:
        raise ConfigError("x must be a non-empty tensor of model inputs (a batch dimension first).")
    check_mask(x, attention_mask, "distillation inputs")
    s_blocks, t_blocks = _blocks(student), _blocks(teacher)
    if len(s_blocks) != len(t_blocks):
        raise ConfigError(f"the student has {len(s_blocks)} blocks and the teacher {len(t_blocks)}; "
                          "distillation matches block outputs one to one, so they must have the same depth.")
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if config.batch_size % world:
        raise ConfigError(f"batch_size={config.batch_size} must be divisible by the {world} processes.")
    local_bs = config.batch_size // world
    sampler = DistributedSampler(range(len(x)), num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // local_bs
    if steps_per_epoch == 0 and config.epochs:
        raise ConfigError(f"{len(x)} samples make no full batch of {config.batch_size}; use a smaller batch_size.")
    total = steps_per_epoch * config.epochs
    device = next(student.parameters()).device
    teacher_names = {n for n, _ in teacher.named_parameters()}
    params = [p for n, p in student.named_parameters()
              if p.requires_grad and (config.trainable == "all" or n not in teacher_names
                                      or n.startswith(BASES_NAME + ".") or n.endswith("." + MIXER_NAME))]
    if not params:
        raise ConfigError("the student has no trainable parameters to distil.")
    frozen = [p for p in student.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_fraction * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / warmup if i < warmup else
                                              0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup))))
    model = nn.parallel.DistributedDataParallel(student) if distributed else student
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s_feats, t_feats = _Features(student), _Features(teacher)
    s_feats.active = t_feats.active = True
    teacher_mode = teacher.training
    teacher.eval()
    student.train()
    report = DistillReport(steps=0, epochs=config.epochs, samples=len(x), world_size=world, seconds=0.0,
                           peak_rss_mb=0.0, peak_cuda_mb=None, trainable_params=sum(p.numel() for p in params),
                           config=asdict(config))
    start = time.perf_counter()
    bar = tqdm(total=total, desc="distill", unit="step", disable=not progress or rank != 0, leave=False)
    try:
        for epoch in range(config.epochs):
            sampler.set_epoch(epoch)
            order = list(sampler)
            running = 0.0
            for step in range(steps_per_epoch):
                idx = torch.tensor(order[step * local_bs:(step + 1) * local_bs])
                xb = x[idx].to(device)
                mb = None if attention_mask is None else attention_mask[idx].to(device)
                with torch.no_grad():
                    t_logits = model_logits(teacher, xb, mb)
                t_out = t_feats.take()
                s_logits = model_logits(model, xb, mb)
                loss, _, _ = distill_loss(s_logits, t_logits, s_feats.take(), t_out, config, mb)
                if not torch.isfinite(loss):
                    raise ConfigError(f"the distillation loss became {float(loss.detach())} at step {report.steps}; "
                                      "lower the learning rate (lr) or the loss weights.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad:
                    nn.utils.clip_grad_norm_(params, config.clip_grad)
                opt.step()
                sched.step()
                report.steps += 1
                running += float(loss.detach())
                bar.update()
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", epoch=epoch + 1)
            report.epoch_losses.append(running / max(1, steps_per_epoch))
            if eval_fn is not None:
                s_feats.active = t_feats.active = False
                report.epoch_evals.append(eval_fn(student))
                s_feats.active = t_feats.active = True
                student.train()
    finally:
        bar.close()
        s_feats.remove()
        t_feats.remove()
        teacher.train(teacher_mode)
        student.eval()
        for p in frozen:
            p.requires_grad_(True)
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        report.peak_cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return report


@torch.no_grad()
def heldout_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, config: DistillConfig | None = None,
                 batch_size: int = 256, attention_mask: torch.Tensor | None = None) -> float:
    """The distillation loss (the one ``distill_`` minimises) of ``student`` on inputs ``x`` (and their
    ``attention_mask``, for padded token ids), averaged over batches: how far the student is from its
    teacher on data it was not trained on."""
    config = config or DistillConfig()
    check_mask(x, attention_mask, "held-out inputs")
    s_feats, t_feats = _Features(student), _Features(teacher)
    s_feats.active = t_feats.active = True
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            mb = None if attention_mask is None else attention_mask[i:i + batch_size]
            t_logits = model_logits(teacher, xb, mb)
            s_logits = model_logits(student, xb, mb)
            loss, _, _ = distill_loss(s_logits, t_logits, s_feats.take(), t_feats.take(), config, mb)
            total, count = total + float(loss) * len(xb), count + len(xb)
    finally:
        s_feats.remove()
        t_feats.remove()
        student.train(modes[0])
        teacher.train(modes[1])
    return total / count

"""One supervised training loop for classification, shared by adaptation and its baselines.

AdamW over the parameter groups it is given, linear warm-up then cosine (or constant) schedule,
gradient clipping, seeded shuffling, per-epoch evaluation, a progress bar and a history.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import ConfigError, DataError
from .evaluate import accuracy, predict

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``lr`` applies to every group that does not set its own."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    schedule: str = "cosine"
    clip_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}.")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 10):
            raise ConfigError(f"lr must be in (0, 10), got {self.lr!r}.")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"clip_grad_norm must be positive or None, got {self.clip_grad_norm!r}.")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}.")


@dataclass
class TrainHistory:
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # training wall time (evaluation excluded)

    @property
    def final_accuracy(self) -> float | None:
        return self.epochs[-1].get("eval_accuracy") if self.epochs else None

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / max(1, len(self.epochs))

    def to_dict(self) -> dict:
        return asdict(self) | {"seconds_per_epoch": self.seconds_per_epoch}


def check_dataset(x: torch.Tensor, y: torch.Tensor, what: str = "training data") -> None:
    if len(x) == 0:
        raise DataError(f"{what} is empty.")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} inputs but {len(y)} labels.")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"{what} contains NaN or Inf values.")
    if y.dtype not in (torch.int64, torch.int32) or (y < 0).any():
        raise DataError(f"{what}: labels must be non-negative integers (int64), got {y.dtype}.")


def train_classifier(model: nn.Module, param_groups: list[dict], x: torch.Tensor, y: torch.Tensor,
                     config: TrainConfig, eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                     progress: bool = True, desc: str = "train") -> TrainHistory:
    """Train ``model`` on ``(x, y)`` with AdamW over ``param_groups`` (dicts with "params" and
    optionally "lr"/"weight_decay"); evaluates on ``eval_data`` after every epoch."""
    check_dataset(x, y)
    if eval_data is not None:
        check_dataset(*eval_data, what="evaluation data")
    groups = [dict(g) for g in param_groups if any(p.requires_grad for p in g["params"])]
    if not groups:
        raise ConfigError("nothing to train: every parameter group is empty or frozen.")
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x) / config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_fraction * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for g in groups for p in g["params"]]
    history = TrainHistory()
    for epoch in range(config.epochs):
        start = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total_loss = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{config.epochs}", leave=False, disable=not progress)
        for step in bar:
            idx = perm[step * config.batch_size:(step + 1) * config.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            opt.step()
            sched.step()
            total_loss += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        history.seconds += time.perf_counter() - start  # training time only, evaluation excluded
        record = {"epoch": epoch + 1, "train_loss": total_loss / steps_per_epoch}
        if eval_data is not None:
            record["eval_accuracy"] = accuracy(predict(model, eval_data[0]), eval_data[1])
        history.epochs.append(record)
    model.eval()
    return history

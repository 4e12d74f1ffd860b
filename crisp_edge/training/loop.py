"""One supervised training loop, shared by adaptation (classification and language modelling) and its
baselines.

AdamW over the parameter groups it is given, linear warm-up then cosine (or constant) schedule,
gradient clipping, seeded shuffling, per-epoch evaluation, a progress bar and a history. The batch loss
is cross-entropy of the model's logits against class labels, or the ``loss_fn`` given (e.g. next-token
cross-entropy, ``crisp_edge.training.adapt_lm.next_token_loss``).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from crisp_edge.errors import CheckpointError, ConfigError, DataError
from crisp_edge.files.run_state import (
    RUN_STATE_FILE,
    check_checkpointing,
    load_run_state,
    optimizer_tensors,
    restore_copy_,
    restore_optimizer_,
    save_run_state,
)
from crisp_edge.training.evaluate import accuracy, model_logits, predict

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
        _check_range("lr", self.lr, 0, 10, low_open=True)
        _check_range("weight_decay", self.weight_decay, 0, 10)
        _check_range("warmup_fraction", self.warmup_fraction, 0, 1)
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.clip_grad_norm is not None:
            _check_range("clip_grad_norm", self.clip_grad_norm, 0, math.inf, low_open=True, hint="or None")
        _check_range("label_smoothing", self.label_smoothing, 0, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}.")


def _check_range(name: str, v, low: float, high: float, low_open: bool = False, hint: str = "") -> None:
    """``v`` is a real number in [low, high) (or (low, high) with ``low_open``); NaN never is."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if low_open else low <= v) and v < high
    if not ok:
        raise ConfigError(f"{name} must be in {'(' if low_open else '['}{low}, {high}){' ' + hint if hint else ''}, "
                          f"got {v!r}.")


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


#: ``loss_fn(model, x_batch, y_batch) -> scalar loss`` (``train_classifier``'s hook for other objectives).
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def check_dataset(x: torch.Tensor, y: torch.Tensor, what: str = "training data", *, per_token: bool = False) -> None:
    """Raise a DataError unless ``(x, y)`` is a dataset: as many inputs as labels, finite inputs, and
    labels that are a 1-D tensor of non-negative integers (``per_token``: integer targets of ``x``'s shape,
    e.g. the token windows themselves for next-token prediction)."""
    for name, t in (("inputs", x), ("labels", y)):
        if not isinstance(t, torch.Tensor):
            raise DataError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() == 0:
            raise DataError(f"{what}: {name} must have a batch dimension, got a 0-dim tensor.")
    if len(x) == 0:
        raise DataError(f"{what} is empty.")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} inputs but {len(y)} labels.")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"{what} contains NaN or Inf values.")
    if per_token:
        if y.shape != x.shape or y.dtype not in (torch.int64, torch.int32) or (y < 0).any():
            raise DataError(f"{what}: targets must be non-negative integers of the inputs' shape {tuple(x.shape)}, "
                            f"got {y.dtype} of shape {tuple(y.shape)}.")
        return
    if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32) or (y < 0).any():
        raise DataError(f"{what}: labels must be a 1-D tensor of non-negative integers (int64), got {y.dtype} "
                        f"of shape {tuple(y.shape)}.")


def check_mask(x: torch.Tensor, attention_mask: torch.Tensor | None, what: str = "training data") -> None:
    """An attention mask must be an integer or bool tensor of ``x``'s shape (1 = real token, 0 = padding)."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.is_floating_point() \
            or tuple(attention_mask.shape) != tuple(x.shape):
        got = f"{attention_mask.dtype} of shape {tuple(attention_mask.shape)}" if isinstance(
            attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise DataError(f"{what}: the attention mask must be an integer tensor of the token ids' shape "
                        f"{tuple(x.shape)} (1 = token, 0 = padding), got {got}.")


def expected_inputs(model: nn.Module) -> tuple[str, tuple[int | None, ...], torch.dtype] | None:
    """What ``model`` takes, read from the model itself: ``("image", (C, H, W), dtype)`` for timm and
    Hugging Face vision transformers (H, W None when the model accepts any size), ``("tokens", (), int64)``
    for language models, None when unknown."""
    patch = getattr(model, "patch_embed", None)  # timm
    if patch is not None and hasattr(patch, "img_size") and isinstance(getattr(patch, "proj", None), nn.Conv2d):
        fixed = getattr(patch, "strict_img_size", True) and not getattr(patch, "dynamic_img_size", False)
        size = tuple(patch.img_size) if fixed and patch.img_size is not None else (None, None)
        return "image", (patch.proj.in_channels, *size), patch.proj.weight.dtype
    config = getattr(model, "config", None)  # Hugging Face
    if config is not None and hasattr(config, "num_channels") and hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
        return "image", (config.num_channels, *size), next(model.parameters()).dtype
    if config is not None and hasattr(config, "vocab_size"):
        return "tokens", (), torch.int64
    return None


def check_inputs(model: nn.Module, x: torch.Tensor, what: str = "training data") -> None:
    """Raise a DataError naming the expected shape and dtype when ``x`` cannot go into ``model``."""
    spec = expected_inputs(model)
    if spec is None:
        return
    kind, shape, dtype = spec
    if kind == "tokens":
        if x.dtype not in (torch.int64, torch.int32) or x.dim() != 2:
            raise DataError(f"{what}: {type(model).__name__} takes token ids, an integer tensor (N, sequence), "
                            f"got {x.dtype} of shape {tuple(x.shape)}.")
        vocab = model.config.vocab_size
        if len(x) and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise DataError(f"{what}: token ids must lie in [0, {vocab}), got [{int(x.min())}, {int(x.max())}].")
        return
    want = "(N, " + ", ".join("any" if d is None else str(d) for d in shape) + ")"
    if x.dim() != 4 or any(d is not None and d != got for d, got in zip(shape, x.shape[1:])):
        hint = " (add the channel axis: x.unsqueeze(1))" if x.dim() == 3 and shape[0] == 1 else ""
        raise DataError(f"{what}: {type(model).__name__} takes images of shape {want} (N, channels, height, width), "
                        f"got {tuple(x.shape)}{hint}.")
    if x.dtype != dtype:
        hint = ", scaled and normalized as in training" if not x.is_floating_point() else ""
        raise DataError(f"{what}: images are {x.dtype} but the model computes in {dtype}; pass x.to({dtype}){hint}.")


def check_weights(model: nn.Module) -> None:
    """Raise a DataError when any of ``model``'s parameters holds NaN or Inf."""
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise DataError(f"model weights {bad[:5]} contain NaN or Inf; load a sound checkpoint before training.")


def train_classifier(model: nn.Module, param_groups: list[dict], x: torch.Tensor, y: torch.Tensor,
                     config: TrainConfig, eval_data: tuple[torch.Tensor, ...] | None = None,
                     progress: bool = True, desc: str = "train", *, checkpoint_dir: str | os.PathLike | None = None,
                     checkpoint_every: int | None = None, resume: bool = False,
                     attention_mask: torch.Tensor | None = None, loss_fn: LossFn | None = None) -> TrainHistory:
    """Train ``model`` on ``(x, y)`` with AdamW over ``param_groups`` (dicts with "params" and
    optionally "lr"/"weight_decay"); evaluates on ``eval_data`` after every epoch.

    Args:
        eval_data: ``(x, y)``, or ``(x, y, attention_mask)`` for padded token ids.
        attention_mask: beside token ids ``x`` (1 = token, 0 = padding); every batch takes its rows.
        loss_fn: the batch loss, ``loss_fn(model, x[idx], y[idx])``; default: cross-entropy of the model's
            logits against class labels (with ``config.label_smoothing``). With a ``loss_fn``, ``y`` holds
            per-token targets of ``x``'s shape (``check_dataset(per_token=True)``) and accuracy on
            ``eval_data`` is not computed (pass None and evaluate afterwards).
        checkpoint_dir: keep the run's state (trainable parameters, optimizer, scheduler, RNG, position,
            history) in ``checkpoint_dir/run_state.safetensors``, written atomically at the end of every
            epoch and every ``checkpoint_every`` steps.
        resume: continue from the state in ``checkpoint_dir`` if there is one (else start afresh). The
            resumed run computes exactly what the uninterrupted one would have (same parameters, bit
            for bit, on the same machine and thread count).
    """
    check_checkpointing(checkpoint_dir, checkpoint_every, resume)
    check_dataset(x, y, per_token=loss_fn is not None)
    check_inputs(model, x)
    if eval_data is not None and loss_fn is not None:
        raise ConfigError("eval_data measures classification accuracy; with a loss_fn, evaluate after training.")
    check_mask(x, attention_mask)
    eval_mask = None
    if eval_data is not None:
        eval_data, eval_mask = tuple(eval_data[:2]), (eval_data[2] if len(eval_data) > 2 else None)
        check_dataset(*eval_data, what="evaluation data")
        check_inputs(model, eval_data[0], what="evaluation data")
        check_mask(eval_data[0], eval_mask, what="evaluation data")
    check_weights(model)
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
    params = [p for g in opt.param_groups for p in g["params"]]
    history = TrainHistory()
    fingerprint = None if checkpoint_dir is None else _run_fingerprint(model, params, opt, x, y, config,
                                                                        attention_mask)
    first_epoch, first_step, perm, total_loss = 0, 0, None, 0.0
    if resume:
        loaded = load_run_state(checkpoint_dir, "train", fingerprint)
        if loaded is not None:
            first_epoch, first_step, perm, total_loss = _restore_(loaded, params, opt, gen, history)
            if not (0 <= first_epoch <= config.epochs and 0 <= first_step < steps_per_epoch
                    and len(history.epochs) == first_epoch and math.isfinite(total_loss)
                    and (first_step == 0 or (perm is not None and perm.dtype == torch.int64
                                             and torch.equal(perm.sort().values, torch.arange(len(x)))))):
                raise CheckpointError(f"the saved training state in {RUN_STATE_FILE} is inconsistent (epoch "
                                      f"{first_epoch}, step {first_step}); delete it to start over.")
            # the schedule's position, with the learning rates it gives there (as sched.step() computes them)
            position = first_epoch * steps_per_epoch + first_step
            lrs = [base * factor(position) for base in sched.base_lrs]
            sched.load_state_dict({**sched.state_dict(), "last_epoch": position, "_step_count": position + 1,
                                   "_last_lr": lrs})
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr

    def save(epoch: int, step: int) -> None:
        tensors, optim_meta = optimizer_tensors(opt)
        tensors |= {f"param.{i}": p for i, p in enumerate(params)}
        tensors |= {"rng.shuffle": gen.get_state(), "rng.torch": torch.get_rng_state()}
        if step:  # mid-epoch: the epoch's shuffle, which the generator has already moved past
            tensors["perm"] = perm
        save_run_state(checkpoint_dir, "train", fingerprint, tensors, {
            "epoch": epoch, "step": step, "total_loss": total_loss, "optimizer": optim_meta,
            "history": asdict(history)})

    for epoch in range(first_epoch, config.epochs):
        start = time.perf_counter()
        model.train()
        if epoch != first_epoch or perm is None:
            perm, total_loss = torch.randperm(len(x), generator=gen), 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{config.epochs}", leave=False, disable=not progress,
                   initial=first_step if epoch == first_epoch else 0)
        for step in range(first_step if epoch == first_epoch else 0, steps_per_epoch):
            idx = perm[step * config.batch_size:(step + 1) * config.batch_size]
            mask = None if attention_mask is None else attention_mask[idx]
            if loss_fn is None:
                loss = F.cross_entropy(model_logits(model, x[idx], mask), y[idx], label_smoothing=config.label_smoothing)
            elif mask is not None:
                raise ConfigError("a loss_fn takes no attention mask (language-model windows are unpadded).")
            else:
                loss = loss_fn(model, x[idx], y[idx])
            value = loss.item()
            if not math.isfinite(value):  # refused before the step, so the model keeps its last finite weights
                raise ConfigError(f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {value}); "
                                  "lower the learning rate or enable clip_grad_norm.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            opt.step()
            sched.step()
            total_loss += value
            bar.update()
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            if checkpoint_every and (epoch * steps_per_epoch + step + 1) % checkpoint_every == 0 \
                    and step + 1 < steps_per_epoch:
                history.seconds += time.perf_counter() - start
                save(epoch, step + 1)
                start = time.perf_counter()
        bar.close()
        history.seconds += time.perf_counter() - start  # training time only, evaluation excluded
        record = {"epoch": epoch + 1, "train_loss": total_loss / steps_per_epoch}
        if eval_data is not None:
            record["eval_accuracy"] = accuracy(predict(model, eval_data[0], attention_mask=eval_mask), eval_data[1])
        history.epochs.append(record)
        if checkpoint_dir is not None:
            save(epoch + 1, 0)
    model.eval()
    return history


def _run_fingerprint(model: nn.Module, params: list[nn.Parameter], opt, x: torch.Tensor, y: torch.Tensor,
                     config: TrainConfig, attention_mask: torch.Tensor | None = None) -> dict:
    """What a resumed run must share with the one that saved its state: the settings, the data, the
    trainable parameters' shapes and every other (frozen) tensor of the model, by SHA-256."""
    trainable = {id(p) for p in params}
    names = {n for n, p in model.named_parameters() if id(p) in trainable}
    frozen = {k: v for k, v in model.state_dict().items() if k not in names}
    data = {"x": x, "y": y} if attention_mask is None else {"x": x, "y": y, "attention_mask": attention_mask}
    return {"config": asdict(config), "data": [list(x.shape), str(x.dtype), _digest(data)],
            "params": [list(p.shape) for p in params], "groups": [len(g["params"]) for g in opt.param_groups],
            "frozen": _digest(frozen)}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _restore_(loaded, params, opt, gen, history) -> tuple[int, int, torch.Tensor | None, float]:
    """Put a saved run state back into the live objects; returns (epoch, step, perm, total_loss)."""
    tensors, state = loaded
    try:
        for i, p in enumerate(params):
            restore_copy_(p, tensors.get(f"param.{i}"), f"parameter {i}")
        restore_optimizer_(opt, tensors, state["optimizer"])
        gen.set_state(tensors["rng.shuffle"])
        torch.set_rng_state(tensors["rng.torch"])
        records = state["history"]["epochs"]
        if not all(isinstance(r, dict) and isinstance(r.get("train_loss"), float) for r in records):
            raise ValueError("history records are malformed")
        history.epochs[:] = list(records)
        history.seconds = float(state["history"]["seconds"])
        epoch, step = state["epoch"], state["step"]
        if isinstance(epoch, bool) or isinstance(step, bool) or not isinstance(epoch, int) or not isinstance(step, int):
            raise ValueError(f"position {epoch!r}, {step!r} is not a pair of integers")
        return epoch, step, tensors.get("perm"), float(state["total_loss"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"the saved training state in {RUN_STATE_FILE} is incomplete or damaged ({type(e).__name__}: "
                              f"{e}); delete it to start over.") from None

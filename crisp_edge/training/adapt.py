"""Task adaptation (Alg. 3): freeze the bases, train only the tiny mixers (and, if asked, a new task
head and the layers' biases), then save the task as a mixer file of kilobytes.

    report = adapt_(model, x_train, y_train, num_classes=10, eval_data=(x_test, y_test))
    save_mixers(model, "mnist.safetensors", task="mnist")
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crisp_edge.data.feed import feed
from crisp_edge.errors import ConfigError
from crisp_edge.files.fingerprint import bases_fingerprint
from crisp_edge.files.mixers import head_module
from crisp_edge.files.run_state import check_checkpointing
from crisp_edge.method.convert import crisp_layers, is_crisp
from crisp_edge.training.loop import (
    TrainConfig,
    TrainHistory,
    check_dataset,
    check_inputs,
    train_classifier,
)

#: Mixers sit at |A| <~ 0.4 after the closed-form retrofit (``gate_init_max``); Adam moves each
#: entry by about lr per step. Chosen on 3-epoch MNIST runs of the embedded ViT (s=4: 80.7% at
#: 1e-2, 83.8% at 3e-2, 87.4% with the head at 1e-2; s=8: 87.0% -> 88.5%); see the README.
DEFAULT_MIXER_LR = 3e-2
DEFAULT_HEAD_LR = 1e-2


@dataclass(frozen=True)
class AdaptConfig:
    """What adaptation trains, and how.

    Attributes:
        train: optimisation settings (epochs, batch size, schedule, seed, ...).
        mixer_lr: learning rate of the mixers.
        train_head: train the task head (a new one when ``num_classes`` differs from the model's).
        head_lr: learning rate of the head.
        train_biases: also train the CRISP layers' biases (counted in the trainable total).
        bias_lr: learning rate of the biases.
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=64))
    mixer_lr: float = DEFAULT_MIXER_LR
    train_head: bool = True
    head_lr: float = DEFAULT_HEAD_LR
    train_biases: bool = False
    bias_lr: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}.")
        for name in ("mixer_lr", "head_lr", "bias_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 10:
                raise ConfigError(f"{name} must be in (0, 10), got {v!r}.")
        for name in ("train_head", "train_biases"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")


@dataclass
class AdaptReport:
    trainable: dict[str, int]
    history: TrainHistory
    bases_unchanged: bool

    @property
    def trainable_total(self) -> int:
        return sum(self.trainable.values())

    @property
    def accuracy(self) -> float | None:
        return self.history.final_accuracy

    def to_dict(self) -> dict:
        return {"trainable": self.trainable, "trainable_total": self.trainable_total,
                "bases_unchanged": self.bases_unchanged, "history": self.history.to_dict()}


def new_head_(model: nn.Module, num_classes: int, seed: int = 0) -> nn.Linear:
    """Give ``model`` a freshly initialised head with ``num_classes`` outputs (seeded)."""
    found = head_module(model)
    if found is None:
        raise ConfigError(f"{model.crisp_arch} has no linear head to replace.")
    path, old = found
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                         dtype=old.weight.dtype, device=old.weight.device)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, head)
    return head


def mark_trainable_(model: nn.Module, *, head: bool = True, biases: bool = False) -> dict[str, list[nn.Parameter]]:
    """Freeze everything, then unfreeze the mixers (+ head, + CRISP biases). Returns them by kind."""
    if not is_crisp(model):
        raise ConfigError("model has no CRISP layers; retrofit_ it before adapting.")
    model.requires_grad_(False)
    layers = crisp_layers(model).values()
    groups: dict[str, list[nn.Parameter]] = {"mixers": [l.crisp_mixer for l in layers]}
    if biases:
        groups["biases"] = [l.bias for l in layers if l.bias is not None]
    if head:
        found = head_module(model)
        if found is None:
            raise ConfigError(f"{model.crisp_arch} has no linear head; use train_head=False.")
        groups["head"] = list(found[1].parameters())
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    return groups


def adapt_(model: nn.Module, x: Any, y: torch.Tensor | None = None, *, num_classes: int | None = None,
           config: AdaptConfig | None = None, eval_data: Any = None,
           progress: bool = True, checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
           resume: bool = False) -> AdaptReport:
    """Adapt a CRISP model to a task in place: bases frozen, mixers (+ head, + biases) trained.

        adapt_(model, x, y)                                # tensors
        adapt_(model, load_dataset("images/", input_spec_of(model)), eval_data=val)
        adapt_(model, my_dataloader)                       # a torch Dataset / DataLoader of (input, label)
        adapt_(model, "texts.jsonl", eval_data="val.jsonl")  # text: the model's own tokenizer, with masks

    Args:
        x, y: the training data: inputs and integer labels as tensors, or (``y`` omitted) anything
            ``crisp_edge.data.feed.feed`` takes: a ``LabeledData``, a torch ``Dataset`` / ``DataLoader``,
            an ``(x, y)`` pair or a data path. Checked against the model's ``InputSpec`` first.
        num_classes: the task's class count; a new head is created when it differs from the model's
            (default: the data's class count when it names its classes, else the model's head).
        eval_data: evaluated after every epoch (the report's accuracy); the same forms as ``x``.
        checkpoint_dir, checkpoint_every, resume: keep the run's state and continue after a kill (see
            ``train_classifier``); resume with the same model, data and config.
    """
    config = config or AdaptConfig()
    if not isinstance(config, AdaptConfig):
        raise ConfigError(f"config must be an AdaptConfig, got {type(config).__name__}.")
    check_checkpointing(checkpoint_dir, checkpoint_every, resume)  # everything checked before the model changes
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if not is_crisp(model):
        raise ConfigError("model has no CRISP layers; retrofit_ it before adapting.")
    train = feed(x, y, model=model, what="training data")
    x, y = train.x, train.y
    if eval_data is not None:
        val = feed(eval_data, model=model, what="evaluation data", class_names=train.class_names)
        eval_data = (val.x, val.y, val.attention_mask)
        check_dataset(*eval_data[:2], what="evaluation data")
        check_inputs(model, eval_data[0], what="evaluation data")
    check_dataset(x, y)
    check_inputs(model, x)
    if num_classes is None and train.class_names is not None:
        num_classes = len(train.class_names)
    if num_classes is not None:
        found = head_module(model)
        if found is None or found[1].out_features != num_classes:
            new_head_(model, num_classes, seed=config.train.seed)
    head = head_module(model)
    if head is not None and int(y.max()) >= head[1].out_features:
        raise ConfigError(f"labels go up to {int(y.max())} but the head has {head[1].out_features} outputs; "
                          "pass num_classes= to give the model a head for this task.")
    before = bases_fingerprint(model)
    groups = mark_trainable_(model, head=config.train_head, biases=config.train_biases)
    lrs = {"mixers": config.mixer_lr, "head": config.head_lr, "biases": config.bias_lr}
    param_groups = [{"params": ps, "lr": lrs[kind]} for kind, ps in groups.items()]
    history = train_classifier(model, param_groups, x, y, config.train, eval_data, progress, desc="adapt",
                               checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
                               attention_mask=train.attention_mask)
    trainable = {kind: sum(p.numel() for p in ps) for kind, ps in groups.items()}
    return AdaptReport(trainable, history, bases_unchanged=bases_fingerprint(model) == before)

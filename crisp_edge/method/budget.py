"""Parameter budgets of a CRISP model: what is stored, what a task trains, what it compresses to."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from crisp_edge.method.convert import crisp_bases


@dataclass(frozen=True)
class GroupBudget:
    key: str
    role: str
    n_layers: int
    d_out: int
    d_in: int
    u: int
    r: int
    s: int
    full_rank: int
    original: int   # dense weight parameters of the group's layers
    stored: int     # u*r (basis) + n*r*s (mixers)
    trainable: int  # n*r*s: the mixers, what a task trains


@dataclass(frozen=True)
class Budget:
    """Totals over every CRISP group (weights only: biases are kept per layer, unchanged)."""

    original: int
    stored: int
    trainable_per_task: int
    groups: tuple[GroupBudget, ...]

    @property
    def compression(self) -> float:
        """Original dense weight parameters / stored CRISP parameters (>1 means smaller)."""
        return self.original / self.stored if self.stored else float("nan")

    @property
    def kept_fraction(self) -> float:
        return self.stored / self.original if self.original else float("nan")

    @property
    def max_trainable_per_layer(self) -> int:
        return max((g.r * g.s for g in self.groups), default=0)

    def to_dict(self) -> dict:
        return {
            "original": self.original, "stored": self.stored, "trainable_per_task": self.trainable_per_task,
            "compression": self.compression, "kept_fraction": self.kept_fraction,
            "max_trainable_per_layer": self.max_trainable_per_layer,
            "groups": [asdict(g) for g in self.groups],
        }


def budget(model: nn.Module) -> Budget:
    """The parameter budget of a converted model."""
    groups = []
    for key, b in crisp_bases(model).items():
        n = b.n_layers
        groups.append(GroupBudget(
            key=key, role=b.role, n_layers=n, d_out=b.d_out, d_in=b.d_in, u=b.u, r=b.r, s=b.s,
            full_rank=b.full_rank, original=n * b.d_in * b.d_out, stored=b.u * b.r + n * b.r * b.s,
            trainable=n * b.r * b.s,
        ))
    return Budget(
        original=sum(g.original for g in groups), stored=sum(g.stored for g in groups),
        trainable_per_task=sum(g.trainable for g in groups), groups=tuple(groups),
    )

"""Choosing the next token from a step's logits: greedy, or temperature + nucleus (top-p) sampling
with a seeded generator, so a run is repeatable and the same on every runtime given the same logits."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from crisp_edge.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    ``temperature`` 0 (the default) is greedy decoding (argmax; ties go to the lowest id), which is what
    parity compares. Above 0 the logits are divided by it and a token is drawn from the smallest set of
    most likely tokens whose probabilities reach ``top_p``, with ``numpy.random.default_rng(seed)``.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and 0 <= self.temperature <= 100):
            raise ConfigError(f"temperature must be a number in [0, 100] (0 = greedy), got {self.temperature!r}.")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None = None) -> int:
    """The next token id from one position's logits ``(vocab,)``."""
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ConfigError(f"a step's logits must be one vector (vocab,), got shape {logits.shape}.")
    if not np.isfinite(logits).all():
        raise ConfigError("a step's logits hold NaN or infinity: the model or runtime produced garbage.")
    if sampling.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = int(np.searchsorted(np.cumsum(p[order]), sampling.top_p) + 1)
    kept = order[:keep]
    q = p[kept] / p[kept].sum()
    return int(kept[(rng or sampling.rng()).choice(keep, p=q)])

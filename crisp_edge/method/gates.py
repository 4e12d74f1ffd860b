"""Gates G applied inside the CRISP transform, and where they are applied (placement).

The paper's default is SiLU-style gating of the mixer, ``G(A) = sigmoid(A) * A`` placed "PRE"
(``W = B @ G(A)``). The ablation gates (none, relu, gelu) and placements (POST: ``G(B @ A)``, TEMP:
``G(B) @ A``) are selectable. Each gate says whether it can be inverted on its increasing branch,
which is what the closed-form retrofit needs.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crisp_edge.errors import ConfigError


@dataclass(frozen=True)
class Gate:
    """A scalar gate with, where it exists, the increasing branch ``[argmin, inf)`` to invert on."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    argmin: float | None  # the gate's minimiser; None when the gate is increasing everywhere
    invertible: bool = True

    @property
    def min_value(self) -> float:
        """The smallest value the gate takes (-inf when unbounded below)."""
        if self.argmin is None:
            return -math.inf
        return float(self.fn(torch.tensor(self.argmin, dtype=torch.float64)))

    def inverse(self, c: torch.Tensor, iters: int = 80) -> torch.Tensor:
        """Solve ``G(a) = c`` for ``a >= argmin`` (float64 bisection, then two Newton steps)."""
        if not self.invertible:
            raise ConfigError(f"gate {self.name!r} is not invertible; use a gradient retrofit instead.")
        c = c.to(torch.float64)
        if self.argmin is None:  # increasing everywhere and invertible: the identity
            return c.clone()
        if bool((c < self.min_value).any()):
            raise ConfigError(
                f"gate {self.name!r} cannot produce {float(c.min()):.4g} (its minimum is {self.min_value:.4g}); "
                "scale the coefficients first."
            )
        lo = torch.full_like(c, self.argmin)
        hi = c.clamp(min=0.0) + 1.0  # for these gates a - G(a) <= 0.28 when a > 0
        a = _bisect(self.fn, c, lo, hi, iters)
        for _ in range(2):  # Newton polish; bisection already brackets the root tightly
            a_req = a.detach().requires_grad_(True)
            with torch.enable_grad():
                y = self.fn(a_req)
                (g,) = torch.autograd.grad(y.sum(), a_req)
            step = torch.where(g.abs() > 1e-6, (y.detach() - c) / g, torch.zeros_like(c))
            a = torch.maximum(a - step, torch.full_like(a, self.argmin))
        return a.detach()


def _bisect(fn, c, lo, hi, iters):
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < c
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _silu(a: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(a) * a


def _gelu(a: torch.Tensor) -> torch.Tensor:
    return F.gelu(a)


def _identity(a: torch.Tensor) -> torch.Tensor:
    return a


GATES: dict[str, Gate] = {
    "silu": Gate("silu", _silu, argmin=-1.2784645427610738),
    "gelu": Gate("gelu", _gelu, argmin=-0.7517915241517157),
    "none": Gate("none", _identity, argmin=None),
    "relu": Gate("relu", torch.relu, argmin=None, invertible=False),
}

#: Where the gate is applied. "pre": W = B @ G(A) (the paper's choice); "post": W = G(B @ A);
#: "temp": W = G(B) @ A.
PLACEMENTS = ("pre", "post", "temp")


def get_gate(name: str) -> Gate:
    try:
        return GATES[name]
    except KeyError:
        raise ConfigError(f"unknown gate {name!r}; choose one of {sorted(GATES)}.") from None


def crisp_weight_matrix(basis: torch.Tensor, mixer: torch.Tensor, gate: Gate, placement: str) -> torch.Tensor:
    """The (u x s) matrix the layer's weight is a row-major reshape of."""
    if placement == "pre":
        return basis @ gate.fn(mixer)
    if placement == "post":
        return gate.fn(basis @ mixer)
    if placement == "temp":
        return gate.fn(basis) @ mixer
    raise ConfigError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}.")

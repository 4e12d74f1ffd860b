"""The CRISP layer (Alg. 1): a shared basis per group, a tiny gated mixer per layer.

    W = reshape(B @ G(A), (d_out, d_in))        # row-major: W.reshape(u, s) == B @ G(A)
    y = x @ W.T + b

or, for a *transposed* group, ``W.T = reshape(B @ G(A), (d_in, d_out))``: with ``s = d_out`` the basis
then spans the layers' input side (Basis Sharing's structure) where ``s = d_in`` untransposed gives an
output-side basis. ``CrispBasis.to_folded`` / ``from_folded`` are the one place that knows which.

Names are the contract: a layer's mixer is the parameter ``crisp_mixer``; the bases live once, at
model level, under ``crisp_bases.<group>.weight``. Layers hold a *reference* to their group's
``CrispBasis`` (not a submodule), so a basis is stored, saved and counted once however many layers
use it, and gradients from every layer of the group accumulate in the same tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crisp_edge.method.gates import crisp_weight_matrix, get_gate

MIXER_NAME = "crisp_mixer"
BASES_NAME = "crisp_bases"


def fold_weight(w: torch.Tensor, u: int, s: int, transpose: bool = False) -> torch.Tensor:
    """A dense ``(d_out, d_in)`` weight in the folded layout ``(u, s)``: ``W.reshape(u, s)``, or
    ``W.T.reshape(u, s)`` for a transposed group."""
    return (w.T if transpose else w).reshape(u, s)


def unfold_weight(m: torch.Tensor, d_out: int, d_in: int, transpose: bool = False) -> torch.Tensor:
    """The dense ``(d_out, d_in)`` weight of a ``(u, s)`` product: the inverse of ``fold_weight``."""
    return m.reshape(d_in, d_out).T if transpose else m.reshape(d_out, d_in)


class CrispBasis(nn.Module):
    """The basis ``B`` (u x r) shared by the layers of one group, plus the group's layout."""

    def __init__(self, role: str, layer_names: list[str], d_in: int, d_out: int, s: int, r: int,
                 gate: str = "silu", placement: str = "pre", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, transpose: bool = False) -> None:
        super().__init__()
        self.role, self.layer_names = role, list(layer_names)
        self.d_in, self.d_out, self.s, self.r = d_in, d_out, s, r
        self.u = d_in * d_out // s
        self.gate_name, self.placement = gate, placement
        self.transpose = bool(transpose)
        self.weight = nn.Parameter(torch.empty(self.u, r, dtype=dtype, device=device))

    @property
    def folded_dense_shape(self) -> tuple[int, int]:
        """The shape the ``(u, s)`` product is reshaped to: ``(d_out, d_in)``, or ``(d_in, d_out)`` (W.T)
        for a transposed group."""
        return (self.d_in, self.d_out) if self.transpose else (self.d_out, self.d_in)

    def to_folded(self, w: torch.Tensor) -> torch.Tensor:
        """A dense ``(d_out, d_in)`` weight in this group's folded layout ``(u, s)``."""
        return fold_weight(w, self.u, self.s, self.transpose)

    def from_folded(self, m: torch.Tensor) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` weight of a ``(u, s)`` product (the inverse of ``to_folded``)."""
        return unfold_weight(m, self.d_out, self.d_in, self.transpose)

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    @property
    def full_rank(self) -> int:
        """The rank at which any weights of this group are exactly representable."""
        return min(self.u, self.n_layers * self.s)

    def extra_repr(self) -> str:
        return (f"role={self.role}, layers={self.n_layers}, d_out={self.d_out}, d_in={self.d_in}, "
                f"u={self.u}, r={self.r}, s={self.s}, gate={self.gate_name}, placement={self.placement}"
                + (", transpose=True" if self.transpose else ""))


class CrispLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` whose weight is built from a shared basis and a mixer."""

    def __init__(self, basis: CrispBasis, bias: bool = True) -> None:
        super().__init__()
        object.__setattr__(self, "_basis", basis)  # a reference: the basis is registered once, at model level
        self.in_features, self.out_features = basis.d_in, basis.d_out
        ref = basis.weight
        self.crisp_mixer = nn.Parameter(torch.empty(basis.r, basis.s, dtype=ref.dtype, device=ref.device))
        self.bias = nn.Parameter(torch.empty(basis.d_out, dtype=ref.dtype, device=ref.device)) if bias else None
        self._gate = get_gate(basis.gate_name)

    @property
    def basis(self) -> CrispBasis:
        return self._basis

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``(d_out, d_in)`` this layer currently computes with."""
        b = self._basis
        return b.from_folded(crisp_weight_matrix(b.weight, self.crisp_mixer, self._gate, b.placement))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        b = self._basis
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={b.r}, s={b.s}, gate={b.gate_name}")

"""Fingerprints that bind a mixer file to the exact bases (and layout) it was trained on.

The basis fingerprint is a SHA-256 over every basis tensor (group key, shape, dtype, bytes). It is
cached per basis and recomputed only when the tensor changes (its in-place version counter moves),
so checking a mixer file during a task switch costs microseconds, not a pass over the bases.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from crisp_edge.method.convert import crisp_bases
from crisp_edge.method.layer import CrispBasis


def _basis_digest(basis: CrispBasis) -> bytes:
    w = basis.weight
    key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape), str(w.device))
    cached = basis.__dict__.get("_fingerprint_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    h.update(f"{tuple(w.shape)}|{w.dtype}".encode())
    h.update(w.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    digest = h.digest()
    basis.__dict__["_fingerprint_cache"] = (key, digest)
    return digest


def bases_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of all of ``model``'s CRISP bases, in group order."""
    h = hashlib.sha256()
    for key, basis in sorted(crisp_bases(model).items()):
        h.update(key.encode() + b"\0")
        h.update(_basis_digest(basis))
    return h.hexdigest()

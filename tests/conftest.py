"""Shared test set-up: single-threaded torch and the toy models of ``crisp_edge.testing``."""
from __future__ import annotations

import copy

# The hub is switched off (offline) for every test by the repository root conftest.py.
import pytest
import torch

from crisp_edge.testing import TOYS, toy_model

# Tiny tensors gain nothing from threads, and on a busy machine torch's thread pool can make a toy
# retrofit hundreds of times slower (spinning workers compete with other processes for the cores).
torch.set_num_threads(1)

ARCHS = tuple(TOYS)

_cache: dict[str, torch.nn.Module] = {}


def fresh_toy(arch: str) -> torch.nn.Module:
    """A deep copy of the seed-0 toy of ``arch`` (built once per session, copied per test)."""
    if arch not in _cache:
        _cache[arch] = toy_model(arch, seed=0)
    return copy.deepcopy(_cache[arch])


def original_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter of a plain model, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param

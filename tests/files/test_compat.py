"""Files written by crisp-edge 0.1.0 before the package was reorganised (tests/fixtures/v0.1.0, made at
commit ba9a53f) still load and compute the same outputs: a checkpoint and a task's mixer file."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import crisp_edge as ce
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.testing import forward

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v0.1.0"


def test_old_checkpoint_and_mixer_file_load_and_match_their_outputs():
    ref = load_file(str(FIXTURES / "outputs.safetensors"))
    model = ce.load_checkpoint(FIXTURES / "ckpt")
    with torch.no_grad():
        assert torch.equal(forward(model, {"x": ref["x"]}), ref["default"])
    mf = read_mixers(FIXTURES / "task1.mixers.safetensors")
    assert mf.task == "task1"
    apply_mixers_(model, mf)
    with torch.no_grad():
        assert torch.equal(forward(model, {"x": ref["x"]}), ref["task1"])

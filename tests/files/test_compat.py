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


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The outputs were recorded on another CPU: the same numbers up to float32 summation order (PyTorch's AVX-512
    and AVX2 kernels differ in the last bits: 4.5e-8 measured on logits of ~0.2); a file loaded wrong, or another
    task's mixers, moves them by whole percent."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_old_checkpoint_and_mixer_file_load_and_match_their_outputs():
    ref = load_file(str(FIXTURES / "outputs.safetensors"))
    model = ce.load_checkpoint(FIXTURES / "ckpt")
    with torch.no_grad():
        close(forward(model, {"x": ref["x"]}), ref["default"])
    mf = read_mixers(FIXTURES / "task1.mixers.safetensors")
    assert mf.task == "task1"
    apply_mixers_(model, mf)
    with torch.no_grad():
        close(forward(model, {"x": ref["x"]}), ref["task1"])

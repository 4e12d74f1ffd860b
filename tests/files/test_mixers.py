"""Mixer files: round trip, swapping, size, and each mismatch refused with its own error."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from crisp_edge import CrispConfig, RoleConfig, crisp_layers, retrofit_
from crisp_edge.errors import (
    BasisMismatchError,
    CorruptMixerFileError,
    DtypeMismatchError,
    GateMismatchError,
    LayoutMismatchError,
    MixerFileError,
)
from crisp_edge.files.mixers import (
    apply_mixers_,
    read_mixers,
    save_mixers,
)
from crisp_edge.files.switcher import TaskSwitcher
from crisp_edge.testing import toy_timm_vit

CONFIG = CrispConfig(default=RoleConfig(s=4, group_size=2))


def crisp_toy(config: CrispConfig = CONFIG, seed: int = 0) -> torch.nn.Module:
    model = toy_timm_vit(seed=seed)  # 4 blocks, width 32, 16x16 grey images
    retrofit_(model, config, progress=False)
    return model


def perturb_task_(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for training a task: new mixers and a new 3-class head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("crisp_mixer"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.head = torch.nn.Linear(32, 3)
        model.head.weight.copy_(torch.randn(3, 32, generator=g))


@pytest.fixture()
def x():
    return torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_round_trip_and_switch_back_bit_for_bit(tmp_path, x):
    model = crisp_toy()
    base_out = model(x)
    base_file = save_mixers(model, tmp_path / "base.safetensors", task="base")
    perturb_task_(model, seed=1)
    task_out = model(x)
    task_file = save_mixers(model, tmp_path / "t1.safetensors", task="t1", labels=["a", "b", "c"])

    fresh = crisp_toy()  # same bases (deterministic retrofit), base mixers
    mf = apply_mixers_(fresh, task_file)
    assert mf.task == "t1" and mf.labels == ["a", "b", "c"]
    assert torch.equal(fresh(x), task_out)
    switcher = TaskSwitcher(fresh)
    switcher.add(base_file)
    switcher.add(task_file)
    for _ in range(2):
        switcher.switch("base")
        assert torch.equal(fresh(x), base_out)
        switcher.switch("t1")
        assert torch.equal(fresh(x), task_out)
    with pytest.raises(MixerFileError, match="no task 'nope'"):
        switcher.switch("nope")


def test_file_size_close_to_raw_bytes(tmp_path):
    model = crisp_toy(CrispConfig(default=RoleConfig(s=4, group_size=2, r=24)))
    path = save_mixers(model, tmp_path / "m.safetensors", task="m")
    mf = read_mixers(path)
    assert set(mf.tensors) == {f"mixer.{k}" for k in ("qkv_0_1", "qkv_2_3", "proj_0_1", "proj_2_3", "fc1_0_1",
                                                       "fc1_2_3", "fc2_0_1", "fc2_2_3")} | {"head.weight", "head.bias"}
    assert path.stat().st_size <= 1.10 * mf.raw_bytes + 1024


def test_fp16_storage_halves_and_upcasts(tmp_path, x):
    model = crisp_toy()
    path = save_mixers(model, tmp_path / "h.safetensors", task="h", storage_dtype=torch.float16)
    mf = read_mixers(path)
    assert all(t.dtype == torch.float16 for t in mf.tensors.values())
    fresh = crisp_toy()
    perturb_task_(fresh, 3)
    apply_mixers_(fresh, mf)
    assert fresh.blocks[0].attn.qkv.crisp_mixer.dtype == torch.float32
    torch.testing.assert_close(fresh(x), model(x), atol=2e-3, rtol=1e-2)


def test_other_bases_refused(tmp_path):
    path = save_mixers(crisp_toy(seed=0), tmp_path / "m.safetensors", task="m")
    other = crisp_toy(seed=1)  # another pretrained model -> other bases, same layout
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(BasisMismatchError, match="trained on other bases"):
        apply_mixers_(other, path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())  # nothing written


def test_bases_changed_in_place_refused(tmp_path):
    model = crisp_toy()
    path = save_mixers(model, tmp_path / "m.safetensors", task="m")
    with torch.no_grad():
        model.crisp_bases["fc1_0_1"].weight[0, 0] += 1e-3
    with pytest.raises(BasisMismatchError):
        apply_mixers_(model, path)


def test_other_layout_refused(tmp_path):
    path = save_mixers(crisp_toy(), tmp_path / "m.safetensors", task="m")
    with pytest.raises(LayoutMismatchError, match="groups differ"):
        apply_mixers_(crisp_toy(CrispConfig(default=RoleConfig(s=4, group_size=4))), path)
    with pytest.raises(LayoutMismatchError, match="r 8 vs 4"):
        apply_mixers_(crisp_toy(CrispConfig(default=RoleConfig(s=4, group_size=2, r=4))), path)


def test_transposed_layout_refused(tmp_path):
    """Same shapes, same s and r, but one model reshapes W.T: its mixers mean something else."""
    transposed = CrispConfig(default=RoleConfig(s=4, group_size=2), roles={"fc1": RoleConfig(s=4, group_size=2, transpose=True)})
    path = save_mixers(crisp_toy(), tmp_path / "m.safetensors", task="m")
    with pytest.raises(LayoutMismatchError, match="transpose False vs True"):
        apply_mixers_(crisp_toy(transposed), path)
    tpath = save_mixers(crisp_toy(transposed), tmp_path / "t.safetensors", task="t")
    assert read_mixers(tpath).meta["layout"]["fc1_0_1"]["transpose"] is True
    with pytest.raises(LayoutMismatchError, match="transpose True vs False"):
        apply_mixers_(crisp_toy(), tpath)
    apply_mixers_(crisp_toy(transposed), tpath)  # its own layout: applies


def test_other_gate_refused(tmp_path):
    path = save_mixers(crisp_toy(), tmp_path / "m.safetensors", task="m")
    with pytest.raises(GateMismatchError, match="gate 'silu' vs 'gelu'"):
        apply_mixers_(crisp_toy(CrispConfig(default=RoleConfig(s=4, group_size=2, gate="gelu"))), path)


def test_wrong_dtype_refused(tmp_path):
    path = save_mixers(crisp_toy(), tmp_path / "m.safetensors", task="m")
    with pytest.raises(DtypeMismatchError, match="trained in float32"):
        apply_mixers_(crisp_toy().double(), path)


def _rewrite(path, mutate):
    """Rewrite a mixer file's tensors/metadata through safetensors (a well-formed but lying file)."""
    from safetensors.torch import load, save

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["crisp_edge"])
    tensors = load(data)
    mutate(meta, tensors)
    path.write_bytes(save(tensors, metadata={"crisp_edge": json.dumps(meta)}))


def test_declared_dtype_must_match_tensors(tmp_path):
    path = save_mixers(crisp_toy(), tmp_path / "m.safetensors", task="m")
    _rewrite(path, lambda meta, t: meta.update(storage_dtype="float16"))
    with pytest.raises(DtypeMismatchError, match="declares float16"):
        read_mixers(path)


@pytest.mark.parametrize("cut", [1, 7, 100, -1, -50])
def test_truncated_file_refused(tmp_path, cut):
    path = save_mixers(crisp_toy(), tmp_path / "m.safetensors", task="m")
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CorruptMixerFileError):
        read_mixers(path)


def test_flipped_data_byte_refused(tmp_path):
    path = save_mixers(crisp_toy(), tmp_path / "m.safetensors", task="m")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptMixerFileError, match="SHA-256"):
        read_mixers(path)


def test_newer_version_and_foreign_files_refused(tmp_path):
    path = save_mixers(crisp_toy(), tmp_path / "m.safetensors", task="m")
    _rewrite(path, lambda meta, t: meta.update(version=99))
    with pytest.raises(CorruptMixerFileError, match="upgrade crisp-edge"):
        read_mixers(path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CorruptMixerFileError, match="not a crisp-edge mixer file"):
        read_mixers(tmp_path / "plain.safetensors")
    with pytest.raises(MixerFileError, match="does not exist"):
        read_mixers(tmp_path / "missing.safetensors")


def test_swapping_keeps_bases_shared_and_untouched(tmp_path, x):
    model = crisp_toy()
    bases = {k: v.weight.detach().clone() for k, v in model.crisp_bases.items()}
    twin = copy.deepcopy(model)
    perturb_task_(twin, 5)
    apply_mixers_(model, save_mixers(twin, tmp_path / "t.safetensors", task="t"))
    assert all(torch.equal(model.crisp_bases[k].weight, v) for k, v in bases.items())
    assert model.blocks[0].attn.qkv.basis is model.crisp_bases["qkv_0_1"]


def test_switching_restores_what_a_file_does_not_hold(tmp_path, x):
    """A task with trained biases followed by one without: the second must not inherit the biases."""
    model = crisp_toy()
    base_out = model(x)
    plain = save_mixers(model, tmp_path / "plain.safetensors", task="plain", head=False)
    with torch.no_grad():
        for layer in crisp_layers(model).values():
            layer.bias.add_(0.1)
    with_bias = save_mixers(model, tmp_path / "bias.safetensors", task="bias", biases=True)
    biased_out = model(x)
    live = crisp_toy()
    switcher = TaskSwitcher(live)
    switcher.add(with_bias)
    switcher.add(plain)
    switcher.switch("bias")
    assert torch.equal(live(x), biased_out)
    switcher.switch("plain")
    assert torch.equal(live(x), base_out)
    switcher.switch("bias")
    switcher.reset()
    assert torch.equal(live(x), base_out) and switcher.active is None


def test_a_save_never_replaces_a_file_it_did_not_write(tmp_path):
    from crisp_edge.files.mixers import check_mixer_target

    model = crisp_toy()
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("the user's own file")
    with pytest.raises(MixerFileError, match="not a crisp-edge mixer file"):
        save_mixers(model, foreign, task="t")
    assert foreign.read_text() == "the user's own file"
    (tmp_path / "dir").mkdir()
    with pytest.raises(MixerFileError, match="not a regular file|is a folder; give a file path"):
        save_mixers(model, tmp_path / "dir", task="t")
    ours = save_mixers(model, tmp_path / "t.safetensors", task="t")
    with pytest.raises(MixerFileError, match="--overwrite"):
        check_mixer_target(ours, overwrite=False)
    save_mixers(model, ours, task="t2")  # the library's default replaces its own kind
    assert read_mixers(ours).task == "t2"


@pytest.mark.timeout(30)
def test_a_fifo_given_as_a_mixer_file_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "m.safetensors")
    with pytest.raises(MixerFileError, match="FIFO"):
        read_mixers(tmp_path / "m.safetensors")

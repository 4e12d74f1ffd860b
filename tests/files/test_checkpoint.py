"""Checkpoints: exact round trips, and every kind of damaged or mismatched folder refused clearly."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
import transformers

from crisp_edge import (
    CheckpointError,
    CrispConfig,
    RoleConfig,
    crisp_bases,
    is_crisp,
    load_checkpoint,
    retrofit_,
    save_checkpoint,
)
from crisp_edge.files.checkpoint import META_FILE, WEIGHTS_FILE, read_checkpoint_meta
from crisp_edge.testing import (
    TIMM_VIT_SOURCE,
    example_inputs,
    forward,
    toy_model,
    toy_timm_vit,
)
from tests.conftest import fresh_toy

CONFIG = CrispConfig(default=RoleConfig(s=4, group_size=2, r=6))  # lossy, so a wrong load would show


def crisp_toy(arch="timm-vit"):
    model = fresh_toy(arch)
    retrofit_(model, CONFIG, progress=False)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved timm toy checkpoint and the outputs it must reproduce (treat as read-only)."""
    model = crisp_toy()
    inputs = example_inputs(model)
    folder = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "ckpt", extra={"note": "hi"})
    return folder, inputs, forward(model, inputs).detach()


def copy_checkpoint(src, dst):
    dst.mkdir()
    for name in (META_FILE, WEIGHTS_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def edit_meta(folder, change):
    meta = json.loads((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_round_trip_from_recorded_source(arch, tmp_path):
    model = crisp_toy(arch)
    inputs = example_inputs(model)
    expected = forward(model, inputs)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.crisp_arch == arch and loaded.crisp_config == CONFIG
    assert torch.equal(forward(loaded, inputs), expected)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    # the loaded model shares its bases like a freshly converted one
    for b in crisp_bases(loaded).values():
        assert all(loaded.get_submodule(n).basis is b for n in b.layer_names)


def test_round_trip_into_an_explicit_plain_model(arch, tmp_path):
    model = crisp_toy(arch)
    inputs = example_inputs(model)
    save_checkpoint(model, tmp_path / "ckpt")
    plain = toy_model(arch, seed=7)  # other random weights: all of them must be replaced
    loaded = load_checkpoint(tmp_path / "ckpt", model=plain)
    assert loaded is plain
    assert torch.equal(forward(loaded, inputs), forward(model, inputs))


def test_tied_embeddings_round_trip(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    retrofit_(model, CONFIG, progress=False)
    inputs = example_inputs(model)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    assert torch.equal(forward(loaded, inputs), forward(model, inputs))


def test_a_head_of_more_than_ten_labels_round_trips(tmp_path):
    """A Hugging Face config's id2label has int keys; JSON makes them strings, which sort differently from
    10 on: the architecture digest must be the same before and after crisp.json is written."""
    model = toy_model("hf-llama-cls", num_labels=12)
    retrofit_(model, CONFIG, progress=False)
    inputs = example_inputs(model)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.score.out_features == 12 and torch.equal(forward(loaded, inputs), forward(model, inputs))


def test_meta_records_everything(saved):
    folder, _, _ = saved
    meta = read_checkpoint_meta(folder)
    assert meta["format"] == "crisp-edge/checkpoint" and meta["version"] == 1
    assert meta["arch"] == "timm-vit" and meta["source"] == TIMM_VIT_SOURCE
    assert CrispConfig.from_dict(meta["config"]) == CONFIG
    assert meta["groups"]["fc1_0_1"] == {"role": "fc1", "layers": ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"],
                                         "d_in": 32, "d_out": 128, "s": 4, "r": 6, "gate": "silu", "placement": "pre"}
    assert meta["tensors"]["crisp_bases.fc1_0_1.weight"] == {"shape": [1024, 6], "dtype": "float32"}
    assert meta["weights"]["bytes"] == (folder / WEIGHTS_FILE).stat().st_size
    assert meta["extra"] == {"note": "hi"}


def test_weights_are_safetensors_not_pickle(saved):
    folder, _, _ = saved
    data = (folder / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert data[8:9] == b"{" and 8 + n <= len(data)
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"]["crisp_edge"] == "crisp-edge/checkpoint"
    assert header["crisp_bases.qkv_0_1.weight"]["dtype"] == "F32"
    assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4]  # neither a pickle nor a torch zip


def test_loading_never_unpickles(saved, monkeypatch):
    folder, inputs, expected = saved

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    assert torch.equal(forward(load_checkpoint(folder), inputs), expected)


def test_save_overwrites_cleanly(tmp_path):
    # (the bytes are not reproducible: safetensors writes its metadata map in hash order)
    model = crisp_toy()
    a = save_checkpoint(model, tmp_path / "a")
    with torch.no_grad():
        model.blocks[0].mlp.fc1.crisp_mixer.add_(1.0)
    save_checkpoint(model, tmp_path / "a")  # overwriting an existing checkpoint works
    assert torch.equal(load_checkpoint(a).blocks[0].mlp.fc1.crisp_mixer, model.blocks[0].mlp.fc1.crisp_mixer)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [META_FILE, WEIGHTS_FILE]  # no temp files left


def test_truncated_weights(saved, tmp_path):
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(folder)


def test_flipped_byte(saved, tmp_path):
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01  # inside a tensor: the file still parses, only the hash can tell
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(folder)


def test_missing_weights(saved, tmp_path):
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing; the checkpoint is incomplete"):
        load_checkpoint(folder)


def test_weights_that_are_not_safetensors(saved, tmp_path):
    # a file that matches the recorded size and hash but is not safetensors (e.g. a hand-edited crisp.json)
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    junk = b"\x80\x04junk" * 10
    (folder / WEIGHTS_FILE).write_bytes(junk)
    import hashlib

    edit_meta(folder, lambda m: m["weights"].update(bytes=len(junk), sha256=hashlib.sha256(junk).hexdigest()))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(folder)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["config"]["default"].update(r=5),
     r"do not match the config.*group layout differs.*crisp_mixer: file has shape \(6, 4\), config implies \(5, 4\)"),
    (lambda m: m["config"]["default"].update(s=8), "do not match the config"),
    (lambda m: m["config"]["default"].update(group_size=4), r"missing tensor crisp_bases\.qkv_0_3\.weight"),
    (lambda m: m["config"].update(targets=["qkv", "proj", "fc1"]), r"unexpected tensor .*fc2"),
    (lambda m: m["config"]["default"].update(gate="gelu"), "group layout differs"),
    (lambda m: m["config"]["default"].update(s=7), "config does not fit the model: s=7 does not divide"),
    (lambda m: m["config"]["default"].update(r=0), "invalid CRISP config: r must be >= 1"),
    (lambda m: m["config"].update(colour=1), "invalid CRISP config: unknown config keys"),
    (lambda m: m.update(version=2), "version 2 is not supported.*upgrade crisp-edge"),
    (lambda m: m.update(version="1"), "version '1' is not supported"),
    (lambda m: m.update(format="other"), "is not a crisp-edge checkpoint"),
    (lambda m: m.pop("groups"), "field 'groups' is missing"),
    (lambda m: m.update(arch="gpt9"), "unknown architecture 'gpt9'"),
    (lambda m: m.update(source=None), r"does not record how to build its architecture .*load_checkpoint\(path, model=<the plain model>\).*save_checkpoint\(model, path, source="),
    (lambda m: m.update(source={"library": "keras"}), "cannot rebuild a model from source library 'keras'"),
    (lambda m: m["weights"].update(file="../elsewhere.safetensors"), "not a plain relative path inside the checkpoint folder"),
])
def test_meta_that_does_not_match(saved, tmp_path, change, message):
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    edit_meta(folder, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_missing_meta(saved, tmp_path):
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    (folder / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="crisp.json does not exist"):
        load_checkpoint(folder)


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                                           ("\xff", "is not valid JSON")])
def test_meta_that_is_not_json(saved, tmp_path, text, message):
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    (folder / META_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_loading_into_a_crisp_model_is_refused(saved):
    model = crisp_toy()
    with pytest.raises(CheckpointError, match="needs the plain architecture; the model given is already CRISP"):
        load_checkpoint(saved[0], model=model)


def test_loading_into_another_architecture_is_refused(saved):
    plain = toy_timm_vit(depth=2)  # 2 blocks instead of 4
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"do not match the config/model.*unexpected tensor blocks\.2\."):
        load_checkpoint(saved[0], model=plain)
    assert not is_crisp(plain)  # the caller's model is given back as it was
    after = plain.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(CheckpointError, match="does not fit the model: ViTForImageClassification has no submodule"):
        load_checkpoint(saved[0], model=toy_model("hf-vit"))


def test_saving_a_plain_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no CRISP layers"):
        save_checkpoint(toy_timm_vit(), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_saving_non_finite_values_is_refused(tmp_path):
    model = crisp_toy()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.crisp_mixer[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"non-finite.*blocks\.0\.mlp\.fc1\.crisp_mixer"):
        save_checkpoint(model, tmp_path / "c")


def test_loaded_model_is_crisp_and_trainable(saved):
    loaded = load_checkpoint(saved[0])
    assert is_crisp(loaded)
    forward(loaded, saved[1]).sum().backward()
    assert all(b.weight.grad is not None for b in crisp_bases(loaded).values())


def _consistent(field, value):
    def change(meta):
        meta["config"]["default"][field] = value
        for group in meta["groups"].values():
            group[field] = value
    return change


@pytest.mark.parametrize("change", [
    lambda m: m["source"]["kwargs"].update(num_heads=4),  # no tensor shape changes: only the digest sees it
    _consistent("gate", "gelu"),
    _consistent("placement", "post"),
], ids=["num_heads", "gate", "placement"])
def test_consistent_edits_of_the_architecture_are_refused(saved, tmp_path, change):
    """Each edit loaded before, with every check passing, and gave outputs off by 0.26-0.99: the weights
    carry a digest of the fields that rebuild the model, so crisp.json cannot be changed on its own."""
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    edit_meta(folder, change)
    with pytest.raises(CheckpointError, match="does not describe the model these weights were saved from"):
        load_checkpoint(folder)


def test_the_architecture_digest_is_in_the_weights_file(saved):
    from crisp_edge.files.checkpoint import architecture_digest

    folder = saved[0]
    data = (folder / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    recorded = json.loads(data[8:8 + n])["__metadata__"]["crisp_edge_architecture_sha256"]
    assert recorded == architecture_digest(read_checkpoint_meta(folder))


def test_notes_may_change_without_touching_the_architecture(saved, tmp_path):
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    edit_meta(folder, lambda m: m.update(extra={"note": "kept"}))
    load_checkpoint(folder)


def test_a_save_never_replaces_what_it_did_not_write(saved, tmp_path):
    from crisp_edge.files.checkpoint import check_checkpoint_target

    model = load_checkpoint(saved[0])
    user = tmp_path / "mine"
    user.mkdir()
    (user / "model.safetensors").write_bytes(b"the user's own weights")
    with pytest.raises(CheckpointError, match="not a crisp-edge checkpoint"):
        save_checkpoint(model, user)
    assert (user / "model.safetensors").read_bytes() == b"the user's own weights"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder|is a file; give a folder path"):
        save_checkpoint(model, tmp_path / "file")
    ours = save_checkpoint(model, tmp_path / "ours")
    with pytest.raises(CheckpointError, match="--overwrite"):
        check_checkpoint_target(ours, overwrite=False)
    assert check_checkpoint_target(ours, overwrite=True) == ours
    save_checkpoint(model, ours, overwrite=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", [META_FILE, WEIGHTS_FILE])
def test_a_fifo_in_a_checkpoint_is_refused_not_waited_on(saved, tmp_path, name):
    folder = copy_checkpoint(saved[0], tmp_path / "c")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with pytest.raises(CheckpointError, match="FIFO"):
        load_checkpoint(folder)

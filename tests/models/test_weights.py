"""Pretrained weights in: weight files load exactly as timm / transformers load them, missing weights are
a clear error, random weights need --random-init, and a checkpoint records the weights' origin."""
from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch

from crisp_edge.errors import CheckpointError, ConfigError
from crisp_edge.files.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from crisp_edge.files.io import sha256_file
from crisp_edge.models.sources import create_model, source_of
from crisp_edge.models.weights import origin_of, parse_model_args
from crisp_edge.testing import TIMM_VIT_SOURCE, toy_model
from crisp_edge.training.retrofit import retrofit_
from tests.files.test_mixers import CONFIG

NAME = TIMM_VIT_SOURCE["name"]
KWARGS = TIMM_VIT_SOURCE["kwargs"]  # 4 classes, 16x16 grey


def _trained_file(tmp_path, suffix):
    """A toy timm ViT with non-default weights, saved the way people save them."""
    model = toy_model("timm-vit", seed=7)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training checkpoint: timm reads its state_dict
    return model, path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weight_files_load_bit_exactly_as_timm_loads_them(tmp_path, suffix):
    trained, path = _trained_file(tmp_path, suffix)
    model = create_model(f"timm:{NAME}", weights=path, model_args=KWARGS)
    ref = timm.create_model(NAME, pretrained=False, **KWARGS).eval()
    timm.models.load_checkpoint(ref, str(path))  # timm's own file loader; no hub involved
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, ref(x)) and torch.equal(out, trained(x))
    origin = origin_of(model)
    assert origin["kind"] == "file" and origin["files"][0]["sha256"] == sha256_file(path)
    assert not origin["head_reinitialized"] and source_of(model) == {"library": "timm", "name": NAME, "kwargs": KWARGS}
    # the class count comes from the file when not given
    small = {k: v for k, v in KWARGS.items() if k != "num_classes"}
    assert create_model(f"timm:{NAME}", weights=path, model_args=small).num_classes == 4


def test_a_head_of_another_size_is_an_explicit_reported_reinit(tmp_path):
    trained, path = _trained_file(tmp_path, ".safetensors")
    with pytest.warns(UserWarning, match="4 classes and num_classes=7 was asked for: the head is re-initialised"):
        model = create_model(f"timm:{NAME}", weights=path, model_args={**KWARGS, "num_classes": 7})
    origin = origin_of(model)
    assert origin["head_reinitialized"] and origin["num_classes"] == 7 and origin["weights_num_classes"] == 4
    assert model.head.out_features == 7 and source_of(model)["kwargs"]["num_classes"] == 7
    same = [k for k, v in model.state_dict().items() if not k.startswith("head.")]
    assert all(torch.equal(model.state_dict()[k], trained.state_dict()[k]) for k in same)


def test_weights_that_do_not_fit_are_an_error(tmp_path):
    _, path = _trained_file(tmp_path, ".safetensors")
    with pytest.raises(ConfigError, match=r"cannot build timm:vit_tiny_patch16_224 with weights .*embed_dim.: 64"):
        create_model(f"timm:{NAME}", weights=path, model_args={**KWARGS, "embed_dim": 64})
    with pytest.raises(ConfigError, match="do not fit.*(Missing|Unexpected) keys"):
        create_model(f"timm:{NAME}", weights=path, model_args={**KWARGS, "depth": 5, "num_classes": 9})
    bad = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": ConfigError("x")}, bad)
    with pytest.raises(ConfigError, match=r"holds pickled Python objects.*refuses pickled objects"):
        create_model(f"timm:{NAME}", weights=bad, model_args=KWARGS)


def test_missing_weights_list_every_way_and_random_init_is_explicit():
    with pytest.raises(ConfigError, match=r"(?s)no pretrained weights found for timm:vit_tiny_patch16_224.*--weights FILE"
                                          r".*timm:local-dir:DIR.*timm:hf-hub.*Hugging Face model folder.*--random-init"):
        create_model("timm:vit_tiny_patch16_224", model_args=KWARGS)
    model = create_model(f"timm:{NAME}", random_init=True, model_args=KWARGS)
    assert origin_of(model)["kind"] == "random-init" and model.num_classes == 4
    with pytest.raises(ConfigError, match="contradict"):
        create_model(f"timm:{NAME}", random_init=True, weights="x.safetensors")


def test_timm_local_dir_and_hf_folder(tmp_path):
    trained = toy_model("timm-vit", seed=3)
    timm.models.save_for_hf(trained, str(tmp_path / "timm-dir"), model_args=KWARGS)
    model = create_model(f"timm:local-dir:{tmp_path / 'timm-dir'}")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    assert source_of(model)["name"] == NAME and source_of(model)["kwargs"]["depth"] == 4
    hf = toy_model("hf-vit", seed=5)
    hf.save_pretrained(tmp_path / "hf")
    loaded = create_model(str(tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, hf(x).logits)
    assert origin_of(loaded)["kind"] == "hf-folder" and origin_of(loaded)["files"][0]["path"].endswith("model.safetensors")


def test_checkpoint_records_the_origin_and_python_models_get_an_actionable_error(tmp_path):
    _, path = _trained_file(tmp_path, ".safetensors")
    model = create_model(f"timm:{NAME}", weights=path, model_args=KWARGS)
    retrofit_(model, CONFIG, progress=False)
    save_checkpoint(model, tmp_path / "ck")
    meta = read_checkpoint_meta(tmp_path / "ck")
    assert meta["origin"]["files"][0] == {"path": str(path.resolve()), "bytes": path.stat().st_size,
                                          "sha256": sha256_file(path)}
    assert origin_of(load_checkpoint(tmp_path / "ck")) == meta["origin"]  # rebuilt without the model
    # a model built with timm directly in Python records no source: the error says exactly what to pass
    plain = timm.create_model(NAME, pretrained=False, **KWARGS)
    retrofit_(plain, CONFIG, progress=False)
    save_checkpoint(plain, tmp_path / "py")
    with pytest.raises(CheckpointError, match=r"built in Python, a timm 'vit_tiny_patch16_224'.*source=\{'library': "
                                              r"'timm', 'name': 'vit_tiny_patch16_224'"):
        load_checkpoint(tmp_path / "py")
    save_checkpoint(plain, tmp_path / "py", source={"library": "timm", "name": NAME, "kwargs": KWARGS})
    assert load_checkpoint(tmp_path / "py") is not None


def test_model_args_parse_to_python_values():
    assert parse_model_args(["num_classes=7", "mlp_ratio=4.0", "qkv_bias=False", "global_pool=avg", "x=none"]) == {
        "num_classes": 7, "mlp_ratio": 4.0, "qkv_bias": False, "global_pool": "avg", "x": None}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_model_args(["7"])


def test_cli_retrofit_with_weights_and_without(tmp_path, capsys):
    from crisp_edge.cli.main import main

    _, path = _trained_file(tmp_path, ".pth")
    args = [f"--model-arg={k}={v}" for k, v in KWARGS.items()]
    assert main(["retrofit", f"timm:{NAME}", "--weights", str(path), *args, "--group-size", "2", "--out",
                 str(tmp_path / "ck"), "--no-progress"]) == 0
    assert "file weights from" in capsys.readouterr().err
    meta = json.loads((tmp_path / "ck" / "crisp.json").read_text())
    assert meta["origin"]["kwargs"]["embed_dim"] == 32 and meta["source"]["kwargs"]["num_classes"] == 4
    assert main(["retrofit", f"timm:{NAME}", *args, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no pretrained weights found" in err and "--random-init" in err and not (tmp_path / "none").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["retrofit", f"timm:{NAME}", *args, "--random-init", "--group-size", "2", "--no-progress"]) == 0
    assert "RANDOM weights" in capsys.readouterr().err


def test_an_hf_folders_image_processor_sets_the_input_spec_through_checkpoints(tmp_path):
    """create_model on a Hugging Face folder with preprocessor_config.json preprocesses data as that
    processor does, also after retrofit + save_checkpoint + load_checkpoint (the spec is in the origin)."""
    import transformers

    from crisp_edge.data.input_spec import input_spec_of

    hf = toy_model("hf-vit")
    hf.save_pretrained(tmp_path / "hf")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.25], image_std=[0.125],
                                   resample=3).save_pretrained(tmp_path / "hf")
    model = create_model(str(tmp_path / "hf"))
    spec = input_spec_of(model)
    assert (spec.mean, spec.std, spec.interpolation) == ((0.25,), (0.125,), "bicubic")
    retrofit_(model, CONFIG, progress=False)
    save_checkpoint(model, tmp_path / "ck")
    assert input_spec_of(load_checkpoint(tmp_path / "ck")) == spec
    assert input_spec_of(toy_model("hf-vit")).mean == (0.5,)  # without a processor: ViTImageProcessor defaults


def test_hf_hub_names_without_a_cached_copy_get_the_same_clear_error():
    with pytest.raises(ConfigError, match=r"(?s)no pretrained weights found for timm:hf-hub:timm/x.*--weights FILE"):
        create_model("timm:hf-hub:timm/x")


@pytest.mark.slow  # dequantises a 135M-parameter GGUF: about a minute on 2 cores
def test_gguf_models_record_their_file():
    from crisp_edge.models.causal_lm import find_smollm2_gguf

    model = create_model("smollm2")
    origin = origin_of(model)
    assert origin["kind"] == "gguf" and origin["files"][0]["sha256"] == sha256_file(find_smollm2_gguf())
    assert source_of(model)["library"] == "transformers" and type(model).__name__ == "LlamaForCausalLM"


def test_info_shows_where_the_weights_came_from(tmp_path, capsys):
    from crisp_edge.cli.main import main

    _, path = _trained_file(tmp_path, ".safetensors")
    model = create_model(f"timm:{NAME}", weights=path, model_args=KWARGS)
    retrofit_(model, CONFIG, progress=False)
    save_checkpoint(model, tmp_path / "ck")
    assert main(["info", str(tmp_path / "ck")]) == 0
    assert f"weights: file weights from {path.resolve()} (sha256 {sha256_file(path)[:12]}" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "ck"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["origin"]["files"][0]["sha256"] == sha256_file(path)

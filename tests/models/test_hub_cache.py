"""Models from the Hugging Face hub cache, offline: a cache folder made in the test (``HF_HUB_CACHE`` /
``HF_HOME`` pointing into tmp_path, the hub's layout: ``models--ORG--NAME/{blobs,snapshots/REV,refs/main}``),
read by timm's ``hf-hub:`` form and by a Hugging Face model id ``hf-hub:ORG/NAME``."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import timm
import torch

from crisp_edge.cli.main import main
from crisp_edge.errors import ConfigError
from crisp_edge.files.checkpoint import read_checkpoint_meta
from crisp_edge.files.io import sha256_file
from crisp_edge.models.llama_classifier import LlamaForTextClassification
from crisp_edge.models.sources import create_model, source_of
from crisp_edge.models.tokenizers import tokenizer_of
from crisp_edge.models.weights import origin_of
from crisp_edge.testing import TIMM_VIT_SOURCE, TOY_WORDS, toy_model, toy_text_folder

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub (and so timm and transformers) reads, with no network."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    return cache


def put_in_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """``folder``'s files as the hub lays out a download: content-addressed blobs, a snapshot of links to
    them, and ``refs/main`` naming the snapshot's revision. Returns the snapshot folder."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def test_timm_hf_hub_form_loads_bit_exactly_from_the_cache(hub_cache, tmp_path):
    trained = toy_model("timm-vit", seed=4)
    timm.models.save_for_hf(trained, str(tmp_path / "saved"), model_args=TIMM_VIT_SOURCE["kwargs"])
    put_in_cache(hub_cache, "acme/tiny-vit", tmp_path / "saved")
    model = create_model("timm:hf-hub:acme/tiny-vit")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    assert source_of(model)["name"] == TIMM_VIT_SOURCE["name"] and source_of(model)["kwargs"]["depth"] == 4
    assert origin_of(model)["kind"] == "timm-hf-hub"
    with pytest.raises(ConfigError, match="names no transformers model class .*timm:hf-hub:ORG/NAME"):
        create_model("hf-hub:acme/tiny-vit")  # timm's format, named without timm: in front


def test_hf_model_id_loads_from_the_cache_with_its_tokenizer(hub_cache, tmp_path):
    hf = toy_model("hf-vit", seed=5)
    hf.save_pretrained(tmp_path / "vit")
    put_in_cache(hub_cache, "acme/tiny-hf-vit", tmp_path / "vit")
    model = create_model("hf-hub:acme/tiny-hf-vit")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x).logits, hf(x).logits)
    origin = origin_of(model)
    assert origin["kind"] == "hf-hub" and origin["name"] == "hf-hub:acme/tiny-hf-vit"
    assert origin["files"][0]["sha256"] == sha256_file(tmp_path / "vit" / "model.safetensors")
    # a LLaMA in the cache: a text classifier with the tokenizer from the same snapshot
    put_in_cache(hub_cache, "acme/tiny-llama", toy_text_folder(tmp_path / "llama"))
    clf = create_model("hf-hub:acme/tiny-llama", model_args={"num_labels": 3})
    assert isinstance(clf, LlamaForTextClassification) and clf.score.out_features == 3
    words = ["<unk>", "<s>", "</s>", *(w for group in TOY_WORDS for w in group)]  # toy_text_folder's vocabulary
    assert tokenizer_of(clf)("good movie")["input_ids"] == [words.index("good"), words.index("movie")]


def test_cli_retrofit_from_the_cache_records_the_hub_name(hub_cache, tmp_path):
    toy_model("hf-vit", seed=5).save_pretrained(tmp_path / "vit")
    put_in_cache(hub_cache, "acme/tiny-hf-vit", tmp_path / "vit")
    assert main(["retrofit", "hf-hub:acme/tiny-hf-vit", "--out", str(tmp_path / "ck"), "--no-progress",
                 "--group-size", "2"]) == 0
    assert read_checkpoint_meta(tmp_path / "ck")["origin"]["name"] == "hf-hub:acme/tiny-hf-vit"


def test_a_model_not_in_the_cache_says_how_to_get_it(hub_cache):
    with pytest.raises(ConfigError, match=r"(?s)no pretrained weights found for hf-hub:acme/absent \(not in the "
                                          r"Hugging Face cache .*hf-home/hub.*hf download acme/absent.*--weights FILE"):
        create_model("hf-hub:acme/absent")
    with pytest.raises(ConfigError, match="no pretrained weights found for timm:hf-hub:acme/absent"):
        create_model("timm:hf-hub:acme/absent")

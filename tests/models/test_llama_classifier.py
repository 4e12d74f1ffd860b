"""LLaMA text classification: the head on the last real token, the classifier built from a LLaMA source,
the tokenizer recorded with the weights, and adaptation on a JSONL file with its attention mask."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import crisp_edge as ce
from crisp_edge.errors import ConfigError, DataError
from crisp_edge.files.checkpoint import load_checkpoint, save_checkpoint
from crisp_edge.models.llama_classifier import LlamaForTextClassification, as_text_classifier
from crisp_edge.models.sources import create_model
from crisp_edge.models.tokenizers import tokenizer_of
from crisp_edge.models.weights import origin_of
from crisp_edge.testing import example_inputs, forward, toy_model, toy_text_folder, toy_text_table
from crisp_edge.training.adapt import AdaptConfig
from crisp_edge.training.loop import TrainConfig

CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))


def test_equals_hf_sequence_classification_on_right_padding_and_ignores_padding():
    model = toy_model("hf-llama-cls")
    inputs = example_inputs(model, batch=4)
    ids, mask = inputs["input_ids"].clamp(min=1), inputs["attention_mask"]
    assert (mask == 0).any() and (mask.sum(1) < mask.shape[1]).any()  # some rows really are padded
    ids[mask == 0] = 0  # pad id 0, right padding: what HF's class pools by
    hf = transformers.LlamaForSequenceClassification(model.config).eval()
    hf.load_state_dict(model.state_dict())  # the same parameter names
    with torch.no_grad():
        ours = forward(model, {"input_ids": ids, "attention_mask": mask})
        torch.testing.assert_close(ours, hf(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=1e-5)
        other = ids.masked_fill(mask == 0, 7)  # any id may pad: masked positions are never read
        assert torch.equal(forward(model, {"input_ids": other, "attention_mask": mask}), ours)
        # a real token equal to the padding id is still read (HF's class would stop before it)
        inner = ids.clone()
        inner[0, 1] = 0
        assert not torch.allclose(forward(model, {"input_ids": inner, "attention_mask": mask})[0], ours[0])


def test_built_from_a_causal_lm_keeps_its_decoder_and_is_seeded():
    lm = toy_model("hf-llama", seed=3)
    a, b = as_text_classifier(lm, 4), as_text_classifier(lm, 4)
    assert isinstance(a, LlamaForTextClassification) and a.score.out_features == 4 and a.config.pad_token_id is not None
    assert torch.equal(a.score.weight, b.score.weight)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(a.model(input_ids=ids).last_hidden_state, lm.model(input_ids=ids).last_hidden_state,
                                   atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError, match="num_labels must be an integer >= 2"):
        as_text_classifier(lm, 1)
    with pytest.raises(ConfigError, match="not a BertForSequenceClassification"):
        as_text_classifier(toy_model("hf-bert"), 2)


def test_source_rebuilds_it_through_a_checkpoint(tmp_path):
    model = toy_model("hf-llama-cls")
    ce.retrofit_(model, CONFIG, progress=False)
    assert model.crisp_arch == "hf-llama-cls"
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    inputs = example_inputs(model)
    assert type(loaded) is LlamaForTextClassification
    assert torch.equal(forward(loaded, inputs), forward(model, inputs))


def test_folder_with_num_labels_records_its_tokenizer_which_pads_with_eos(tmp_path):
    folder = toy_text_folder(tmp_path / "llama")
    assert transformers.AutoTokenizer.from_pretrained(folder).pad_token is None  # LLaMA-like: no padding token
    model = create_model(str(folder), model_args={"num_labels": 2})
    assert isinstance(model, LlamaForTextClassification) and model.score.out_features == 2
    record = origin_of(model)["tokenizer"]
    assert record["kind"] == "hf-folder" and {f["path"].rsplit("/", 1)[1] for f in record["files"]} >= {"tokenizer.json"}
    tok = tokenizer_of(model)
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "right"
    # the record survives a checkpoint, and a changed tokenizer file is refused, not used
    ce.retrofit_(model, CONFIG, progress=False)
    save_checkpoint(model, tmp_path / "ck")
    assert tokenizer_of(load_checkpoint(tmp_path / "ck")).get_vocab() == tok.get_vocab()
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["vocab"]["extra"] = len(spec["model"]["vocab"])
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="tokenizer file .*tokenizer.json has changed"):
        tokenizer_of(load_checkpoint(tmp_path / "ck"))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="is gone .*--tokenizer PATH"):
        tokenizer_of(load_checkpoint(tmp_path / "ck"))


def test_num_labels_is_only_for_llama_models(tmp_path):
    folder = toy_text_folder(tmp_path / "bert", arch="hf-bert")
    with pytest.raises(ConfigError, match="plain LLaMA causal LM"):
        create_model(str(folder), model_args={"num_labels": 2})
    with pytest.raises(ConfigError, match="apply to timm:<name> models"):
        create_model(str(folder), model_args={"depth": 2})


@pytest.mark.parametrize("arch", ["hf-llama", "hf-bert"])
def test_adapt_on_jsonl_feeds_every_batch_its_attention_mask(arch, tmp_path, monkeypatch):
    folder = toy_text_folder(tmp_path / "m", arch=arch)
    model = create_model(str(folder), model_args={"num_labels": 2} if arch == "hf-llama" else None)
    ce.retrofit_(model, CONFIG, progress=False)
    train = toy_text_table(tmp_path / "train.jsonl", n=24)
    val = toy_text_table(tmp_path / "val.jsonl", n=8, seed=1)
    seen = []
    original = type(model).forward

    def spy(self, input_ids=None, attention_mask=None, **kw):
        seen.append((input_ids.shape, attention_mask))
        return original(self, input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    report = ce.adapt_(model, str(train), eval_data=str(val),
                       config=AdaptConfig(train=TrainConfig(epochs=1, batch_size=8)), progress=False)
    assert report.accuracy is not None and report.bases_unchanged
    assert len(seen) == 3 + 1  # three training batches, one evaluation batch
    assert all(m is not None and m.shape == s and m.dtype == torch.int64 for s, m in seen)
    assert any(bool((m == 0).any()) for _, m in seen)  # the texts are padded, and the padding is masked


def test_text_without_a_tokenizer_is_a_clear_error(tmp_path):
    model = toy_model("hf-llama-cls")  # built in Python: no tokenizer recorded
    ce.retrofit_(model, CONFIG, progress=False)
    data = toy_text_table(tmp_path / "t.jsonl", n=10)
    with pytest.raises(DataError, match="records no tokenizer .*--tokenizer DIR"):
        ce.adapt_(copy.deepcopy(model), str(data), progress=False)


def test_max_length_sets_the_input_spec_through_the_checkpoint(tmp_path):
    from crisp_edge.data.input_spec import input_spec_of

    folder = toy_text_folder(tmp_path / "llama")
    model = create_model(str(folder), model_args={"num_labels": 2, "max_length": 6})
    assert input_spec_of(model).max_length == 6 and example_inputs(model)["input_ids"].shape == (2, 6)
    ce.retrofit_(model, CONFIG, progress=False)
    save_checkpoint(model, tmp_path / "ck")
    assert input_spec_of(load_checkpoint(tmp_path / "ck")).max_length == 6
    with pytest.raises(ConfigError, match=r"max_length must be an integer in \[1, 16\]"):
        create_model(str(folder), model_args={"num_labels": 2, "max_length": 17})
    with pytest.raises(ConfigError, match="max_length goes with num_labels"):
        create_model(str(folder), model_args={"max_length": 6})


def test_pipeline_adapts_a_text_task_with_the_models_tokenizer(tmp_path):
    from crisp_edge.files.mixers import read_mixers
    from crisp_edge.training.pipeline import PipelineConfig, run_pipeline

    model = create_model(str(toy_text_folder(tmp_path / "llama")), model_args={"num_labels": 2})
    texts = toy_text_table(tmp_path / "reviews.jsonl", n=30)
    config = PipelineConfig(crisp=CONFIG, keep_fraction=None, tasks=(), data=(("reviews", str(texts)),),
                            adapt=AdaptConfig(train=TrainConfig(epochs=1, batch_size=8)))
    result = run_pipeline(model, tmp_path / "run", config, progress=False, log=lambda _: None)
    mf = read_mixers(result.mixer_files["reviews"])
    assert mf.labels == ["neg", "pos"] and mf.task == "reviews"
    assert tokenizer_of(load_checkpoint(result.checkpoint)) is not None  # the run's checkpoint keeps the record


def test_retrofit_records_a_tokenizer_given_on_the_command_line(tmp_path):
    import shutil

    from crisp_edge.cli.main import main

    folder = toy_text_folder(tmp_path / "bert", arch="hf-bert")
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, weights_only / name)
    assert tokenizer_of(create_model(str(weights_only))) is None
    assert main(["retrofit", str(weights_only), "--tokenizer", str(folder), "--out", str(tmp_path / "ck"),
                 "--no-progress", "--group-size", "2"]) == 0
    tok = tokenizer_of(load_checkpoint(tmp_path / "ck"))
    assert tok is not None and tok.pad_token == "[PAD]" and "good" in tok.get_vocab()
    assert main(["retrofit", str(weights_only), "--tokenizer", str(tmp_path / "nothing"), "--no-progress"]) == 2


def test_adaptation_learns_a_toy_text_task(tmp_path):
    """Mixers + head on the last real token learn which word group a text holds (chance: 50%)."""
    model = create_model(str(toy_text_folder(tmp_path / "llama")), model_args={"num_labels": 2})
    ce.retrofit_(model, CONFIG, progress=False)
    report = ce.adapt_(model, str(toy_text_table(tmp_path / "train.jsonl", n=80)),
                       eval_data=str(toy_text_table(tmp_path / "val.jsonl", n=40, seed=1)),
                       config=AdaptConfig(train=TrainConfig(epochs=3, batch_size=16)), progress=False)
    assert report.accuracy >= 0.9 and report.bases_unchanged

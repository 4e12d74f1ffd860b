"""Your own model and your own text, from the command line: a Hugging Face folder (LLaMA or BERT, with its
tokenizer) -> retrofit -> adapt --data texts.jsonl -> export -> parity --inputs texts.jsonl."""
from __future__ import annotations

import pytest

from crisp_edge.cli.main import main
from crisp_edge.files.checkpoint import load_checkpoint, save_checkpoint
from crisp_edge.files.mixers import read_mixers
from crisp_edge.testing import toy_text_folder, toy_text_table
from crisp_edge.training.retrofit import retrofit_
from tests.files.test_mixers import CONFIG

pytestmark = pytest.mark.runtime


def _cli(*args: str) -> int:
    return main([*args, "--no-progress"] if args[0] in ("retrofit", "adapt", "parity") else list(args))


@pytest.mark.parametrize("arch, model_args", [("hf-llama", ["--model-arg", "num_labels=2"]), ("hf-bert", [])])
def test_text_classification_end_to_end(arch, model_args, tmp_path, capsys):
    folder = toy_text_folder(tmp_path / "model", arch=arch)
    texts = toy_text_table(tmp_path / "texts.jsonl", n=40)
    ck, mixers, bundle = tmp_path / "ck", tmp_path / "reviews.mixers.safetensors", tmp_path / "onnx"
    assert _cli("retrofit", str(folder), *model_args, "--out", str(ck), "--group-size", "2") == 0
    assert _cli("adapt", str(ck), "--data", str(texts), "--val-fraction", "0.2", "--epochs", "2", "--name", "reviews",
                "--out", str(mixers)) == 0
    out = capsys.readouterr().out
    assert "32 token sequences, 2 classes (neg, pos)" in out and "validation accuracy" in out
    assert read_mixers(mixers).labels == ["neg", "pos"]
    assert _cli("export", str(ck), "--target", "onnx", "--mode", "swappable", "--out", str(bundle),
                "--task", str(mixers)) == 0
    capsys.readouterr()
    assert _cli("parity", str(bundle), "--checkpoint", str(ck), "--inputs", str(texts), "--mixers", str(mixers),
                "--no-plot", "--report-dir", str(tmp_path / "rep")) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS") and "your data (40 examples), task 'reviews': top-1 agreement 100.0%" in out


def test_bert_checkpoint_without_a_recorded_tokenizer_takes_tokenizer(tmp_path, capsys):
    """A checkpoint from a model retrofitted in Python records no tokenizer: adapt says to pass --tokenizer,
    and with it the text trains (the attention mask reaching the model is tests/models/test_llama_classifier's)."""
    import transformers

    folder = toy_text_folder(tmp_path / "bert", arch="hf-bert")
    model = transformers.BertForSequenceClassification.from_pretrained(folder)
    retrofit_(model, CONFIG, progress=False)
    save_checkpoint(model, tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck").crisp_arch == "hf-bert"
    texts = toy_text_table(tmp_path / "t.jsonl", n=20)
    out = tmp_path / "t.mixers.safetensors"
    assert _cli("adapt", str(tmp_path / "ck"), "--data", str(texts), "--epochs", "1", "--out", str(out)) == 2
    assert "records no tokenizer" in capsys.readouterr().err and not out.exists()
    assert _cli("adapt", str(tmp_path / "ck"), "--data", str(texts), "--epochs", "1", "--out", str(out),
                "--tokenizer", str(folder)) == 0
    assert read_mixers(out).labels == ["neg", "pos"]
    assert _cli("adapt", str(tmp_path / "ck"), "--task", "mnist", "--tokenizer", str(folder)) == 2
    assert "--tokenizer go with --data" in capsys.readouterr().err


def test_dense_llama_classifier_bundle_loads_in_optimum_with_its_tokenizer(tmp_path):
    """The dense bundle carries config.json and the tokenizer recorded with the weights: optimum's
    ORTModelForSequenceClassification and AutoTokenizer load the folder as it is and agree with PyTorch."""
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForSequenceClassification

    from crisp_edge.export.onnx.export import export_onnx
    from crisp_edge.models.sources import create_model

    model = create_model(str(toy_text_folder(tmp_path / "llama")), model_args={"num_labels": 3, "max_length": 8})
    retrofit_(model, CONFIG, progress=False)
    bundle = export_onnx(model, tmp_path / "dense", mode="dense")
    assert {"config.json", "tokenizer.json"} <= set(bundle.manifest["files"])
    tok = transformers.AutoTokenizer.from_pretrained(bundle.path)
    batch = tok(["good movie", "the plot was very dull and poor"], padding="max_length", max_length=8,
                return_tensors="pt")
    ort = ORTModelForSequenceClassification.from_pretrained(bundle.path, file_name="model.onnx")
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = ort(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(torch.as_tensor(got), want, atol=1e-4, rtol=1e-4)
    assert tok.pad_token == "</s>" and bool((batch["attention_mask"] == 0).any())

"""`crisp-edge adapt` on a CRISP LLaMA checkpoint with a plain text: the task file it writes, and bad text
refused with exit status 2, a reason, and nothing written."""
from __future__ import annotations

import shutil

import pytest
import torch

from crisp_edge.cli import main
from crisp_edge.files.checkpoint import load_checkpoint
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.testing import toy_llama_folder

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n" * 12
FAST = ["--window", "16", "--epochs", "2", "--lr", "0.03", "--no-progress"]


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    folder = toy_llama_folder(root / "toy-llama")
    assert main(["retrofit", str(folder), "--out", str(root / "ckpt"), "--no-progress"]) == 0
    return root / "ckpt"


def test_adapt_on_a_text_writes_a_task_file_for_its_bases(llama_ckpt, tmp_path, capsys):
    data = tmp_path / "genesis.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "genesis.mixers.safetensors"
    assert main(["adapt", str(llama_ckpt), "--data", str(data), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "held-out windows (1 in 10 of --data)" in printed and f"wrote {out}" in printed
    mf = read_mixers(out)
    ppl = mf.meta["extra"]["perplexity"]
    assert mf.task == "genesis" and mf.meta["extra"]["objective"] == "causal-lm" and ppl["after"] < ppl["before"]
    assert set(mf.tensors) == {k for k in mf.tensors if k.startswith("mixer.")}  # mixers only, no LM head
    model = load_checkpoint(llama_ckpt)
    x = torch.randint(0, 40, (1, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=x).logits
    apply_mixers_(model, out)
    assert not torch.allclose(model(input_ids=x).logits, before)


def test_separate_heldout_text_and_train_limit(llama_ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "held.txt").write_text(TEXT[:400], encoding="utf-8")
    out = tmp_path / "a.m"
    assert main(["adapt", str(llama_ckpt), "--data", str(tmp_path / "a.txt"), "--val", str(tmp_path / "held.txt"),
                 "--train-limit", "5", "--out", str(out), *FAST]) == 0
    assert "data: 5 training windows of 16 tokens; 25 held-out windows (--val" in capsys.readouterr().out
    assert read_mixers(out).meta["extra"]["perplexity"]["heldout_windows"] == 25


@pytest.mark.parametrize("content, reason", [
    (b"", "holds no text"),
    (b"\xff\xfe not utf-8 at all, though long enough to fill a window or two", "is not UTF-8: byte 0"),
    (b"too short", "9 tokens do not fill one window of 16"),
])
def test_bad_text_is_refused_with_its_reason_and_nothing_written(llama_ckpt, tmp_path, capsys, content, reason):
    data = tmp_path / "bad.txt"
    data.write_bytes(content)
    out = tmp_path / "bad.mixers.safetensors"
    assert main(["adapt", str(llama_ckpt), "--data", str(data), "--out", str(out), *FAST]) == 2
    assert reason in capsys.readouterr().err and not out.exists()


def test_a_missing_tokenizer_is_named(llama_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(llama_ckpt, ckpt)
    folder = llama_ckpt.parent / "toy-llama"
    moved = tmp_path / "moved"
    shutil.move(folder, moved)  # the folder the checkpoint was retrofitted from is gone
    try:
        (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
        args = ["adapt", str(ckpt), "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "a.m"), *FAST]
        assert main(args) == 2
        assert "--tokenizer PATH" in capsys.readouterr().err
        assert main([*args, "--tokenizer", str(moved)]) == 0
    finally:
        shutil.move(moved, folder)


def test_classifier_options_are_refused_for_a_language_model(llama_ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    assert main(["adapt", str(llama_ckpt), "--data", str(tmp_path / "a.txt"), "--train-biases", *FAST]) == 2
    assert "for classifiers" in capsys.readouterr().err

"""Language-model adaptation (adapt_lm_): mixers alone learn a text, bases and LM head stay put, the task
file round-trips and refuses other bases, and bad data says what is wrong."""
from __future__ import annotations

import copy

import pytest
import torch

from crisp_edge.errors import BasisMismatchError, ConfigError, DataError
from crisp_edge.files.mixers import apply_mixers_, read_mixers, save_mixers
from crisp_edge.method.convert import crisp_layers
from crisp_edge.models.causal_lm import perplexity
from crisp_edge.testing import toy_char_tokenizer, toy_hf_llama, toy_model
from crisp_edge.training.adapt_lm import AdaptLMConfig, adapt_lm_, lm_windows, next_token_loss, split_heldout
from crisp_edge.training.loop import TrainConfig
from crisp_edge.training.retrofit import retrofit_

TEXT = "in the beginning god created the heaven and the earth. and the earth was without form, and void.\n" * 12
CONFIG = AdaptLMConfig(window=16, mixer_lr=3e-2, train=TrainConfig(epochs=2, batch_size=8))


@pytest.fixture(scope="module")
def crisp_llama():
    model = toy_hf_llama(seed=0)
    retrofit_(model, progress=False)
    return model


def test_mixers_alone_lower_the_loss_on_the_training_text(crisp_llama):
    model = copy.deepcopy(crisp_llama)
    tok = toy_char_tokenizer()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "crisp_mixer" not in n}
    mixers = {n: l.crisp_mixer.detach().clone() for n, l in crisp_layers(model).items()}
    ids = lm_windows(TEXT, window=16, tokenizer=tok)
    before = perplexity(model, ids.reshape(-1), window=16, max_tokens=None, progress=False)["perplexity"]
    report = adapt_lm_(model, TEXT, tokenizer=tok, eval_data=TEXT, config=CONFIG, progress=False)
    after = perplexity(model, ids.reshape(-1), window=16, max_tokens=None, progress=False)["perplexity"]
    assert report.before["perplexity"] == pytest.approx(before) and report.after["perplexity"] == pytest.approx(after)
    assert after < 0.92 * before  # a repetitive text: two epochs of mixers alone must show
    assert report.bases_unchanged and report.trainable == {"mixers": sum(m.numel() for m in mixers.values())}
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # LM head, norms too
    assert any(not torch.equal(l.crisp_mixer, mixers[n]) for n, l in crisp_layers(model).items())
    assert report.history.epochs[-1]["train_loss"] < report.history.epochs[0]["train_loss"]


def test_heldout_windows_sample_the_whole_text_and_never_train():
    rows = torch.arange(40 * 4).reshape(40, 4)
    train, held = split_heldout(rows, 0.1)
    assert held[:, 0].tolist() == [36, 76, 116, 156] and train.shape == (36, 4)
    assert not set(train[:, 0].tolist()) & set(held[:, 0].tolist())
    with pytest.raises(DataError, match="none to hold out"):
        split_heldout(rows[:5], 0.1)


def test_the_task_file_round_trips_and_refuses_other_bases(crisp_llama, tmp_path):
    model = copy.deepcopy(crisp_llama)
    adapt_lm_(model, TEXT, tokenizer=toy_char_tokenizer(), config=CONFIG, progress=False)
    path = save_mixers(model, tmp_path / "text.mixers.safetensors", task="text", head=False)
    x = lm_windows(TEXT, window=16, tokenizer=toy_char_tokenizer())[:4]
    expected = next_token_loss(model, x, x)
    fresh = copy.deepcopy(crisp_llama)
    assert not torch.equal(next_token_loss(fresh, x, x), expected)
    mf = apply_mixers_(fresh, path)
    assert mf.task == "text" and "head.weight" not in mf.tensors  # the LM head is the model's own, not the task's
    assert torch.equal(next_token_loss(fresh, x, x), expected)
    other = toy_hf_llama(seed=1)  # same layout, other pretrained weights -> other bases
    retrofit_(other, progress=False)
    with pytest.raises(BasisMismatchError, match="other bases"):
        apply_mixers_(other, read_mixers(path))


def test_bad_data_and_models_are_refused_with_the_reason(crisp_llama):
    tok = toy_char_tokenizer()
    with pytest.raises(DataError, match="do not fill one window of 16"):
        adapt_lm_(copy.deepcopy(crisp_llama), "too short", tokenizer=tok, config=CONFIG, progress=False)
    with pytest.raises(DataError, match="no text"):
        lm_windows("  \n", window=16, tokenizer=tok)
    with pytest.raises(ConfigError, match="pass tokenizer="):
        lm_windows(TEXT, window=16)
    with pytest.raises(DataError, match=r"shape \(N, 16\)"):
        lm_windows(torch.zeros(3, 8, dtype=torch.long), window=16)
    with pytest.raises(DataError, match="integer tensor"):
        lm_windows(torch.zeros(3, 16), window=16)
    with pytest.raises(DataError, match="token ids must lie in"):
        adapt_lm_(copy.deepcopy(crisp_llama), torch.full((4, 16), 99), eval_data=torch.zeros(1, 16, dtype=torch.long),
                  config=CONFIG, progress=False)
    with pytest.raises(ConfigError, match="retrofit_ it"):
        adapt_lm_(toy_hf_llama(), TEXT, tokenizer=tok, config=CONFIG, progress=False)
    vit = toy_model("timm-vit")
    retrofit_(vit, progress=False)
    with pytest.raises(ConfigError, match="use adapt_ for classifiers"):
        adapt_lm_(vit, TEXT, tokenizer=tok, config=CONFIG, progress=False)
    for bad in ({"window": 1}, {"val_fraction": 0.9}, {"mixer_lr": 0.0}):
        with pytest.raises(ConfigError):
            AdaptLMConfig(**bad)

"""The runtime-neutral LM bundle section and session mixin, driven by the PyTorch reference stepper
(the runtimes' LM sessions are tested in runtime_tests/)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from crisp_edge.errors import ConfigError, DataError
from crisp_edge.export.errors import BundleError
from crisp_edge.export.lm import LMSessionMixin, check_lm_section, lm_section, record_references, reference_prompts
from crisp_edge.export.parity.compare import Tolerance
from crisp_edge.generation import TorchStepper
from crisp_edge.testing import toy_hf_llama


class _TorchLMSession(LMSessionMixin):
    def __init__(self, model, section):
        self.model = model
        self.bundle = SimpleNamespace(path=Path("toy-bundle"), manifest={"lm": section}, mode="dense")

    def lm_stepper(self):
        return TorchStepper(self.model, self.lm["max_seq_len"])


def test_section_records_and_checks_generation():
    model = toy_hf_llama(seed=0).eval()
    prompts = reference_prompts(None, 64)
    assert [len(p) for p in prompts] == [5, 9, 3] and prompts == reference_prompts(None, 64)
    refs = record_references({"default": TorchStepper(model, 24)}, prompts, max_new_tokens=64)
    assert len(refs["default"]["cases"][1]["tokens"]) == 24 - 9  # capped to fit the cache
    section = lm_section(max_seq_len=24, vocab_size=64, tokenizer_record=None, references=refs)
    sess = _TorchLMSession(model, section)
    out = sess.generate([1, 2, 3], 5)
    assert out["text"] is None and len(out["token_ids"]) == 5
    [parity] = sess.check_generation(Tolerance(1e-4, 0.99999, "test"))
    assert parity.passed, parity.summary()
    with pytest.raises(DataError, match="no tokenizer"):
        sess.generate("hello", 3)
    with pytest.raises(ConfigError, match="no tasks to switch"):
        sess.generate([1], 3, task="kjv")
    with pytest.raises(DataError, match="token ids must be"):
        sess.generate([99], 3)


@pytest.mark.parametrize("bad", [None, {"kind": "other"}, {"kind": "causal-lm", "max_seq_len": 1, "vocab_size": 64},
                                 {"kind": "causal-lm", "max_seq_len": 8, "vocab_size": 64, "generation": {}}])
def test_malformed_sections_are_refused(bad):
    with pytest.raises(BundleError):
        check_lm_section(bad, "manifest.json")


def test_cache_length_and_task_models():
    from crisp_edge.export.lm import is_causal_lm, resolve_max_seq_len, task_models

    model = toy_hf_llama(seed=0)  # max_position_embeddings 32
    assert is_causal_lm(model) and not is_causal_lm(model.model)
    assert resolve_max_seq_len(model, None) == 32 and resolve_max_seq_len(model, 16) == 16
    for bad in (4, 33, True, "16"):
        with pytest.raises(ConfigError):
            resolve_max_seq_len(model, bad)
    assert list(task_models(model, [])) == ["default"]


def test_tokenizer_sources(tmp_path):
    from tokenizers import Tokenizer, models

    from crisp_edge.errors import DataError
    from crisp_edge.models.tokenizers import load_tokenizer, tokenizer_of
    from crisp_edge.models.weights import ORIGIN_ATTR

    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    assert len(load_tokenizer(tmp_path / "tokenizer.json")) == 2
    model = toy_hf_llama(seed=0)
    model.save_pretrained(tmp_path / "hf")  # a folder without tokenizer files
    with pytest.raises(DataError, match="no tokenizer could be read"):
        load_tokenizer(tmp_path / "hf")
    setattr(model, ORIGIN_ATTR, {"kind": "hf-folder", "name": str(tmp_path / "gone"), "files": []})
    assert tokenizer_of(model) is None  # the folder the weights came from is gone: no tokenizer, no error
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="no tokenizer could be read"):
        load_tokenizer(tmp_path / "bad.json")

"""ONNX Runtime language-model bundles (``export.onnx.lm_export`` / ``lm_session``): a toy CRISP LLaMA
exported dense and swappable with a key/value cache and two task files, generating in ONNX Runtime
token for token as PyTorch does, and every fault the issue names refused or caught by parity."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from crisp_edge.export import export_onnx, load_bundle
from crisp_edge.export.errors import AdapterError, BundleError, NoTaskError
from crisp_edge.export.onnx.adapter import mixers_to_onnx_adapter
from crisp_edge.export.parity.check import check_bundle
from crisp_edge.export.parity.compare import ATOL_LM_FP32, tolerance_for
from crisp_edge.export.parity.generation import check_generation
from crisp_edge.export.parity.report import report_json

import crisp_edge as ce
from crisp_edge.cli import main as crisp_edge_main
from crisp_edge.errors import BasisMismatchError, ConfigError, DataError, LayoutMismatchError
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.generation import TorchStepper, generate
from crisp_edge.testing import make_lm_task_file, make_task_file, toy_model

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)
CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))
SEQ = 32
PROMPT = [5, 9, 14, 3]


def crisp_llama(seed: int = 0) -> torch.nn.Module:
    model = toy_model("hf-llama", seed=seed)
    ce.retrofit_(model, CONFIG, progress=False)
    return model


def tiny_tokenizer():
    """A word-level tokenizer over the toy's 64 ids (the reference prompts' words among them)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = "The capital of France is In the beginning God created def fibonacci ( n ) :".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    vocab.update({f"w{i}": i for i in range(len(vocab), 64)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    model = crisp_llama()
    tasks = [make_lm_task_file(model, root / f"{t}.mixers.safetensors", t, seed=i + 1) for i, t in enumerate("ab")]
    tok = tiny_tokenizer()
    dense = export_onnx(model, root / "dense", mode="dense", max_seq_len=SEQ, tokenizer=tok)
    swap = export_onnx(model, root / "swap", mode="swappable", tasks=tasks, max_seq_len=SEQ, tokenizer=tok)
    return {"root": root, "model": model, "tasks": tasks, "dense": dense, "swap": swap}


def torch_tokens(model, mixer_file=None, n: int = 12) -> list[int]:
    m = copy.deepcopy(model)
    if mixer_file is not None:
        apply_mixers_(m, read_mixers(mixer_file))
    return generate(TorchStepper(m, SEQ), PROMPT, n).new_ids


def test_bundles_record_the_lm_contract(lm):
    for bundle, mode in ((lm["dense"], "dense"), (lm["swap"], "swappable")):
        m = bundle.manifest
        assert m["mode"] == mode and m["lm"]["max_seq_len"] == SEQ and m["lm"]["tokenizer"]["vocab_size"] == 64
        assert m["exporter"]["with_past"] is True
        names = [i["name"] for i in m["inputs"]]
        assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
        assert [o["name"] for o in m["outputs"]][:2] == ["logits", "present.0.key"]
    swap = lm["swap"].manifest
    assert sorted(swap["lm"]["generation"]) == ["a", "b", "default"] and swap["swappable"]["head"] is None
    assert not any(k.startswith("head.") for k in swap["swappable"]["overridable"])  # lm_head is no task tensor
    assert (lm["dense"].path / "config.json").is_file()  # optimum's ORTModelForCausalLM can load it


def test_generation_matches_pytorch_for_every_task(lm):
    sess = lm["swap"].session()
    want = {"default": torch_tokens(lm["model"])}
    want.update({t: torch_tokens(lm["model"], f) for t, f in zip("ab", lm["tasks"])})
    got = {t: sess.generate(PROMPT, 12, task=t, stop_at_eos=False)["token_ids"] for t in want}
    assert got == want
    assert len({tuple(v) for v in got.values()}) == 3  # the task files visibly change the text
    dense = lm["dense"].session().generate(PROMPT, 12, stop_at_eos=False)["token_ids"]
    assert dense == want["default"]
    text = sess.generate("In the beginning", 5, task="a", stop_at_eos=False)
    assert text["prompt_ids"][0] == 1 and isinstance(text["text"], str)


@pytest.mark.parametrize("which", ["dense", "swap"])
def test_parity_checks_generation_of_every_task(lm, which, tmp_path):
    report = check_bundle(lm[which].path)
    assert report.passed, report.summary()
    tasks = ["default"] if which == "dense" else ["default", "a", "b"]
    assert sorted(g["task"] for g in report.generation) == sorted(tasks)
    assert all(g["tokens_match"] and g["logits_match"] for g in report.generation)
    assert all(c["max_abs_diff"] < 1e-5 for g in report.generation for c in g["cases"])
    assert report.tolerance["atol"] == ATOL_LM_FP32 and "language model" in report.tolerance["reason"]
    doc = report_json(report)
    assert doc["passed"] and len(doc["generation"]) == len(tasks)
    out = tmp_path / "parity.json"
    assert crisp_edge_main(["parity", str(lm[which].path), "--json", str(out), "--no-plot",
                            "--report-dir", str(tmp_path / "r")]) == 0
    assert len(json.loads(out.read_text())["generation"]) == len(tasks)


def _edited(lm, tmp_path, edit) -> str:
    folder = tmp_path / "edited"
    shutil.copytree(lm["swap"].path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest["lm"]["generation"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def test_parity_fails_on_a_wrong_task_and_on_drifted_logits(lm, tmp_path):
    def wrong_task(gen):  # task a's reference replaced by b's: a's own mixers no longer match it
        gen["a"] = gen["b"]

    report = check_bundle(_edited(lm, tmp_path, wrong_task))
    assert not report.passed
    [f] = [f for f in report.failures if f.stage == "generation"]
    assert f.task == "a" and "tokens differ" in f.message
    assert crisp_edge_main(["parity", _edited(lm, tmp_path / "x", wrong_task), "--no-plot",
                            "--report-dir", str(tmp_path / "r")]) == 1

    def drift(gen):  # one stored logit off by 0.05 (10x the LM tolerance): tokens still equal, logits caught
        gen["b"]["cases"][1]["top_logits"][4][3] += 0.05

    report = check_bundle(_edited(lm, tmp_path / "y", drift))
    [f] = [f for f in report.failures if f.stage == "generation"]
    assert f.task == "b" and "prompt 1: tokens equal" in f.message and "step 4" in f.message


def test_wrong_task_tokens_differ_from_the_reference(lm):
    sess = lm["swap"].session()
    sess.set_task("b")
    ref = lm["swap"].manifest["lm"]["generation"]["a"]
    result = check_generation(sess.lm_stepper(), ref, tolerance_for("onnxruntime", "swappable"), task="a")
    assert not result.tokens_match and not result.passed


def test_stale_cache_and_missing_task_are_refused(lm):
    sess = lm["swap"].session()
    stepper = sess.lm_stepper()
    with pytest.raises(NoTaskError):
        stepper.step(PROMPT, 0)
    sess.set_task("a")
    stepper.step(PROMPT, 0)
    with pytest.raises(ConfigError, match="stale cache"):
        stepper.step([7], 2)  # skips the cache's end
    sess.set_task("b")  # a switch starts a new sequence: continuing the old one is stale
    with pytest.raises(ConfigError, match="stale cache"):
        stepper.step([7], len(PROMPT))
    first = stepper.step(PROMPT, 0)
    stepper.reset()
    assert np.array_equal(first, stepper.step(PROMPT, 0))


def test_bad_input_gets_a_clear_error(lm, tmp_path):
    sess = lm["swap"].session()
    with pytest.raises(AdapterError, match="neither a task"):
        sess.generate(PROMPT, 3, task="nope")
    with pytest.raises(DataError, match="key/value cache"):
        sess.generate(list(range(SEQ)), 3, task="a")
    with pytest.raises(DataError, match="key/value cache"):
        sess.generate("The " * (SEQ + 1), 3, task="a")
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps({**json.loads((lm["swap"].path / "tokenizer.json").read_text()),
                                 "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "x": 1}, "unk_token": "<unk>"}}))
    with pytest.raises(DataError, match="does not match the bundle"):
        sess.generate("The capital", 3, task="a", tokenizer=other)
    tampered = tmp_path / "tampered"
    shutil.copytree(lm["swap"].path, tampered)
    (tampered / "tokenizer.json").write_text((tampered / "tokenizer.json").read_text().replace("France", "Spain"))
    with pytest.raises(BundleError, match="tokenizer.json"):
        load_bundle(tampered)


def test_task_files_from_another_model_are_refused(lm, tmp_path):
    foreign = crisp_llama(seed=3)
    mixers = make_lm_task_file(foreign, tmp_path / "f.mixers.safetensors", "f")
    with pytest.raises(BasisMismatchError):
        mixers_to_onnx_adapter(mixers, lm["swap"].path)
    with_head = make_task_file(lm["model"], tmp_path / "h.mixers.safetensors", "h", num_classes=64)
    with pytest.raises(LayoutMismatchError, match="no place"):
        mixers_to_onnx_adapter(with_head, lm["swap"].path)
    other = export_onnx(foreign, tmp_path / "other", mode="swappable", tasks=[mixers], max_seq_len=SEQ)
    sess = lm["swap"].session()
    with pytest.raises(BasisMismatchError, match="other bases"):
        sess.generate(PROMPT, 3, task=other.task_path("f"))


def test_lm_options_are_checked(lm, tmp_path):
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        export_onnx(lm["model"], tmp_path / "x", mode="dense", max_seq_len=64)
    with pytest.raises(ConfigError, match="'dense' or 'swappable'"):
        export_onnx(lm["model"], tmp_path / "x", mode="factored")
    with pytest.raises(ConfigError, match="causal language models only"):
        export_onnx(toy_model("hf-vit"), tmp_path / "x", mode="dense", max_seq_len=16)


def test_cli_exports_an_lm_checkpoint(lm, tmp_path, capsys):
    ce.save_checkpoint(lm["model"], tmp_path / "ckpt")
    tok = tmp_path / "tok.json"
    tok.write_text((lm["swap"].path / "tokenizer.json").read_text())
    out = tmp_path / "bundle"
    assert crisp_edge_main(["export", str(tmp_path / "ckpt"), "--mode", "swappable", "--out", str(out),
                            "--task", str(lm["tasks"][0]), "--max-seq-len", "24", "--tokenizer", str(tok)]) == 0
    assert "key/value cache of 24 tokens" in capsys.readouterr().out
    sess = load_bundle(out).session()
    assert sess.generate(PROMPT, 6, task="a", stop_at_eos=False)["token_ids"] == torch_tokens(lm["model"], lm["tasks"][0], 6)


def test_optimum_generates_the_same_tokens_from_the_dense_bundle(lm):
    """The dense bundle is a plain optimum causal-LM folder too (model.onnx + config.json)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    ort_model = ORTModelForCausalLM.from_pretrained(lm["dense"].path)
    ids = torch.tensor([PROMPT])
    out = ort_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert out[0, len(PROMPT):].tolist() == torch_tokens(lm["model"])


def test_a_task_added_later_gets_its_generation_reference(lm, tmp_path):
    from crisp_edge.export.onnx.adapter import remove_task

    folder = tmp_path / "b2"
    shutil.copytree(lm["swap"].path, folder)
    ce.save_checkpoint(lm["model"], tmp_path / "ckpt")
    c = make_lm_task_file(lm["model"], tmp_path / "c.mixers.safetensors", "c", seed=7)
    mixers_to_onnx_adapter(c, folder, checkpoint=tmp_path / "ckpt")
    gen = load_bundle(folder).manifest["lm"]["generation"]
    report = check_bundle(folder)
    assert report.passed and sorted(g["task"] for g in report.generation) == ["a", "b", "c", "default"]
    want = generate(TorchStepper(_applied(lm["model"], c), SEQ), gen["default"]["cases"][0]["prompt"], 5).new_ids
    assert gen["c"]["cases"][0]["tokens"][:5] == want
    remove_task(folder, "c")
    assert "c" not in load_bundle(folder).manifest["lm"]["generation"]


def _applied(model, mixer_file):
    m = copy.deepcopy(model)
    apply_mixers_(m, read_mixers(mixer_file))
    return m

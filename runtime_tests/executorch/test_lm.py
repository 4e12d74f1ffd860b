"""ExecuTorch language-model bundles (static key/value cache) of a toy CRISP LLaMA: generation parity per
task, task switching, the refusals (fault injection), and ``crisp-edge generate``.

The default suite exports one swappable bundle (portable kernels: the fastest lowering) with two task
files whose mixers are perturbed so the tokens visibly change with the task, and a toy tokenizer; the
XNNPACK exports (dense and swappable) and the benchmark's quick form are ``slow``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.bench.running import run_bench
import torch

import crisp_edge as ce
from crisp_edge.cli.main import main as cli_main
from crisp_edge.errors import ConfigError, DataError
from crisp_edge.export.errors import AdapterError, BundleError, ExportError, NoTaskError
from crisp_edge.export.executorch.bundle import load_et_bundle
from crisp_edge.export.executorch.export import export_executorch
from crisp_edge.export.executorch.lm_session import EtLMSession, validate_lm_bundle
from crisp_edge.export.executorch.tasks import check_task_ptd, read_ptd_bytes, write_task_ptd
from crisp_edge.export.lm import record_references, reference_prompts
from crisp_edge.export.parity.check import check_bundle
from crisp_edge.export.parity.compare import Tolerance, tolerance_for
from crisp_edge.export.parity.generation import check_generation
from crisp_edge.generation import TorchStepper
from crisp_edge.testing import make_lm_task_file, toy_hf_llama

pytestmark = pytest.mark.runtime
REPO = Path(__file__).resolve().parents[2]
TASKS = ("alpha", "beta")


def toy_tokenizer(words: int = 62):
    """A word-level tokenizer of the toy's 64-token vocabulary (<s>, </s> and w0..w61)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(words - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def crisp_llama(seed: int = 0, tied: bool = False):
    model = toy_hf_llama(seed=seed, tied=tied).eval()
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    return model


@pytest.fixture(scope="module")
def model():
    return crisp_llama()


@pytest.fixture(scope="module")
def tasks(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_tasks")
    return [make_lm_task_file(model, d / f"{t}.mixers.safetensors", task=t, seed=i + 1) for i, t in enumerate(TASKS)]


@pytest.fixture(scope="module")
def swappable(model, tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_bundles") / "swap"
    return export_executorch(model, out, mode="swappable", recipe="portable", tasks=tasks, tokenizer=toy_tokenizer())


def _assert_each_task_generates_its_own_tokens(sess, model, paths, seq: int) -> None:
    """Greedy tokens of every task (and the default) in the session equal the PyTorch model with that task's
    mixers (the reference computed here, not the one stored at export), and the three differ."""
    prompt = [5, 9, 3, 7]
    got = {t: sess.generate(prompt, 12, task=t)["token_ids"] for t in ("default", *TASKS)}
    for t, path in zip(TASKS, paths):
        ref = record_references({t: TorchStepper(_with_mixers(model, path), seq)}, [prompt], 12)[t]
        assert got[t] == ref["cases"][0]["tokens"]
    assert len({tuple(v) for v in got.values()}) == 3, got


def test_each_task_generates_its_own_pytorch_reference(swappable, model, tasks):
    m = swappable.manifest
    assert m["parity"]["passed"] and m["lm"]["max_seq_len"] == 32  # the toy's position range caps the default 256
    assert m["tolerance"]["atol"] == tolerance_for("executorch-lm", "swappable").atol  # the named LM tolerance
    assert m["lm"]["tokenizer"]["vocab_size"] == 64 and set(m["lm"]["generation"]) == {"default", *TASKS}
    sess = swappable.session(threads=1)
    assert isinstance(sess, EtLMSession)
    report = validate_lm_bundle(swappable)
    assert report.passed and report.max_abs < 1e-4, report.summary()
    tensors = check_bundle(swappable)  # crisp-edge parity: the stored prefill cases of every task
    assert tensors.passed and len(tensors.comparisons) >= 2 * 3, tensors
    _assert_each_task_generates_its_own_tokens(sess, model, tasks, 32)  # the task changes the text
    sess.set_task("beta")  # the wrong task for alpha's reference: parity notices
    wrong = check_generation(sess.lm_stepper(), m["lm"]["generation"]["alpha"], Tolerance(1e-4, 0.999, "test"), "alpha")
    assert not wrong.tokens_match and not wrong.logits_match


def _with_mixers(model, path):
    import copy

    from crisp_edge.files.mixers import apply_mixers_

    m = copy.deepcopy(model)
    apply_mixers_(m, path)
    return m


def test_task_switch_starts_a_new_sequence(swappable):
    sess = swappable.session(threads=1)
    fresh = swappable.session(threads=1)
    step = sess.lm_stepper()
    sess.set_task("alpha")
    step.step(list(range(3, 23)), 0)  # fills 20 cache positions with alpha's keys and values
    sess.set_task("beta")
    with pytest.raises(ConfigError, match="stale cache"):
        step.step([4], 20)  # continuing alpha's sequence on beta's weights is refused
    short = sess.generate([6, 7], 8)["token_ids"]  # beta, over a cache still holding alpha's entries
    assert short == fresh.generate([6, 7], 8, task="beta")["token_ids"]


def test_refusals(swappable, tmp_path):
    sess = swappable.session(threads=1)
    with pytest.raises(NoTaskError):
        sess.generate([1, 2], 3)
    with pytest.raises(AdapterError, match="neither a task"):
        sess.generate([1, 2], 3, task="no-such-task")
    with pytest.raises(DataError, match="key/value cache holds 32"):
        sess.generate(list(range(40)), 3, task="alpha")
    with pytest.raises(DataError, match="token ids must be in"):
        sess.generate([64], 3, task="alpha")
    with pytest.raises(ExportError, match="one prefill from an empty cache"):
        sess.run({"tokens": np.zeros((1, 2), np.int64), "input_pos": np.array([3, 4])})
    swap = swappable.manifest["swappable"]
    arrays = _alpha_mixers(swappable)
    foreign = write_task_ptd(arrays, tmp_path / "foreign.ptd", swap["tag"] ^ 1)  # made for other bases
    with pytest.raises(Exception, match="(?i)tag|bases"):
        sess.set_task(foreign)
    assert sess.task is None
    with pytest.raises(NoTaskError):  # the failed switch left no task, not the previous one
        sess.generate([1, 2], 3)


def _alpha_mixers(bundle):
    arrays, _ = check_task_ptd(read_ptd_bytes(bundle.task_path("alpha")), bundle.manifest["swappable"], "alpha",
                               hashed=True)
    return arrays


def test_tokenizer_must_be_the_bundles(swappable, tmp_path):
    sess = swappable.session(threads=1)
    mine = tmp_path / "tokenizer.json"
    toy_tokenizer(words=40).save(str(mine))  # another vocabulary
    with pytest.raises(DataError, match="does not match the bundle"):
        sess.generate("w1 w2", 3, task="alpha", tokenizer=mine)
    toy_tokenizer().save(str(mine))  # the same tokenizer, written by the user: accepted
    assert sess.generate("w1 w2", 3, task="alpha", tokenizer=mine)["token_ids"] == \
        sess.generate("w1 w2", 3, task="alpha")["token_ids"]
    copy = tmp_path / "edited"
    shutil.copytree(swappable.path, copy)
    tok = copy / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"w1"', '"w1x"'))
    with pytest.raises(BundleError, match="tokenizer.json does not match"):
        load_et_bundle(copy)


def test_an_edited_lm_section_is_refused(swappable, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(swappable.path, copy)
    meta = json.loads((copy / "manifest.json").read_text())
    meta["lm"]["max_seq_len"] = 64  # a longer cache than the program's
    (copy / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not match the lm section"):
        load_et_bundle(copy).session(threads=1)


def test_cli_generate_streams_the_sessions_text(swappable, capsys):
    sess = swappable.session(threads=1)
    want = sess.generate("w3 w4 w5", 6, task="beta", stop_at_eos=True)
    assert cli_main(["generate", str(swappable.path), "--prompt", "w3 w4 w5", "--task", "beta",
                     "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out == want["text"] + "\n"
    assert f"generated {len(want['token_ids'])}" in err and "task beta" in err
    assert re.search(r"prefill \d+\.\d tokens/s, decode \d+\.\d tokens/s", err), err  # the runtime's steps, timed
    assert cli_main(["generate", str(swappable.path), "--prompt-ids", "3,4", "--max-new-tokens", "2",
                     "--temperature", "0.9", "--top-p", "0.8", "--seed", "3"]) == 0  # swappable: task "default"
    assert "task default" in capsys.readouterr().err
    assert cli_main(["generate", str(swappable.path), "--prompt", "w1", "--task", "nope"]) == 2
    assert cli_main(["generate", str(swappable.path), "--prompt", "w1", "--prompt-ids", "1"]) == 2
    assert "one of them" in capsys.readouterr().err


@pytest.mark.slow
def test_xnnpack_dense_and_swappable_agree_with_pytorch(model, tasks, tmp_path):
    dense = export_executorch(model, tmp_path / "dense", mode="dense", max_seq_len=24)
    swap = export_executorch(model, tmp_path / "swap", mode="swappable", tasks=tasks, max_seq_len=24)
    for b in (dense, swap):
        assert b.manifest["parity"]["passed"] and b.manifest["parity"]["max_abs"] < 1e-4
        ops = b.manifest["non_delegated_ops"]["forward"]
        # delegated, but the swappable program's head (one position per call: crisp::rowmajor_linear)
        assert _products(ops) == ({"crisp.rowmajor_linear.default": 1} if b is swap else {}), ops
        assert b.manifest["params"]["head_copy"] == 0  # the toy's head is not tied: nothing stored twice
    prompts = reference_prompts(None, 64)
    assert dense.session().generate(prompts[0], 10)["token_ids"] == \
        swap.session().generate(prompts[0], 10, task="default")["token_ids"]


def _products(ops: dict) -> dict:
    """The matrix products among ``ops`` (a method's non-delegated operators)."""
    return {k: n for k, n in ops.items() if "linear" in k or k.startswith("aten.mm") or "addmm" in k}


@pytest.mark.slow
def test_swappable_program_reads_a_tied_head_in_place_and_still_switches_tasks(tmp_path):
    """SmolLM2 ties its head to the embedding. The swappable XNNPACK program's vocabulary projection (one
    position per call) is ``crisp::rowmajor_linear`` reading the embedding in place: no copy of the head
    (XNNPACK turns a shared weight away, and would pack one copy per method), while the CRISP weights stay
    buffers that ``set_task`` rewrites: each task's tokens are its PyTorch reference's and differ between
    tasks. The attention mask is one ``where`` per call, not one per layer."""
    from crisp_edge.export.model_io import _stored_params

    model = crisp_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    paths = [make_lm_task_file(model, tmp_path / f"{t}.mixers.safetensors", task=t, seed=i + 1)
             for i, t in enumerate(TASKS)]
    b = export_executorch(model, tmp_path / "swap", mode="swappable", tasks=paths, max_seq_len=24)
    m = b.manifest
    ops = m["non_delegated_ops"]["forward"]
    assert _products(ops) == {"crisp.rowmajor_linear.default": 1}, ops
    assert ops.get("aten.where.self", 0) <= 1 < model.config.num_hidden_layers, ops
    assert m["params"]["stored"] == _stored_params(model) and m["params"]["head_copy"] == 0
    assert m["parity"]["passed"] and m["parity"]["max_abs"] < 1e-4  # every task's generation, in ExecuTorch
    sess = b.session(threads=1)
    _assert_each_task_generates_its_own_tokens(sess, model, paths, 24)  # set_task still rewrites the weights


def test_swappable_forward_packs_constant_weights_once_and_leaves_buffers_to_set_task():
    """The swappable recipe's partitioners on one linear whose weight is a buffer (a CRISP weight that
    set_task writes) and one whose weight is a constant (a language model's head): both products run in
    XNNPACK; the constant is inside its delegate (packed once, at load), the buffer is not (an input of the
    delegate, read as set_task left it)."""
    from torch import nn

    from crisp_edge.export.executorch.lowering import non_delegated_ops, partition

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(8, 8))
            self.head = nn.Linear(8, 5, bias=False)

        def forward(self, x):
            return self.head(torch.nn.functional.linear(x, self.w))

    ep = torch.export.export(Two().eval(), (torch.randn(1, 8),))
    edge = partition({"forward": ep}, "xnnpack", "swappable")
    assert not _products(non_delegated_ops(edge)["forward"])
    inside = set()
    for name, mod in edge.exported_program("forward").graph_module.named_children():
        if name.startswith("lowered_module"):
            sig = mod.original_module.graph_signature
            inside |= set(sig.inputs_to_parameters.values()) | set(sig.inputs_to_buffers.values())
    assert "head.weight" in inside and "w" not in inside, inside


@pytest.mark.slow
def test_bench_quick(tmp_path):
    r = run_bench("bench_lm_executorch.py", "--quick", "--work", str(tmp_path / "work"), out=tmp_path / "lm.json")
    assert all(p["tokens_match"] for v in r["parity"].values() for p in v)
    assert set(r["ratios"]) >= {"prefill_swappable_vs_dense", "decode_swappable_vs_dense", "switch_in_decode_steps",
                                "rss_swappable_vs_dense"}


def test_export_refuses_what_an_lm_bundle_cannot_be(model, tmp_path):
    with pytest.raises(ConfigError, match="'dense' or 'swappable'"):
        export_executorch(model, tmp_path / "f", mode="factored")
    with pytest.raises(ConfigError, match="example_input does not apply"):
        export_executorch(model, tmp_path / "q", mode="dense", example_input=torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings"):
        export_executorch(model, tmp_path / "long", mode="dense", max_seq_len=64)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_cpp_runner_generates_the_sessions_tokens(swappable, tmp_path):
    from runtime_tests.executorch.test_runner import RUNNER_DIR

    exe = tmp_path / "crisp_et_runner"
    r = subprocess.run(["bash", str(RUNNER_DIR / "build.sh"), sys.executable, str(exe)], capture_output=True,
                       text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    sess = swappable.session(threads=1)
    prompt = [5, 9, 3, 7]
    swap = swappable.manifest["swappable"]
    foreign = write_task_ptd(_alpha_mixers(swappable), tmp_path / "foreign.ptd", swap["tag"] ^ 1)
    mine = write_task_ptd(_alpha_mixers(swappable), tmp_path / "mine.ptd", swap["tag"])  # alpha, given by path
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([str(exe), str(swappable.path), str(out), "--generate", ",".join(map(str, prompt)),
                        "--max-new-tokens", "12", "--task", "alpha", "--task", "beta", "--task", "default",
                        "--task", f"mine={mine}"], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    for task in ("alpha", "beta", "default"):
        want = sess.generate(prompt, 12, task=task, stop_at_eos=False)["token_ids"]
        assert (out / f"tokens.{task}.txt").read_text().strip() == ",".join(map(str, want)), task
    assert (out / "tokens.mine.txt").read_text() == (out / "tokens.alpha.txt").read_text()
    bad = subprocess.run([str(exe), str(swappable.path), str(out), "--generate", "1,2", "--max-new-tokens", "3",
                          "--task", f"x={foreign}"], capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 3 and "tag" in bad.stderr, bad.stderr[-2000:]  # a task file for other bases
    long = subprocess.run([str(exe), str(swappable.path), str(out), "--generate", ",".join(["1"] * 32),
                           "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300, check=False)
    assert long.returncode == 2 and "key/value cache holds 32" in long.stderr


@pytest.mark.slow
def test_cli_exports_a_checkpoint_and_generates(model, tmp_path, capsys):
    from crisp_edge.files.checkpoint import save_checkpoint

    save_checkpoint(model, tmp_path / "ckpt")
    toy_tokenizer().save(str(tmp_path / "tokenizer.json"))
    assert cli_main(["export", str(tmp_path / "ckpt"), "--target", "executorch", "--mode", "dense", "--out",
                     str(tmp_path / "lm"), "--max-seq-len", "16", "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    out = capsys.readouterr().out
    assert "cache 16 tokens" in out and "tokenizer tokenizer.json (64 tokens)" in out
    assert cli_main(["generate", str(tmp_path / "lm"), "--prompt", "w1 w2", "--max-new-tokens", "4"]) == 0
    want = load_et_bundle(tmp_path / "lm").session().generate("w1 w2", 4)["text"]
    assert capsys.readouterr().out == want + "\n"
    assert cli_main(["export", str(tmp_path / "ckpt"), "--target", "executorch", "--out", str(tmp_path / "x"),
                     "--max-seq-len", "64"]) == 2  # beyond the model's 32 positions

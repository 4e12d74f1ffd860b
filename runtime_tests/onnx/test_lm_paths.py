"""The swappable LM graph's prefill and decode paths (``export.onnx.lm_paths``) and the fold data's pages
handed back after a switch (``OnnxCrispSession.set_task``, ``crisp_edge.files.pages``): the graph's
structure, both paths' numbers against the dense bundle, generation against PyTorch."""
from __future__ import annotations

import copy
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from crisp_edge.export import export_onnx, load_bundle
from crisp_edge.export.errors import BundleError
from crisp_edge.export.onnx import bundle as onnx_bundle
from crisp_edge.export.onnx import lm_paths
from crisp_edge.export.parity.compare import ATOL_LM_FP32

import crisp_edge as ce
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.files.pages import file_mappings, resident_bytes
from crisp_edge.generation import TorchStepper, generate
from crisp_edge.testing import make_lm_task_file, toy_model

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)
SEQ = 32
PROMPT = [5, 9, 14, 3]
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux")


def crisp_llama(transpose: bool = False) -> torch.nn.Module:
    model = toy_model("hf-llama", seed=0)
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2, transpose=transpose)), progress=False)
    return model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_paths")
    model = crisp_llama()
    tasks = [make_lm_task_file(model, root / f"{t}.mixers.safetensors", t, seed=i + 1) for i, t in enumerate("ab")]
    dense = export_onnx(model, root / "dense", mode="dense", max_seq_len=SEQ)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_bundle, "EXTERNAL_DATA_BYTES", 0)  # every graph's weights in a .data file, mapped as SmolLM2's are
        mp.setattr(lm_paths, "FLIP_MIN_WEIGHTS", 0)  # the toy's 32 x 64 weights get both paths, as SmolLM2's MLP does
        swap = export_onnx(model, root / "swap", mode="swappable", tasks=tasks, max_seq_len=SEQ)
    return {"root": root, "model": model, "tasks": tasks, "dense": dense, "swap": swap}


def torch_tokens(model, mixer_file=None, n: int = 10) -> list[int]:
    m = copy.deepcopy(model)
    if mixer_file is not None:
        apply_mixers_(m, read_mixers(mixer_file))
    return generate(TorchStepper(m, SEQ), PROMPT, n).new_ids


def test_each_weight_product_has_a_prefill_and_a_decode_path(lm):
    swap = lm["swap"].manifest["swappable"]
    weights = sorted(swap["weights"])
    assert swap["prefill_flipped"] == weights and len(weights) == 14  # 2 blocks x 7 projections, none transposed
    graph = onnx.load(str(lm["swap"].path / "model.onnx")).graph
    assert [n.op_type for n in graph.node[:3]] == ["Shape", "Gather", "Equal"]  # one token? once a run
    top = {i for n in graph.node for i in n.input}
    paths = {}
    for node in graph.node:
        if node.op_type == "If":
            assert list(node.input) == ["crisp.is_decode"]
            b = {a.name: a.g for a in node.attribute}
            paths[node.output[0]] = ([(n.op_type, list(n.input)) for n in b["then_branch"].node],
                                     [(n.op_type, list(n.input)) for n in b["else_branch"].node])
    assert len(paths) == len(weights)  # one If per weight product, nothing else branches
    for w in weights:
        assert f"{w}.dense" not in top  # used inside the If branches only
        (decode, prefill), = [p for p in paths.values() if any(f"{w}.dense" in i for _, i in p[0])]
        assert [op for op, _ in decode] == ["Transpose", "MatMul"] and decode[0][1] == [f"{w}.dense"]
        assert [op for op, _ in prefill] == ["Transpose", "MatMul", "Transpose"]
        assert prefill[1][1][0] == f"{w}.dense"  # the weight is MatMul's first operand: never packed per call
    # the LM head's product reads a constant: one path, outside any If
    (head,) = [n for n in graph.node if n.output[0] == "logits"]
    assert head.op_type == "MatMul"


def test_small_weights_keep_the_one_path(tmp_path):
    model = crisp_llama()  # the toy's largest weight has 2048 numbers, under FLIP_MIN_WEIGHTS
    bundle = export_onnx(model, tmp_path / "swap", mode="swappable", max_seq_len=SEQ)
    assert bundle.manifest["swappable"]["prefill_flipped"] == []
    assert "If" not in [n.op_type for n in onnx.load(str(bundle.path / "model.onnx")).graph.node]


def feeds(bundle, batch: int, past: int, new: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"input_ids": rng.integers(0, 64, (batch, new)), "attention_mask": np.ones((batch, past + new), np.int64),
           "position_ids": np.tile(np.arange(past, past + new), (batch, 1))}
    for i in bundle.manifest["inputs"]:
        if i["name"].startswith("past_key_values."):
            out[i["name"]] = rng.standard_normal((batch, i["shape"][1], past, i["shape"][3])).astype(np.float32)
    return out


@pytest.mark.parametrize("new", [1, 5])  # one token: the decode path; five: the prefill path
def test_both_paths_compute_what_the_dense_bundle_computes(lm, new):
    dense, swap = lm["dense"].session(), lm["swap"].session()
    swap.set_task("default")  # the exported mixers: the dense bundle's weights
    for batch, past in ((1, 0), (2, 3)):
        x = feeds(lm["dense"], batch, past, new)
        want, got = dense.run(x), swap.run(x)
        assert list(got) == list(want) and got["logits"].shape == (batch, new, 64)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL_LM_FP32, err_msg=name)


def test_transposed_groups_keep_the_one_path_and_generate_as_pytorch(tmp_path, monkeypatch):
    model = crisp_llama(transpose=True)
    monkeypatch.setattr(lm_paths, "FLIP_MIN_WEIGHTS", 0)  # large enough, but W^T is the fold's own layout
    bundle = export_onnx(model, tmp_path / "swap", mode="swappable", max_seq_len=SEQ)
    assert bundle.manifest["swappable"]["prefill_flipped"] == []  # W^T is the fold's own layout: x @ W^T as it is
    assert "If" not in [n.op_type for n in onnx.load(str(bundle.path / "model.onnx")).graph.node]
    got = bundle.session().generate(PROMPT, 10, task="default", stop_at_eos=False)["token_ids"]
    assert got == torch_tokens(model)


@linux
def test_a_switch_hands_back_the_fold_data_pages_and_reads_them_again(lm):
    data = lm["swap"].path / "fold.onnx.data"
    sess = lm["swap"].session()
    sess.fold.run_with_ort_values(sess.weight_names, {})  # what a switch runs: the bases become resident
    assert file_mappings(data) and resident_bytes(data) > 0
    for task, mixer_file in zip("ab", lm["tasks"]):
        sess.set_task(task)
        assert resident_bytes(data) == 0 and file_mappings(data)  # still mapped, nothing resident
        assert sess.generate(PROMPT, 10, stop_at_eos=False)["token_ids"] == torch_tokens(lm["model"], mixer_file)
    sess.release_bases = False  # the faster-switch choice: the bases stay resident
    sess.set_task("a")
    assert resident_bytes(data) > 0


def test_a_fold_data_file_changed_after_opening_is_refused(lm, tmp_path):
    folder = tmp_path / "swap"
    shutil.copytree(lm["swap"].path, folder)
    sess = load_bundle(folder).session()
    sess.set_task("a")
    data = folder / "fold.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="changed after this session opened"):
        sess.set_task("b")
    assert sess.task is None

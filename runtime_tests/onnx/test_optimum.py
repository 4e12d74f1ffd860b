"""Dense bundles of Hugging Face models through optimum's ONNX exporter (``export_onnx(exporter="optimum")``).

Toy HF ViT and LLaMA models built in code (``crisp_edge.testing``), retrofitted with CRISP, exported
dense by optimum, checked in ONNX Runtime against PyTorch: the stored reference cases by the parity
library, and fresh inputs (another batch size and, for LLaMA, another sequence length) by hand.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from crisp_edge.export import ExportError, export_onnx, load_bundle
from crisp_edge.export.onnx.optimum import EXPORTER_NAME, resolve_exporter
from crisp_edge.export.parity.check import check_bundle, recompute_reference
from crisp_edge.export.parity.reference import read_reference

import crisp_edge as ce
from crisp_edge.cli import main as crisp_edge_main
from crisp_edge.errors import ConfigError
from crisp_edge.testing import example_inputs, forward, toy_model


def parity_main(argv: list[str]) -> int:
    """``crisp-edge parity ARGV``, exit status and all."""
    return crisp_edge_main(["parity", *argv])

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)
CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))
ATOL = 1e-4


def crisp_toy(arch: str, seed: int = 0) -> torch.nn.Module:
    model = toy_model(arch, seed=seed)
    ce.retrofit_(model, CONFIG, progress=False)
    return model


@pytest.fixture(scope="module")
def llama():
    return crisp_toy("hf-llama")


@pytest.fixture(scope="module")
def llama_bundle(llama, tmp_path_factory):
    return export_onnx(llama, tmp_path_factory.mktemp("llama") / "bundle", mode="dense", exporter="optimum")


def text_feeds(batch: int, length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, length - 3:] = 0  # right padding on one row
    pos = torch.arange(length).expand(batch, length).contiguous()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def test_hf_vit_crisp_dense_bundle_through_optimum(tmp_path):
    model = crisp_toy("hf-vit")
    before = copy.deepcopy(model.state_dict())
    bundle = export_onnx(model, tmp_path / "vit", mode="dense", exporter="optimum")
    ex = bundle.manifest["exporter"]
    assert ex["kind"] == "optimum" and ex["name"] == EXPORTER_NAME and ex["task"] == "image-classification"
    assert ex["optimum"] and ex["transformers"] and bundle.manifest["mode"] == "dense"
    assert [i["name"] for i in bundle.manifest["inputs"]] == ["pixel_values"]
    # the batch axis is free; channels and image size are the model's own (a ViT takes only its size)
    assert bundle.manifest["inputs"][0]["shape"] == ["batch_size", 1, 16, 16]
    assert bundle.manifest["dynamic_axes"]["pixel_values"] == {"0": "batch_size"}
    # the exported model is untouched: still CRISP, same tensors
    assert ce.crisp_layers(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = check_bundle(tmp_path / "vit")
    assert report.passed and report.runtime == "onnxruntime" and len(report.comparisons) >= 2
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(7))  # a batch size not in the reference
    with torch.no_grad():
        want = forward(model, {"pixel_values": x}).numpy()
    got = load_bundle(tmp_path / "vit").session()(x)
    assert got.shape == want.shape == (5, 3) and np.abs(got - want).max() < ATOL
    with pytest.raises(ExportError, match=r"input 'pixel_values' has shape \[1, 1, 24, 24\]"):
        load_bundle(tmp_path / "vit").session()(np.zeros((1, 1, 24, 24), np.float32))


def test_llama_bundle_records_integer_inputs(llama_bundle):
    """A LLaMA exports as a language-model bundle: optimum's with-past graph (runtime_tests/onnx/test_lm.py
    covers generation); its token inputs are integers and its tensor cases exercise the mask and the cache."""
    m = llama_bundle.manifest
    assert m["exporter"]["kind"] == "optimum" and m["exporter"]["task"] == "text-generation-with-past"
    assert m["exporter"]["with_past"] is True and "lm" in m
    dtypes = {i["name"]: i["dtype"] for i in m["inputs"]}
    assert {k: dtypes[k] for k in ("input_ids", "attention_mask", "position_ids")} == {
        "input_ids": "int64", "attention_mask": "int64", "position_ids": "int64"}
    assert m["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch_size", "sequence_length", 64]}
    assert m["dynamic_axes"]["input_ids"] == {"0": "batch_size", "1": "sequence_length"}
    assert m["parity"]["passed"] and m["parity"]["checked_cases"] == 2 * len(m["outputs"])
    ref = read_reference(llama_bundle.path, m["reference"])
    for case in ref.inputs:
        assert case["input_ids"].dtype == np.int64 and case["input_ids"].max() < 64
        assert case["attention_mask"].min() == 0 and case["attention_mask"].max() == 1  # the mask is exercised
    assert [c["past_key_values.0.key"].shape[2] for c in ref.inputs] == [0, 4]  # an empty cache and a filled one


def test_llama_bundle_matches_pytorch_logits_on_new_inputs(llama, llama_bundle):
    sess = load_bundle(llama_bundle.path).session(threads=1)
    for batch, length, seed in ((4, 5, 1), (1, 11, 2)):  # new batch sizes and sequence lengths
        feeds = text_feeds(batch, length, 64, seed)
        with torch.no_grad():
            want = llama(**feeds).logits.numpy()
        got = sess.run(feeds)["logits"]
        assert got.shape == want.shape == (batch, length, 64)
        assert np.abs(got - want).max() < ATOL
        assert (got.argmax(-1) == want.argmax(-1)).all()
        numpy_in = sess.run({k: v.numpy() for k, v in feeds.items()})["logits"]  # numpy ints work too
        assert np.array_equal(numpy_in, got)


def test_llama_session_refuses_float_token_ids(llama_bundle):
    sess = llama_bundle.session()
    feeds = text_feeds(2, 4, 64, 0)
    feeds["input_ids"] = feeds["input_ids"].float() + 0.5
    with pytest.raises(ExportError, match="input 'input_ids' takes integers"):
        sess.run(feeds)


def test_parity_library_and_cli_accept_the_llama_bundle(llama, llama_bundle, tmp_path):
    report = check_bundle(llama_bundle.path)
    assert report.passed and report.comparisons and report.max_abs < ATOL
    assert parity_main([str(llama_bundle.path), "--report-dir", str(tmp_path / "rep"), "--no-plot",
                        "--no-progress"]) == 0
    assert json.loads((tmp_path / "rep" / "parity.json").read_text())["passed"] is True
    # a reference recomputed from another model (other mixers) makes the same bundle fail: the check can fail
    other = copy.deepcopy(llama)
    with torch.no_grad():
        for layer in ce.crisp_layers(other).values():
            layer.crisp_mixer.add_(0.2)
    bad = check_bundle(llama_bundle.path, reference=recompute_reference(llama_bundle.path, other, device="cpu"))
    assert not bad.passed


def test_plain_llama_exports_dense_and_auto_picks_optimum(tmp_path):
    model = toy_model("hf-llama", seed=3)  # not CRISP: a plain dense export
    bundle = export_onnx(model, tmp_path / "plain", mode="dense", exporter="auto")
    assert bundle.manifest["exporter"]["kind"] == "optimum"
    feeds = text_feeds(2, 6, 64, 5)
    with torch.no_grad():
        want = model(**feeds).logits.numpy()
    assert np.abs(bundle.session().run(feeds)["logits"] - want).max() < ATOL


def test_exporter_selection():
    vit, timm = toy_model("hf-vit"), crisp_toy("timm-vit")
    assert resolve_exporter(vit, "dense", "auto") == "optimum"
    assert resolve_exporter(vit, "factored", "auto") == "torch"  # CRISP ops must stay in the graph
    assert resolve_exporter(vit, "swappable", "auto") == "torch"
    assert resolve_exporter(timm, "dense", "auto") == "torch"
    assert resolve_exporter(vit, "dense", "torch") == "torch"
    with pytest.raises(ConfigError, match="dense bundles only"):
        resolve_exporter(vit, "swappable", "optimum")
    with pytest.raises(ExportError, match="VisionTransformer"):
        resolve_exporter(timm, "dense", "optimum")
    with pytest.raises(ConfigError, match="exporter must be one of"):
        resolve_exporter(vit, "dense", "tf2onnx")


def test_torch_exporter_is_recorded_and_still_the_default(tmp_path):
    model = crisp_toy("timm-vit")
    bundle = export_onnx(model, tmp_path / "timm", mode="dense")
    assert bundle.manifest["exporter"]["kind"] == "torch"
    assert bundle.manifest["exporter"]["name"].startswith("torch.onnx.export")


def test_bad_inputs_are_refused_before_anything_is_written(llama, tmp_path):
    ids = example_inputs(llama)["input_ids"]
    with pytest.raises(ConfigError, match="makes its own reference cases"):
        export_onnx(llama, tmp_path / "a", mode="dense", exporter="optimum", example_input=ids)
    with pytest.raises(ConfigError, match="'dense' or 'swappable'"):
        export_onnx(llama, tmp_path / "c", mode="factored", exporter="optimum")
    vit = toy_model("hf-vit")
    with pytest.raises(ExportError, match=r"float32 \[batch, 1, 16, 16\] tensor"):
        export_onnx(vit, tmp_path / "d", mode="dense", exporter="optimum", example_input=torch.zeros(2, 1, 24, 24))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exporter", ["optimum", "torch"])
def test_dense_hf_bundles_carry_their_config_and_optimum_loads_them(tmp_path, exporter, llama_bundle):
    """A dense bundle of a Hugging Face model holds config.json (+ preprocessor_config.json for the ViT),
    hashed in the manifest; optimum's ORTModelForImageClassification loads the folder as it is and
    gives the bundle's logits. The LLaMA bundle gets its config (no tokenizer is known: no processor)."""
    import transformers
    from crisp_edge.files.io import sha256_file

    model = crisp_toy("hf-vit")
    bundle = export_onnx(model, tmp_path / "vit", mode="dense", exporter=exporter)
    files = bundle.manifest["files"]
    for name in ("config.json", "preprocessor_config.json"):
        assert files[name]["sha256"] == sha256_file(tmp_path / "vit" / name)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "vit")
    assert config.architectures == ["ViTForImageClassification"] and config.num_labels == 3
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "vit")
    assert processor.size == {"height": 16, "width": 16} and list(processor.image_mean) == [0.5]
    from optimum.onnxruntime import ORTModelForImageClassification

    ort_model = ORTModelForImageClassification.from_pretrained(tmp_path / "vit")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = forward(model, {"pixel_values": x})
    got = ort_model(pixel_values=x).logits
    assert torch.as_tensor(got).shape == (2, 3) and (torch.as_tensor(got) - want).abs().max() < ATOL
    assert "config.json" in llama_bundle.manifest["files"] and "preprocessor_config.json" not in llama_bundle.manifest["files"]
    # swappable bundles hold more than one graph: no optimum config is claimed for them
    swap = export_onnx(model, tmp_path / "swap", mode="swappable")
    assert "config.json" not in swap.manifest["files"]

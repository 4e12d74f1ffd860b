"""Swappable int8 ONNX bundles (``export_onnx(mode="swappable", quantize="int8")``, ``onnx/swap_int8.py``): the
inference graph is the dense int8 graph with its MatMulInteger weights and scales as task inputs; a switch writes
them with the fused fold+quantize kernel, or with the fold graph's in-graph quantization where ORT runs alone.
The two paths agree, a switch gives the task's answer, float32 task files are tasks, and other bases are refused."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import crisp_edge as ce
from crisp_edge.errors import BasisMismatchError
from crisp_edge.export import check_bundle, export_onnx, fold_kernel, load_bundle
from crisp_edge.export.bundle import bundle_tag
from crisp_edge.export.onnx.adapter import write_adapter
from crisp_edge.export.onnx.quantize import WEIGHT_QMAX
from crisp_edge.export.onnx import swap_int8
from crisp_edge.export.onnx.session import OnnxCrispSession
from crisp_edge.export.onnx.swap_int8 import int8_names
from crisp_edge.export.parity.compare import ATOL_INT8
from crisp_edge.files.fingerprint import bases_fingerprint
from crisp_edge.files.mixers import apply_mixers_, model_layout
from crisp_edge.method.convert import crisp_bases, materialize_
from crisp_edge.testing import make_task_file, toy_model

pytestmark = pytest.mark.runtime


def crisp_toy(seed: int = 0):
    model = toy_model("timm-vit", seed=seed)
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    return model.eval()


class GraphFold(OnnxCrispSession):
    """The session an app running ONNX Runtime alone gets: the fold graph's own fold and quantization."""

    use_fold_kernel = False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap_int8")
    model = crisp_toy()
    tasks = [make_task_file(model, root / "t1.safetensors", "t1", 1, 4),
             make_task_file(model, root / "t2.safetensors", "t2", 2, 4)]  # same classes: outputs comparable
    bundle = export_onnx(model, root / "int8", mode="swappable", quantize="int8", tasks=tasks)
    return model, tasks, bundle


def x_input(batch: int = 5) -> np.ndarray:
    return torch.randn((batch, 1, 16, 16), generator=torch.Generator().manual_seed(7)).numpy()


def test_the_bundle_is_the_int8_graph_with_its_weights_as_task_inputs(setup):
    model, _, bundle = setup
    m = bundle.manifest
    assert m["quantize"]["scheme"] == "int8" and m["tolerance"]["dtype"] == "int8"
    assert "task switch" in m["tolerance"]["reason"] and m["tolerance"]["atol"] == ATOL_INT8
    graph = onnx.load(str(bundle.path / "model.onnx")).graph
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    weights = [w for w in m["swappable"]["weights"] if w.endswith(".int8")]
    assert weights and len(weights) == 4 * 4  # qkv, proj, fc1, fc2 of every block
    for w in weights:
        codes, scales = int8_names(w.removesuffix(".int8"))
        assert inputs[codes] == onnx.TensorProto.INT8 and inputs[scales] == onnx.TensorProto.FLOAT
    fused = {n.input[1]: n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"}
    assert set(weights) <= set(fused)  # every task weight feeds an integer kernel, its bias taken in too
    assert all(fused[w].input[4] == w.replace(".weight.int8", ".bias") for w in weights)
    assert not [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    report = check_bundle(load_bundle(bundle.path))
    assert report.passed and report.tolerance["dtype"] == "int8"


def test_default_codes_are_the_folded_int8_bases_quantized_per_channel(setup):
    """The bases are stored as int8 codes with a scale per term; the switch's codes and scales for the exported
    mixers are a float64 numpy fold of those dequantized bases, quantized symmetric per output channel
    (quantize_dynamic's scheme) in MatMulInteger's (d_in, d_out) layout, ties aside; and that is PyTorch's
    float weight within the two quantizations' error."""
    model, _, bundle = setup
    fold = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(bundle.path / "fold.onnx")).graph.initializer}
    dense = dict(materialize_(copy.deepcopy(model)).named_parameters())
    sess = bundle.session()
    sess.set_task("default")
    bases = crisp_bases(model)
    assert bases and not [k for k in bases if f"basis.{k}" in fold]  # no float basis stored
    for key, basis in bases.items():
        # stored channel-major (every toy group's shapes allow it): put back in product order to check it
        assert fold_kernel.channel_major_fits(basis.d_out, basis.d_in, basis.s)
        codes = fold_kernel.channel_major(fold[f"basis.{key}.int8"], basis.d_out, basis.d_in, basis.s, inverse=True)
        b = codes.astype(np.float64) * fold[f"basis.{key}.scale"][:, None]  # (r, u)
        a = fold[f"mixer.{key}"].astype(np.float64)
        gated = a / (1 + np.exp(-a))  # silu, the toy's gate
        for i, name in enumerate(basis.layer_names):
            w = (b.T @ gated[i]).reshape(basis.d_out, basis.d_in)
            scale = np.abs(w).max(1) / WEIGHT_QMAX  # 7-bit codes, -64..64
            exact = (w / scale[:, None]).T
            codes, got_scale = (sess._weights[n].numpy() for n in int8_names(f"dense.{name}.weight"))
            np.testing.assert_allclose(got_scale, scale, rtol=1e-5)
            off = codes.astype(int) != np.rint(exact)
            assert np.all(np.abs(np.abs(exact[off] - np.floor(exact[off])) - 0.5) < 1e-3)
            assert np.abs(codes.astype(int)).max() == WEIGHT_QMAX  # 7-bit: exact in ORT's kernel without VNNI
            err = np.abs(codes.T * got_scale[:, None] - dense[f"{name}.weight"].detach().numpy()).max(1)
            assert np.all(err <= 3 * got_scale)  # a code step and a half each way, at most


def test_kernel_and_fold_graph_switches_agree_and_switching_gives_the_tasks_answer(setup):
    model, tasks, bundle = setup
    kern, graph = bundle.session(), GraphFold(bundle)
    assert kern.fold_with == "crisp-edge kernel" and graph.fold_with == "onnxruntime"
    x = x_input()
    outs = {}
    for task in ("t1", "t2", "default", "t1"):
        kern.set_task(task)
        graph.set_task(task)
        a, b = kern(x), graph(x)
        for name, v in kern._weights.items():  # the same codes but for rounding ties, a step apart at most
            if name.endswith(".int8"):
                diff = np.abs(v.numpy().astype(int) - graph._weights[name].numpy().astype(int))
                assert diff.max() <= 1 and diff.mean() < 1e-3, (task, name, diff.max(), diff.mean())
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)  # a step is 1/64 of a channel's largest weight
        if task in outs:
            np.testing.assert_array_equal(a, outs[task])  # back to t1: t1's answer again, nothing left of t2
        outs[task] = a
    for mf, task in zip(tasks, ("t1", "t2")):
        ref = copy.deepcopy(model)
        apply_mixers_(ref, mf)
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy()
        assert np.abs(outs[task] - want).max() <= ATOL_INT8
        other = outs["t2" if task == "t1" else "t1"]
        assert np.abs(other - want).max() > 5 * np.abs(outs[task] - want).max()  # the other task is far off


def test_the_kernel_quantizes_to_the_fold_graphs_range(tmp_path, monkeypatch):
    """The kernel's codes follow the fold graph's largest code, so a bundle written before the 7-bit weights (its
    graph quantizing to -127..127) still switches to the graph's codes with the kernel."""
    monkeypatch.setattr(swap_int8, "WEIGHT_QMAX", 127)
    bundle = export_onnx(crisp_toy(), tmp_path / "q127", mode="swappable", quantize="int8")
    kern, graph = bundle.session(), GraphFold(bundle)
    assert kern.fold_with == "crisp-edge kernel"
    kern.set_task("default")
    graph.set_task("default")
    codes = [v.numpy() for k, v in kern._weights.items() if k.endswith(".int8")]
    assert codes and max(int(np.abs(c.astype(int)).max()) for c in codes) == 127
    np.testing.assert_allclose(kern(x_input()), graph(x_input()), atol=1e-5, rtol=0)


def test_a_float32_task_file_is_a_task_and_other_bases_are_refused(setup, tmp_path):
    """Tasks are mixers: the .onnx_adapter of a float32 swappable bundle of the same model switches the int8 one
    (same tag, same answer as the bundle's own task); a file made for other bases is a BasisMismatchError and
    leaves the session with no task."""
    model, tasks, bundle = setup
    fp32 = export_onnx(model, tmp_path / "fp32", mode="swappable", tasks=tasks[:1])
    assert fp32.manifest["swappable"]["adapter_model_version"] == bundle.manifest["swappable"]["adapter_model_version"]
    sess = bundle.session()
    x = x_input()
    sess.set_task("t1")
    own = sess(x)
    sess.set_task(fp32.task_path("t1"))
    np.testing.assert_array_equal(sess(x), own)
    other = crisp_toy(seed=1)
    tag = bundle_tag(bases_fingerprint(other), model_layout(other))
    shape = bundle.manifest["swappable"]["overridable"]["mixer.qkv_0_1"]
    bad = write_adapter({"mixer.qkv_0_1": np.zeros(shape, np.float32)}, tmp_path / "other.onnx_adapter", tag)
    with pytest.raises(BasisMismatchError):
        sess.set_task(bad)
    assert sess.task is None


@pytest.mark.parametrize("value", [np.array([64, 64], np.float32), np.array(64.5, np.float32), np.array(0, np.float32),
                                   np.array(200, np.float32), np.array(np.nan, np.float32)])
def test_a_fold_graph_range_that_is_not_one_code_leaves_the_graph_to_quantize(value):
    """A fold graph whose largest-code constant is not one integer in 1..127 (a damaged or foreign file) gives the
    kernel no range: the session keeps the graph's own quantization instead of failing or guessing."""
    from crisp_edge.export.onnx.kernel_fold import _largest_code

    assert _largest_code({swap_int8.QMAX_NAMES[0]: onnx.numpy_helper.from_array(value, swap_int8.QMAX_NAMES[0])}) is None
    assert _largest_code({}) is None
    good = onnx.numpy_helper.from_array(np.array(64, np.float32), swap_int8.QMAX_NAMES[1])
    assert _largest_code({swap_int8.QMAX_NAMES[1]: good}) == 64

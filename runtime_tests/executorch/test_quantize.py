"""int8 ExecuTorch bundles (``export_executorch(..., quantize="int8")``): XNNPACK's dynamically quantized
linears through PT2E, recorded in the manifest, delegated, checked by parity with the int8 tolerance,
and refused where the runtime cannot run them; swappable int8 (crisp::qlinear over buffers set_task writes
with crisp::fold_quant_) switching tasks and matching PyTorch within the int8 tolerance."""
from __future__ import annotations

import pytest

import crisp_edge as ce
from crisp_edge.errors import ConfigError
from crisp_edge.export import check_bundle, export_executorch, load_et_bundle
from crisp_edge.export.parity.compare import ATOL_INT8
from crisp_edge.testing import toy_model

pytestmark = pytest.mark.runtime


def crisp_toy(seed: int = 0):
    model = toy_model("timm-vit", seed=seed)
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    return model


@pytest.mark.slow
def test_int8_dense_program_is_smaller_delegated_and_passes_parity(tmp_path):
    model = crisp_toy()
    fp32 = export_executorch(model, tmp_path / "fp32", mode="dense")
    int8 = export_executorch(model, tmp_path / "int8", mode="dense", quantize="int8")
    m = int8.manifest
    assert m["quantize"]["scheme"] == "int8" and m["tolerance"]["dtype"] == "int8"
    assert m["params"]["program_bytes"] < 0.6 * fp32.manifest["params"]["program_bytes"]
    left = " ".join(m["non_delegated_ops"]["forward"])
    assert "linear" not in left and "quantize" not in left and "mm" not in left, left  # all in XNNPACK
    report = check_bundle(load_et_bundle(int8.path))
    assert report.passed and report.tolerance["dtype"] == "int8" and report.max_abs <= ATOL_INT8


@pytest.mark.parametrize("mode, recipe, why", [
    ("factored", "xnnpack", "every forward, and XNNPACK's quantized linear takes only weights it packs once"),
    ("dense", "portable", "recipe")])
def test_int8_is_refused_where_the_runtime_cannot_run_it(mode, recipe, why, tmp_path):
    """The refusal says why for this runtime, mode and recipe; nothing is written."""
    with pytest.raises(ConfigError, match=why):
        export_executorch(crisp_toy(), tmp_path / "b", mode=mode, recipe=recipe, quantize="int8")
    assert not (tmp_path / "b").exists()


def _mixers_only_task(model, path, seed):
    """A task that changes the CRISP mixers only (the head stays): what set_task's int8 weights alone must show."""
    import copy

    import torch

    from crisp_edge.files.mixers import save_mixers
    from crisp_edge.method.convert import crisp_layers

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in crisp_layers(m).values():
            layer.crisp_mixer.add_(0.3 * torch.randn(layer.crisp_mixer.shape, generator=g))
    save_mixers(m, path, task=f"mix{seed}")
    return m


@pytest.mark.slow
def test_int8_swappable_switches_tasks_within_the_int8_tolerance(tmp_path):
    """Each task's logits (after set_task from its file) match that task's float32 PyTorch model within the named
    int8 tolerance, and differ from the other task's by more: a forward that kept the load-time int8 weights (what
    XNNPACK's packed linear would do) fails. Parity (check_bundle) passes for every task; the manifest says what
    runs where."""
    import numpy as np
    import torch

    from crisp_edge.export.parity.compare import tolerance_for
    from crisp_edge.testing import forward

    model = crisp_toy()
    tasks = {f"mix{s}": _mixers_only_task(model, tmp_path / f"mix{s}.mixers.safetensors", s) for s in (1, 2)}
    b = export_executorch(model, tmp_path / "b", mode="swappable", quantize="int8",
                          tasks=[tmp_path / f"{t}.mixers.safetensors" for t in tasks])
    m = b.manifest
    assert m["quantize"]["scheme"] == "int8" and m["tolerance"]["dtype"] == "int8"
    assert m["tolerance"]["reason"] == tolerance_for("executorch", "swappable", "int8").reason
    assert set(m["custom_ops"]) == {"crisp::fold_quant_", "crisp::qlinear.out"}
    assert m["non_delegated_ops"]["set_task"]["crisp.fold_quant_.default"] == 8  # one per group: 4 roles x 2
    assert m["non_delegated_ops"]["forward"]["crisp.qlinear.default"] == 16  # every CRISP linear (4 x 4 blocks)
    report = check_bundle(load_et_bundle(b.path))
    assert report.passed and report.max_abs <= ATOL_INT8
    sess = load_et_bundle(b.path).session(threads=1)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    refs = {t: forward(tasks.get(t, model), {"x": x}).detach().numpy() for t in ("mix1", "mix2", "default")}
    for task in ("mix1", "mix2", "default", "mix1"):
        sess.set_task(task)
        got = sess.run({"x": x.numpy()})["logits"]
        own = np.abs(got - refs[task]).max()
        assert own <= ATOL_INT8 / 5, (task, own)  # well inside the tolerance
        # and far closer to its own task than to the others': the int8 weights were rewritten by set_task (a
        # forward that kept the load-time ones, as XNNPACK's packed linear would, matches "default" throughout)
        for other in set(refs) - {task}:
            assert own < np.abs(got - refs[other]).max() / 4, (task, other)


def _constants(pte: bytes) -> list[tuple[str, int, tuple[int, ...]]]:
    """(method, scalar type, shape) of every constant tensor the program stores."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import Tensor

    program = deserialize_pte_binary(pte).program
    return [(plan.name, int(v.val.scalar_type.value), tuple(v.val.sizes)) for plan in program.execution_plan
            for v in plan.values if isinstance(v.val, Tensor) and v.val.data_buffer_idx > 0
            and v.val.allocation_info is None]


@pytest.mark.slow
def test_int8_swappable_stores_int8_bases(tmp_path):
    """The int8 swappable program stores each group's basis as int8 codes, transposed (r, u), with one float32 scale
    per term, and no float32 basis in either layout; so it is well under the float32 swappable program's bytes
    (whose float32 bases are most of it): three quarters of the bases' float32 bytes are saved."""
    from executorch.exir.scalar_type import ScalarType

    from crisp_edge.export.quantize import SWAPPABLE_INT8_WEIGHTS
    from crisp_edge.method.convert import crisp_bases

    model = crisp_toy()
    q8 = export_executorch(model, tmp_path / "q8", mode="swappable", quantize="int8")
    f32 = export_executorch(model, tmp_path / "f32", mode="swappable", validate=False)
    assert q8.manifest["quantize"]["weights"] == SWAPPABLE_INT8_WEIGHTS  # the record says so, as ONNX Runtime's
    consts = _constants((q8.path / "model.pte").read_bytes())
    char, flt = ScalarType.CHAR.value, ScalarType.FLOAT.value
    for key, b in crisp_bases(model).items():
        u, r = b.weight.shape
        assert ("set_task", char, (r, u)) in consts, key
        assert ("set_task", flt, (r,)) in consts, key
        assert not [c for c in consts if c[1] == flt and c[2] in ((u, r), (r, u))], key  # no float copy left
    first = next(iter(crisp_bases(model).values()))
    assert ("set_task", flt, tuple(first.weight.shape)) in _constants((f32.path / "model.pte").read_bytes())  # seen
    q8_bytes, f32_bytes = q8.manifest["params"]["program_bytes"], f32.manifest["params"]["program_bytes"]
    basis_bytes = 4 * sum(b.weight.numel() for b in crisp_bases(model).values())  # float32 bases: 73% of f32_bytes
    assert f32_bytes - q8_bytes >= 0.7 * basis_bytes, (q8_bytes, f32_bytes, basis_bytes)  # 3/4 of them saved
    assert q8_bytes < 0.5 * f32_bytes  # the toy's patch embedding, norms and head stay float32

def test_int8_swappable_language_model_is_refused(tmp_path):
    from crisp_edge.testing import toy_hf_llama

    model = toy_hf_llama()
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    with pytest.raises(ConfigError, match="XNNPACK packs a quantized linear.s weights once.*activation outliers"):
        export_executorch(model, tmp_path / "b", mode="swappable", quantize="int8")
    assert not (tmp_path / "b").exists()

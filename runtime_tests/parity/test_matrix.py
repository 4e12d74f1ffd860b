"""The parity matrix: architecture x export mode x runtime x task mixer, on toy models built in code.

Every cell retrofits a toy (``crisp_edge.testing.toy_model``), optionally gives it a task (a mixer
file with its own mixers and head: shipped as a task of a swappable bundle, or applied before a
dense / factored export), exports it, and checks the bundle in its runtime against the PyTorch
reference with ``check_bundle``: every output of every stored case of every task.

* architectures: ``timm-vit``, ``hf-vit`` (float images), ``hf-bert`` and ``hf-llama-cls`` (the LLaMA
  text classifier; integer token ids and an attention mask, kept int64 in the graph / program); the
  causal LM ``hf-llama`` is not exported by these paths yet (see ``test_llama_is_refused_with_a_typed_error``).
* runtimes: ``onnxruntime`` (fast, in the default run) and ``executorch`` (XNNPACK recipe; 10-40 s
  per export on 2 cores, so marked ``slow``).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from crisp_edge.errors import ConfigError
from crisp_edge.export.parity.check import check_bundle
from crisp_edge.export.parity.reference import read_reference

import crisp_edge as ce
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.testing import example_inputs, forward, make_task_file, toy_model

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)
CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))
ARCHS = ("timm-vit", "hf-vit", "hf-bert", "hf-llama-cls")
MODES = ("dense", "factored", "swappable")
RUNTIMES = ("onnxruntime", pytest.param("executorch", marks=pytest.mark.slow))
TASKS = ("no-task", "task")

_toys: dict[str, torch.nn.Module] = {}


def crisp_toy(arch: str) -> torch.nn.Module:
    if arch not in _toys:
        m = toy_model(arch, seed=0)
        ce.retrofit_(m, CONFIG, progress=False)
        _toys[arch] = m
    return copy.deepcopy(_toys[arch])




def export(runtime: str, model, out, mode: str, tasks=()):
    if runtime == "onnxruntime":
        from crisp_edge.export.onnx.export import export_onnx

        return export_onnx(model, out, mode=mode, tasks=tasks)
    from crisp_edge.export.executorch.export import export_executorch

    return export_executorch(model, out, mode=mode, recipe="xnnpack", tasks=tasks)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_parity_matrix(runtime, arch, mode, task, tmp_path):
    model = crisp_toy(arch)
    tasks = []
    if task == "task":
        mixer_file = make_task_file(model, tmp_path / "task1.safetensors")
        if mode == "swappable":
            tasks = [mixer_file]  # shipped as a task: one bundle, switched at run time
        else:
            apply_mixers_(model, read_mixers(mixer_file))  # fixed-weight modes export the task's model
    bundle = export(runtime, model, tmp_path / "bundle", mode, tasks)
    report = check_bundle(bundle.path)
    assert report.passed, "\n".join(report.problems())
    want_tasks = ["default", "task1"] if tasks else ["default"]
    assert report.tasks == want_tasks and report.runtime == runtime and report.mode == mode
    ref = read_reference(bundle.path, bundle.manifest["reference"])
    assert len(report.comparisons) == len(want_tasks) * len(ref.inputs) * len(ref.output_names) >= 2
    assert {c.shape[-1] for c in report.comparisons} == {model_classes(model)} | ({3} if tasks else set())
    if tasks:  # the task really changes the outputs: a check that ignored it would fail
        a, b = ref.outputs["default"][0]["logits"], ref.outputs["task1"][0]["logits"]
        assert a.shape != b.shape or np.abs(a - b).max() > 100 * report.atol


def model_classes(model) -> int:
    with torch.no_grad():
        out = forward(model, example_inputs(model))
    return int(out.shape[-1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_llama_exports_as_a_language_model(runtime, mode, tmp_path):
    """hf-llama: the generic trace would fix the batch inside its causal mask, so both runtimes export it as a
    language model instead (dense or swappable, with a key/value cache and generation parity:
    runtime_tests/{onnx,executorch}/test_lm.py); the factored mode is refused with a typed error, nothing written."""
    model = crisp_toy("hf-llama")
    if mode == "factored":
        with pytest.raises(ConfigError, match="'dense' or 'swappable'"):
            export(runtime, model, tmp_path / "bundle", mode)
        assert not (tmp_path / "bundle").exists()
        return
    bundle = export(runtime, model, tmp_path / "bundle", mode)
    assert "lm" in bundle.manifest and check_bundle(bundle.path).passed

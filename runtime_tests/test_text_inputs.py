"""Integer inputs (token ids, attention masks) through both runtimes' sessions, on the BERT toy: they keep
their dtype in the graph / program, float values are refused for them, and a task switch changes the
outputs to the task's PyTorch outputs."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from crisp_edge.export.errors import ExportError

import crisp_edge as ce
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.testing import example_inputs, forward, make_task_file, toy_model

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)


def crisp_bert():
    model = toy_model("hf-bert")
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    return model


def check_session(sess, model, task_file, inputs):
    want = {"default": forward(model, inputs)}
    task_model = copy.deepcopy(model)
    apply_mixers_(task_model, read_mixers(task_file))
    want["task1"] = forward(task_model, inputs)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    for task in ("task1", "default"):
        sess.set_task(task)
        got = sess.run(feeds)["logits"]
        np.testing.assert_allclose(got, want[task].detach().numpy(), atol=1e-3, rtol=1e-3)
    with pytest.raises(ExportError, match="input 'input_ids' takes integers"):
        sess.run({**feeds, "input_ids": feeds["input_ids"].astype(np.float32) + 0.5})


def test_onnx_swappable_bert_takes_int64_token_ids(tmp_path):
    from crisp_edge.export.onnx.export import export_onnx

    model = crisp_bert()
    task = make_task_file(model, tmp_path / "task1.safetensors")
    bundle = export_onnx(model, tmp_path / "b", mode="swappable", tasks=[task])
    assert {i["name"]: i["dtype"] for i in bundle.manifest["inputs"]} == {"input_ids": "int64", "attention_mask": "int64"}
    check_session(bundle.session(threads=1), model, task, example_inputs(model, batch=3, seed=5))


@pytest.mark.slow
def test_executorch_swappable_bert_takes_int64_token_ids(tmp_path):
    from crisp_edge.export.executorch.export import export_executorch
    from crisp_edge.export.executorch.session import EtCrispSession, write_runner_inputs

    model = crisp_bert()
    task = make_task_file(model, tmp_path / "task1.safetensors")
    bundle = export_executorch(model, tmp_path / "b", mode="swappable", recipe="portable", tasks=[task])
    assert {i["name"]: i["dtype"] for i in bundle.manifest["inputs"]} == {"input_ids": "int64", "attention_mask": "int64"}
    check_session(EtCrispSession(bundle.path), model, task, example_inputs(model, batch=2, seed=5))
    n = write_runner_inputs(bundle, tmp_path / "in")
    assert n >= 1 and np.load(tmp_path / "in" / "input.0.input_ids.npy").dtype == np.int64

"""A swappable ExecuTorch bundle run the standard way, with ExecuTorch's own API (not crisp-edge's session).

``Runtime.get().load_program("model.pte", data_path="tasks/x.ptd")`` + ``forward`` never calls
``set_task``: the program's task guard must make that forward fail loudly, never return all-zero
logits; after ``set_task`` (fed the task's tensors) the same program computes the task's reference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from crisp_edge.export.executorch.bundle import DEFAULT_PTD, PROGRAM
from crisp_edge.export.executorch.export import export_executorch
from crisp_edge.export.executorch.tasks import check_task_ptd
from crisp_edge.export.parity.reference import read_reference

from crisp_edge.testing import make_task_file

from .test_export import crisp_toy

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model = crisp_toy()
    d = tmp_path_factory.mktemp("plain")
    task = make_task_file(model, d / "t1.safetensors", "t1", 1, 3)
    return export_executorch(model, d / "swap", mode="swappable", recipe="portable", tasks=[task])


def _program(bundle, ptd: str):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(bundle.path / PROGRAM), data_path=str(bundle.path / ptd))


def _set_task_feeds(bundle, ptd: str) -> list[torch.Tensor]:
    """The set_task inputs from a task .ptd (the exported head and mixers fill what the file lacks)."""
    swap = bundle.manifest["swappable"]  # the app's own reader: the file's tensors, crisp.mixers cut into groups
    tensors = {**check_task_ptd((bundle.path / DEFAULT_PTD).read_bytes(), swap, "default")[0],
               **check_task_ptd((bundle.path / ptd).read_bytes(), swap, ptd)[0]}
    feeds = []
    for item in bundle.manifest["swappable"]["set_task_inputs"]:
        a = tensors[item["name"]]
        pad = item["shape"][0] - a.shape[0]
        if item["name"].startswith("head.") and pad:
            a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), np.float32)])
        feeds.append(torch.from_numpy(np.ascontiguousarray(a)))
    return feeds


@pytest.mark.parametrize("ptd", ["tasks/t1.ptd", DEFAULT_PTD])
def test_plain_load_program_forward_without_set_task_fails_loudly(bundle, ptd):
    ref = read_reference(bundle.path, bundle.manifest["reference"])
    forward = _program(bundle, ptd).load_method("forward")
    with pytest.raises(RuntimeError, match="0x12"):  # InvalidArgument from the guard's index_select
        forward.execute([torch.from_numpy(ref.inputs[0]["x"])])


def test_plain_program_after_set_task_computes_the_task(bundle):
    ref = read_reference(bundle.path, bundle.manifest["reference"])
    program = _program(bundle, "tasks/t1.ptd")
    program.load_method("set_task").execute(_set_task_feeds(bundle, "tasks/t1.ptd"))
    forward = program.load_method("forward")
    for i, case in enumerate(ref.inputs):
        got = forward.execute([torch.from_numpy(case["x"])])[0].numpy()[:, :3]  # the head is padded to capacity
        want = ref.outputs["t1"][i]["logits"]
        assert np.abs(got - want).max() <= 1e-4
        assert np.abs(got - ref.outputs["default"][i]["logits"][:, :3]).max() > 1e-2  # the task really differs


@pytest.mark.slow
def test_xnnpack_program_fails_loudly_too(tmp_path):
    """The guard's index_select stays outside the XNNPACK delegate (a portable, bounds-checked kernel)."""
    from executorch.runtime import Runtime

    b = export_executorch(crisp_toy(), tmp_path / "x", mode="swappable", recipe="xnnpack")
    assert b.manifest["non_delegated_ops"]["forward"].get("aten.index_select.default") == 1
    program = Runtime.get().load_program(str(b.path / PROGRAM), data_path=str(b.path / DEFAULT_PTD))
    with pytest.raises(RuntimeError, match="0x12"):
        program.load_method("forward").execute([torch.zeros(2, 1, 16, 16)])

"""The task ``.ptd`` writer and reader (export/executorch/tasks.py), without exporting a program.

* a task file is within 10% + 1 KB of its mixers' bytes even when it has many small groups (issue 18;
  one FlatTensor entry per group cost ~114 bytes each: SmolLM2's 56 groups made it 12.9% larger);
* ``crisp.mixers`` comes back cut into the groups by name, values and shapes exact, head apart;
* the tag is checked before the cut, and a ``crisp.mixers`` of another length or a group stored twice
  is a typed error; task files written with one tensor per group still load.
"""
from __future__ import annotations

import numpy as np
import pytest
from crisp_edge.export.errors import AdapterError
from crisp_edge.export.executorch.bundle import MIXERS_KEY, TAG_KEY
from crisp_edge.export.executorch.digest import DIGEST_KEY, ptd_digest
from crisp_edge.export.executorch.tasks import check_task_ptd, parse_ptd, ptd_bytes

from crisp_edge.errors import BasisMismatchError

from .test_runner import raw_ptd

pytestmark = pytest.mark.runtime
TAG = 1234567
#: 48 groups of 2 layers x r 4 x s 4 (128 bytes each): names out of order, as a model's roles and groups give them.
GROUPS = {f"mixer.{role}_{2 * g}_{2 * g + 1}": [2, 4, 4] for g in range(8)
          for role in ("v_proj", "q_proj", "o_proj", "k_proj", "up_proj", "down_proj")}


def swap_record(head: bool = False) -> dict:
    """The part of a bundle's ``swappable`` record a task file is checked against."""
    inputs = [{"name": k, "shape": s} for k, s in GROUPS.items()]
    if head:
        inputs += [{"name": "head.weight", "shape": [5, 8]}, {"name": "head.bias", "shape": [5]}]
    return {"set_task_inputs": inputs, "tag": TAG, "head": {"num_classes": 5, "max_classes": 5} if head else None}


def task(seed: int = 0, head: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in GROUPS.items()}
    if head:
        arrays.update({"head.weight": rng.standard_normal((3, 8)).astype(np.float32),
                       "head.bias": rng.standard_normal(3).astype(np.float32)})
    return arrays


def with_digest(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**arrays, DIGEST_KEY: ptd_digest(arrays)}


@pytest.mark.parametrize("head", [False, True])
def test_a_task_file_is_within_10_percent_and_1_kb_of_its_tensors(head):
    arrays = task(head=head)
    tensor_bytes = sum(a.nbytes for a in arrays.values())
    data = ptd_bytes(arrays, TAG)
    assert len(data) <= 1.10 * tensor_bytes + 1024, (len(data), tensor_bytes)
    assert sorted(parse_ptd(data, "t")) == sorted([MIXERS_KEY, TAG_KEY, DIGEST_KEY] + (["head.bias", "head.weight"] if head else []))


@pytest.mark.parametrize("head", [False, True])
def test_crisp_mixers_comes_back_cut_into_its_groups_by_name(head):
    arrays = task(seed=1, head=head)
    got, classes = check_task_ptd(ptd_bytes(arrays, TAG), swap_record(head), "t.ptd")  # as a file given by path
    assert sorted(got) == sorted(arrays) and classes == (3 if head else None)
    for k, a in arrays.items():
        assert got[k].dtype == np.float32 and got[k].shape == a.shape and np.array_equal(got[k], a), k


def test_a_task_file_with_one_tensor_per_group_still_loads():
    arrays = task(seed=2)
    old = raw_ptd(with_digest({**arrays, TAG_KEY: np.array([TAG], np.int64)}))
    got, _ = check_task_ptd(old, swap_record(), "old.ptd")
    assert all(np.array_equal(got[k], a) for k, a in arrays.items()) and sorted(got) == sorted(arrays)


def packed_file(mixers: np.ndarray, tag: int = TAG, **extra: np.ndarray) -> bytes:
    """A task file as crisp-edge writes it (digest valid), holding ``mixers`` as ``crisp.mixers``."""
    return raw_ptd(with_digest({MIXERS_KEY: mixers, TAG_KEY: np.array([tag], np.int64), **extra}))


def test_a_wrong_crisp_mixers_or_a_group_stored_twice_is_refused():
    arrays = task(seed=3)
    flat = np.concatenate([arrays[k].ravel() for k in sorted(arrays)])
    assert check_task_ptd(packed_file(flat), swap_record(), "ok.ptd")[0].keys() == arrays.keys()
    for bad in (flat[:-1], np.concatenate([flat, flat[:1]]), flat.reshape(-1, 4), flat.astype(np.int64)):
        with pytest.raises(AdapterError, match=f"{MIXERS_KEY}.*float32 \\[{flat.size}\\]"):
            check_task_ptd(packed_file(bad), swap_record(), "bad.ptd")
    name = sorted(arrays)[0]
    with pytest.raises(AdapterError, match="both in"):
        check_task_ptd(packed_file(flat, **{name: arrays[name]}), swap_record(), "twice.ptd")
    with pytest.raises(BasisMismatchError, match="other bases"):  # the tag first: a foreign file is never cut
        check_task_ptd(packed_file(flat[:-1], tag=TAG ^ 1), swap_record(), "foreign.ptd")

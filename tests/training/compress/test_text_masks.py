"""Compressing a text model distils on padded token ids with their attention mask: both models see the
mask, the feature loss and the rank allocator's measure leave the padding out, and the pipeline keeps the
masks of the data it distils on."""
from __future__ import annotations

import json

import pytest
import torch

from crisp_edge.data.labeled import LabeledData
from crisp_edge.errors import DataError
from crisp_edge.method.config import CrispConfig, RoleConfig
from crisp_edge.models.sources import create_model
from crisp_edge.testing import toy_hf_bert, toy_text_folder, toy_text_table
from crisp_edge.training.adapt import AdaptConfig
from crisp_edge.training.compress import DistillConfig, allocate_ranks, compress_vit, distill_
from crisp_edge.training.compress.distill import heldout_loss
from crisp_edge.training.loop import TrainConfig
from crisp_edge.training.pipeline import PipelineConfig, _joined, run_pipeline
from crisp_edge.training.retrofit import retrofit_

CONFIG = CrispConfig(default=RoleConfig(s=4, group_size=2))


def _padded(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, the same ids with other tokens in the padded positions, mask): 6 rows of 10, 4 padded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 64, (6, 10), generator=g)
    mask = torch.ones_like(x)
    mask[:, 6:] = 0
    other = x.clone()
    other[:, 6:] = torch.randint(1, 64, (6, 4), generator=g)
    return x, other, mask



@pytest.fixture()
def teacher():
    t = toy_hf_bert(seed=0).eval()
    retrofit_(t, CONFIG, progress=False)
    return t


def test_with_the_mask_what_sits_under_the_padding_does_not_change_the_loss(teacher):
    student, _ = compress_vit(teacher, 0.5, None, method="uniform", distill=False, progress=False)
    x, other, mask = _padded()
    masked = [heldout_loss(student, teacher, t, attention_mask=mask) for t in (x, other)]
    assert masked[0] == pytest.approx(masked[1], rel=1e-5, abs=1e-7)
    unmasked = [heldout_loss(student, teacher, t) for t in (x, other)]
    assert abs(unmasked[0] - unmasked[1]) > 1e-3 * unmasked[0]  # without it the padding's tokens count


def test_with_the_mask_the_rank_allocator_ignores_the_padding(teacher):
    x, other, mask = _padded(1)
    plans = [allocate_ranks(teacher, 0.5, "greedy", calib=t, calib_mask=mask).role_ranks for t in (x, other)]
    assert plans[0] == plans[1]


def test_distillation_feeds_every_batch_its_mask_and_checks_it(teacher, monkeypatch):
    import crisp_edge.training.compress.distill as distill

    seen = []
    real = distill.model_logits
    monkeypatch.setattr(distill, "model_logits", lambda m, x, mask=None: seen.append(mask) or real(m, x, mask))
    student, _ = compress_vit(teacher, 0.5, None, method="uniform", distill=False, progress=False)
    x, _, mask = _padded()
    distill_(student, teacher, x, DistillConfig(epochs=1, batch_size=3), attention_mask=mask, progress=False)
    assert len(seen) == 4 and all(m is not None and m.shape == (3, 10) and not m[:, 6:].any() for m in seen)
    with pytest.raises(DataError, match="attention mask must be an integer tensor of the token ids' shape"):
        distill_(student, teacher, x, attention_mask=mask[:, :5], progress=False)


def test_joined_task_inputs_pad_to_the_widest_and_mask_the_padding():
    a = LabeledData(torch.ones(2, 3, dtype=torch.int64), None, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    b = LabeledData(torch.full((1, 5), 7), None)
    j = _joined([a, b])
    assert j.x.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [7, 7, 7, 7, 7]]
    assert j.attention_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    same = _joined([LabeledData(torch.zeros(2, 4), None), LabeledData(torch.zeros(1, 4), None)])
    assert same.x.shape == (3, 4) and same.attention_mask is None  # images: joined as they are


def test_pipeline_compression_of_a_text_model_distils_with_the_masks(tmp_path, monkeypatch):
    import crisp_edge.training.compress.distill as distill

    seen = []
    real = distill.model_logits
    monkeypatch.setattr(distill, "model_logits", lambda m, x, mask=None: seen.append(mask) or real(m, x, mask))
    model = create_model(str(toy_text_folder(tmp_path / "bert", arch="hf-bert")))
    short = toy_text_table(tmp_path / "short.jsonl", n=20)
    rows = [json.loads(line) for line in short.read_text().splitlines()]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": f"{r['text']} {r['text']}", "label": r["label"]})
                                                 + "\n" for r in rows))
    config = PipelineConfig(crisp=CONFIG, keep_fraction=0.5, tasks=(), distill_fraction=1.0, distill_epochs=1,
                            data=(("short", str(short)), ("long", str(tmp_path / "long.jsonl"))),
                            adapt=AdaptConfig(train=TrainConfig(epochs=1, batch_size=8)))
    run_pipeline(model, tmp_path / "run", config, progress=False, log=lambda _: None)
    assert seen and all(m is not None for m in seen)
    assert any(bool((m == 0).any()) for m in seen)  # the short texts are padded, and the padding is masked

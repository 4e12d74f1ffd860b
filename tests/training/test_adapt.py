"""Adaptation (Alg. 3): exactly the mixers (+ chosen extras) train; bases stay bit-identical."""
from __future__ import annotations

import pytest
import torch

from crisp_edge.errors import ConfigError, DataError
from crisp_edge.files.mixers import apply_mixers_, read_mixers, save_mixers
from crisp_edge.training.adapt import AdaptConfig, adapt_, mark_trainable_
from crisp_edge.training.loop import TrainConfig
from tests.files.test_mixers import crisp_toy


def toy_task(n=128, classes=3, seed=0):
    """A learnable task for the toy model: horizontal stripes, vertical stripes or a checkerboard."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    i = torch.arange(16)
    patterns = torch.stack([
        (i[:, None] // 2 % 2).expand(16, 16), (i[None, :] // 2 % 2).expand(16, 16),
        ((i[:, None] // 2 + i[None, :] // 2) % 2),
    ]).float()
    x = patterns[y][:, None] * 2.0 + 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    return x, y


FAST = AdaptConfig(train=TrainConfig(epochs=3, batch_size=16))


@pytest.mark.parametrize("head, biases", [(True, False), (False, False), (True, True)])
def test_trainable_set_is_exactly_mixers_plus_extras(head, biases):
    model = crisp_toy()
    groups = mark_trainable_(model, head=head, biases=biases)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.endswith(".crisp_mixer")}
    if head:
        expected |= {"head.weight", "head.bias"}
    if biases:
        expected |= {n for n, _ in model.named_parameters() if n.endswith(".bias") and n.rsplit(".", 1)[0]
                     in {m for m, mod in model.named_modules() if type(mod).__name__ == "CrispLinear"}}
    assert trainable == expected
    assert sum(p.numel() for ps in groups.values() for p in ps) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    assert not any(n.startswith("crisp_bases") for n in trainable)


def test_adapt_learns_keeps_bases_and_round_trips(tmp_path):
    model = crisp_toy()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("crisp_mixer")
              and not n.startswith("head.")}
    x, y = toy_task()
    xt, yt = toy_task(seed=1)
    config = AdaptConfig(train=TrainConfig(epochs=4, batch_size=16))
    report = adapt_(model, x, y, num_classes=3, config=config,
                    eval_data=(xt, yt), progress=False)
    assert report.bases_unchanged
    assert report.accuracy >= 0.9, report.history.epochs
    assert report.trainable["mixers"] == sum(p.numel() for n, p in model.named_parameters() if n.endswith("crisp_mixer"))
    assert report.trainable["head"] == 3 * 32 + 3
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed during adaptation"
    path = save_mixers(model, tmp_path / "quad.safetensors", task="quadrants")
    fresh = crisp_toy()
    apply_mixers_(fresh, read_mixers(path))
    assert torch.equal(fresh(xt), model(xt))


def test_mixers_alone_reduce_the_loss():
    model = crisp_toy()  # keep the model's own 4-way head, frozen: only the mixers can move
    x, y = toy_task()
    report = adapt_(model, x, y, config=AdaptConfig(train=TrainConfig(epochs=4, batch_size=16), train_head=False),
                    progress=False)
    assert set(report.trainable) == {"mixers"}
    losses = [e["train_loss"] for e in report.history.epochs]
    assert losses[-1] < 0.85 * losses[0], losses


def test_adapt_refuses_bad_input():
    model = crisp_toy()
    x, y = toy_task()
    with pytest.raises(ConfigError, match="num_classes"):
        adapt_(model, x, y + 4, config=FAST, progress=False)
    with pytest.raises(DataError, match="empty"):
        adapt_(model, x[:0], y[:0], config=FAST, progress=False)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        adapt_(model, bad, y, num_classes=3, config=FAST, progress=False)
    with pytest.raises(ConfigError, match="mixer_lr"):
        AdaptConfig(mixer_lr=0)
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)

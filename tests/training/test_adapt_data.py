"""adapt_ takes data in every form people hold it (tensors, a Dataset, a DataLoader, a LabeledData, a
path) through one conversion point, and works on a Hugging Face ViT (whose output is an object)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from crisp_edge.data.input_spec import input_spec_of
from crisp_edge.data.labeled import LabeledData
from crisp_edge.errors import DataError
from crisp_edge.models.outputs import logits_of
from crisp_edge.testing import toy_model
from crisp_edge.training.adapt import AdaptConfig, adapt_
from crisp_edge.training.loop import TrainConfig
from crisp_edge.training.retrofit import retrofit_
from tests.files.test_mixers import CONFIG, crisp_toy
from tests.training.test_adapt import toy_task

FAST = AdaptConfig(train=TrainConfig(epochs=2, batch_size=16))


def _mixers(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("crisp_mixer")}


@pytest.mark.parametrize("form", ["dataset", "dataloader", "labeled", "pair"])
def test_every_form_trains_exactly_as_tensors(form):
    """The same examples handed over as a Dataset, a DataLoader (unshuffled), a LabeledData or an (x, y)
    pair train the same mixers, bit for bit, as the tensors themselves."""
    x, y = toy_task(64)
    xt, yt = toy_task(32, seed=1)
    ref = crisp_toy()
    ref_report = adapt_(ref, x, y, num_classes=3, config=FAST, eval_data=(xt, yt), progress=False)
    data = {"dataset": TensorDataset(x, y), "dataloader": DataLoader(TensorDataset(x, y), batch_size=10),
            "labeled": LabeledData(x, y, source="mine"), "pair": (x, y)}[form]
    model = crisp_toy()
    report = adapt_(model, data, num_classes=3, config=FAST, eval_data=TensorDataset(xt, yt), progress=False)
    assert [e["eval_accuracy"] for e in report.history.epochs] == [e["eval_accuracy"] for e in ref_report.history.epochs]
    for (n, a), b in zip(_mixers(ref).items(), _mixers(model).values()):
        assert torch.equal(a, b), n


def test_class_names_set_the_head_and_bad_data_is_refused_before_training():
    x, y = toy_task(64)
    model = crisp_toy()
    before = _mixers(model)
    names = ("h", "v", "check", "unused")
    adapt_(model, LabeledData(x, y, class_names=names, source="mine"), config=FAST, progress=False)
    assert model.head.out_features == 4  # from the data's class names, no num_classes needed
    model = crisp_toy()
    with pytest.raises(DataError, match="needs labels"):
        adapt_(model, TensorDataset(x), config=FAST, progress=False)
    with pytest.raises(DataError, match="inputs must be a torch.Tensor, got TensorDataset"):
        adapt_(model, TensorDataset(x, y), y, config=FAST, progress=False)
    with pytest.raises(DataError, match="same class"):
        adapt_(model, TensorDataset(x, torch.zeros_like(y)), config=FAST, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), _mixers(model).values()))


def test_adapt_a_hugging_face_vit_from_a_dataloader():
    """HF models return an ImageClassifierOutput: training, evaluation and the head swap all read its
    logits through models.outputs.logits_of."""
    model = toy_model("hf-vit")
    retrofit_(model, CONFIG, progress=False)
    assert input_spec_of(model).shape == (1, 16, 16)
    x, y = toy_task(96)
    xt, yt = toy_task(48, seed=1)
    report = adapt_(model, DataLoader(TensorDataset(x, y), batch_size=32), num_classes=3,
                    config=AdaptConfig(train=TrainConfig(epochs=4, batch_size=16)), eval_data=(xt, yt), progress=False)
    assert report.bases_unchanged and report.accuracy is not None
    assert report.accuracy > 0.5, report.history.epochs  # 3 balanced classes: chance is 1/3
    assert logits_of(model(xt[:2])).shape == (2, 3)


def test_logits_of_every_output_kind():
    from transformers.modeling_outputs import CausalLMOutput, ImageClassifierOutput, SequenceClassifierOutput

    t = torch.randn(2, 3)
    for out in (t, ImageClassifierOutput(logits=t), SequenceClassifierOutput(logits=t), CausalLMOutput(logits=t),
                {"logits": t}, (t, None)):
        assert logits_of(out) is t
    from crisp_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot find logits"):
        logits_of({"hidden": t})

"""The pipeline on models that do not take 28x28 grey images, fed with data written to disk: a timm
DeiT-Tiny-shaped toy at 224x224 RGB (ImageNet mean/std, resize + centre crop) and a Hugging Face ViT
read from a save_pretrained folder. Bad data is refused before the run folder exists."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crisp_edge.cli.main import main
from crisp_edge.files.checkpoint import load_checkpoint
from crisp_edge.files.mixers import apply_mixers_, read_mixers
from crisp_edge.models.outputs import logits_of
from crisp_edge.testing import toy_model

DEIT_ARGS = ["--model-arg=depth=2", "--model-arg=embed_dim=32", "--model-arg=num_heads=2", "--model-arg=num_classes=3"]
FAST = ["--keep", "0.5", "--distill-epochs", "1", "--adapt-epochs", "1", "--no-progress"]


def write_image_folder(root, classes=3, per_class=6, size=(48, 40), mode="RGB", seed=0):
    """Class folders of PNGs: a colour / brightness pattern per class, so the task is learnable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((size[1], size[0], 3), dtype=np.float64)
            base[..., c % 3] = 180.0
            img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).convert(mode).save(root / f"class{c}" / f"{i}.png")
    return root


def test_pipeline_on_a_deit_tiny_shaped_model_at_224(tmp_path, capsys):
    data = write_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    rc = main(["pipeline", "timm:deit_tiny_patch16_224", "--random-init", *DEIT_ARGS, "--data", f"shapes={data}",
               "--val-fraction", "0.2", "--out", str(out), *FAST])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    state = json.loads((out / "pipeline.json").read_text())
    assert state["config"]["data"] == [["shapes", str(data)]] and state["config"]["tasks"] == []
    assert state["stages"]["compress"]["distill_images"] == 14  # all of the 80% training split (18 * 0.8)
    mf = read_mixers(out / "tasks" / "shapes.mixers.safetensors")
    assert mf.labels == ["class0", "class1", "class2"]
    student = load_checkpoint(out / "compressed")
    apply_mixers_(student, mf)
    assert student(torch.zeros(1, 3, 224, 224)).shape == (1, 3)


def test_pipeline_on_a_hugging_face_vit_folder(tmp_path, capsys):
    hf = toy_model("hf-vit", seed=2)  # 16x16 grey, 3 labels
    hf.save_pretrained(tmp_path / "hf-vit")
    x = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 3
    x[:, 0, :8] += y[:, None, None].float()  # learnable
    np.savez(tmp_path / "mine.npz", x=x.numpy(), y=y.numpy(), class_names=np.array(["a", "b", "c"]))
    out = tmp_path / "run"
    rc = main(["pipeline", str(tmp_path / "hf-vit"), "--data", str(tmp_path / "mine.npz"), "--out", str(out), *FAST])
    assert rc == 0, capsys.readouterr().err
    mf = read_mixers(out / "tasks" / "mine.mixers.safetensors")
    model = load_checkpoint(out / "compressed")
    apply_mixers_(model, mf)
    assert mf.labels == ["a", "b", "c"] and logits_of(model(x[:2])).shape == (2, 3)


@pytest.mark.parametrize("case, message", [
    ("one-class", "same class"),
    ("grey-task", "built-in task 'digits' has 28x28 grey images but the model takes RGB images 224x224"),
    ("unreadable", "0.png: cannot identify image file"),
])
def test_bad_data_is_refused_before_the_run_folder_exists(tmp_path, capsys, case, message):
    data = write_image_folder(tmp_path / "d", classes=1 if case == "one-class" else 2, per_class=3)
    args = ["--data", str(data)]
    if case == "grey-task":
        args = ["--task", "digits"]
    if case == "unreadable":
        (data / "class0" / "0.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    rc = main(["pipeline", "timm:deit_tiny_patch16_224", "--random-init", *DEIT_ARGS, *args, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and not out.exists(), err

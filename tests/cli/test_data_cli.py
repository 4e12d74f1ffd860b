"""`adapt --data`, `compress --data` / `--no-distill` on a model that does not take Fashion-MNIST: data
read with the model's own input spec, class names kept in the mixer file, bad data and unwritable
outputs refused before any training and before any file is written."""
from __future__ import annotations

import numpy as np
import pytest

from crisp_edge.cli.main import main
from crisp_edge.files.checkpoint import load_checkpoint, save_checkpoint
from crisp_edge.files.mixers import read_mixers
from tests.files.test_mixers import crisp_toy
from tests.training.test_pipeline_own import write_image_folder


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(crisp_toy(), tmp_path / "ckpt")  # timm toy: 16x16 grey, 4 classes


def test_adapt_on_an_image_folder_keeps_its_class_names(tmp_path, ckpt, capsys):
    data = write_image_folder(tmp_path / "imgs", classes=3, per_class=8, mode="L")
    out = tmp_path / "mine.mixers.safetensors"
    assert main(["adapt", str(ckpt), "--data", str(data), "--val-fraction", "0.25", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "18 images, 3 classes" in printed and "validation accuracy" in printed and "grey images 16x16" in printed
    mf = read_mixers(out)
    assert mf.labels == ["class0", "class1", "class2"] and mf.task == "imgs"


@pytest.mark.parametrize("case, message", [
    ("empty", "is empty"),
    ("one-class", "same class"),
    ("out-of-range", "out of range for 3 classes"),
    ("rgb-npz", "takes 1-channel images"),
    ("unwritable", "is a folder; give a file path"),
    ("both", "pass --data PATH (your data) or --task NAME"),
])
def test_bad_data_is_refused_before_training_and_writing(tmp_path, ckpt, capsys, case, message):
    out = tmp_path / "out.mixers.safetensors"
    data = tmp_path / "d"
    extra = []
    if case == "empty":
        data.mkdir()
    elif case == "one-class":
        write_image_folder(data, classes=1, per_class=4, mode="L")
    elif case in ("out-of-range", "rgb-npz"):
        data = tmp_path / "d.npz"
        x = np.zeros((8, 3, 16, 16) if case == "rgb-npz" else (8, 1, 16, 16), np.float32)
        np.savez(data, x=x, y=np.array([0, 1, 2, 3, 0, 1, 2, 0]), class_names=np.array(["a", "b", "c"]))
    else:
        write_image_folder(data, classes=2, per_class=4, mode="L")
        if case == "unwritable":
            out.mkdir()
        else:
            extra = ["--task", "digits"]
    rc = main(["adapt", str(ckpt), "--data", str(data), *extra, "--epochs", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert case == "unwritable" or not out.exists()


def test_compress_with_data_and_without(tmp_path, ckpt, capsys):
    # no --data, a model that does not take Fashion-MNIST: a clear error, nothing written
    assert main(["compress", str(ckpt), "--keep", "0.5", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "pass --data PATH" in capsys.readouterr().err and not (tmp_path / "a").exists()
    # --no-distill needs no data at all
    assert main(["compress", str(ckpt), "--keep", "0.5", "--no-distill", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "b") is not None
    # distillation on a flat folder of the user's images (no labels), accuracy on a labelled one
    flat = tmp_path / "flat"
    write_image_folder(tmp_path / "lab", classes=2, per_class=8, mode="L")
    flat.mkdir()
    for i, p in enumerate(sorted((tmp_path / "lab").rglob("*.png"))):
        p.rename(flat / f"{i}.png")
    write_image_folder(tmp_path / "val", classes=2, per_class=4, mode="L")
    capsys.readouterr()
    assert main(["compress", str(ckpt), "--keep", "0.5", "--data", str(flat), "--val", str(tmp_path / "val"),
                 "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "distillation steps on 16 inputs" in printed and "(8 examples): teacher" in printed

"""User data in every supported form -> exact model-ready tensors, and every kind of bad data -> a DataError
that names the problem, raised before any training."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from crisp_edge.data import images as images_mod
from crisp_edge.data.fashion_mnist import normalize_images
from crisp_edge.data.formats import (
    LabeledData,
    as_tensors,
    load_dataset,
    split_validation,
)
from crisp_edge.data.input_spec import KNOWN_SPECS, InputSpec
from crisp_edge.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
FMNIST = KNOWN_SPECS["fmnist-vit"][1]  # 28x28 grey, Fashion-MNIST mean/std
#: 2x2 RGB, no resize: pixel p in channel c -> (p / 255 - mean[c]) / std[c], easy to check by hand
RGB2 = InputSpec("image", channels=3, height=2, width=2, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
GREY2 = InputSpec("image", channels=1, height=2, width=2, mean=(0.0,), std=(1.0,))
TOKENS = InputSpec("tokens", max_length=4, vocab_size=5)


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _fmnist_folder(root: Path, n_per_class: int = 3, classes=("bag", "coat"), seed: int = 0) -> dict[str, list]:
    """Random 28x28 grey PNGs in class folders; returns class -> the pixel arrays in file-name order."""
    rng = np.random.default_rng(seed)
    written = {}
    for c in classes:
        written[c] = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n_per_class)]
        for i, px in enumerate(written[c]):
            _png(root / c / f"{i}.png", px)
    return written


def _tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "good": 2, "bad": 3, "movie": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


# ---------------------------------------------------------------------------------------------- images

def test_image_folder_is_exactly_fashion_mnist_normalisation(tmp_path):
    written = _fmnist_folder(tmp_path)
    data = load_dataset(tmp_path, FMNIST)
    assert data.class_names == ("bag", "coat") and data.num_classes == 2
    assert data.y.tolist() == [0, 1, 0, 1, 0, 1]  # classes in turn
    raw = np.stack([written[c][i] for i in range(3) for c in ("bag", "coat")])
    assert data.x.dtype == torch.float32 and torch.equal(data.x, normalize_images(raw))


def test_png_of_known_pixels_gives_hand_computed_tensor(tmp_path):
    px = np.array([[[255, 0, 64], [0, 255, 128]], [[51, 102, 0], [255, 255, 255]]], dtype=np.uint8)  # (2, 2, 3)
    _png(tmp_path / "a" / "x.png", px)
    _png(tmp_path / "b" / "x.png", px[::-1].copy())
    x = load_dataset(tmp_path, RGB2).x[0]
    expected = torch.tensor([
        [[1.0, -1.0], [-0.6, 1.0]],                           # red: (p/255 - 0.5) / 0.5
        [[-1.0, 3.0], [0.6, 3.0]],                            # green: (p/255 - 0.25) / 0.25
        [[64 / 255, 128 / 255], [0.0, 1.0]],                  # blue: p/255
    ])
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_rgb_png_is_converted_to_grey_with_the_luma_formula(tmp_path):
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    _png(tmp_path / "r.png", red)
    data = load_dataset(tmp_path, GREY2, labels="optional")
    assert data.y is None and data.x.shape == (1, 1, 2, 2)
    assert torch.equal(data.x, torch.full((1, 1, 2, 2), 76 / 255))  # ITU-R 601-2: 255 * 299 / 1000 -> 76


def test_wide_image_is_centre_cropped(tmp_path):
    px = np.array([[10, 20, 30, 40], [50, 60, 70, 80]], dtype=np.uint8)  # 2 high, 4 wide: keeps columns 1..2
    _png(tmp_path / "w.png", px)
    x = load_dataset(tmp_path, GREY2, labels="optional").x[0, 0]
    assert torch.equal(x, torch.tensor([[20.0, 30.0], [60.0, 70.0]]) / 255)


def test_large_image_is_resized_to_the_spec(tmp_path):
    _png(tmp_path / "big.png", np.full((90, 60), 200, dtype=np.uint8))
    x = load_dataset(tmp_path, FMNIST, labels="optional").x
    assert x.shape == (1, 1, 28, 28)
    assert torch.equal(x, normalize_images(np.full((1, 28, 28), 200, dtype=np.uint8)))  # a flat image stays flat


def test_validation_folder_uses_the_training_class_indices(tmp_path):
    _fmnist_folder(tmp_path / "train", classes=("bag", "coat", "shirt"))
    _fmnist_folder(tmp_path / "val", n_per_class=1, classes=("coat", "shirt"))
    train = load_dataset(tmp_path / "train", FMNIST)
    val = load_dataset(tmp_path / "val", FMNIST, class_names=train.class_names)
    assert val.class_names == ("bag", "coat", "shirt") and val.y.tolist() == [1, 2]
    _fmnist_folder(tmp_path / "bad", n_per_class=1, classes=("coat", "sock"))
    with pytest.raises(DataError, match=r"\['sock'\] are not among the training classes"):
        load_dataset(tmp_path / "bad", FMNIST, class_names=train.class_names)


def test_max_items_takes_a_class_balanced_prefix(tmp_path):
    _fmnist_folder(tmp_path, n_per_class=4, classes=("a", "b", "c"))
    data = load_dataset(tmp_path, FMNIST, max_items=5)
    assert data.y.tolist() == [0, 1, 2, 0, 1]


def test_progress_bar_shows_and_can_be_turned_off(tmp_path, monkeypatch, capsys):
    _fmnist_folder(tmp_path)
    monkeypatch.setattr(images_mod, "PROGRESS_MIN_ITEMS", 1)
    load_dataset(tmp_path, FMNIST, progress=False)
    assert "img" not in capsys.readouterr().err
    load_dataset(tmp_path, FMNIST, progress=True)
    assert "img" in capsys.readouterr().err


def test_flat_folder_is_unlabelled(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"frame{i}.jpeg", np.full((28, 28), 40 * i))
    (flat / "notes.txt").write_text("not an image: skipped")
    data = load_dataset(flat, FMNIST, labels="optional")
    assert len(data) == 3 and data.y is None and data.class_names is None
    with pytest.raises(DataError, match="classification needs labels"):
        load_dataset(flat, FMNIST)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("one_class", "same class"),
    ("empty_class", "holds no images"),
    ("corrupt", r"cannot read image .*b[/\\]bad\.png"),
    ("truncated", r"cannot read image .*b[/\\]cut\.png"),
    ("mixed", "both class folders .* and loose images"),
    ("fifo_image", r"b[/\\]pipe\.png is a FIFO"),
])
def test_bad_image_folders(tmp_path, case, match):
    root = tmp_path / "d"
    if case != "missing":
        root.mkdir()
    if case in ("one_class", "empty_class", "corrupt", "truncated", "mixed", "fifo_image"):
        _fmnist_folder(root, n_per_class=2, classes=("a",) if case == "one_class" else ("a", "b"))
    if case == "empty_class":
        (root / "c").mkdir()
    if case == "corrupt":
        (root / "b" / "bad.png").write_bytes(b"this is not a png")
    if case == "truncated":
        data = (root / "a" / "0.png").read_bytes()
        (root / "b" / "cut.png").write_bytes(data[: len(data) // 2])
    if case == "mixed":
        _png(root / "loose.png", np.zeros((28, 28)))
    if case == "fifo_image":
        os.mkfifo(root / "b" / "pipe.png")
    with pytest.raises(DataError, match=match):
        load_dataset(root, FMNIST)


def test_single_class_folder_is_fine_for_distillation(tmp_path):
    _fmnist_folder(tmp_path, classes=("a",))
    assert load_dataset(tmp_path, FMNIST, labels="optional").y.tolist() == [0, 0, 0]


def test_oversized_image_and_decoded_total_are_refused(tmp_path, monkeypatch):
    _fmnist_folder(tmp_path)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(DataError, match="over the 10-byte limit"):
        load_dataset(tmp_path, FMNIST)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_BYTES", 1 << 20)
    monkeypatch.setattr(images_mod, "MAX_DECODED_BYTES", 28 * 28 * 4 * 5)
    with pytest.raises(DataError, match=r"pass max_items \(at most 5\)"):
        load_dataset(tmp_path, FMNIST)
    assert len(load_dataset(tmp_path, FMNIST, max_items=5)) == 5


# ---------------------------------------------------------------------------------------------- tensors

@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_tensor_files_round_trip(tmp_path, suffix):
    x = torch.randn(6, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    path = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(path, x=x.numpy(), y=y.numpy(), class_names=np.array(["a", "b", "c"]))
    else:
        save_file({"x": x, "y": y}, path, metadata={"class_names": json.dumps(["a", "b", "c"])})
    data = load_dataset(path, FMNIST)
    assert torch.equal(data.x, x) and torch.equal(data.y, y) and data.class_names == ("a", "b", "c")
    part = load_dataset(path, FMNIST, max_items=4)
    assert torch.equal(part.x, x[:4]) and part.y.tolist() == [0, 1, 2, 0]
    short = tmp_path / f"short{suffix}"
    if suffix == ".npz":
        np.savez(short, x=x.numpy(), y=y[:5].numpy())
    else:
        save_file({"x": x, "y": y[:5]}, short)
    with pytest.raises(DataError, match="6 inputs .* but 5 labels"):  # checked on the whole file, not the prefix
        load_dataset(short, FMNIST, max_items=2)


def test_uint8_pixels_are_normalised_with_the_spec(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=raw, y=np.array([0, 1, 0, 1]))
    assert torch.equal(load_dataset(tmp_path / "d.npz", FMNIST).x, normalize_images(raw))


def test_token_tensors(tmp_path):
    ids = torch.tensor([[2, 4, 0, 0], [3, 0, 0, 0]])
    save_file({"x": ids, "y": torch.tensor([0, 1]), "attention_mask": (ids > 0).long()}, tmp_path / "t.safetensors")
    data = load_dataset(tmp_path / "t.safetensors", TOKENS)
    assert torch.equal(data.x, ids) and data.attention_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    save_file({"x": ids + 3}, tmp_path / "big.safetensors")
    with pytest.raises(DataError, match=r"token ids must lie in \[0, 5\)"):
        load_dataset(tmp_path / "big.safetensors", TOKENS, labels="optional")


def _bad_tensors(case: str) -> dict[str, np.ndarray]:
    x = np.zeros((4, 1, 28, 28), np.float32)
    y = np.array([0, 1, 0, 1])
    return {
        "channels": {"x": np.zeros((4, 3, 28, 28), np.float32), "y": y},
        "size": {"x": np.zeros((4, 1, 32, 32), np.float32), "y": y},
        "dtype": {"x": x.astype(np.int32), "y": y},
        "nan": {"x": np.where(np.arange(4)[:, None, None, None] == 2, np.nan, x).astype(np.float32), "y": y},
        "inf": {"x": np.where(np.arange(4)[:, None, None, None] == 3, np.inf, x).astype(np.float32), "y": y},
        "length": {"x": x, "y": y[:3]},
        "negative": {"x": x, "y": np.array([0, 1, -1, 1])},
        "fraction": {"x": x, "y": np.array([0, 1, 0.5, 1])},
        "range": {"x": x, "y": np.array([0, 1, 0, 3]), "class_names": np.array(["a", "b"])},
        "no_x": {"inputs": x, "y": y},
        "empty": {"x": x[:0], "y": y[:0]},
    }[case]


@pytest.mark.parametrize("case, match", [
    ("channels", "takes 1-channel images .* got 3 channels"),
    ("size", "takes 28x28 images .* got 32x32"),
    ("dtype", "float .* or uint8 .* got torch.int32"),
    ("nan", "example 2 contains NaN or Inf"),
    ("inf", "example 3 contains NaN or Inf"),
    ("length", "4 inputs .* but 3 labels"),
    ("negative", "label 2 is -1"),
    ("fraction", "label 2 is 0.5"),
    ("range", r"label 3 is 3, out of range for 2 classes"),
    ("no_x", "no tensor named 'x'"),
    ("empty", "holds no examples"),
])
def test_bad_tensor_files(tmp_path, case, match):
    np.savez(tmp_path / "d.npz", **_bad_tensors(case))
    with pytest.raises(DataError, match=match):
        load_dataset(tmp_path / "d.npz", FMNIST)


def test_labels_checked_against_the_callers_class_count(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 1, 28, 28), np.float32), y=np.array([0, 1, 2]))
    assert load_dataset(tmp_path / "d.npz", FMNIST, num_classes=3).num_classes == 3
    with pytest.raises(DataError, match="out of range for 2 classes"):
        load_dataset(tmp_path / "d.npz", FMNIST, num_classes=2)


def test_pickled_npz_is_refused_not_loaded(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([object(), 1], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(tmp_path / "d.npz", FMNIST)


def test_corrupt_tensor_files(tmp_path):
    for name in ("d.npz", "d.safetensors"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(DataError, match="not a readable"):
            load_dataset(tmp_path / name, FMNIST)


# ---------------------------------------------------------------------------------------------- files

@pytest.mark.timeout(30)
def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.npz")
    with pytest.raises(DataError, match="is a FIFO"):  # opening it would block forever: it is only stat'ed
        load_dataset(tmp_path / "pipe.npz", FMNIST)
    os.symlink("/dev/zero", tmp_path / "zero.txt")
    with pytest.raises(DataError, match="is a character device"):
        load_dataset(tmp_path / "zero.txt", TOKENS, labels="optional")


def test_oversized_and_unknown_files(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 28, 28), np.float32))
    with pytest.raises(DataError, match="over the 100-byte limit"):
        load_dataset(tmp_path / "d.npz", FMNIST, labels="optional", max_bytes=100)
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_dataset(tmp_path / "d.parquet", FMNIST)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope.parquet", FMNIST)


# ---------------------------------------------------------------------------------------------- text

def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_jsonl_with_class_names_and_a_tokenizer(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "good movie", "label": "pos"}, {"text": "bad", "label": "neg"},
                                         {"text": "good good good good good", "label": "pos"}])
    data = load_dataset(path, TOKENS, tokenizer=_tokenizer())
    assert data.class_names == ("neg", "pos") and data.y.tolist() == [1, 0, 1]
    assert data.x.tolist() == [[2, 4, 0, 0], [3, 0, 0, 0], [2, 2, 2, 2]]  # padded / truncated to max_length 4
    assert data.attention_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    raw = load_dataset(path, TOKENS)
    assert raw.x is None and raw.texts == ("good movie", "bad", "good good good good good")


def test_csv_with_integer_labels_and_quoted_commas(tmp_path):
    path = _csv(tmp_path / "d.csv", ["id", "text", "label"], [[1, "good, really", 1], [2, "bad", 0], [3, "meh", 2]])
    data = load_dataset(path, TOKENS)
    assert data.texts == ("good, really", "bad", "meh") and data.y.tolist() == [1, 0, 2] and data.class_names is None
    unlabelled = _csv(tmp_path / "u.csv", ["text"], [["a"], ["b"]])
    assert load_dataset(unlabelled, TOKENS, labels="optional").y is None


def test_plain_text_for_calibration(tmp_path):
    (tmp_path / "c.txt").write_text("\ufeffIn the beginning\nwas the word\n", encoding="utf-8")
    data = load_dataset(tmp_path / "c.txt", TOKENS, labels="optional")
    assert data.texts == ("In the beginning\nwas the word\n",) and data.x is None and data.y is None
    with pytest.raises(DataError, match="plain text, which has no labels"):
        load_dataset(tmp_path / "c.txt", TOKENS)


@pytest.mark.parametrize("case, match", [
    ("no_label_column", "has no 'label' column"),
    ("no_label_field", "has no 'label' field"),
    ("no_text", "line 2 has no 'text' field"),
    ("empty_text", "line 2: the 'text' is empty"),
    ("blank_only", "holds no text"),
    ("header_only", "holds no examples"),
    ("mixed_labels", "labels mix"),
    ("float_label", "label 1.5 is not an integer"),
    ("negative_label", "label 1 is -1"),
    ("bad_json", "line 2 is not JSON"),
    ("latin1", r"not UTF-8: byte 14 \(line 2\) is b.\\xe9"),
    ("some_unlabelled", "some lines have a 'label' field and some do not"),
    ("one_class", "same class"),
    ("image_model", "is text but the model takes grey images"),
])
def test_bad_text(tmp_path, case, match):
    j = tmp_path / "d.jsonl"
    spec = FMNIST if case == "image_model" else TOKENS
    path = {
        "no_label_column": lambda: _csv(tmp_path / "d.csv", ["text"], [["a"], ["b"]]),
        "no_label_field": lambda: _jsonl(j, [{"text": "a"}, {"text": "b"}]),
        "no_text": lambda: _jsonl(j, [{"text": "a", "label": 0}, {"body": "b", "label": 1}]),
        "empty_text": lambda: _jsonl(j, [{"text": "a", "label": 0}, {"text": "  ", "label": 1}]),
        "blank_only": lambda: (j.write_text("\n \n\n"), j)[1],
        "header_only": lambda: _csv(tmp_path / "d.csv", ["text", "label"], []),
        "mixed_labels": lambda: _jsonl(j, [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}]),
        "float_label": lambda: _jsonl(j, [{"text": "a", "label": 0}, {"text": "b", "label": 1.5}]),
        "negative_label": lambda: _jsonl(j, [{"text": "a", "label": 0}, {"text": "b", "label": -1}]),
        "bad_json": lambda: (j.write_text('{"text": "a", "label": 0}\n{"text": \n'), j)[1],
        "latin1": lambda: (j.write_bytes('{"a": 1}\n{"caf\u00e9"'.encode("latin-1")), j)[1],
        "some_unlabelled": lambda: _jsonl(j, [{"text": "a", "label": 0}, {"text": "b"}]),
        "one_class": lambda: _jsonl(j, [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]),
        "image_model": lambda: _jsonl(j, [{"text": "a", "label": 0}, {"text": "b", "label": 1}]),
    }[case]()
    with pytest.raises(DataError, match=match):
        load_dataset(path, spec)


def test_text_labels_checked_against_training_classes(tmp_path):
    path = _jsonl(tmp_path / "v.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(DataError, match="class 'meh' is not among the training classes"):
        load_dataset(path, TOKENS, class_names=("neg", "pos"))
    ints = _jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(DataError, match="out of range for 2 classes"):
        load_dataset(ints, TOKENS, class_names=("neg", "pos"))


def test_tokenizer_without_padding_token_is_refused(tmp_path):
    tok = _tokenizer()
    tok.pad_token = None
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": 0}, {"text": "bad", "label": 1}])
    with pytest.raises(DataError, match="no padding token"):
        load_dataset(path, TOKENS, tokenizer=tok)


# ---------------------------------------------------------------------------------------------- torch objects

def test_as_tensors_from_dataset_dataloader_and_pil_items():
    x = torch.randn(5, 1, 28, 28)
    y = torch.tensor([0, 1, 0, 1, 1])
    ds = torch.utils.data.TensorDataset(x, y)
    for obj in (ds, torch.utils.data.DataLoader(ds, batch_size=2)):
        data = as_tensors(obj, FMNIST)
        assert torch.equal(data.x, x) and torch.equal(data.y, y)
    assert len(as_tensors(ds, FMNIST, max_items=3)) == 3
    px = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    pil_items = [(Image.fromarray(px[0]), 0), (Image.fromarray(px[1]), 1)]  # torchvision ImageFolder without transform
    assert torch.equal(as_tensors(pil_items, FMNIST).x, normalize_images(px))
    dicts = [{"pixel_values": x[i], "labels": int(y[i])} for i in range(5)]
    assert torch.equal(as_tensors(dicts, FMNIST).y, y)


@pytest.mark.parametrize("items, match", [
    ([("a string", 0), ("b", 1)], "cannot use an input of type str"),
    ([(torch.zeros(1, 28, 28), "cat"), (torch.zeros(1, 28, 28), "dog")], "labels must be integers"),
    ([(torch.zeros(1, 28, 28), 0), (torch.zeros(1, 28, 28),)], "some items have labels and some do not"),
    ([(torch.zeros(3, 28, 28), 0), (torch.zeros(3, 28, 28), 1)], "got 3 channels"),
    ([], "is empty"),
])
def test_as_tensors_errors(items, match):
    with pytest.raises(DataError, match=match):
        as_tensors(items, FMNIST)
    with pytest.raises(DataError, match="Dataset or DataLoader"):
        as_tensors(iter(items), FMNIST)


# ---------------------------------------------------------------------------------------------- splits

def test_split_is_deterministic_and_stratified():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    data = LabeledData(torch.arange(100, dtype=torch.float32)[:, None], y, class_names=("a", "b", "c"), source="t")
    train, val = split_validation(data, 0.2, seed=3)
    again_train, again_val = split_validation(data, 0.2, seed=3)
    assert torch.equal(val.x, again_val.x) and torch.equal(train.x, again_train.x)
    assert torch.bincount(val.y).tolist() == [10, 6, 4] and len(train) == 80
    assert set(train.x[:, 0].tolist()).isdisjoint(val.x[:, 0].tolist())
    assert val.class_names == ("a", "b", "c")
    assert not torch.equal(split_validation(data, 0.2, seed=4)[1].x, val.x)


def test_text_split_never_separates_duplicates():
    texts = tuple(f"text {i % 37}" for i in range(200))  # each text about 5 times
    data = LabeledData(None, torch.tensor([i % 2 for i in range(200)]), source="t", texts=texts)
    train, val = split_validation(data, 0.25, seed=0)
    assert set(train.texts).isdisjoint(val.texts)
    assert len(train) + len(val) == 200 and 45 <= len(val) <= 56
    assert split_validation(data, 0.25, seed=0)[1].texts == val.texts


def test_split_errors():
    data = LabeledData(torch.zeros(3, 1), torch.tensor([0, 1, 0]), source="tiny")
    with pytest.raises(DataError, match="leave no validation example"):
        split_validation(data, 0.1)
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        split_validation(data, 1.0)
    with pytest.raises(DataError, match="no split keeps duplicates apart"):
        split_validation(LabeledData(None, None, source="same", texts=("a",) * 4), 0.5)


# ---------------------------------------------------------------------------------------------- example

def test_example_writer_round_trips_through_load_dataset(tmp_path):
    spec = importlib.util.spec_from_file_location("write_user_data", ROOT / "examples" / "data" / "write_user_data.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from crisp_edge.data.fashion_mnist import (
        FASHION_MNIST_CLASSES,
        load_fashion_mnist_raw,
    )

    images, labels = load_fashion_mnist_raw("test")
    keep = example.balanced_subset(labels, 2)
    example.write_image_folder(images[keep], labels[keep], FASHION_MNIST_CLASSES, tmp_path / "imgs")
    data = load_dataset(tmp_path / "imgs", FMNIST)
    assert data.class_names[0] == "0_T-shirt_top" and len(data.class_names) == 10
    order = np.argsort(labels[keep], kind="stable")  # file order per class, classes in turn
    by_class = [keep[order][labels[keep][order] == c] for c in range(10)]
    expected = [by_class[c][i] for i in range(2) for c in range(10)]
    assert torch.equal(data.x, normalize_images(images[expected]))
    assert data.y.tolist() == labels[expected].tolist()  # folder index == Fashion-MNIST label

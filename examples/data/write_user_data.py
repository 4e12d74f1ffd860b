"""Write data the way users hold it, for the "bring your own data" quickstart.

    .venv/bin/python examples/data/write_user_data.py [--out user-data] [--per-class 100] [--val-per-class 20]

writes

    user-data/fmnist-images/train/<k>_<class>/<n>.png   Fashion-MNIST train images as an ImageFolder of PNGs
    user-data/fmnist-images/val/<k>_<class>/<n>.png     Fashion-MNIST test images, for --val
    user-data/digits-train.npz, digits-test.npz         the built-in digits task: x float32 (N, 1, 28, 28)
                                                        model-ready, y int64, class_names
    user-data/wordnet-verbs/{train,val,test}.jsonl      with --text-per-class K: WordNet verb glosses, one
                                                        {"text": ..., "label": "verb.motion"} per line

Class folders are named ``<label>_<name>`` so that their sorted order (the class index an image folder
gets) is Fashion-MNIST's label order, the order of the embedded ViT's head. Then, for example:

    from crisp_edge.data.formats import load_dataset
    from crisp_edge.data.input_spec import input_spec_of
    spec = input_spec_of(model)                       # the embedded ViT: 28x28 grey, Fashion-MNIST mean/std
    train = load_dataset("user-data/fmnist-images/train", spec)
    val = load_dataset("user-data/fmnist-images/val", spec, class_names=train.class_names)
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from crisp_edge.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist_raw
from crisp_edge.data.tasks import load_task


def folder_names(class_names: tuple[str, ...]) -> list[str]:
    """``<index>_<name>`` with characters unsafe in a folder name replaced (``T-shirt/top`` -> ``0_T-shirt_top``)."""
    width = len(str(len(class_names) - 1))
    return [f"{i:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', n)}" for i, n in enumerate(class_names)]


def balanced_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first ``per_class`` indices of every class, in file order."""
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def write_image_folder(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], root: Path) -> list[Path]:
    """uint8 (N, H, W) grey images as ``root/<k>_<class>/<n>.png``; returns the paths in input order."""
    from PIL import Image

    names = folder_names(class_names)
    paths = []
    for n, (img, label) in enumerate(zip(images, labels, strict=True)):
        path = root / names[int(label)] / f"{n:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_fmnist_images(out: Path, per_class: int, val_per_class: int) -> dict[str, int]:
    counts = {}
    for split, folder, k in (("train", "train", per_class), ("test", "val", val_per_class)):
        images, labels = load_fashion_mnist_raw(split)
        keep = balanced_subset(labels, k)
        counts[folder] = len(write_image_folder(images[keep], labels[keep], FASHION_MNIST_CLASSES,
                                                out / "fmnist-images" / folder))
    return counts


def write_digits_npz(out: Path) -> dict[str, int]:
    data = load_task("digits")
    names = np.array(data.task.class_names)  # a unicode array: loads with allow_pickle=False
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "digits-train.npz", x=data.x_train.numpy(), y=data.y_train.numpy(), class_names=names)
    np.savez(out / "digits-test.npz", x=data.x_test.numpy(), y=data.y_test.numpy(), class_names=names)
    return {"digits-train": len(data.y_train), "digits-test": len(data.y_test)}


def write_text_jsonl(out: Path, per_class: int) -> dict[str, int]:
    """WordNet verb glosses -> 15 verb supersenses (Debian ``wordnet-base``) as JSONL, ``per_class`` texts per
    class for training and a third of that for validation and test."""
    from crisp_edge.data.corpora import load_text_task, write_jsonl

    verbs = 15
    task = load_text_task("wordnet-verbs", max_train=verbs * per_class, max_val=verbs * max(2, per_class // 3),
                          max_test=verbs * max(2, per_class // 3), balanced=True)
    paths = write_jsonl(task, out / "wordnet-verbs")
    return {f"wordnet-verbs/{s}": len(task.split(s)) for s in paths}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("user-data"))
    p.add_argument("--per-class", type=int, default=100, help="training images per Fashion-MNIST class")
    p.add_argument("--val-per-class", type=int, default=20, help="validation images per class (from the test split)")
    p.add_argument("--text-per-class", type=int, default=0, help="also write WordNet verb glosses as JSONL, this many "
                                                                  "training texts per class (default 0: none)")
    p.add_argument("--text-only", action="store_true", help="write only the text (with --text-per-class)")
    args = p.parse_args(argv)
    if args.text_only and not args.text_per_class:
        p.error("--text-only needs --text-per-class K")
    counts = {} if args.text_only else {**write_fmnist_images(args.out, args.per_class, args.val_per_class),
                                        **write_digits_npz(args.out)}
    if args.text_per_class:
        counts.update(write_text_jsonl(args.out, args.text_per_class))
    for name, n in counts.items():
        print(f"{name}: {n:,} examples")
    print(f"written under {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

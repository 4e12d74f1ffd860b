"""Image folders -> model-ready tensors, preprocessed with the model's ``InputSpec``.

Two layouts:

* **class folders** (torchvision ``ImageFolder``): ``root/<class>/<image>``; class index = position of
  the folder name in sorted order (as torchvision does), or in ``class_names`` when given (a
  validation folder then gets the training set's indices);
* **flat**: ``root/<image>`` with no subfolders: unlabelled (distillation inputs).

Images are decoded one at a time with PIL into a preallocated tensor (memory: the output plus one
image); every file is stat'ed before it is opened (FIFOs and devices refused, not read), and
PIL's decompression-bomb limit is an error, not a warning.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from crisp_edge.data.input_spec import InputSpec
from crisp_edge.data.labeled import LabeledData, check_labels, stat_regular
from crisp_edge.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
#: Largest image file decoded: a photo is a few MB; anything above this is not a training image.
MAX_IMAGE_BYTES = 64 << 20
#: Largest tensor of decoded images (float32): beyond it, pass max_items.
MAX_DECODED_BYTES = 8 << 30
#: Below this many images the bar would only flicker.
PROGRESS_MIN_ITEMS = 200


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _image_names(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if _is_image_name(e.name))


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow; install it with `pip install pillow` (torchvision brings it).") from None
    return Image


def _resample(name: str):
    return getattr(_pil().Resampling, name.upper())


def preprocess_image(img, spec: InputSpec) -> torch.Tensor:
    """A PIL image -> float32 (C, H, W): channels, resize, centre crop, [0, 1], normalise (timm's eval
    transform; see ``crisp_edge.data.input_spec``)."""
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if spec.channels not in (1, 3):
        raise DataError(f"images can be converted to 1 or 3 channels, but the model takes {spec.channels}; "
                        "pass tensors (.safetensors / .npz) instead.")
    h, w = spec.height, spec.width
    if spec.crop_mode == "squash":
        size = (math.floor(w / spec.crop_pct), math.floor(h / spec.crop_pct))
    else:  # shorter side to floor(size / crop_pct), aspect ratio kept (torchvision Resize(int) rounding)
        side = math.floor(min(h, w) / spec.crop_pct) if h == w else None
        iw, ih = img.size
        if side is None:  # non-square target: scale so both sides cover the scaled target (timm ResizeKeepRatio)
            scale = max(math.floor(h / spec.crop_pct) / ih, math.floor(w / spec.crop_pct) / iw)
            size = (round(iw * scale), round(ih * scale))
        elif iw <= ih:
            size = (side, int(side * ih / iw))
        else:
            size = (int(side * iw / ih), side)
    if size != img.size:
        img = img.resize(size, resample=_resample(spec.interpolation))
    iw, ih = img.size
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
    if (iw, ih) != (w, h):
        img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).float().div_(255.0)
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()
    for c in range(spec.channels):  # scalar ops per channel: bit-identical to fashion_mnist.normalize_images
        x[c].sub_(spec.mean[c]).div_(spec.std[c])
    return x


def read_image(path: Path, spec: InputSpec) -> torch.Tensor:
    """Decode one image file (stat'ed first) and preprocess it; a DataError names a file PIL cannot read."""
    Image = _pil()  # noqa: N806 (the module's usual name)
    stat_regular(path, MAX_IMAGE_BYTES, what="image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return preprocess_image(img, spec)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path} is too large to decode safely ({e}); downscale it.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"cannot read image {path}: {e}. The file is corrupt or not an image; replace or delete it.") from None


def _interleave(per_class: list[list[Path]], max_items: int | None) -> list[tuple[Path, int]]:
    """Items class by class in turn (file-name order inside each), so a ``max_items`` prefix is balanced."""
    out: list[tuple[Path, int]] = []
    longest = max((len(f) for f in per_class), default=0)
    for i in range(longest):
        for label, files in enumerate(per_class):
            if i < len(files):
                out.append((files[i], label))
    return out[:max_items]


def scan_image_folder(root: Path, class_names: tuple[str, ...] | None = None
                      ) -> tuple[list[list[Path]] | None, tuple[str, ...] | None, list[Path]]:
    """``(files per class, class names, [])`` for class folders, ``(None, None, files)`` for a flat folder."""
    entries = list(os.scandir(root))
    subdirs = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    loose = sorted(e.name for e in entries if _is_image_name(e.name))
    if subdirs and loose:
        raise DataError(f"{root} holds both class folders ({', '.join(subdirs[:3])}) and loose images "
                        f"({', '.join(loose[:3])}); move the loose images into a class folder, or use a folder of "
                        "images only for unlabelled data.")
    if not subdirs:
        if not loose:
            raise DataError(f"image folder {root} is empty: it holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no "
                            "class folders.")
        return None, None, [root / n for n in loose]
    names = tuple(subdirs)
    if class_names is not None:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise DataError(f"{root}: class folders {unknown} are not among the training classes {list(class_names)}; "
                            "rename them or add them to the training data.")
        names = tuple(class_names)
    per_class = []
    for name in names:
        folder = root / name
        files = [folder / n for n in _image_names(folder)] if folder.is_dir() else []
        if not files and (class_names is None or name in subdirs):
            raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it.")
        per_class.append(files)
    return per_class, names, []


def load_image_folder(root: str | os.PathLike, spec: InputSpec, *, class_names: tuple[str, ...] | None = None,
                      max_items: int | None = None, progress: bool = True) -> LabeledData:
    """An image folder (class folders or flat) as ``LabeledData`` of float32 (N, C, H, W) per ``spec``."""
    root = Path(root)
    if spec.kind != "image":
        raise DataError(f"{root} is a folder of images but the model takes {spec.describe()}.")
    per_class, names, flat = scan_image_folder(root, class_names)
    items = _interleave(per_class, max_items) if per_class is not None else [(p, -1) for p in flat[:max_items]]
    nbytes = len(items) * 4 * spec.channels * spec.height * spec.width
    if nbytes > MAX_DECODED_BYTES:
        raise DataError(f"{root}: {len(items):,} images of {spec.channels}x{spec.height}x{spec.width} would take "
                        f"{nbytes / 2**30:.1f} GiB as float32; pass max_items (at most "
                        f"{MAX_DECODED_BYTES // (nbytes // len(items)):,}).")
    x = torch.empty((len(items), spec.channels, spec.height, spec.width), dtype=torch.float32)
    bar = tqdm(items, desc=f"read {root.name or root}", unit="img", leave=False,
               disable=not progress or len(items) < PROGRESS_MIN_ITEMS)
    for i, (path, _) in enumerate(bar):
        x[i] = read_image(path, spec)
    if per_class is None:
        return LabeledData(x, None, source=f"image folder {root} ({len(items):,} unlabelled images)")
    y = check_labels(torch.tensor([label for _, label in items], dtype=torch.int64), str(root), len(names))
    return LabeledData(x, y, class_names=names, source=f"image folder {root} ({len(names)} class folders)")

"""What a model takes as input, read from the model itself: ``InputSpec`` and ``input_spec_of``.

    spec = input_spec_of(model)                       # timm / Hugging Face ViT, the embedded ViT, LLaMA, BERT
    spec = input_spec_of(hf_vit, processor_dir="my-vit/")   # mean/std/resize from preprocessor_config.json

An image spec says how a picture becomes a model-ready tensor, in timm's eval-transform terms:
convert to ``channels`` (1: PIL "L" luma, 3: "RGB"), resize, centre-crop to ``height`` x ``width``,
scale to [0, 1], normalise per channel with ``mean``/``std``. The resize before the crop is

* ``crop_mode="center"``: the shorter side goes to ``floor(size / crop_pct)``, aspect ratio kept
  (timm's default eval transform);
* ``crop_mode="squash"``: both sides go to ``floor(height / crop_pct)`` x ``floor(width / crop_pct)``,
  aspect ratio not kept (Hugging Face's ``ViTImageProcessor``, which resizes straight to the model size).

A token spec gives ``max_length`` (classification batches are padded/truncated to it) and ``vocab_size``.

Where the numbers come from (``InputSpec.source`` says which, for error messages and reports):

* the embedded Fashion-MNIST ViT (``crisp_edge.models.sources.EMBEDDED_VIT_SOURCE``): 28 x 28 grey,
  Fashion-MNIST's mean/std, no crop: exactly ``crisp_edge.data.fashion_mnist.normalize_images``;
* timm models: ``timm.data.resolve_data_config({}, model=model)`` for mean, std, crop_pct,
  interpolation and crop mode; channels and size from the patch embedding (``resolve_data_config``
  reports the *pretrained* config's 3 x 224 x 224 even for a model built at another size). A model
  built with fewer channels than its pretrained mean/std has (``in_chans=1``) gets their average,
  the grey value for which timm's summed RGB stem weights see the same input;
* Hugging Face image models: ``config.num_channels`` and ``config.image_size``, with resize, crop,
  mean and std from the image processor in ``processor_dir`` when one is given (``create_model`` on a
  folder with ``preprocessor_config.json`` reads it and records the spec in the model's origin, which
  checkpoints keep), else the defaults of ``ViTImageProcessor`` (mean = std = 0.5, bilinear squash to
  the model size);
* Hugging Face language models (LLaMA, BERT, ...): tokens, ``max_length`` = the config's
  ``max_text_length`` when it has one (a LLaMA text classifier built with ``max_length``), else
  ``min(config.max_position_embeddings, DEFAULT_MAX_TEXT_LENGTH)``, unless given.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from crisp_edge.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from crisp_edge.errors import ConfigError, DataError
from crisp_edge.models.sources import EMBEDDED_VIT_NAME, EMBEDDED_VIT_SOURCE, source_of
from crisp_edge.models.weights import origin_of

INPUT_SPEC_VERSION = 1
#: Token budget of a classification example when the model allows more: 512 is BERT's window, and
#: padding every example to a LLaMA's 4k-128k positions would spend memory on padding alone.
DEFAULT_MAX_TEXT_LENGTH = 512
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash")
#: PIL's resample codes (as Hugging Face image processors store them) -> interpolation name.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
#: ViTImageProcessor's defaults (transformers IMAGENET_STANDARD_MEAN/STD, resample BILINEAR).
_HF_DEFAULT_MEAN_STD = 0.5


@dataclass(frozen=True)
class InputSpec:
    """What a model takes. ``kind`` is "image" or "tokens"; the other fields belong to one kind.

    Attributes:
        channels, height, width: image tensor shape (C, H, W) the model takes.
        mean, std: per-channel normalisation after scaling pixels to [0, 1] (``len == channels``).
        crop_pct: fraction of the resized image kept by the centre crop (1.0: no crop).
        interpolation: resize filter, one of ``INTERPOLATIONS``.
        crop_mode: "center" (shorter side, aspect kept) or "squash" (both sides); see the module doc.
        max_length: tokens per classification example (padded / truncated to it).
        vocab_size: token ids must lie in [0, vocab_size) (None: unchecked).
        source: where the numbers were read from (said in error messages).
    """

    kind: str
    channels: int | None = None
    height: int | None = None
    width: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    crop_mode: str = "center"
    max_length: int | None = None
    vocab_size: int | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        def positive_int(name: str, v: Any) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"InputSpec.{name} must be a positive integer, got {v!r}.")

        if self.kind == "image":
            for name in ("channels", "height", "width"):
                positive_int(name, getattr(self, name))
            for name in ("mean", "std"):
                v = getattr(self, name)
                if not isinstance(v, tuple) or len(v) != self.channels or not all(isinstance(t, (int, float)) for t in v):
                    raise ConfigError(f"InputSpec.{name} must be a tuple of {self.channels} numbers (one per channel), "
                                      f"got {v!r}.")
            if not all(s > 0 for s in self.std):
                raise ConfigError(f"InputSpec.std must be positive, got {self.std}.")
            if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) or not 0 < self.crop_pct <= 1:
                raise ConfigError(f"InputSpec.crop_pct must be in (0, 1], got {self.crop_pct!r}.")
            if self.interpolation not in INTERPOLATIONS:
                raise ConfigError(f"InputSpec.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}.")
            if self.crop_mode not in CROP_MODES:
                raise ConfigError(f"InputSpec.crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}.")
        elif self.kind == "tokens":
            positive_int("max_length", self.max_length)
            if self.vocab_size is not None:
                positive_int("vocab_size", self.vocab_size)
        else:
            raise ConfigError(f"InputSpec.kind must be 'image' or 'tokens', got {self.kind!r}.")

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's tensor shape: (C, H, W) for images, (max_length,) for tokens."""
        return (self.channels, self.height, self.width) if self.kind == "image" else (self.max_length,)

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"token ids, up to {self.max_length} per example" + (f", vocabulary {self.vocab_size}" if self.vocab_size else "")
        grey = {1: "grey", 3: "RGB"}.get(self.channels, f"{self.channels}-channel")
        return (f"{grey} images {self.height}x{self.width}, mean {list(self.mean)}, std {list(self.std)}, "
                f"{self.interpolation} resize ({self.crop_mode}, crop_pct {self.crop_pct:g})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = INPUT_SPEC_VERSION
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        d = dict(d)
        version = d.pop("version", INPUT_SPEC_VERSION)
        if version != INPUT_SPEC_VERSION:
            raise ConfigError(f"InputSpec version {version} is not supported (this crisp-edge reads {INPUT_SPEC_VERSION}).")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"InputSpec has no fields {sorted(unknown)}.")
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


#: Models this project ships, by name: their source record and the spec their weights were trained with.
KNOWN_SPECS: dict[str, tuple[dict[str, Any], InputSpec]] = {
    EMBEDDED_VIT_NAME: (EMBEDDED_VIT_SOURCE, InputSpec(
        "image", channels=1, height=28, width=28, mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,),
        crop_pct=1.0, interpolation="bilinear", crop_mode="center",
        source="the embedded Fashion-MNIST ViT (crisp_edge.data.fashion_mnist.normalize_images)")),
}


def _per_channel(values: Any, channels: int, what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    if len(vals) == channels:
        return vals
    if len(vals) == 1:
        return vals * channels
    if channels == 1:
        return (sum(vals) / len(vals),)
    raise DataError(f"{what} has {len(vals)} values but the model takes {channels} channels; "
                    "pass an InputSpec yourself (crisp_edge.data.input_spec.InputSpec).")


def _timm_spec(model: nn.Module) -> InputSpec:
    import timm.data

    patch = model.patch_embed
    channels = int(patch.proj.in_channels)
    height, width = (int(s) for s in patch.img_size)
    cfg = timm.data.resolve_data_config({}, model=model)
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode not in CROP_MODES:  # timm's "border" mode: centre crop is the nearest of ours
        crop_mode = "center"
    return InputSpec(
        "image", channels=channels, height=height, width=width,
        mean=_per_channel(cfg["mean"], channels, "timm's mean"), std=_per_channel(cfg["std"], channels, "timm's std"),
        crop_pct=float(cfg.get("crop_pct") or 1.0), interpolation=cfg.get("interpolation") or "bilinear",
        crop_mode=crop_mode, source=f"timm data config of {type(model).__name__}")


def _size(d: Any) -> tuple[int, int] | int | None:
    """A Hugging Face processor size dict -> (h, w), a shortest edge (int), or None."""
    if isinstance(d, dict):
        if "height" in d and "width" in d:
            return int(d["height"]), int(d["width"])
        if "shortest_edge" in d:
            return int(d["shortest_edge"])
    if isinstance(d, int):
        return d
    return None


def _hf_image_spec(model: nn.Module, processor_dir: str | os.PathLike | None,
                   recorded: dict[str, Any] | None = None) -> InputSpec:
    config = model.config
    channels = int(config.num_channels)
    size = config.image_size
    height, width = (int(s) for s in (size if isinstance(size, (list, tuple)) else (size, size)))
    mean = std = (_HF_DEFAULT_MEAN_STD,) * channels
    crop_pct, interpolation, crop_mode = 1.0, "bilinear", "squash"
    source = f"{type(model).__name__}.config (no image processor given: ViTImageProcessor defaults)"
    if processor_dir is not None or recorded is not None:
        import transformers

        where = processor_dir if processor_dir is not None else "the preprocessor_config.json recorded with the model"
        try:
            if processor_dir is not None:
                proc = transformers.AutoImageProcessor.from_pretrained(str(processor_dir), local_files_only=True)
            else:
                cls = getattr(transformers, str(recorded.get("image_processor_type", "ViTImageProcessor")), None)
                if not (isinstance(cls, type) and issubclass(cls, transformers.image_processing_utils.BaseImageProcessor)):
                    raise ValueError(f"image_processor_type {recorded.get('image_processor_type')!r} is not one")
                proc = cls.from_dict(recorded)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read an image processor from {where} ({e}); it needs a "
                            "preprocessor_config.json (written by image_processor.save_pretrained).") from None
        processor_dir = where
        if getattr(proc, "do_normalize", True):
            mean = _per_channel(proc.image_mean, channels, f"{processor_dir} image_mean")
            std = _per_channel(proc.image_std, channels, f"{processor_dir} image_std")
        else:
            mean, std = (0.0,) * channels, (1.0,) * channels
        if getattr(proc, "do_rescale", True) and abs(float(getattr(proc, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise DataError(f"{processor_dir}: rescale_factor {proc.rescale_factor} is not 1/255; pass an InputSpec yourself.")
        interpolation = _PIL_RESAMPLE.get(int(getattr(proc, "resample", 2)), "bilinear")
        resize = _size(getattr(proc, "size", None)) if getattr(proc, "do_resize", True) else None
        crop = _size(getattr(proc, "crop_size", None)) if getattr(proc, "do_center_crop", False) else None
        crop_h = crop[0] if isinstance(crop, tuple) else crop
        if isinstance(resize, tuple):  # straight to (h, w), then maybe a crop (DeiT)
            crop_mode, crop_pct = "squash", (crop_h / resize[0] if crop_h else 1.0)
        elif isinstance(resize, int):  # shorter side, then a crop
            crop_mode, crop_pct = "center", (crop_h / resize if crop_h else 1.0)
        crop_pct = min(1.0, crop_pct)
        source = f"{type(model).__name__}.config + image processor {processor_dir}"
    return InputSpec("image", channels=channels, height=height, width=width, mean=mean, std=std,
                     crop_pct=crop_pct, interpolation=interpolation, crop_mode=crop_mode, source=source)


def input_spec_of(model: nn.Module, *, processor_dir: str | os.PathLike | None = None,
                  max_length: int | None = None) -> InputSpec:
    """The ``InputSpec`` of ``model`` (plain or CRISP): see the module docstring for the sources.

    Args:
        processor_dir: a local Hugging Face folder with ``preprocessor_config.json`` (image models).
        max_length: tokens per classification example (language models; default: the model's window,
            at most ``DEFAULT_MAX_TEXT_LENGTH``).
    """
    source = source_of(model)
    for _, (known_source, spec) in KNOWN_SPECS.items():
        if source == known_source:
            return spec
    patch = getattr(model, "patch_embed", None)
    if patch is not None and hasattr(patch, "img_size") and isinstance(getattr(patch, "proj", None), nn.Conv2d):
        return _timm_spec(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_channels") and hasattr(config, "image_size"):
        recorded = (origin_of(model) or {}).get("preprocessor_config")
        return _hf_image_spec(model, processor_dir, recorded if isinstance(recorded, dict) else None)
    if config is not None and hasattr(config, "vocab_size"):
        window = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_TEXT_LENGTH
        chosen = getattr(config, "max_text_length", None)  # a text classifier's own (llama_classifier)
        length = max_length if max_length is not None else int(chosen) if chosen is not None else min(
            int(window), DEFAULT_MAX_TEXT_LENGTH)
        if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= window:
            raise ConfigError(f"max_length must be an integer in [1, {window}] (the model's window), got {max_length!r}.")
        return InputSpec("tokens", max_length=length, vocab_size=int(config.vocab_size),
                         source=f"{type(model).__name__}.config")
    raise DataError(f"cannot tell what {type(model).__name__} takes as input (not a timm or Hugging Face vision "
                    "transformer, nor a Hugging Face language model); pass an InputSpec yourself, e.g. "
                    "InputSpec('image', channels=3, height=224, width=224, mean=(0.5,)*3, std=(0.5,)*3).")

"""Model construction: the embedded default ViT and rebuilding architectures recorded in checkpoints.

A checkpoint records *how to build* the plain architecture (its "source"), never code: either a timm
model name with keyword arguments, or a Hugging Face config dictionary. ``build_model`` turns that
record back into a randomly initialised module, offline.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from crisp_edge.errors import CheckpointError, ConfigError

#: The embedded default model: a small timm VisionTransformer that this project trained itself on
#: Fashion-MNIST (examples/train_fmnist_vit.py). 28x28 grey images, 7x7 patches -> 16 tokens + CLS.
EMBEDDED_VIT_NAME = "fmnist-vit"
EMBEDDED_VIT_SOURCE: dict[str, Any] = {
    "library": "timm",
    "name": "vit_tiny_patch16_224",
    "kwargs": {
        "img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10,
        "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0,
    },
}
SOURCE_ATTR = "crisp_edge_source"


def _embedded_crisp_config():
    from crisp_edge.method.config import CrispConfig, RoleConfig

    return CrispConfig(default=RoleConfig(s=4, group_size=3))


#: The CRISP layout used for the embedded ViT in the demo, examples and benchmarks: per role, two
#: groups of 3 blocks sharing a basis, s=4, full rank r = 3*4 = 12 (48 mixer numbers per layer).
EMBEDDED_CRISP_CONFIG = _embedded_crisp_config()


def build_model(source: dict[str, Any]) -> nn.Module:
    """Build the plain (dense, randomly initialised) architecture described by ``source``."""
    library = source.get("library")
    if library == "timm":
        import timm

        model = timm.create_model(source["name"], pretrained=False, **source.get("kwargs", {}))
    elif library == "transformers":
        import transformers

        cfg_dict = dict(source["config"])
        model_type = cfg_dict.pop("model_type", None)
        if model_type is None:
            raise CheckpointError("the recorded Hugging Face config has no 'model_type'.")
        config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
        class_name = source.get("class") or (getattr(config, "architectures", None) or [None])[0]
        cls = _hf_class(class_name)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise CheckpointError(f"the recorded Hugging Face model class {class_name!r} is not a transformers model class.")
        model = cls(config)
    else:
        raise CheckpointError(
            f"cannot rebuild a model from source library {library!r}; pass the plain model yourself "
            "(load_checkpoint(path, model=...))."
        )
    setattr(model, SOURCE_ATTR, source)
    return model


def _hf_class(class_name: object) -> type | None:
    """A transformers model class by name, or one crisp-edge adds (``bert_pooling.HF_EXTRA_CLASSES``)."""
    import transformers

    from crisp_edge.models.bert_pooling import HF_EXTRA_CLASSES

    return HF_EXTRA_CLASSES.get(str(class_name)) or getattr(transformers, str(class_name), None)


def source_of(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild ``model``'s architecture, if known (set by ``build_model`` or read from HF config)."""
    src = getattr(model, SOURCE_ATTR, None)
    if src is not None:
        return src
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        return {"library": "transformers", "class": type(model).__name__, "config": config.to_dict()}
    return None


def create_model(name: str) -> nn.Module:
    """The plain model behind a name:

    * ``"fmnist-vit"``: the embedded ViT with its trained weights;
    * ``"timm:<model_name>"``: a timm architecture with random weights (no network);
    * a local Hugging Face model folder (``config.json`` + ``*.safetensors``): loaded with its
      pretrained weights, offline, safetensors only.
    """
    if name == EMBEDDED_VIT_NAME:
        return load_embedded_vit()
    if name.startswith("timm:"):
        return build_model({"library": "timm", "name": name[5:], "kwargs": {}})
    if Path(name).is_dir() and (Path(name) / "config.json").exists():
        return load_hf_pretrained(name)
    raise ConfigError(
        f"unknown model {name!r}: use {EMBEDDED_VIT_NAME!r}, 'timm:<name>' (e.g. timm:vit_small_patch16_224), "
        "or a local Hugging Face model folder with config.json and safetensors weights."
    )


def load_hf_pretrained(folder: str | Path) -> nn.Module:
    """A Hugging Face model saved locally (``save_pretrained``), offline and from safetensors only
    (``use_safetensors=True`` refuses pickled ``.bin`` weights)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    class_name = (getattr(config, "architectures", None) or [None])[0]
    cls = _hf_class(class_name)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ConfigError(f"{folder}/config.json names no transformers model class (architectures={class_name!r}).")
    try:
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except OSError as e:
        raise ConfigError(f"cannot load {folder} (safetensors weights are required, pickle is refused): {e}") from None
    setattr(model, SOURCE_ATTR, {"library": "transformers", "class": cls.__name__, "config": config.to_dict()})
    return model.eval()


def embedded_vit_files():
    return resources.files("crisp_edge") / "assets" / "fmnist_vit"


def load_embedded_vit() -> nn.Module:
    """The project's own Fashion-MNIST ViT with its committed weights, in eval mode."""
    from safetensors.torch import load_file

    model = build_model(EMBEDDED_VIT_SOURCE)
    weights = embedded_vit_files() / "model.safetensors"
    with resources.as_file(weights) as path:
        if not path.exists():
            raise CheckpointError(
                f"the embedded ViT's weights are missing ({path}); train them with "
                "`python examples/train_fmnist_vit.py` or reinstall crisp-edge."
            )
        model.load_state_dict(load_file(str(path)))
    return model.eval()


def embedded_vit_card() -> dict[str, Any]:
    """The training record committed beside the embedded weights (accuracy, recipe, time)."""
    with resources.as_file(embedded_vit_files() / "card.json") as path:
        return json.loads(path.read_text())

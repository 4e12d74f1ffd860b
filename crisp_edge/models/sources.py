"""Model construction: the embedded default ViT and rebuilding architectures recorded in checkpoints.

A checkpoint records *how to build* the plain architecture (its "source"), never code: either a timm
model name with keyword arguments, or a Hugging Face config dictionary. ``build_model`` turns that
record back into a randomly initialised module, offline (a checkpoint then loads its own weights into
it). ``create_model`` turns a name into a model *with* its pretrained weights (``weights.py``).
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from crisp_edge.errors import CheckpointError, ConfigError
from crisp_edge.models.tokenizers import has_tokenizer, tokenizer_record
from crisp_edge.models.weights import hf_class

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
        cls = hf_class(class_name)
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


def source_of(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild ``model``'s architecture, if known (set by ``build_model`` or read from HF config)."""
    src = getattr(model, SOURCE_ATTR, None)
    if src is not None:
        return src
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        return {"library": "transformers", "class": type(model).__name__, "config": config.to_dict()}
    return None


def create_model(name: str, *, weights: str | os.PathLike | None = None, model_args: dict[str, Any] | None = None,
                 random_init: bool = False) -> nn.Module:
    """The plain model behind a name, with its pretrained weights (never random ones by accident):

    * ``"fmnist-vit"``: the embedded ViT with its trained weights;
    * ``"timm:<name>"`` (also ``timm:local-dir:DIR`` / ``timm:hf-hub:ID``): timm's pretrained weights from
      its caches (offline), or from ``weights`` (a .safetensors / .pth file); ``model_args`` are timm's
      keyword arguments (``{"num_classes": 7, "img_size": 224}``); see ``crisp_edge.models.weights``;
    * a local Hugging Face model folder (``config.json`` + ``*.safetensors``): loaded with its
      pretrained weights, offline, safetensors only; ``"hf-hub:ORG/NAME"``: the same, from the
      model's snapshot in the Hugging Face hub cache (``weights.hub_snapshot``; never downloaded);
    * a ``.gguf`` file (or ``"smollm2"``): a LLaMA-architecture causal LM (``causal_lm.load_causal_lm``).

    ``model_args={"num_labels": K}`` (and optionally ``"max_length": L``, tokens per example) on a LLaMA
    causal LM (GGUF or folder) makes it a text classifier with a new K-class head
    (``llama_classifier.as_text_classifier``). A text model's tokenizer (in its
    folder, or the GGUF file) is recorded in the origin (``tokenizers.tokenizer_of`` reads it back).

    ``random_init=True`` builds the architecture with random weights, on purpose (tests, benchmarks).
    When no weights can be found a ConfigError lists the ways to give them. The model records how to
    rebuild its architecture (``source_of``) and where its weights came from (``weights.origin_of``).
    """
    from crisp_edge.models import weights as w

    model_args = dict(model_args or {})
    if name.startswith("timm:"):
        if random_init:
            if weights is not None:
                raise ConfigError("--random-init and --weights contradict each other; pass one.")
            prefix, arch, saved = w.timm_architecture(name[5:])
            if prefix == "hf-hub":
                raise ConfigError("--random-init needs an architecture name (timm:vit_small_patch16_224), not hf-hub:.")
            model = build_model({"library": "timm", "name": arch, "kwargs": {**saved, **model_args}})
            origin = {"kind": "random-init", "name": name, "kwargs": model_args, "files": []}
        else:
            model, source, origin = w.load_timm(name[5:], model_args, weights=weights)
            setattr(model, SOURCE_ATTR, source)
        setattr(model, w.ORIGIN_ATTR, origin)
        return model
    num_labels, max_length = model_args.pop("num_labels", None), model_args.pop("max_length", None)
    if max_length is not None and num_labels is None:
        raise ConfigError("--model-arg max_length goes with num_labels (the tokens per example of a LLaMA text "
                          "classifier).")
    if weights is not None or model_args:
        raise ConfigError(f"--weights and --model-arg apply to timm:<name> models (and num_labels to LLaMA models); "
                          f"{name!r} carries its own weights and configuration (edit its config.json to change the "
                          "architecture).")
    path = w.hub_snapshot(name[len("hf-hub:"):]) if name.startswith("hf-hub:") else Path(name)
    if name == EMBEDDED_VIT_NAME:
        model = load_embedded_vit() if not random_init else build_model(EMBEDDED_VIT_SOURCE)
        with resources.as_file(embedded_vit_files() / "model.safetensors") as file:
            files = [] if random_init else [w.file_record(file)]
        origin = {"kind": "random-init" if random_init else "embedded", "name": name, "kwargs": {}, "files": files}
    elif path.is_dir() and (path / "config.json").exists():
        model = w.load_hf_pretrained(path, random_init=random_init)
        setattr(model, SOURCE_ATTR, source_of(model))
        files = [] if random_init else [w.file_record(p) for p in sorted(path.glob("*.safetensors"))]
        kind = "random-init" if random_init else ("hf-hub" if name.startswith("hf-hub:") else "hf-folder")
        origin = {"kind": kind, "name": name if kind == "hf-hub" else str(path.resolve()), "kwargs": {}, "files": files}
        if has_tokenizer(path):
            origin["tokenizer"] = tokenizer_record(path)
        processor = path / "preprocessor_config.json"
        if processor.is_file() and processor.stat().st_size < 1 << 20:  # its preprocessing, kept in checkpoints
            try:
                origin["preprocessor_config"] = json.loads(processor.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ConfigError(f"{processor} is not valid JSON ({e}); write it with image_processor.save_pretrained."
                                  ) from None
    elif name == "smollm2" or (path.suffix.lower() == ".gguf"):
        from crisp_edge.models.causal_lm import find_smollm2_gguf, load_causal_lm

        if random_init:
            raise ConfigError("--random-init is not available for GGUF models; use a Hugging Face config folder.")
        file = find_smollm2_gguf() if name == "smollm2" else path
        model = load_causal_lm(file)[0]
        setattr(model, SOURCE_ATTR, source_of(model))
        origin = {"kind": "gguf", "name": name, "kwargs": {}, "files": [w.file_record(file)],
                  "tokenizer": tokenizer_record(file)}
    else:
        hint = ""
        if path.is_file() and path.suffix.lower() in w.WEIGHT_SUFFIXES:
            hint = f" A weights file goes with its architecture: timm:<architecture> --weights {name}."
        elif path.is_dir():
            hint = f" {name} has no config.json (a Hugging Face folder) ; for timm's folder format use timm:local-dir:{name}."
        raise ConfigError(
            f"unknown model {name!r}: use {EMBEDDED_VIT_NAME!r}, 'timm:<name>' (e.g. timm:vit_small_patch16_224 "
            "--weights FILE), 'timm:local-dir:DIR', a local Hugging Face model folder with config.json and "
            f"safetensors weights, 'hf-hub:ORG/NAME' (from the Hugging Face cache), or a .gguf file.{hint}")
    if num_labels is not None:  # a LLaMA causal LM becomes a text classifier (llama_classifier's docstring)
        from crisp_edge.models.llama_classifier import as_text_classifier

        model = as_text_classifier(model, num_labels, max_length=max_length)
        setattr(model, SOURCE_ATTR, source_of(model))
        kwargs = {"num_labels": num_labels} | ({"max_length": max_length} if max_length is not None else {})
        origin = {**origin, "kwargs": kwargs, "head_reinitialized": True, "num_classes": num_labels,
                  "weights_num_classes": f"a language-model head of {model.config.vocab_size} tokens"}
    setattr(model, w.ORIGIN_ATTR, origin)
    return model


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

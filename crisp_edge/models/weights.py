"""Pretrained weights in: timm's sources, weight files, and the record of where a model's weights came from.

    model = create_model("timm:vit_small_patch16_224")                          # timm's hub cache, offline
    model = create_model("timm:vit_small_patch16_224", weights="vit_s.safetensors", model_args={"num_classes": 7})
    model = create_model("timm:local-dir:my_vit/")                               # timm's own folder format

A model never gets random weights by accident: when none can be found, ``missing_weights_error`` says
every way to give them, and random weights need ``random_init=True`` (``--random-init``).

Files are read without executing code: safetensors, or ``torch.load(weights_only=True)`` for
``.pth`` / ``.pt`` / ``.bin`` (a file that needs pickled objects is refused). The state dict then goes
through timm's own pretrained-loading path (its checkpoint filter, input-channel adaptation and
classifier handling), so a file loads exactly as ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay={"file": path})`` would load it. A classifier whose class count differs from the
file's is re-initialised only when asked for (``num_classes`` given), and then reported (a warning and
``origin["head_reinitialized"]``); any other key the file lacks is an error.

The *origin* (``ORIGIN_ATTR`` on the model, ``origin`` in a checkpoint's crisp.json) records the kind,
name, keyword arguments and the files with their SHA-256, so a checkpoint says which weights it holds.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crisp_edge.errors import ConfigError
from crisp_edge.files.io import sha256_file

ORIGIN_ATTR = "crisp_edge_origin"
#: Weight files read for ``--weights``: safetensors, or PyTorch files read with ``weights_only=True``.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
#: timm's keys for the state dict inside a training checkpoint, in its order of preference.
_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["num_classes=7", "img_size=224", "qkv_bias=false"]`` -> ``{"num_classes": 7, ...}``: each value
    an int, float, bool (true/false), None (none) or else a string."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ConfigError(f"--model-arg expects NAME=VALUE (e.g. num_classes=7), got {item!r}.")
        low = text.strip().lower()
        value: Any
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text
        out[key] = value
    return out


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).resolve()
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def origin_of(model: nn.Module) -> dict[str, Any] | None:
    """Where ``model``'s weights came from (set by ``create_model``), or None."""
    return getattr(model, ORIGIN_ATTR, None)


def describe_origin(origin: dict[str, Any] | None) -> str:
    if not origin:
        return "weights of unknown origin (a model built in Python)"
    kind = origin.get("kind")
    if kind == "random-init":
        return "RANDOM weights (--random-init)"
    files = origin.get("files") or []
    where = ", ".join(f"{f['path']} (sha256 {f['sha256'][:12]}...)" for f in files) or origin.get("name", "")
    note = f"; head re-initialised to {origin['num_classes']} classes (the weights have " \
           f"{origin['weights_num_classes']})" if origin.get("head_reinitialized") else ""
    return f"{kind} weights from {where}{note}"


def missing_weights_error(name: str, why: str = "") -> ConfigError:
    return ConfigError(
        f"no pretrained weights found for {name}{f' ({why})' if why else ''}. Give them one of these ways:\n"
        f"  --weights FILE                  a .safetensors file (or a .pth/.pt read with weights_only=True)\n"
        f"  timm:local-dir:DIR              a folder saved by timm (config.json + model.safetensors)\n"
        f"  timm:hf-hub:ORG/NAME            from the Hugging Face hub cache (download it once with a network)\n"
        f"  a Hugging Face model folder     config.json + *.safetensors (save_pretrained)\n"
        f"  hf-hub:ORG/NAME                 a Hugging Face model in the hub cache (HF_HUB_CACHE / HF_HOME)\n"
        f"  --random-init                   random weights, on purpose (tests, benchmarks)\n"
        f"In Python: create_model(name, weights=FILE) / create_model(name, random_init=True).")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a weight file, never executing code; the state dict inside a training
    checkpoint (EMA first, as timm does) and without DDP / torch.compile prefixes."""
    from timm.models import clean_state_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist or is not a file.")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"weights file {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}.")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint: Any = load_file(str(path))
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors / unpickler errors of every kind
        import pickle

        why = "it holds pickled Python objects" if isinstance(e, pickle.UnpicklingError) else \
            f"{type(e).__name__}: {str(e)[:200]}"
        raise ConfigError(f"cannot read weights file {path} ({why}); a .pth must hold "
                          "plain tensors (torch.load(weights_only=True) refuses pickled objects): convert it to "
                          "safetensors.") from None
    if isinstance(checkpoint, dict):
        key = next((k for k in _STATE_KEYS if isinstance(checkpoint.get(k), dict)), None)
        checkpoint = checkpoint[key] if key else checkpoint
    if not isinstance(checkpoint, dict) or not checkpoint or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise ConfigError(f"weights file {path} holds no state dict (a mapping of names to tensors).")
    return clean_state_dict(checkpoint)


class _TimmLoadLog(logging.Handler):
    """Collects what timm's loader says about keys it did not load (it logs them, it does not raise)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith(("Missing keys", "Unexpected keys", "Unable to convert")):
            self.messages.append(msg)


@contextlib.contextmanager
def _timm_loading() -> Iterator[_TimmLoadLog]:
    """Offline (hub cache only) and with timm's key reports captured."""
    log = logging.getLogger("timm.models._builder")
    handler, level = _TimmLoadLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    patch = contextlib.nullcontext()
    try:
        import huggingface_hub.constants as hf_constants
        from unittest import mock

        patch = mock.patch.object(hf_constants, "HF_HUB_OFFLINE", True)  # read once at import
    except ImportError:
        pass
    try:
        with patch:
            yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _hub_weights_reachable(name: str) -> bool:
    """Whether timm could load ``name``'s pretrained weights without a download: an hf-hub id (tried
    offline, from the cache) or a legacy URL already in torch's hub cache."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown name or tag: create_model says so
        return True
    if cfg is None:
        return False
    if getattr(cfg, "hf_hub_id", None):
        return True
    url = getattr(cfg, "url", None)
    return bool(url) and (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


def timm_architecture(name: str) -> tuple[str, str, dict[str, Any]]:
    """``(prefix, architecture, saved arguments)`` of a timm name: ``local-dir:DIR`` reads DIR/config.json
    (timm's format), ``hf-hub:ID`` is resolved by timm when it loads, a plain name is its own architecture."""
    prefix, _, rest = name.partition(":") if name.startswith(("local-dir:", "hf-hub:")) else ("", "", name)
    if prefix == "local-dir":
        from timm.models._hub import load_model_config_from_path  # timm's own reader of its folder format

        if not (Path(rest) / "config.json").is_file():
            raise ConfigError(f"timm:local-dir:{rest} needs a folder with timm's config.json and weights "
                              "(written by timm.models.push_to_hf_hub / save_for_hf).")
        _, arch, args = load_model_config_from_path(rest)
        return prefix, arch, {k: v for k, v in (args or {}).items() if k != "pretrained_model_args"}
    return prefix, rest, {}


def load_timm(name: str, kwargs: dict[str, Any] | None = None, *, weights: str | os.PathLike | None = None
              ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, source, origin)``: a timm model with pretrained weights (see the module docstring),
    the record that rebuilds its architecture (``sources.build_model``) and its weights' origin.
    ``name`` may carry timm's ``local-dir:`` / ``hf-hub:`` prefix."""
    import timm

    kwargs = dict(kwargs or {})
    refused = sorted({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"} & set(kwargs))
    if refused:
        raise ConfigError(f"--model-arg {refused[0]} is not allowed; give weights with --weights or timm:local-dir:DIR.")
    prefix, arch, arch_args = timm_architecture(name)
    if prefix and weights is not None:
        raise ConfigError(f"timm:{name} brings its own weights; drop --weights (or use timm:ARCHITECTURE --weights FILE).")
    rest = name.partition(":")[2] if prefix else name

    asked_classes = kwargs.get("num_classes")
    file_classes = None
    files: list[dict[str, Any]] = []
    create_kwargs: dict[str, Any] = {}
    if weights is not None:
        state = read_state_dict(weights)
        files = [file_record(weights)]
        try:
            classifier = timm.models.get_pretrained_cfg(rest)
            classifier = getattr(classifier, "classifier", None) or "head"
        except Exception:  # noqa: BLE001 - an unknown name: create_model below says so
            classifier = "head"
        head = state.get(f"{classifier if isinstance(classifier, str) else classifier[0]}.weight")
        file_classes = int(head.shape[0]) if head is not None and head.dim() == 2 else None
        overlay: dict[str, Any] = {"state_dict": state}
        if file_classes is not None:
            overlay["num_classes"] = file_classes
            kwargs.setdefault("num_classes", file_classes)
        create_kwargs["pretrained_cfg_overlay"] = overlay
        kind = "file"
    elif prefix:
        kind = f"timm-{prefix}"
        if prefix == "local-dir":
            found = sorted(p for p in Path(rest).iterdir() if p.suffix in WEIGHT_SUFFIXES)
            files = [file_record(p) for p in found[:1]]
    elif not _hub_weights_reachable(rest):
        raise missing_weights_error(f"timm:{name}", "timm has no pretrained weights in its caches for it")
    else:
        kind = "timm-pretrained"
    try:
        with _timm_loading() as log:
            model = timm.create_model(name, pretrained=True, **create_kwargs, **kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - timm / hub errors of every kind
        text = f"{type(e).__name__}: {str(e)[:300]}"
        if weights is None and ("offline" in text.lower() or "cache" in text.lower() or "connect" in text.lower()
                                or "LocalEntryNotFound" in text or "No pretrained weights" in text):
            raise missing_weights_error(f"timm:{name}", text) from None
        where = f" with weights {weights}" if weights is not None else ""
        raise ConfigError(f"cannot build timm:{name}{where} and arguments {kwargs} ({text}).") from None
    num_classes = getattr(model, "num_classes", None)
    pretrained_classes = file_classes if file_classes is not None else model.pretrained_cfg.get("num_classes")
    reinit = asked_classes is not None and pretrained_classes is not None and asked_classes != pretrained_classes
    head_names = tuple(f"{c}." for c in ([model.pretrained_cfg.get("classifier")] if isinstance(
        model.pretrained_cfg.get("classifier"), str) else (model.pretrained_cfg.get("classifier") or ())))
    bad = [m for m in log.messages if not (reinit and m.startswith("Missing keys") and all(
        k.strip().startswith(head_names) for k in m[m.index("(") + 1:m.index(")")].split(",")))]
    if bad:
        raise ConfigError(f"the weights do not fit timm:{name} with arguments {kwargs}: {'; '.join(bad)[:400]}. "
                          "Pass the architecture's arguments the weights were trained with (--model-arg).")
    if prefix:
        arch = model.pretrained_cfg.get("architecture") or arch
    if prefix == "hf-hub":  # the architecture arguments saved beside the weights (in the cache now)
        from timm.models._hub import load_model_config_from_hf

        with _timm_loading():
            saved = load_model_config_from_hf(rest)[2] or {}
        arch_args = {k: v for k, v in saved.items() if k != "pretrained_model_args"}
    source_kwargs = {**arch_args, **kwargs}
    if num_classes is not None:
        source_kwargs["num_classes"] = int(num_classes)
    origin = {"kind": kind, "name": name, "kwargs": kwargs, "files": files, "num_classes": num_classes,
              "weights_num_classes": pretrained_classes, "head_reinitialized": bool(reinit)}
    if reinit:
        warnings.warn(f"timm:{name}: the weights' classifier has {pretrained_classes} classes and num_classes="
                      f"{asked_classes} was asked for: the head is re-initialised (random); train it (crisp-edge adapt "
                      "trains a task head).", stacklevel=2)
    return model.eval(), {"library": "timm", "name": arch, "kwargs": source_kwargs}, origin


def hub_snapshot(repo_id: str) -> Path:
    """The folder of ``repo_id``'s snapshot in the Hugging Face hub cache (``HF_HUB_CACHE``, else
    ``HF_HOME``/hub; ``refs/main`` names the revision), found offline: nothing is downloaded."""
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - a bad id, no cached copy, a broken cache: all mean "not here"
        raise missing_weights_error(f"hf-hub:{repo_id}", f"not in the Hugging Face cache {hf_constants.HF_HUB_CACHE}: "
                                    f"{type(e).__name__}; download it once with `hf download {repo_id}` on a machine "
                                    "with a network, then copy the cache") from None


def load_hf_pretrained(folder: str | Path, *, random_init: bool = False) -> nn.Module:
    """A Hugging Face model saved locally (``save_pretrained``), offline and from safetensors only
    (``use_safetensors=True`` refuses pickled ``.bin`` weights); ``random_init`` builds it from its
    config alone."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # e.g. timm's config.json, which names no model_type
        raise ConfigError(f"{folder}/config.json is not a Hugging Face transformers config ({type(e).__name__}: "
                          f"{str(e)[:160]}); a timm model folder loads as timm:local-dir:DIR (timm:hf-hub:ORG/NAME "
                          "from the hub cache).") from None
    class_name = (getattr(config, "architectures", None) or [None])[0]
    cls = hf_class(class_name)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ConfigError(f"{folder}/config.json names no transformers model class (architectures={class_name!r}); "
                          "a timm model folder loads as timm:local-dir:DIR (timm:hf-hub:ORG/NAME from the hub cache).")
    if random_init:
        model = cls(config)
    else:
        try:
            model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        except OSError as e:
            raise ConfigError(f"cannot load {folder} (safetensors weights are required, pickle is refused): {e}") from None
    return model.eval()  # its source is its config (sources.source_of)


def hf_class(class_name: object) -> type | None:
    """A transformers model class by name, or one crisp-edge adds (``bert_pooling.HF_EXTRA_CLASSES``,
    ``llama_classifier.LLAMA_EXTRA_CLASSES``)."""
    import transformers

    from crisp_edge.models.bert_pooling import HF_EXTRA_CLASSES
    from crisp_edge.models.llama_classifier import LLAMA_EXTRA_CLASSES

    extra = HF_EXTRA_CLASSES.get(str(class_name)) or LLAMA_EXTRA_CLASSES.get(str(class_name))
    return extra or getattr(transformers, str(class_name), None)

"""Dense ONNX graphs of Hugging Face models through ``optimum``'s exporter (``export_onnx(exporter="optimum")``).

    bundle = export_onnx(hf_model, "bundle/", mode="dense", exporter="optimum")   # or exporter="auto"
    sess = bundle.session(); logits = sess.run({"input_ids": ids, "attention_mask": m, "position_ids": p})

Why optimum for Hugging Face dense bundles: optimum's ``OnnxConfig`` for each architecture knows
the model's real input names, dtypes and dynamic axes (``pixel_values`` [batch_size, num_channels,
height, width]; ``input_ids`` / ``attention_mask`` / ``position_ids`` int64 [batch_size,
sequence_length]), the task's outputs (``logits``) and the patches a clean trace needs (LLaMA's
causal mask and rotary cache), which a hand-written ``torch.onnx.export`` call would have to
re-derive per architecture. Tasks: ``image-classification`` for ``ViTForImageClassification``,
``text-generation`` (without past key/values) for ``LlamaForCausalLM`` when this function is called
directly; ``export_onnx`` exports a causal LM as a language-model bundle instead (optimum's
``text-generation-with-past`` graph, ``crisp_edge.export.onnx.lm_export``), which scores whole
sequences too.

Only ``dense``: optimum exports the architecture's own modules, so a CRISP model is first
``materialize_``-d on a copy (W folded into plain ``nn.Linear``). ``factored`` and ``swappable``
bundles need the CRISP ops (``B @ G(A)``, weights as graph inputs) kept in the graph, which
optimum's configs know nothing about: they stay on the TorchScript path of ``onnx_export``.

The export itself is optimum's (``optimum.exporters.onnx.onnx_export_from_model``, on the
materialized in-memory model; it traces with ``torch.onnx.export``, TorchScript), at the
bundle's opset (18 by default), into a temporary folder, with optimum's own validation and
post-processing off: the bundle's parity check (``export/parity/check.py``) runs on the fixed seeded
reference inputs before the bundle is moved into place, like every other bundle.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import torch
from crisp_edge.export.errors import ExportError
from crisp_edge.export.logs import quiet_loggers
from crisp_edge.export.parity.reference import REFERENCE_BATCHES, reference_inputs
from torch import nn

from crisp_edge.errors import ConfigError
from crisp_edge.method.convert import is_crisp, materialize_

#: ``exporter=`` values of ``export_onnx``: "torch" (TorchScript, every model and mode), "optimum"
#: (Hugging Face models, dense only), "auto" (optimum for a supported Hugging Face model in dense
#: mode when optimum is importable, else torch).
EXPORTERS = ("torch", "optimum", "auto")
EXPORTER_NAME = "optimum.exporters.onnx.onnx_export_from_model"
#: Hugging Face model class -> optimum task (the ONNX graph's inputs and outputs follow from it).
OPTIMUM_TASKS = {
    "ViTForImageClassification": "image-classification",
    "LlamaForCausalLM": "text-generation",
}
OUTPUT_NAME = "logits"
#: Tokens masked (right padding) at the end of the last row of each text reference case, so the
#: stored cases exercise the attention mask, not only an all-ones one.
PADDED_TOKENS = 2


@dataclass
class OptimumExport:
    """What ``export_with_optimum`` made: the graph, its inputs, axes, reference inputs and record."""

    proto: onnx.ModelProto
    task: str
    input_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    cases: list[dict[str, torch.Tensor]]
    record: dict[str, Any] = field(default_factory=dict)


def optimum_available() -> bool:
    """True when ``optimum.exporters.onnx`` imports (optimum 2.x + optimum-onnx, transformers < 4.58)."""
    try:
        import optimum.exporters.onnx  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def optimum_task(model: nn.Module) -> str | None:
    """The optimum task of a supported Hugging Face model, else ``None``."""
    return OPTIMUM_TASKS.get(type(model).__name__) if hasattr(model, "config") else None


def resolve_exporter(model: nn.Module, mode: str, exporter: str) -> str:
    """"torch" or "optimum" for ``exporter`` (one of ``EXPORTERS``), checked against the model and mode."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {EXPORTERS}, got {exporter!r}.")
    if exporter == "auto":
        ok = mode == "dense" and optimum_task(model) is not None and optimum_available()
        return "optimum" if ok else "torch"
    if exporter == "optimum":
        if mode != "dense":
            raise ConfigError(f"exporter 'optimum' makes dense bundles only; a {mode!r} bundle keeps the CRISP ops in "
                              "the graph, which only the 'torch' exporter does. Use exporter='torch' (or 'auto').")
        if optimum_task(model) is None:
            raise ExportError(f"exporter 'optimum' supports the Hugging Face classes {sorted(OPTIMUM_TASKS)}; this "
                              f"model is a {type(model).__name__}. Use exporter='torch'.")
        if not optimum_available():
            raise ExportError("exporter 'optimum' needs optimum 2.1 + optimum-onnx 0.1 with transformers < 4.58 "
                              "(`import optimum.exporters.onnx` fails here); install them or use exporter='torch'.")
    return exporter


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("optimum", "optimum-onnx", "transformers"):
        try:
            out[pkg.replace("-", "_")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg.replace("-", "_")] = "unknown"
    return out


def _quiet():
    """optimum's and the tracer's warnings and info logs off for the export, restored afterwards."""
    return quiet_loggers("optimum", "transformers", "torch.onnx", python_warnings=True)


def _text_case(ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` plus the mask and positions the graph takes: all ones but the last row's last
    ``PADDED_TOKENS`` tokens (right padding), positions 0..L-1."""
    b, length = ids.shape
    case = {"input_ids": ids}
    if "attention_mask" in names:
        mask = torch.ones((b, length), dtype=torch.int64)
        if length > PADDED_TOKENS:
            mask[-1, length - PADDED_TOKENS:] = 0
        case["attention_mask"] = mask
    if "position_ids" in names:
        case["position_ids"] = torch.arange(length, dtype=torch.int64).expand(b, length).contiguous()
    return case


def _check_example(model: nn.Module, task: str, example: Any) -> dict[str, torch.Tensor]:
    """The user's example (or the toy default) as the one tensor the task is driven by."""
    if example is None:
        from crisp_edge.testing import example_inputs

        example = example_inputs(model, batch=REFERENCE_BATCHES[0])
    key = "input_ids" if task == "text-generation" else "pixel_values"
    if isinstance(example, torch.Tensor):
        example = {key: example}
    if not isinstance(example, dict) or key not in example or not isinstance(example[key], torch.Tensor):
        raise ConfigError(f"example_input for a {type(model).__name__} must be a tensor or a dict with {key!r}.")
    t = example[key]
    if task == "text-generation":
        if t.dtype not in (torch.int64, torch.int32) or t.ndim != 2 or t.numel() == 0:
            raise ExportError(f"input 'input_ids' must be a [batch, sequence] int64 tensor of token ids, got "
                              f"{t.dtype} of shape {list(t.shape)}.")
        vocab = int(model.config.vocab_size)
        if int(t.min()) < 0 or int(t.max()) >= vocab:
            raise ExportError(f"input 'input_ids' holds ids outside the vocabulary [0, {vocab}).")
        return {key: t.to(torch.int64)}
    size = model.config.image_size
    want = [int(model.config.num_channels), *((size, size) if isinstance(size, int) else size)]
    if t.dtype != torch.float32 or list(t.shape[1:]) != want:
        raise ExportError(f"input 'pixel_values' must be a float32 [batch, {', '.join(map(str, want))}] tensor (the "
                          f"model's channels and image size), got {t.dtype} of shape {list(t.shape)}.")
    return {key: t}


def _cases(model: nn.Module, task: str, example: dict[str, torch.Tensor], names: list[str]) -> list[dict]:
    if task == "text-generation":
        ids = reference_inputs(example, int_high=int(model.config.vocab_size))
        return [_text_case(c["input_ids"], names) for c in ids]
    return reference_inputs(example)


def _pin_image_size(proto: onnx.ModelProto, pixels: torch.Tensor) -> None:
    """Fix ``pixel_values``' channel, height and width axes to the example's sizes: optimum names them
    symbolic, but a ViT (without position-embedding interpolation) takes only its configured size,
    so a bundle must say so (the session then refuses another size with a clear error, before ORT)."""
    for v in proto.graph.input:
        if v.name == "pixel_values":
            for d, size in zip(list(v.type.tensor_type.shape.dim)[1:], pixels.shape[1:]):
                d.Clear()
                d.dim_value = int(size)


def optimum_graph(model: nn.Module, task: str, opset: int, *, hint: str = "", **options: Any) -> onnx.ModelProto:
    """optimum's ONNX graph of ``model`` for ``task``: a materialized copy (``model`` is not changed) is
    exported by ``onnx_export_from_model`` into a temporary folder and read back whole, optimum's own
    validation and post-processing off (the bundle's parity check runs instead). ``options`` go to optimum
    (e.g. ``do_constant_folding=False``); ``hint`` ends the error message when optimum fails."""
    from optimum.exporters.onnx import onnx_export_from_model

    dense = copy.deepcopy(model).eval()
    if is_crisp(dense):
        materialize_(dense)
    with tempfile.TemporaryDirectory(prefix="crisp-optimum-") as tmp, _quiet(), torch.no_grad():
        try:
            onnx_export_from_model(dense, tmp, opset=opset, task=task, do_validation=False, no_post_process=True,
                                   device="cpu", **options)
        except Exception as e:  # noqa: BLE001 - optimum's and the tracer's own (untyped) errors
            raise ExportError(f"optimum could not export this {type(model).__name__} (task {task!r}, opset {opset}): "
                              f"{type(e).__name__}: {str(e)[:400]}.{hint}") from None
        path = Path(tmp) / "model.onnx"
        if not path.is_file():
            wrote = sorted(p.name for p in Path(tmp).iterdir())
            raise ExportError(f"optimum wrote no model.onnx for task {task!r} (it wrote {wrote}).")
        return onnx.load(str(path))  # external data, if any, is read in now: the folder goes away


def export_with_optimum(model: nn.Module, example_input: Any = None, opset: int = 18) -> OptimumExport:
    """The dense ONNX graph of the Hugging Face ``model`` (CRISP or plain) by optimum, with its
    reference inputs. ``model`` is not changed (a copy is materialized and exported)."""
    task = optimum_task(model)
    if task is None:
        raise ExportError(f"optimum export supports {sorted(OPTIMUM_TASKS)}, not {type(model).__name__}.")
    example = _check_example(model, task, example_input)
    proto = optimum_graph(model, task, opset, hint=" For a ViT, exporter='torch' is the fallback.")
    if task == "image-classification":
        _pin_image_size(proto, example["pixel_values"])
    names = [v.name for v in proto.graph.input]
    outs = [v.name for v in proto.graph.output]
    if outs != [OUTPUT_NAME]:
        raise ExportError(f"optimum's {task!r} graph returns {outs}; a bundle needs exactly [{OUTPUT_NAME!r}].")
    axes: dict[str, dict[int, str]] = {}
    for v in list(proto.graph.input) + list(proto.graph.output):
        dims = {i: d.dim_param for i, d in enumerate(v.type.tensor_type.shape.dim) if d.dim_param}
        if dims:
            axes[v.name] = dims
    cases = _cases(model, task, example, names)
    missing = [n for n in names if n not in cases[0]]
    if missing:
        raise ExportError(f"optimum's {task!r} graph takes {names}; crisp-edge cannot make reference inputs "
                          f"for {missing}.")
    record = {"name": EXPORTER_NAME, "kind": "optimum", "task": task, "with_past": False, **_versions(),
              "torch": torch.__version__, "onnx": onnx.__version__, "do_constant_folding": True}
    return OptimumExport(proto, task, names, axes, cases, record)


#: PIL resample codes, as Hugging Face image processors store them.
_PIL_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def write_hf_configs(model: nn.Module, folder: Path) -> list[str]:
    """Beside a dense ``model.onnx`` of a Hugging Face model: its ``config.json`` (the architecture
    class named in ``architectures``) and, for image models whose preprocessing a ``ViTImageProcessor``
    expresses exactly (resize straight to the model size, no crop), ``preprocessor_config.json``, so
    optimum's ``ORTModelFor...from_pretrained(bundle)`` and ``AutoImageProcessor`` load the bundle as
    it is; for text models, the tokenizer recorded with the weights (``models.tokenizers.tokenizer_of``;
    skipped with a warning when it cannot be read), so ``AutoTokenizer.from_pretrained(bundle)`` works too.
    Returns the names written (none for models without a Hugging Face config)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file") or not getattr(config, "model_type", None):
        return []
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    config.to_json_file(str(folder / "config.json"))
    written = ["config.json"]
    from crisp_edge.data.input_spec import input_spec_of
    from crisp_edge.errors import CrispEdgeError

    try:
        spec = input_spec_of(model)
    except CrispEdgeError:
        return written
    if spec.kind == "tokens":
        from crisp_edge.models.tokenizers import tokenizer_of

        try:
            tokenizer = tokenizer_of(model)
        except CrispEdgeError as e:  # the weights export as they are; only the convenience file is missing
            warnings.warn(f"the bundle carries no tokenizer: {e}", stacklevel=3)
            tokenizer = None
        if tokenizer is not None:
            saved = tokenizer.save_pretrained(str(folder))
            written += sorted({Path(f).name for f in saved if (folder / Path(f).name).is_file()})
    if spec.kind == "image" and spec.crop_mode == "squash" and spec.crop_pct == 1.0:
        import transformers

        processor = transformers.ViTImageProcessor(
            do_resize=True, size={"height": spec.height, "width": spec.width},
            resample=_PIL_CODES[spec.interpolation], do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=list(spec.mean), image_std=list(spec.std))
        processor.save_pretrained(str(folder))
        written.append("preprocessor_config.json")
    return written


__all__ = ["EXPORTERS", "OPTIMUM_TASKS", "OptimumExport", "export_with_optimum", "optimum_available", "optimum_task",
           "resolve_exporter", "write_hf_configs"]

"""Export a CRISP model to an ONNX Runtime bundle: ``dense``, ``factored`` or ``swappable``.

    bundle = export_onnx(model, "bundle/", mode="swappable", tasks=["mnist.mixers.safetensors"])
    sess = bundle.session(threads=1); sess.set_task("mnist"); logits = sess(x)

Modes (DESIGN.md section 3):

* ``dense``: a deep copy is ``materialize_``-d and exported; the graph is the original
  architecture's, with folded weights. Fastest, largest.
* ``factored``: the CRISP model itself, with bases and mixers as plain initializers. Each basis is
  one tensor (layers hold a reference to it, so the trace sees one value): the file is about the
  compressed size. ORT constant-folds W at session creation, so inference runs dense.
* ``swappable``: switch-then-dense. ``fold.onnx`` (task tensors as overridable initializers ->
  every layer's dense W, built by ``onnx_fold``) and ``model.onnx`` (the architecture, with every
  CRISP layer's weight and bias and the head as *graph inputs*, all else initializers). A task
  switch runs the fold once; inference runs dense. Tasks are ``.onnx_adapter`` files.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter), opset 18. Chosen
because (1) it keeps the CRISP ops with ``do_constant_folding=False`` (the dynamo exporter's default
optimizer folds ``B @ G(A)`` into W, defeating ``factored``), (2) its ``dynamic_axes`` give the head's
class axis a symbolic size in ``swappable``, so tasks may bring heads of any class count, and (3) it
exports a ViT in a fraction of a second (the dynamo path takes ~12x longer, which matters for tests
on a 2-core machine). It is deprecated upstream; the choice is one constant (``EXPORTER``) and the
bundles are plain ONNX either way. Opset 18: supported by every ORT since 1.14, and it has
``Split(num_outputs=)`` and ``LayerNormalization``.

Exporter choice (``exporter=``): "torch" (the default, above) exports every model and mode;
"optimum" exports a Hugging Face ``ViTForImageClassification`` or ``LlamaForCausalLM`` as a
``dense`` bundle through ``optimum.exporters.onnx`` (``onnx_optimum``: optimum knows each
architecture's input names, integer token inputs, dynamic axes and tracing patches); "auto" picks
optimum for those models in dense mode when optimum imports, torch otherwise. ``factored`` and
``swappable`` always use the TorchScript path: they need the CRISP ops (and weights as graph
inputs) kept in the graph, which optimum's per-architecture configs do not describe. The manifest's
``exporter`` record names the exporter (``kind``: "torch" or "optimum") and its versions.

Every export is validated (``validate_bundle``) in a temporary folder next to ``out_dir`` and only
then renamed into place, so ``out_dir`` never holds a half-written or unvalidated bundle.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from crisp_edge._version import __version__
from crisp_edge.errors import ConfigError
from crisp_edge.export.bundle import (
    MANIFEST,
    MODES,
    REFERENCE,
    TASKS_DIR,
    bundle_tag,
    check_threads,
    file_record,
    task_mixers,
)
from crisp_edge.export.writing import add_sections, check_replaceable, params_record, write_validated
from crisp_edge.export.model_io import (
    OUTPUT_NAME,
    _example_inputs,
    _Forward,
    _stored_params,
)
from crisp_edge.export.onnx.adapter import adapter_arrays, task_record, write_adapter
from crisp_edge.export.onnx.bundle import (
    ADAPTER_SUFFIX,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    OnnxBundle,
    io_record,
    save_onnx,
)
from crisp_edge.export.onnx.fold import (
    CLASS_AXIS,
    build_fold_graph,
    take_folded_weights,
)
from crisp_edge.export.lm import is_causal_lm
from crisp_edge.export.onnx.lm_export import export_lm_onnx
from crisp_edge.export.onnx.optimum import (
    OptimumExport,
    export_with_optimum,
    resolve_exporter,
    write_hf_configs,
)
from crisp_edge.export.onnx.quantize import LM_MODES as QUANT_LM_MODES
from crisp_edge.export.onnx.quantize import MODES as QUANT_MODES
from crisp_edge.export.onnx.quantize import REFUSALS as QUANT_REFUSALS
from crisp_edge.export.onnx.quantize import quantize_graph
from crisp_edge.export.onnx.swap_int8 import int8_fold_graph, int8_forward_graph
from crisp_edge.export.parity.compare import tolerance_for
from crisp_edge.export.parity.reference import (
    reference_inputs,
    reference_outputs,
    reference_record,
    resolve_reference,
    write_reference,
)
from crisp_edge.export.parity.task_reference import source_record
from crisp_edge.export.parity.validate import validate_bundle
from crisp_edge.export.quantize import SCHEMES, SWAPPABLE_INT8_WEIGHTS, check_scheme, quantize_record
from crisp_edge.files.fingerprint import bases_fingerprint
from crisp_edge.files.io import atomic_write_json
from crisp_edge.files.mixers import MixerFile, apply_mixers_, model_layout
from crisp_edge.method.convert import (
    _set_submodule,
    is_crisp,
    materialize_,
)

EXPORTER = "torch.onnx.export(dynamo=False)"
DEFAULT_OPSET = 18
#: Opsets the TorchScript exporter writes and ONNX Runtime 1.32 runs: the model graph needs 14 (attention),
#: the fold graph 18 (``Split`` with ``num_outputs``); above 23 torch.onnx refuses.
OPSETS = {"dense": (14, 23), "factored": (18, 23), "swappable": (18, 23)}
BATCH_AXIS = "batch"


class _FedLinear(nn.Module):
    """A linear layer whose weight (and bias, when fed) are read from ``slot``, filled per call."""

    def __init__(self, linear: nn.Linear, slot: dict, weight: str, bias: str | None) -> None:
        super().__init__()
        self.slot, self.weight_key, self.bias_key = slot, weight, bias
        self.bias = None if bias else linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.slot[self.bias_key] if self.bias_key else self.bias
        return F.linear(x, self.slot[self.weight_key], b)


class _WeightsAsInputs(nn.Module):
    """The dense model with the named linear parameters taken from inputs, after the model inputs.

    (``torch.func.functional_call`` refuses to run under the TorchScript tracer, hence the slots.)
    """

    def __init__(self, model: nn.Module, input_names: Sequence[str], params: Sequence[str]) -> None:
        super().__init__()
        self.k, self.params, self.slot = len(input_names), list(params), {}
        fed = set(params)
        for path in sorted({p.rpartition(".")[0] for p in params}):
            linear = model.get_submodule(path)
            bias = f"{path}.bias" if f"{path}.bias" in fed else None
            _set_submodule(model, path, _FedLinear(linear, self.slot, f"{path}.weight", bias))
        self.fwd = _Forward(model, input_names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        self.slot.clear()
        self.slot.update(zip(self.params, args[self.k:]))
        return self.fwd(*args[:self.k])


def _torch_export(module: nn.Module, args: tuple, path: Path, input_names: list[str], dynamic_axes: dict,
                  opset: int, fold_constants: bool) -> onnx.ModelProto:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=input_names,
                          output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=fold_constants)
    proto = onnx.load(str(path))
    path.unlink()
    _strip_wrapper_prefix(proto)
    return proto


def _strip_wrapper_prefix(proto: onnx.ModelProto) -> None:
    """Name initializers by the model's own parameter names (drop the wrappers' ``model.`` prefixes)."""
    taken = {t.name for t in proto.graph.initializer} | {v.name for v in proto.graph.input}
    rename = {}
    for t in proto.graph.initializer:
        new = t.name
        for prefix in ("fwd.model.", "model."):
            if new.startswith(prefix):
                new = new[len(prefix):]
                break
        if new != t.name and new not in taken:
            rename[t.name] = new
            taken.add(new)
    for t in proto.graph.initializer:
        t.name = rename.get(t.name, t.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _tolerance_record(mode: str, quantize: str | None) -> dict[str, Any]:
    dtype = "float32" if quantize is None else SCHEMES[quantize]["dtype"]
    tol = tolerance_for("onnxruntime", mode, dtype)
    return {"atol": tol.atol, "min_cosine": tol.min_cosine, "dtype": dtype, "reason": tol.reason}


def export_onnx(model: nn.Module, out_dir: str | os.PathLike, *, mode: str = "swappable",
                example_input: torch.Tensor | dict[str, torch.Tensor] | None = None,
                tasks: Sequence[str | os.PathLike | MixerFile] = (), opset: int = DEFAULT_OPSET,
                overwrite: bool = False, threads: int = 1, reference_device: str = "auto",
                reference_dtype: str = "float32", exporter: str = "torch", quantize: str | None = None,
                checkpoint: str | os.PathLike | None = None, tokenizer: Any = None,
                max_seq_len: int | None = None) -> OnnxBundle:
    """Export ``model`` (a CRISP model; a plain one for ``dense``) to an ONNX bundle at ``out_dir``.

    Args:
        mode: "dense", "factored" or "swappable" (see the module docstring).
        example_input: a float32 tensor (input name ``x``) or a dict of named tensors; axis 0 is the
            dynamic batch axis. Default: ``crisp_edge.testing.example_inputs(model)``.
        tasks: mixer files to ship as ``tasks/<task>.onnx_adapter`` (swappable only); each is
            checked against the model and gets PyTorch reference outputs for validation.
        overwrite: replace an existing ``out_dir``.
        threads: ORT intra-op threads for the validation run.
        reference_device: where the PyTorch reference runs: "auto" (CUDA when present, else CPU),
            "cpu" or "cuda" (``crisp_edge.export.parity.reference``); recorded in the manifest.
        reference_dtype: "float32" or "float64" (a tighter reference); recorded in the manifest.
        exporter: "torch" (TorchScript, every model and mode), "optimum" (Hugging Face ViT / LLaMA,
            dense only; integer token inputs supported) or "auto" (see the module docstring).
        quantize: None (float32) or "int8" (``crisp_edge.export.quantize``: int8 per-channel weights,
            dynamic int8 activations, by ONNX Runtime's ``quantize_dynamic``; dense, or swappable with the int8
            weights and scales as task inputs written at each switch: ``onnx/swap_int8.py``), or for a causal
            language model also "int4" (``MatMulNBits``, 4-bit blocks of 32); recorded in the manifest; parity
            then uses the scheme's tolerance.
        checkpoint: the checkpoint folder ``model`` was loaded from, recorded in the manifest (``source``) so
            that tasks added later (``export-task``) get their PyTorch reference from it.
        tokenizer, max_seq_len: a causal language model (``LlamaForCausalLM``) exports with a key/value cache
            through ``crisp_edge.export.onnx.lm_export`` (optimum's with-past graph whatever ``exporter``
            says; dense or swappable): its Hugging Face fast tokenizer is stored in the bundle, and
            ``max_seq_len`` (default 256) is the longest sequence a session accepts.

    Returns the validated ``OnnxBundle``; raises ``ParityError`` if ORT disagrees with PyTorch.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode != "dense" and not is_crisp(model):
        raise ConfigError(f"mode {mode!r} needs a CRISP model (retrofit_ it first); a plain model exports as 'dense'.")
    if tasks and mode != "swappable":
        raise ConfigError(f"tasks need mode='swappable' ({mode!r} bundles hold one fixed set of weights; "
                          "apply_mixers_ and export that model instead).")
    lm = is_causal_lm(model)
    quantize = check_scheme(quantize, mode, "ONNX Runtime", QUANT_LM_MODES if lm else QUANT_MODES, QUANT_REFUSALS,
                            lm=lm)
    reference = resolve_reference(reference_device, reference_dtype)
    out_dir = Path(out_dir)
    lo, hi = OPSETS[mode]
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ConfigError(f"opset {opset!r:.20} is not supported for a {mode!r} bundle; use {lo}..{hi} "
                          f"(default {DEFAULT_OPSET}).")
    check_replaceable(out_dir, BUNDLE_FORMAT, overwrite)
    check_threads(threads)
    model = model.eval()
    if is_causal_lm(model):
        if example_input is not None:
            raise ConfigError("a language model bundle makes its own reference cases (prefill with and without a "
                              "cache): drop example_input.")
        return export_lm_onnx(model, out_dir, mode=mode, mixers=task_mixers(model, tasks), opset=opset,
                              reference=reference, threads=threads, tokenizer=tokenizer, max_seq_len=max_seq_len,
                              source=source_record(checkpoint, model), quantize=quantize)
    if tokenizer is not None or max_seq_len is not None:
        raise ConfigError("tokenizer and max_seq_len apply to causal language models only.")
    kind = resolve_exporter(model, mode, exporter)
    if kind == "optimum":
        optimum_export = export_with_optimum(model, example_input, opset)
        example, names = {}, optimum_export.input_names
    else:
        optimum_export = None
        example = _example_inputs(model, example_input)
        names = list(example)
    mixers = task_mixers(model, tasks)
    return write_validated(out_dir, lambda folder: _write_bundle(model, folder, mode, example, names, mixers, opset,
                                                                 reference, optimum_export, quantize,
                                                                 source_record(checkpoint, model)),
                           OnnxBundle, threads=threads, validate=validate_bundle)


def _write_bundle(model: nn.Module, folder: Path, mode: str, example: dict, names: list[str],
                  mixers: list[MixerFile], opset: int, reference: dict, optimum_export: OptimumExport | None = None,
                  quantize: str | None = None, source: dict | None = None) -> dict:
    args = tuple(example[n] for n in names) if optimum_export is None else ()
    axes = {n: {0: BATCH_AXIS} for n in names}
    axes[OUTPUT_NAME] = {0: BATCH_AXIS}
    models, files, swap = {}, {}, None
    if optimum_export is not None:  # dense, exported by optimum (onnx_optimum)
        proto, axes = optimum_export.proto, optimum_export.dynamic_axes
    elif mode == "dense":
        dense = copy.deepcopy(model)
        if is_crisp(dense):
            materialize_(dense)
        proto = _torch_export(_Forward(dense, names), args, folder / "tmp.onnx", names, axes, opset, True)
    elif mode == "factored":
        proto = _torch_export(_Forward(copy.deepcopy(model), names), args, folder / "tmp.onnx", names, axes, opset,
                              False)
    else:
        fold, spec = build_fold_graph(model, opset)
        outputs = spec.outputs
        if quantize:  # the fold's CRISP weights leave it as int8 codes and scales (swap_int8)
            fold, outputs = int8_fold_graph(fold, spec)
        written = save_onnx(fold, folder / "fold.onnx")
        models["fold"] = {"file": "fold.onnx", "inputs": [], "outputs": list(outputs),
                          "overridable": spec.overridable}
        files.update({f: None for f in written})
        dense = materialize_(copy.deepcopy(model))
        params = list(spec.outputs.values())
        state = dict(dense.named_parameters())
        w_names = list(spec.outputs)
        for out, p in spec.outputs.items():
            if spec.head and p.startswith(spec.head + "."):
                axes[out] = {0: CLASS_AXIS}
        if spec.head:
            axes[OUTPUT_NAME] = {0: BATCH_AXIS, 1: CLASS_AXIS}
        module = _WeightsAsInputs(dense, names, params)
        proto = _torch_export(module, args + tuple(state[p].detach() for p in params), folder / "tmp.onnx",
                              names + w_names, axes, opset, True)
        if quantize:
            proto, tool = int8_forward_graph(proto, spec, {p: state[p].detach().numpy() for p in params})
        else:
            proto = take_folded_weights(proto, spec)
        layout = model_layout(model)
        fp = bases_fingerprint(model)
        head = None
        if spec.head:
            h = model.get_submodule(spec.head)
            head = {"path": spec.head, "in_features": h.in_features, "num_classes": h.out_features,
                    "bias": h.bias is not None}
        swap = {"bases_sha256": fp, "layout": layout, "adapter_model_version": bundle_tag(fp, layout),
                "overridable": spec.overridable, "weights": outputs, "head": head,
                "task_semantics": "exported tensors, with the adapter's tensors replacing theirs"}
    written = save_onnx(proto, folder / "model.onnx")
    files.update({f: None for f in written})
    quant = None
    if quantize is not None:  # a swappable graph was quantized above (swap_int8), a dense one is quantized here
        quant = (quantize_record(quantize, tool, SWAPPABLE_INT8_WEIGHTS) if swap is not None
                 else quantize_record(quantize, quantize_graph(folder / "model.onnx", quantize)))
    if mode == "dense":  # a plain model.onnx: with its HF config files, optimum's ORTModelFor... loads the bundle
        files.update({f: None for f in write_hf_configs(model, folder)})
    models["model"] = {"file": "model.onnx", "inputs": names + ([] if swap is None else list(swap["weights"])),
                       "outputs": [OUTPUT_NAME]}

    cases = optimum_export.cases if optimum_export is not None else reference_inputs(example)
    run_ref = {"output_names": [OUTPUT_NAME], "device": reference["device"], "dtype": reference["dtype"]}
    ref = {"default": reference_outputs(model, cases, **run_ref)}
    tasks = {}
    if swap is not None:
        for mf in mixers:
            task_model = copy.deepcopy(model)
            apply_mixers_(task_model, mf)
            ref[mf.task] = reference_outputs(task_model, cases, **run_ref)
            rel = f"{TASKS_DIR}/{mf.task}{ADAPTER_SUFFIX}"
            arrays = adapter_arrays(mf, swap, str(mf.path or mf.task))
            write_adapter(arrays, folder / rel, swap["adapter_model_version"])
            tasks[mf.task] = task_record(rel, (folder / rel).read_bytes(), mf, arrays)
    write_reference(folder, cases, ref)
    files[REFERENCE] = None
    files = {f: file_record(folder, f) for f in files}
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    stored = _stored_params(model)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "crisp_edge_version": __version__, "mode": mode,
        "opset": opset, "exporter": optimum_export.record if optimum_export is not None else {
            "name": EXPORTER, "kind": "torch", "torch": torch.__version__, "onnx": onnx.__version__,
            "do_constant_folding": mode != "factored"},
        "arch": getattr(model, "crisp_arch", None), "models": models, "files": files,
        "inputs": io_record(graph, names), "outputs": io_record(graph, [OUTPUT_NAME], outputs=True),
        "dynamic_axes": {k: {str(a): v for a, v in d.items()} for k, d in axes.items()},
        "tolerance": _tolerance_record(mode, quantize),
        "reference": reference_record(names, [OUTPUT_NAME], len(cases), list(ref), **reference),
        "params": params_record(model, stored),
        "tasks": tasks,
    }
    add_sections(manifest, quantize=quant, source=source, swappable=swap)
    bundle = OnnxBundle(folder, manifest)
    manifest["params"]["weights_bytes"] = bundle.weights_bytes()
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest

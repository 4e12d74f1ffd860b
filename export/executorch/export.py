"""Export a CRISP model to an ExecuTorch bundle: ``dense``, ``factored`` or ``swappable``; XNNPACK or portable.

    bundle = export_executorch(model, "bundle/", mode="swappable", recipe="xnnpack", tasks=["mnist.mixers.safetensors"])
    sess = bundle.session(threads=1); sess.set_task("mnist"); logits = sess(x)

Modes (DESIGN.md sections 3-4):

* ``dense``: a deep copy is ``materialize_``-d and lowered: the original architecture with folded
  weights, exactly what the plain XNNPACK recipe gives a dense model. Fastest, largest.
* ``factored``: the CRISP model itself; every forward builds W = reshape(B @ G(A)) in the graph. With
  XNNPACK the computed-weight linears need ``force_non_static_weights_for_f32_linear`` (else they fall
  back to portable kernels, ~47x slower); that flag breaks the conv patch embedding, so convolutions
  are lowered first by a conv-only partitioner. Smallest file; slower forward.
* ``swappable``: switch-then-dense in one program. Every CRISP linear's weight (and the head) is a
  mutable buffer; the method ``set_task(mixers..., head.weight, head.bias)`` rebuilds them in place from
  the bases (constants of the program, stored once) and ``forward`` reads them at dense speed. Programs
  are emitted with ``share_mutable_buffers=True`` and ``emit_mutable_buffer_names=True`` so both methods
  see one copy of the buffers. ``set_task`` folds each group with crisp-edge's operator ``crisp::fold_``
  (``export/executorch/custom_ops.py``; the manifest's ``custom_ops`` lists the kernels a program needs), which writes
  the group's weights in place into the buffers; a group it does not take (a transposed one, a "post" or
  "temp" placement) runs a product per layer, written back as soon as it is built, so ``set_task``'s own
  planned memory is at most one layer's product, not a second copy of the weights
  (``lowering._write_back_early``, ``lowering._shared_buffer_planning``). A constant method ``crisp_tag`` returns the bases-and-layout tag that
  every task ``.ptd`` must carry (``et_tasks``). Every program (all modes) also has ``crisp_io``: the
  tag of its I/O contract (names, order, shapes; ``digest.io_tag``), so a loader can tell that the
  manifest describing it was not edited. Tasks are ``tasks/<name>.ptd``; the exported mixers are
  ``default.ptd``. The head has a fixed capacity (``max_classes``): smaller heads are zero-padded and
  outputs are cut to the task's class count by the loaders.
  ``forward`` before any ``set_task`` fails in the runtime itself (the task guard, ``_SwapProgram``), so
  a plain ``Runtime.load_program(pte, data_path=ptd)`` or C++ ``Module(pte, ptd)`` never returns zeros.

Recipes: ``xnnpack`` (delegate to XNNPACK, fp32; tolerance 1e-3) and ``portable`` (ExecuTorch's portable
kernels, no delegate; tolerance 1e-4). timm's fused attention (``F.scaled_dot_product_attention``)
decomposes into ops XNNPACK does not take, so it is turned off on the copy that is lowered
(``fused_attn = False`` on every module that has the flag): the attention matmuls and softmax stay
delegated. The ops left outside the delegate after lowering are recorded in the manifest
(``non_delegated_ops``), e.g. ``native_layer_norm``.

ExecuTorch programs have static shapes: the batch size is the example input's (``batch`` records it).
Every export is validated in ExecuTorch (``validate_bundle``, the parity library) in a temporary folder next to
``out_dir`` and only then renamed into place.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
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
from crisp_edge.export.errors import ExportError
from crisp_edge.export.writing import add_sections, check_replaceable, params_record, write_validated
from crisp_edge.export.executorch.bundle import (
    DEFAULT_PTD,
    ET_BUNDLE_FORMAT,
    ET_BUNDLE_VERSION,
    PROGRAM,
    PTD_SUFFIX,
    RECIPES,
    RUNNER_SPEC,
    EtBundle,
)
from crisp_edge.export.executorch.custom_ops import crisp_ops
from crisp_edge.export.executorch.digest import IO_METHOD, io_tag
from crisp_edge.export.executorch.lowering import lower
from crisp_edge.export.executorch.programs import _SetTaskView, _SwapProgram, _unfuse_attention
from crisp_edge.export.executorch.quantize import LM_MODES as QUANT_LM_MODES
from crisp_edge.export.executorch.quantize import MODES as QUANT_MODES
from crisp_edge.export.executorch.quantize import REFUSALS as QUANT_REFUSALS
from crisp_edge.export.executorch.quantize import RECIPES as QUANT_RECIPES
from crisp_edge.export.executorch.quantize import SWAPPABLE_INT8_TOOL
from crisp_edge.export.executorch.quantize import quantize_module
from crisp_edge.export.parity.compare import tolerance_for
from crisp_edge.export.quantize import SCHEMES, SWAPPABLE_INT8_WEIGHTS, check_scheme, quantize_record
from crisp_edge.export.executorch.runner_spec import runner_spec
from crisp_edge.export.lm import is_causal_lm
from crisp_edge.export.executorch.tasks import task_arrays, task_record, write_task_ptd
from crisp_edge.export.model_io import (
    OUTPUT_NAME,
    _example_inputs,
    _Forward,
    _stored_params,
)
from crisp_edge.export.parity.reference import (
    REFERENCE_SEED,
    reference_inputs,
    reference_outputs,
    reference_record,
    resolve_reference,
    write_reference,
)
from crisp_edge.export.parity.task_reference import source_record
from crisp_edge.export.parity.validate import validate_bundle
from torch import nn

from crisp_edge._version import __version__
from crisp_edge.errors import ConfigError
from crisp_edge.files.fingerprint import bases_fingerprint
from crisp_edge.files.io import atomic_write_json
from crisp_edge.files.mixers import (
    MixerFile,
    apply_mixers_,
    head_module,
    model_layout,
)
from crisp_edge.method.convert import crisp_bases, is_crisp, materialize_

#: Reference cases stored (each of the program's static batch size).
REFERENCE_CASES = 2
# torchao (imported by ExecuTorch's XNNPACK backend) registers an Enum with torch's pytree, which logs a
# deprecation warning meant for torchao's developers on every import; keep it out of users' terminals.
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "register_constant() on Enum subclasses" not in record.getMessage())


def _tolerance_record(mode: str, recipe: str, quantize: str | None) -> dict[str, Any]:
    dtype = "float32" if quantize is None else SCHEMES[quantize]["dtype"]
    tol = tolerance_for("executorch", mode, dtype, recipe=recipe)
    return {"atol": tol.atol, "min_cosine": tol.min_cosine, "dtype": dtype, "reason": tol.reason}


def export_executorch(model: nn.Module, out_dir: str | os.PathLike, *, mode: str = "swappable",
                      recipe: str = "xnnpack", tasks: Sequence[str | os.PathLike | MixerFile] = (),
                      example_input: torch.Tensor | dict[str, torch.Tensor] | None = None,
                      max_classes: int | None = None, overwrite: bool = False, threads: int = 1,
                      validate: bool = True, reference_device: str = "auto",
                      reference_dtype: str = "float32", quantize: str | None = None,
                      checkpoint: str | os.PathLike | None = None, tokenizer: Any = None,
                      max_seq_len: int | None = None) -> EtBundle:
    """Export ``model`` (a CRISP model; a plain one for ``dense``) to an ExecuTorch bundle at ``out_dir``.

    Args:
        mode: "dense", "factored" or "swappable" (see the module docstring).
        recipe: "xnnpack" or "portable".
        tasks: mixer files to ship as ``tasks/<task>.ptd`` (swappable only), checked against the model;
            each gets PyTorch reference outputs for validation.
        example_input: a float32 tensor (input ``x``) or dict of named tensors; its shapes (batch
            included) are the program's. Default: ``crisp_edge.testing.example_inputs(model, batch=2)``.
        max_classes: swappable: the head's capacity (default: the largest head of the model and tasks).
        threads: ExecuTorch threads for the validation run.
        validate: run the bundle in ExecuTorch against the PyTorch reference before moving it into place.
        reference_device, reference_dtype: where and in which dtype the PyTorch reference runs ("auto" =
            CUDA when present; "float64" for a tighter reference), as in ``crisp_edge.export.parity.reference``.
        quantize: None (float32) or "int8" (``crisp_edge.export.quantize``: XNNPACK's int8 per-channel
            weights with dynamically quantized activations, through PT2E; dense mode, xnnpack recipe; in a
            swappable bundle the CRISP linears run ``crisp::qlinear`` over int8 buffers that ``set_task`` writes
            with ``crisp::fold_quant_`` from int8 bases, one scale per term, ``executorch/quantize.py``
            SWAPPABLE_INT8_TOOL), or for a
            causal language model also "int4" (torchao 8da4w, groups of 32); recorded in the manifest; parity
            then uses the scheme's tolerance.
        checkpoint: the checkpoint folder ``model`` was loaded from, recorded in the manifest (``source``) so
            that tasks added later (``export-task``) get their PyTorch reference from it.
        tokenizer, max_seq_len: a causal language model (``LlamaForCausalLM``) exports with a static
            key/value cache of ``max_seq_len`` positions (default 256) and its tokenizer stored in the bundle
            (``crisp_edge.export.executorch.lm_export``); other arguments as above (no ``example_input``).

    Returns the ``EtBundle``; raises ``ParityError`` if ExecuTorch disagrees with PyTorch.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
    if recipe not in RECIPES:
        raise ConfigError(f"recipe must be one of {RECIPES}, got {recipe!r}.")
    if mode != "dense" and not is_crisp(model):
        raise ConfigError(f"mode {mode!r} needs a CRISP model (retrofit_ it first); a plain model exports as 'dense'.")
    if tasks and mode != "swappable":
        raise ConfigError(f"tasks need mode='swappable' ({mode!r} bundles hold one fixed set of weights).")
    lm = is_causal_lm(model)
    quantize = check_scheme(quantize, mode, "ExecuTorch", QUANT_LM_MODES if lm else QUANT_MODES, QUANT_REFUSALS, lm=lm)
    if quantize is not None and recipe not in QUANT_RECIPES[quantize]:
        raise ConfigError(f"quantize={quantize!r} needs recipe in {QUANT_RECIPES[quantize]} (the portable kernels have "
                          f"no quantized linear); got recipe={recipe!r}.")
    reference = resolve_reference(reference_device, reference_dtype)
    out_dir = Path(out_dir)
    check_replaceable(out_dir, ET_BUNDLE_FORMAT, overwrite)
    check_threads(threads)
    model = model.eval()
    if lm:
        from crisp_edge.export.executorch.lm_export import export_lm_executorch

        if example_input is not None:
            raise ConfigError("a causal language model exports with tokens as inputs: example_input does not apply "
                              "(set max_seq_len for the cache length).")
        return export_lm_executorch(model, out_dir, mode=mode, recipe=recipe, mixers=task_mixers(model, tasks),
                                    threads=threads, validate=validate, reference=reference, tokenizer=tokenizer,
                                    max_seq_len=max_seq_len, source=source_record(checkpoint, model),
                                    quantize=quantize)
    if tokenizer is not None or max_seq_len is not None:
        raise ConfigError("tokenizer and max_seq_len apply to causal language models (LlamaForCausalLM) only.")
    example = _example_inputs(model, example_input)
    mixers = task_mixers(model, tasks)
    return write_validated(out_dir, lambda folder: _write_bundle(model, folder, mode, recipe, example, mixers,
                                                                 max_classes, reference, quantize,
                                                                 source_record(checkpoint, model)),
                           EtBundle, threads=threads, validate=validate_bundle if validate else None)


def _io(names: list[str], example: dict[str, torch.Tensor]) -> list[dict]:
    return [{"name": n, "dtype": str(example[n].dtype).removeprefix("torch."), "shape": list(example[n].shape)}
            for n in names]


def _write_bundle(model: nn.Module, folder: Path, mode: str, recipe: str, example: dict,
                  mixers: list[MixerFile], max_classes: int | None, reference: dict,
                  quantize: str | None = None, source: dict | None = None) -> dict:
    names = list(example)
    args = tuple(example[n] for n in names)
    files: list[str] = [PROGRAM]
    swap = quant = None
    with torch.no_grad():  # the I/O contract the program carries as crisp_io (digest.io_spec_text)
        out_shape = list(_Forward(model, names).eval()(*args).shape)
    contract: dict[str, Any] = {"mode": mode, "inputs": _io(names, example),
                                "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": out_shape}]}
    if mode in ("dense", "factored"):
        m = copy.deepcopy(model)
        if mode == "dense" and is_crisp(m):
            materialize_(m)
        for p in m.parameters():
            p.requires_grad_(False)
        _unfuse_attention(m)
        program = _Forward(m, names).eval()
        if quantize is not None:
            program, tool = quantize_module(program, args, quantize)
            quant = quantize_record(quantize, tool)
        pte, ops = lower({"forward": program}, {"forward": args}, recipe, mode,
                         constant_methods={IO_METHOD: io_tag(contract)})
    else:
        found = head_module(model)
        head = None
        if found is not None:
            counts = [found[1].out_features] + [int(mf.tensors["head.weight"].shape[0])
                                                for mf in mixers if "head.weight" in mf.tensors]
            cap = max_classes if max_classes is not None else max(counts)
            if cap < max(counts):
                raise ConfigError(f"max_classes={cap} is smaller than a head to ship ({max(counts)} classes).")
            head = {"path": found[0], "in_features": found[1].in_features, "num_classes": found[1].out_features,
                    "max_classes": cap}
        fp, layout = bases_fingerprint(model), model_layout(model)
        prog = _SwapProgram(model, names, head["max_classes"] if head else None, bundle_tag(fp, layout),
                            quantize=quantize).eval()
        if quantize is not None:
            quant = quantize_record(quantize, SWAPPABLE_INT8_TOOL, SWAPPABLE_INT8_WEIGHTS)
        view = copy.copy(prog)
        view.__class__ = _SetTaskView  # shares every submodule: the buffers keep their names
        bases = crisp_bases(model)
        inputs = [{"name": f"mixer.{key}", "shape": [len(layers), bases[key].weight.shape[1], bases[key].s]}
                  for key, _, layers, *_ in prog.groups]
        if head:
            inputs += [{"name": "head.weight", "shape": [head["max_classes"], head["in_features"]]},
                       {"name": "head.bias", "shape": [head["max_classes"]]}]
        swap = {"bases_sha256": fp, "layout": layout, "tag": bundle_tag(fp, layout),
                "set_task_inputs": inputs, "head": head,
                "task_semantics": "exported tensors, with the task file's tensors replacing theirs"}
        set_args = tuple(torch.zeros(i["shape"]) for i in inputs)
        pte, ops = lower({"forward": prog, "set_task": view}, {"forward": args, "set_task": set_args}, recipe, mode,
                         constant_methods={"crisp_tag": swap["tag"], IO_METHOD: io_tag({**contract, "swappable": swap})})
    (folder / PROGRAM).write_bytes(pte)

    batches = [int(args[0].shape[0])] * REFERENCE_CASES  # static shapes: every case has the program's batch
    cases = reference_inputs(example, batches=batches, seed=REFERENCE_SEED)

    def outputs(m: nn.Module) -> list[dict]:
        return reference_outputs(m, cases, output_names=[OUTPUT_NAME], **reference)

    ref = {"default": outputs(model)}
    tasks = {}
    if swap is not None:
        default = {f"mixer.{k}": torch.stack([model.get_submodule(n).crisp_mixer.detach() for n in b.layer_names])
                   for k, b in crisp_bases(model).items()}
        if swap["head"]:
            h = model.get_submodule(swap["head"]["path"])
            default["head.weight"] = h.weight.detach()
            default["head.bias"] = h.bias.detach() if h.bias is not None else torch.zeros(h.out_features)
        write_task_ptd({k: v.float().contiguous().numpy() for k, v in default.items()}, folder / DEFAULT_PTD,
                       swap["tag"])
        files.append(DEFAULT_PTD)
        for mf in mixers:
            task_model = copy.deepcopy(model)
            apply_mixers_(task_model, mf)
            ref[mf.task] = outputs(task_model)
            rel = f"{TASKS_DIR}/{mf.task}{PTD_SUFFIX}"
            arrays = task_arrays(mf, swap, str(mf.path or mf.task))
            write_task_ptd(arrays, folder / rel, swap["tag"])
            tasks[mf.task] = task_record(rel, (folder / rel).read_bytes(), mf, arrays)
    write_reference(folder, cases, ref)
    files.append(REFERENCE)
    if list(ref["default"][0][OUTPUT_NAME].shape) != out_shape:
        raise ExportError(f"the reference output has shape {list(ref['default'][0][OUTPUT_NAME].shape)}, the program "
                          f"was lowered for {out_shape}.")
    stored = _stored_params(model)
    import executorch

    manifest: dict[str, Any] = {
        "format": ET_BUNDLE_FORMAT, "version": ET_BUNDLE_VERSION, "crisp_edge_version": __version__, "mode": mode,
        "recipe": recipe,
        "exporter": {"name": "torch.export + executorch.exir.to_edge_transform_and_lower", "torch": torch.__version__,
                     "executorch": getattr(getattr(executorch, "version", None), "__version__", "unknown"),
                     "fused_attention": False},
        "arch": getattr(model, "crisp_arch", None), "program": {"file": PROGRAM, "methods": sorted(ops)
                                                                + (["crisp_tag"] if swap else []) + [IO_METHOD]},
        "custom_ops": crisp_ops(ops),  # kernels the runtime must register before it loads the program
        "files": {f: file_record(folder, f) for f in files},
        "inputs": _io(names, example),
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": out_shape}],
        "batch": int(args[0].shape[0]),
        "non_delegated_ops": ops,
        "tolerance": _tolerance_record(mode, recipe, quantize),
        "reference": reference_record(names, [OUTPUT_NAME], len(cases), list(ref), batches=batches,
                                      seed=REFERENCE_SEED, **reference),
        "params": {**params_record(model, stored), "program_bytes": (folder / PROGRAM).stat().st_size},
        "tasks": tasks,
    }
    add_sections(manifest, quantize=quant, source=source, swappable=swap)
    (folder / RUNNER_SPEC).write_text(runner_spec(manifest))
    manifest["files"][RUNNER_SPEC] = file_record(folder, RUNNER_SPEC)
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


__all__ = ["export_executorch", "lower"]

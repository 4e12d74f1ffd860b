"""ONNX Runtime bundles of CRISP causal language models, with a key/value cache (``export_onnx`` routes here).

    bundle = export_onnx(crisp_llama, "lm/", mode="swappable", tasks=["kjv.mixers.safetensors"],
                         tokenizer=hf_tokenizer, max_seq_len=256)
    sess = bundle.session(threads=1); sess.generate("In the beginning", 32, task="kjv")

The graph is optimum's ``text-generation-with-past`` export of ``LlamaForCausalLM`` (on a materialized
copy): inputs ``input_ids``, ``attention_mask`` [batch, past + new], ``position_ids`` and
``past_key_values.{i}.key/.value`` [batch, kv_heads, past, head_dim]; outputs ``logits`` and
``present.{i}.key/.value`` (past and new together). ``onnxruntime``'s and optimum's own
``ORTModelForCausalLM`` run a dense bundle as it is (its ``config.json`` is written beside it).

Both modes export *without* constant folding (``lm_graph``): every weight is one initializer named by its
parameter, feeding a ``Transpose`` then ``MatMul`` (SmolLM2's tied embedding / ``lm_head`` is stored once:
folded, the file held its transpose too, 21% more bytes). ``swappable`` reuses the ViT bundles'
switch-then-dense machinery (``fold.py``, ``adapter.py``, ``session.py``): that graph with every CRISP layer's
weight initializer replaced by a graph input that takes the fold graph's output for it
(``weights_as_inputs``, then ``take_folded_weights``: a free reshape in the graph). The LM head is not
a task tensor (``build_fold_graph(head=False)``): it is the vocabulary projection, tied to the
embedding in SmolLM2, and a task is its mixers alone (``save_mixers(..., head=False)``). Each large weight's product then gets two
paths, an ``If`` on the number of new tokens (``lm_paths``): prefill multiplies by the non-constant weight in
the form ONNX Runtime runs fastest for many tokens, decode in the one it runs fastest for one; the
manifest's ``swappable.prefill_flipped`` lists those weights (fold outputs).

The manifest is the ONNX bundle's plus an ``lm`` section (``crisp_edge.export.lm``): ``max_seq_len``
(recorded and enforced by the session; default 256, at most the model's ``max_position_embeddings``),
the tokenizer when the model came with one (``tokenizer.json``, hash-pinned), and a greedy generation
reference per task from the PyTorch model with that task's mixers applied. The tensor reference
(``reference.npz``) holds two prefill cases: an empty cache (batch 2), and three new tokens after a
cache of four (batch 3, the last row's last token padded) so the past inputs are checked too.

``quantize`` ("int8" / "int4", dense only: ``export.quantize``) rewrites the graph with ONNX Runtime's own
quantizers (``onnx.quantize.quantize_lm_graph``) before it is saved; the references stay the float32 PyTorch
model's, checked under the scheme's named LM tolerance (``parity.compare``: teacher-forced logits and top-1
agreement, greedy tokens reported), and the manifest records the scheme (``quantize``).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from crisp_edge._version import __version__
from crisp_edge.errors import ConfigError
from crisp_edge.export.bundle import MANIFEST, REFERENCE, TASKS_DIR, bundle_tag, file_record
from crisp_edge.export.errors import ExportError
from crisp_edge.export.lm import (
    lm_section, record_references, reference_prompts, resolve_max_seq_len, task_models)
from crisp_edge.export.model_io import _stored_params
from crisp_edge.export.onnx.adapter import adapter_arrays, task_record, write_adapter
from crisp_edge.export.onnx.bundle import ADAPTER_SUFFIX, BUNDLE_FORMAT, BUNDLE_VERSION, OnnxBundle, io_record, save_onnx
from crisp_edge.export.onnx.fold import build_fold_graph, take_folded_weights
from crisp_edge.export.onnx.lm_paths import flip_candidates, two_path_graph
from crisp_edge.export.onnx.optimum import _versions, optimum_available, optimum_graph, write_hf_configs
from crisp_edge.export.onnx.quantize import quantize_lm_graph, weights_text
from crisp_edge.export.parity.compare import tolerance_for
from crisp_edge.export.parity.lm_check import WithPast, cache_names, lm_tolerance
from crisp_edge.export.parity.reference import reference_outputs, reference_record, write_reference
from crisp_edge.export.parity.validate import validate_bundle
from crisp_edge.export.quantize import SCHEMES, quantize_record
from crisp_edge.export.writing import add_sections, params_record, write_validated
from crisp_edge.files.fingerprint import bases_fingerprint
from crisp_edge.files.io import atomic_write_json
from crisp_edge.files.mixers import MixerFile, model_layout
from crisp_edge.generation import BundleTokenizer, TorchStepper, write_tokenizer

LM_TASK = "text-generation-with-past"
EXPORTER_NAME = "optimum.exporters.onnx.onnx_export_from_model"
#: The reference cases: (batch, cached tokens, new tokens).
LM_CASES = ((2, 0, 6), (3, 4, 3))


def lm_graph(model: nn.Module, opset: int) -> onnx.ModelProto:
    """optimum's with-past graph of a materialized copy of ``model``, exported without constant folding:
    every weight stays one initializer named by its parameter (what ``weights_as_inputs`` needs, and a
    tied ``lm_head`` is stored once; folding would store its transpose too). ONNX Runtime folds the
    transposes at session creation."""
    if not optimum_available():
        raise ExportError("exporting a language model needs optimum 2.1 + optimum-onnx 0.1 with transformers < 4.58 "
                          "(`import optimum.exporters.onnx` fails here); install the export requirements.")
    proto = optimum_graph(model, LM_TASK, opset, do_constant_folding=False)
    n = int(model.config.num_hidden_layers)
    want_in = ["input_ids", "attention_mask", "position_ids"] + cache_names("past_key_values", n)
    want_out = ["logits"] + cache_names("present", n)
    got_in, got_out = [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]
    if got_in != want_in or got_out != want_out:
        raise ExportError(f"optimum's {LM_TASK!r} graph takes {got_in} and returns {got_out}; crisp-edge expects "
                          f"{want_in} and {want_out} (optimum's contract changed?).")
    return proto


def weights_as_inputs(proto: onnx.ModelProto, outputs: dict[str, str]) -> onnx.ModelProto:
    """Replace the initializer of each parameter in ``outputs`` (fold output -> parameter name) by a graph
    input named as the fold output, (d_out, d_in) float32, feeding the same nodes."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    missing = sorted(p for p in outputs.values() if p not in inits)
    if missing:
        raise ExportError(f"the exported graph holds no initializer {missing[0]!r} (of {len(missing)}); the exporter "
                          "renamed or merged weights (two identical layers?), so they cannot be fed per task.")
    rename = {p: out for out, p in outputs.items()}
    keep = [t for t in graph.initializer if t.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    for out, p in outputs.items():
        graph.input.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, list(inits[p].dims)))
    return proto


def lm_cases(model: nn.Module, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The seeded tensor reference cases (``LM_CASES``); a case's cache is the PyTorch model's own."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    wrapper = WithPast(model).eval()
    cases = []
    for batch, cached, new in LM_CASES:
        past = {n: torch.zeros(batch, kv, 0, head_dim) for n in cache_names("past_key_values", wrapper.layers)}
        if cached:
            ids = torch.randint(0, cfg.vocab_size, (batch, cached), generator=g)
            with torch.no_grad():
                out = wrapper(ids, torch.ones(batch, cached, dtype=torch.int64),
                              torch.arange(cached).expand(batch, cached).contiguous(), **past)
            past = {n: out[n.replace("past_key_values", "present")].detach().clone() for n in past}
        mask = torch.ones(batch, cached + new, dtype=torch.int64)
        mask[-1, -1] = 0  # right padding on the last row: the mask is read, not assumed all ones
        cases.append({"input_ids": torch.randint(0, cfg.vocab_size, (batch, new), generator=g),
                      "attention_mask": mask,
                      "position_ids": torch.arange(cached, cached + new).expand(batch, new).contiguous(), **past})
    return cases


def steppers(models: dict[str, nn.Module], max_seq_len: int) -> dict[str, TorchStepper]:
    return {task: TorchStepper(m, max_seq_len) for task, m in models.items()}


def exporter_record() -> dict[str, Any]:
    return {"name": EXPORTER_NAME, "kind": "optimum", "task": LM_TASK, "with_past": True, **_versions(),
            "torch": torch.__version__, "onnx": onnx.__version__, "do_constant_folding": False}


def swappable_graph(model: nn.Module, opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto, Any, list[str]]:
    """(fold graph, inference graph taking the fold's outputs, fold spec, the fold outputs whose products the
    prefill path flips) of a CRISP causal LM (``lm_paths``: a prefill and a decode path in one graph)."""
    fold, spec = build_fold_graph(model, opset, head=False)
    proto = take_folded_weights(weights_as_inputs(lm_graph(model, opset), spec.outputs), spec)
    proto, flipped = two_path_graph(proto, flip_candidates(spec.folded))
    return fold, proto, spec, sorted(w[:-len(".dense")] for w in flipped)


def export_lm_onnx(model: nn.Module, out_dir: Path, *, mode: str, mixers: Sequence[MixerFile], opset: int,
                   reference: dict, threads: int, tokenizer: Any = None, max_seq_len: int | None = None,
                   source: dict | None = None, quantize: str | None = None) -> Any:
    """Write and validate the LM bundle (``export_onnx`` checked the common arguments, ``quantize`` included,
    and routes here)."""
    if mode not in ("dense", "swappable"):
        raise ConfigError(f"a language model exports as 'dense' or 'swappable' (with a key/value cache), not {mode!r}.")
    seq = resolve_max_seq_len(model, max_seq_len)
    return write_validated(out_dir, lambda folder: _write_lm_bundle(model, folder, mode, mixers, opset, reference, seq,
                                                                    tokenizer, source, quantize),
                           OnnxBundle, threads=threads, validate=validate_bundle)


def _write_lm_bundle(model: nn.Module, folder: Path, mode: str, mixers: Sequence[MixerFile], opset: int,
                     reference: dict, max_seq_len: int, tokenizer: Any, source: dict | None,
                     quantize: str | None = None) -> dict:
    models, files, swap, quant = {}, [], None, None
    if mode == "dense":
        proto = lm_graph(model, opset)
        if quantize is not None:
            proto, tool = quantize_lm_graph(proto, quantize)
            quant = quantize_record(quantize, tool, weights=weights_text(quantize))
    else:
        fold, proto, spec, flipped = swappable_graph(model, opset)
        files += save_onnx(fold, folder / "fold.onnx")
        models["fold"] = {"file": "fold.onnx", "inputs": [], "outputs": list(spec.outputs), "overridable": spec.overridable}
        layout, fp = model_layout(model), bases_fingerprint(model)
        swap = {"bases_sha256": fp, "layout": layout, "adapter_model_version": bundle_tag(fp, layout),
                "overridable": spec.overridable, "weights": spec.outputs, "head": None,
                "prefill_flipped": flipped,
                "task_semantics": "exported tensors, with the adapter's tensors replacing theirs"}
    graph = proto.graph
    names = [v.name for v in graph.input if not (swap and v.name in swap["weights"])]
    outs = [v.name for v in graph.output]
    files += save_onnx(proto, folder / "model.onnx")
    if mode == "dense":  # with config.json, optimum's ORTModelForCausalLM loads the bundle as it is
        files += write_hf_configs(model, folder)
    models["model"] = {"file": "model.onnx", "inputs": names + (list(swap["weights"]) if swap else []), "outputs": outs}
    by_task = task_models(model, mixers)
    tasks = {}
    for mf in mixers:
        rel = f"{TASKS_DIR}/{mf.task}{ADAPTER_SUFFIX}"
        arrays = adapter_arrays(mf, swap, str(mf.path or mf.task))
        write_adapter(arrays, folder / rel, swap["adapter_model_version"])
        tasks[mf.task] = task_record(rel, (folder / rel).read_bytes(), mf, arrays)
    cases = lm_cases(model)
    run = partial(reference_outputs, device=reference["device"], dtype=reference["dtype"])
    write_reference(folder, cases, {t: run(WithPast(m), cases, output_names=outs) for t, m in by_task.items()})
    files.append(REFERENCE)
    vocab = int(model.config.vocab_size)
    tok_record = None
    if tokenizer is not None:
        tok_record = write_tokenizer(tokenizer, folder, model.config)
        files.append(tok_record["file"])
    prompts = reference_prompts(BundleTokenizer.load(folder, tok_record, vocab) if tok_record else None, vocab)
    generation = record_references(steppers(by_task, max_seq_len), prompts)
    dtype = "float32" if quant is None else SCHEMES[quantize]["dtype"]
    tol = lm_tolerance("onnxruntime", mode, tolerance_for("onnxruntime", mode), dtype)
    stored = _stored_params(model)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "crisp_edge_version": __version__, "mode": mode,
        "opset": opset, "exporter": exporter_record(), "arch": getattr(model, "crisp_arch", None),
        "models": models, "files": {f: file_record(folder, f) for f in files},
        "inputs": io_record(graph, names), "outputs": io_record(graph, outs, outputs=True),
        "dynamic_axes": {v.name: {str(i): d.dim_param for i, d in enumerate(v.type.tensor_type.shape.dim) if d.dim_param}
                         for v in list(graph.input) + list(graph.output) if v.name in names or v.name in outs},
        "tolerance": {**tol.to_dict(), "dtype": dtype},
        "reference": reference_record(names, outs, len(cases), list(by_task), batches=[c[0] for c in LM_CASES],
                                      **reference),
        "params": params_record(model, stored),
        "tasks": tasks,
        "lm": lm_section(max_seq_len=max_seq_len, vocab_size=vocab, tokenizer_record=tok_record, references=generation),
    }
    add_sections(manifest, quantize=quant, source=source, swappable=swap)
    manifest["params"]["weights_bytes"] = OnnxBundle(folder, manifest).weights_bytes()
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest

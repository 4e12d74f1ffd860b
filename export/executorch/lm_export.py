"""ExecuTorch bundles of CRISP causal language models, with a static key/value cache (``export_executorch``
routes here when the model is a ``LlamaForCausalLM``).

    bundle = export_executorch(crisp_llama, "lm/", mode="swappable", tasks=["kjv.mixers.safetensors"],
                               tokenizer=hf_tokenizer, max_seq_len=256)
    sess = bundle.session(threads=1); sess.generate("In the beginning", 32, task="kjv")

The program's ``forward(tokens int64 [1, T], input_pos int64 [T]) -> logits float32 [1, vocab]`` (the
last position's) serves both the prefill (T up to ``max_seq_len``: a dynamic dimension) and the decode
(T = 1). The key/value cache is Hugging Face's ``StaticCache`` wrapped as ExecuTorch expects
(``transformers.integrations.executorch.TorchExportableModuleWithStaticCache``, what optimum-executorch
exports): one mutable buffer [1, kv_heads, max_seq_len, head_dim] per layer and per K / V, written at
``input_pos`` by ``index_copy_`` (in place in the program: ExecuTorch's reinplace pass); attention sees
the cache up to the last position written, so what a longer earlier sequence left behind is masked out
and a new sequence just starts at ``input_pos`` 0. Only the last position is projected onto the
vocabulary, and grouped query heads attend to the cache as it is (``_grouped_attention``: no copy of
the cache per query head). (ExecuTorch's own Llama export uses its custom ``llama::custom_sdpa`` /
``update_cache`` ops instead, which need the LLM custom-ops library in every runner; the plain ops here
run in any runner. ``bench/bench_lm_et_anchor.py`` compares the two on the same weights.)

``swappable`` is the ViT bundles' switch-then-dense program (``programs._SwapProgram``): every CRISP
layer's weight is a mutable buffer that ``set_task(mixers...)`` rebuilds from the bases, the cache
buffers sit beside them, and the task guard makes ``forward`` fail before any ``set_task``. The LM head
is not a task tensor (it is the vocabulary projection, tied to the embedding in SmolLM2): a task is its
mixers alone. Task files are ``tasks/<name>.ptd`` as for every swappable ExecuTorch bundle.

A swappable XNNPACK program has a third method, ``decode`` (T = 1, what a session runs for one token):
``forward``'s graph with the task weights' products ``crisp::rowmajor_linear``
(``export/executorch/custom_ops.py``), which reads a buffer in place where XNNPACK packs a weight that is not
a constant again at every call (about twice the product itself at one token per step). ``forward`` (the
prefill) keeps XNNPACK with its task products flipped, ``(W @ x^T)^T`` (``programs._FlippedBufLinear``): the
weight buffer is the product's input, read in place, and XNNPACK packs the prompt's activation instead (packing
every weight per prompt held a SmolLM2 prefill at 0.93x of the dense program's). Its vocabulary projection (one position per call in both methods) is
``crisp::rowmajor_linear`` too, reading a tied head's embedding in place: no packed copy in either method.
The manifest's ``custom_ops`` lists the operators; a session registers crisp-edge's kernels before it
loads the program (``session.require_kernels``), the C++ runner compiles them in. A portable swappable
program keeps to stock operators (no ``decode``). The manifest's ``params.head_copy`` counts the parameters a program stores twice
(``params.stored`` counts them once; a dense XNNPACK program holds a tied head twice: the delegate packs
its own).

The manifest is the ExecuTorch bundle's plus ``dynamic_axes`` and the ``lm`` section
(``crisp_edge.export.lm``): ``max_seq_len``, the tokenizer when the model came with one
(``tokenizer.json``, hash-pinned) and a greedy generation reference per task from the PyTorch model with
that task's mixers. ``reference.npz`` holds tensor cases too (prefills of seeded prompts from an empty
cache: the last position's logits), so ``crisp-edge parity`` compares tensors as for every bundle. The
export is validated by generation parity of every task in ExecuTorch.

``quantize`` ("int8" / "int4", dense only: ``export.quantize``) quantizes the dense model's linears with
ExecuTorch's own LLM recipe (``executorch.quantize.quantize_lm_``: torchao 8da8w / 8da4w) before export; the
references stay the float32 PyTorch model's, checked under the scheme's named LM tolerance
(``parity.compare``: teacher-forced logits and top-1 agreement, greedy tokens reported), and the manifest
records the scheme (``quantize``).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from crisp_edge._version import __version__
from crisp_edge.errors import ConfigError
from crisp_edge.export.bundle import MANIFEST, REFERENCE, TASKS_DIR, bundle_tag, file_record
from crisp_edge.export.executorch.bundle import (
    DECODE_METHOD,
    DEFAULT_PTD,
    ET_BUNDLE_FORMAT,
    ET_BUNDLE_VERSION,
    PROGRAM,
    PTD_SUFFIX,
    RUNNER_SPEC,
    EtBundle,
)
from crisp_edge.export.executorch.custom_ops import crisp_ops
from crisp_edge.export.executorch.digest import IO_METHOD, io_tag
from crisp_edge.export.executorch.lowering import lower
from crisp_edge.export.executorch.programs import (
    _FlippedBufLinear,
    _RowMajorBufLinear,
    _SetTaskView,
    _SwapProgram,
    rowmajor_head,
    task_linear_view,
)
from crisp_edge.export.executorch.quantize import quantize_lm_
from crisp_edge.export.executorch.runner_spec import runner_spec
from crisp_edge.export.executorch.tasks import task_arrays, task_record, write_task_ptd
from crisp_edge.export.lm import lm_section, record_references, reference_prompts, resolve_max_seq_len, task_models
from crisp_edge.export.model_io import _stored_params
from crisp_edge.export.parity.compare import tolerance_for
from crisp_edge.export.parity.reference import REFERENCE_SEED, reference_outputs, reference_record, write_reference
from crisp_edge.export.quantize import SCHEMES, quantize_record
from crisp_edge.export.writing import add_sections, params_record, write_validated
from crisp_edge.files.fingerprint import bases_fingerprint
from crisp_edge.files.io import atomic_write_json
from crisp_edge.files.mixers import MixerFile, model_layout
from crisp_edge.generation import BundleTokenizer, TorchStepper, write_tokenizer
from crisp_edge.method.convert import crisp_bases, is_crisp, materialize_

INPUT_NAMES = ("tokens", "input_pos")
OUTPUT_NAME = "logits"
#: Token count of the example the program is traced with (any count > 1 that fits the cache: the token
#: dimension is dynamic; 1 would be specialised away by the tracer).
_EXAMPLE_TOKENS = 4
#: The tensor reference (``reference.npz``, what ``crisp-edge parity`` compares beside generation): seeded
#: prompts of these lengths, each a prefill from an empty cache, and the last position's logits.
REFERENCE_TOKENS = (6, 3)


class _Prefill(nn.Module):
    """The PyTorch reference of a tensor case: ``model``'s last-position logits for ``tokens`` at ``input_pos``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, position_ids=input_pos.unsqueeze(0)).logits[:, -1]


#: The attention the exported programs use (registered with transformers when a program is built).
_GROUPED_ATTENTION = "crisp_grouped_sdpa"


def _grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Grouped-query attention over the static cache without repeating the cache per query head.

    transformers' SDPA attention repeats each key / value head for its G query heads (``repeat_kv``): over
    a static cache that is a copy of the whole cache per layer and step, outside XNNPACK (what ExecuTorch's
    ``llama::custom_sdpa`` avoids). Here the G query heads of a key / value head are stacked along the
    query positions instead (query [1, H, T, d] -> [1, KV, G*T, d], the mask repeated G times), so both
    matrix products are batched over the cache as it is. Written out (scores, mask, softmax, product)
    rather than through ``scaled_dot_product_attention``, whose decomposition the export's strides do not
    survive. Without grouping or a 4-D mask it is transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, t, d = query.shape
    kv, length = key.shape[1], key.shape[-2]
    g = h // kv
    if g == 1 or attention_mask is None or attention_mask.ndim != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    mask = attention_mask[:, :, :, :length]
    if mask.dtype == torch.bool:  # not the programs' own mask (``_additive_mask``): the same add after one where
        mask = _to_additive(mask, query.dtype)
    scores = torch.matmul(query.reshape(b, kv, g * t, d), key.transpose(-1, -2)) * (scaling or d ** -0.5)
    # the mask [b, 1, T, L] broadcast over the G stacked query heads: an add (XNNPACK's), no copy of the mask
    scores = (scores.view(b, kv, g, t, length) + mask.unsqueeze(2)).view(b, kv, g * t, length)
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # [b, kv, g * t, d]
    return out.view(b, kv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h, d), None


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the float mask added to the scores (0 / dtype's minimum)."""
    return torch.where(mask, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))


def _additive_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The export-friendly causal mask (transformers' ``sdpa_without_vmap``) as an additive float mask, built
    once per call: the layers add it to their scores (in XNNPACK) instead of each running a ``where``
    outside the delegate (about 9% of a SmolLM2 prefill)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa_without_vmap"](*args, **kwargs)
    return _to_additive(mask, torch.float32) if mask is not None and mask.dtype == torch.bool else mask


class _StaticCacheLM(nn.Module):
    """``forward(tokens [1, T], input_pos [T]) -> logits [1, vocab]`` of ``model`` (an HF causal LM, changed in
    place: static-cache generation config and the export-friendly SDPA mask) over a static cache of
    ``max_seq_len`` positions. ``.model`` is the HF model, so ``_SwapProgram.set_task`` finds its layers."""

    def __init__(self, model: nn.Module, max_seq_len: int) -> None:
        super().__init__()
        from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

        model.generation_config.use_cache = True
        model.generation_config.cache_implementation = "static"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # registers the vmap-free SDPA mask and switches model's attention to it; keeps the static cache
            wrapped = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len,
                                                            device=torch.device("cpu"))
        self.cache = wrapped.model  # TorchExportableModuleWithStaticCache: the cache buffers
        self.model = model
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # the wrapper's export-friendly mask (additive), with grouped attention instead of SDPA's repeated cache
        ALL_MASK_ATTENTION_FUNCTIONS.register(_GROUPED_ATTENTION, _additive_mask)
        ALL_ATTENTION_FUNCTIONS.register(_GROUPED_ATTENTION, _grouped_attention)
        model.config._attn_implementation = _GROUPED_ATTENTION

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        # TorchExportableModuleWithStaticCache.forward's call, plus logits_to_keep=1: the vocabulary
        # projection of the last position only (of all T, it was most of a prefill's time: 64 x 49152 x 576
        # multiply-adds for SmolLM2), as ExecuTorch's own Llama export does
        out = self.model(input_ids=tokens, cache_position=input_pos, attention_mask=None,
                         past_key_values=self.cache.static_cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]


class _LMSwapProgram(_SwapProgram):
    """The swappable program with the LM's two named inputs (``torch.export``'s dynamic shapes name them)."""

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(tokens, input_pos)


def _programs(model: nn.Module, mode: str, max_seq_len: int, recipe: str,
              quantize: str | None = None) -> tuple[dict, dict, dict | None, dict | None]:
    """(methods to lower, their example inputs, the swappable record or None, the quantize record or None).

    A swappable XNNPACK program gets a ``decode`` method beside ``forward``: the same graph at one token,
    its task weights read in place by ``crisp::rowmajor_linear`` (``programs._RowMajorBufLinear``). XNNPACK
    packs a weight that is not a constant at every call: about twice the product itself at one token per
    step, and held a 64-token SmolLM2 prefill at 0.93x of the dense program's; ``forward`` (the prefill)
    computes its task products flipped (``programs._FlippedBufLinear``: the weight is the input, read in
    place; the prompt's activation is the operand XNNPACK packs). The methods share every buffer."""
    example = (torch.zeros(1, _EXAMPLE_TOKENS, dtype=torch.long), torch.arange(_EXAMPLE_TOKENS))
    if mode == "dense":
        m = copy.deepcopy(model)
        if is_crisp(m):
            materialize_(m)
        for p in m.parameters():
            p.requires_grad_(False)
        quant = None if quantize is None else quantize_record(quantize, quantize_lm_(m, quantize))
        return {"forward": _StaticCacheLM(m, max_seq_len).eval()}, {"forward": example}, None, quant
    fp, layout = bases_fingerprint(model), model_layout(model)
    prog = _LMSwapProgram(model, list(INPUT_NAMES), None, bundle_tag(fp, layout)).eval()
    prog.fwd = _StaticCacheLM(prog.fwd.model, max_seq_len)
    if recipe == "xnnpack":
        rowmajor_head(prog.fwd.model)  # one position per call: read in place, a tied head from the embedding
    view = copy.copy(prog)
    view.__class__ = _SetTaskView  # shares every submodule: the buffers keep their names
    inputs = [{"name": f"mixer.{key}", "shape": [len(layers), *prog.bases[bkey].shape[1:2], crisp_bases(model)[key].s]}
              for key, bkey, layers, *_ in prog.groups]
    swap = {"bases_sha256": fp, "layout": layout, "tag": bundle_tag(fp, layout), "set_task_inputs": inputs,
            "head": None, "task_semantics": "exported tensors, with the task file's tensors replacing theirs"}
    set_args = tuple(torch.zeros(i["shape"]) for i in inputs)
    methods, examples = {"forward": prog, "set_task": view}, {"forward": example, "set_task": set_args}
    if recipe == "xnnpack":
        methods["forward"] = task_linear_view(prog, _FlippedBufLinear)
        methods[DECODE_METHOD] = task_linear_view(prog, _RowMajorBufLinear)
        examples[DECODE_METHOD] = (torch.zeros(1, 1, dtype=torch.long), torch.arange(1))
    return methods, examples, swap, None


def _tied_head(model: nn.Module) -> int:
    """The parameter count of ``model``'s vocabulary projection when it is tied to the embedding, else 0."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head.weight.numel() if head is not None and emb is not None and head.weight is emb.weight else 0


def _head_copy(model: nn.Module, mode: str, recipe: str) -> int:
    """The parameters a program stores twice (the manifest's ``params.head_copy``; ``params.stored`` counts
    them once): a tied head's in a dense XNNPACK program (the delegate holds the head's packed weights beside
    the embedding's). The swappable XNNPACK program's head reads the embedding in place (``rowmajor_head``),
    a portable program's is a portable product over it: no copy."""
    return _tied_head(model) if mode == "dense" and recipe != "portable" else 0


def export_lm_executorch(model: nn.Module, out_dir: Path, *, mode: str, recipe: str, mixers: Sequence[MixerFile],
                         threads: int, validate: bool, reference: dict, tokenizer: Any = None,
                         max_seq_len: int | None = None, source: dict | None = None,
                         quantize: str | None = None) -> EtBundle:
    """Write and validate the LM bundle (``export_executorch`` checked the common arguments, ``quantize``
    included, and routes here)."""
    from crisp_edge.export.executorch.lm_session import validate_lm_bundle

    if mode not in ("dense", "swappable"):
        raise ConfigError(f"a language model exports as 'dense' or 'swappable' (with a key/value cache), not {mode!r}.")
    seq = resolve_max_seq_len(model, max_seq_len)
    return write_validated(out_dir, lambda folder: _write_lm_bundle(model, folder, mode, recipe, mixers, seq,
                                                                    tokenizer, source, reference, quantize),
                           EtBundle, threads=threads, validate=validate_lm_bundle if validate else None)


def _write_lm_bundle(model: nn.Module, folder: Path, mode: str, recipe: str, mixers: Sequence[MixerFile],
                     max_seq_len: int, tokenizer: Any, source: dict | None, reference: dict,
                     quantize: str | None = None) -> dict:
    import executorch

    vocab = int(model.config.vocab_size)
    io = {"mode": mode, "inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, max_seq_len]},
                                   {"name": "input_pos", "dtype": "int64", "shape": [max_seq_len]}],
          "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [1, vocab]}]}
    programs, examples, swap, quant = _programs(model, mode, max_seq_len, recipe, quantize)
    tokens = torch.export.Dim("tokens", min=1, max=max_seq_len)
    constants = {IO_METHOD: io_tag({**io, "swappable": swap} if swap else io)}
    if swap:
        constants["crisp_tag"] = swap["tag"]
    pte, ops = lower(programs, examples, recipe, mode, constant_methods=constants,
                     dynamic_shapes={"forward": ({1: tokens}, {0: tokens})}, strict=True, reinplace=True)
    (folder / PROGRAM).write_bytes(pte)
    del programs, examples, pte  # the program copies of the weights: not needed for the references below
    files = [PROGRAM]
    tasks = {}
    if swap is not None:
        default = {f"mixer.{k}": torch.stack([model.get_submodule(n).crisp_mixer.detach() for n in b.layer_names])
                   for k, b in crisp_bases(model).items()}
        write_task_ptd({k: v.float().contiguous().numpy() for k, v in default.items()}, folder / DEFAULT_PTD, swap["tag"])
        files.append(DEFAULT_PTD)
        for mf in mixers:
            rel = f"{TASKS_DIR}/{mf.task}{PTD_SUFFIX}"
            arrays = task_arrays(mf, swap, str(mf.path or mf.task))
            write_task_ptd(arrays, folder / rel, swap["tag"])
            tasks[mf.task] = task_record(rel, (folder / rel).read_bytes(), mf, arrays)
    tok_record = None
    if tokenizer is not None:
        tok_record = write_tokenizer(tokenizer, folder, model.config)
        files.append(tok_record["file"])
    prompts = reference_prompts(BundleTokenizer.load(folder, tok_record, vocab) if tok_record else None, vocab)
    # each task's model with its weights folded once (the same W = B G(A) a CRISP forward computes at every
    # call): a 64-token reference then costs 64 dense steps, not 64 rebuilds of every weight
    by_task = {t: materialize_(copy.deepcopy(m)) if is_crisp(m) else m for t, m in task_models(model, mixers).items()}
    generation = record_references({t: TorchStepper(m, max_seq_len) for t, m in by_task.items()}, prompts)
    g = torch.Generator().manual_seed(REFERENCE_SEED)
    cases = [{"tokens": torch.randint(0, vocab, (1, n), generator=g), "input_pos": torch.arange(n)}
             for n in REFERENCE_TOKENS]
    write_reference(folder, cases, {t: reference_outputs(_Prefill(m), cases, output_names=[OUTPUT_NAME], **reference)
                                    for t, m in by_task.items()})
    files.append(REFERENCE)
    dtype = "float32" if quant is None else SCHEMES[quantize]["dtype"]
    tol = tolerance_for("executorch-lm", mode, dtype)  # long decodes through deep models drift more
    stored = _stored_params(model)
    manifest: dict[str, Any] = {
        "format": ET_BUNDLE_FORMAT, "version": ET_BUNDLE_VERSION, "crisp_edge_version": __version__, "mode": mode,
        "recipe": recipe,
        "exporter": {"name": "torch.export + executorch.exir.to_edge_transform_and_lower", "torch": torch.__version__,
                     "executorch": getattr(getattr(executorch, "version", None), "__version__", "unknown"),
                     "kv_cache": "transformers StaticCache (TorchExportableModuleWithStaticCache)"},
        "arch": getattr(model, "crisp_arch", None),
        "program": {"file": PROGRAM, "methods": sorted(ops) + sorted(constants)},
        "files": {f: file_record(folder, f) for f in files},
        "inputs": io["inputs"], "outputs": io["outputs"], "batch": 1,
        "dynamic_axes": {"tokens": {"1": "tokens"}, "input_pos": {"0": "tokens"}},
        "non_delegated_ops": ops,
        "custom_ops": crisp_ops(ops),
        "reference": reference_record(list(INPUT_NAMES), [OUTPUT_NAME], len(cases), list(by_task),
                                      batches=[1] * len(cases), seed=REFERENCE_SEED, **reference),
        "tolerance": {**tol.to_dict(), "dtype": dtype},
        "params": {**params_record(model, stored), "head_copy": _head_copy(model, mode, recipe),
                   "program_bytes": (folder / PROGRAM).stat().st_size},
        "tasks": tasks,
        "lm": lm_section(max_seq_len=max_seq_len, vocab_size=vocab, tokenizer_record=tok_record, references=generation),
    }
    add_sections(manifest, quantize=quant, source=source, swappable=swap)
    (folder / RUNNER_SPEC).write_text(runner_spec(manifest))
    manifest["files"][RUNNER_SPEC] = file_record(folder, RUNNER_SPEC)
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


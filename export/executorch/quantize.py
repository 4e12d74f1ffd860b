"""Quantized ExecuTorch programs: the XNNPACK quantizer through PT2E (``torchao.quantization.pt2e``).

``quantize_module(module, args, "int8")`` exports the module, annotates it with ExecuTorch's
``XNNPACKQuantizer`` configured for int8 per-channel symmetric weights and dynamically quantized int8
activations (``get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)``), runs it once
on ``args`` (dynamic activations need no calibration statistics, but PT2E's observers want one pass)
and converts it; the result lowers with the plain XNNPACK partitioner, which takes the quantized
linears as XNNPACK's dynamically quantized fully-connected kernels.

A causal language model takes ExecuTorch's own LLM recipe instead (``executorch/extension/llm/export/quantize.py``
and the Llama export's ``source_transformation/quantize.py``): ``quantize_lm_(model, scheme)`` is torchao's
``quantize_`` on every ``nn.Linear`` of the eager model (the ``lm_head`` included), before the one strict
``torch.export`` its static key/value cache needs, with ``Int8DynamicActivationIntxWeightConfig``: int8
per-channel weights for "int8" (the Llama export's "8da8w") and, for "int4", int4 codes in groups of ``INT4_GROUP``
("8da4w") inside a ``BlockOffsetLinear`` (min..max groups: the float offset added from block sums) with the
``lm_head`` at 8da8w; int8 activations quantized per token at run time, lowered by the plain XNNPACK partitioner
to its dynamically quantized linear (qd8-qc8w / qd8-qb4w; the offsets' two small linears in float32). The token
embedding stays float32 (its
quantized form, ``embedding_byte``, runs outside XNNPACK in a kernel library every runner would need).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from crisp_edge.errors import ConfigError

#: scheme -> the (mode, recipe) pairs ExecuTorch can run it in (see crisp_edge.export.quantize).
MODES: dict[str, tuple[str, ...]] = {"int8": ("dense", "swappable"), "int4": ("dense",)}
#: The same for a causal language model (its Llama-export program: torchao's 8da8w / 8da4w linears).
LM_MODES: dict[str, tuple[str, ...]] = {"int8": ("dense",), "int4": ("dense",)}
RECIPES: dict[str, tuple[str, ...]] = {"int8": ("xnnpack",), "int4": ("xnnpack",)}
#: Why the other modes are refused.
REFUSALS: dict[str, str] = {
    "swappable": "XNNPACK packs a quantized linear's weights once, at load, so a set_task writing them would be "
                 "ignored, and crisp-edge's own int8 linear, which a swappable int8 ViT runs instead, quantizes "
                 "activations per token: a real language model's activation outliers defeat that. Measured on "
                 "SmolLM2-135M (a swappable int8 language-model program built for the measurement: crisp::qlinear in "
                 "prefill and decode over weights set_task folds from int8 bases), perplexity +9.3% / +4.9% (KJV New "
                 "Testament / Devil's Dictionary; the goal is 3%) and logits 6.33 off against the int8 bound of 5.0, "
                 "though it decoded 1.16x and prefilled 1.67x as fast as the float32 swappable program "
                 "(SmolLM2-shaped, 4 layers).",
    "factored": "A factored program computes its weights on every forward, and XNNPACK's quantized linear takes "
                "only weights it packs once, at load.",
}
#: The manifest's ``quantize.tool`` of an int8 swappable ViT program. XNNPACK packs a quantized linear's int8
#: weights once, at load (its partitioner counts a buffer as a static weight, ``is_param_node``), so a set_task
#: writing them would be ignored: the CRISP linears run crisp-edge's own int8 linear instead
#: (``custom_ops``: ``crisp::qlinear`` reading each layer's packed buffer in place, ``crisp::fold_quant_`` writing it).
#: The bases are stored as int8 codes, transposed (r, u) (channel-major where the shapes allow,
#: ``fold_kernel.channel_major``), with one symmetric scale per term, as ONNX Runtime's swappable int8 bundle stores
#: them (``export/quantize.py`` ``basis_codes``): set_task multiplies each term's scale into the gated mixers and
#: folds the codes as they are.
SWAPPABLE_INT8_TOOL: dict[str, Any] = {
    "name": "crisp::fold_quant_ (set_task) + crisp::qlinear (forward)",
    "weights": "int8 symmetric per output channel (scale = max |w| / 127), packed vnni16 (kernels/qlinear.h), "
               "written by set_task from the fold of the int8 bases (codes (r, u), one float32 scale per basis "
               "term, multiplied into the mixers)",
    "activations": "uint8 per token with a zero point, quantized at run time (XNNPACK qd8's arithmetic)",
    "quantized": "every CRISP linear; the head (task weights) and the patch-embedding convolution stay float32 "
                 "(XNNPACK), as do the attention matmuls (as in the dense int8 program)",
}


def quantize_module(module: nn.Module, args: tuple, scheme: str) -> tuple[nn.Module, dict[str, Any]]:
    """(the quantized graph module, the tool record for the manifest)."""
    import executorch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    assert scheme == "int8", scheme  # the only scheme in MODES; check_scheme refuses the rest
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        graph = torch.export.export(module, args, strict=False).module()
        graph = prepare_pt2e(graph, quantizer)
        graph(*args)
        graph = convert_pt2e(graph)
    return graph, {"name": "XNNPACKQuantizer (PT2E)",
                   "executorch": getattr(getattr(executorch, "version", None), "__version__", "unknown"),
                   "config": "get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)"}


class BlockOffsetLinear(nn.Module):
    """A linear whose weight is stored as 4-bit min..max blocks that XNNPACK can run: per output row and block of
    ``block`` input channels, W = offset + step * c with step = (max - min) / 15, offset = min + 8 * step and the
    code c in -8..7. ``codes`` holds W - offset (symmetric 4-bit exactly on its grid: torchao's
    ``SYMMETRIC_NO_CLIPPING_ERR`` picks step as its scale), ``block_sums`` sums x per block (a 0/1 matrix) and
    ``offsets`` (blocks -> outputs) adds offset times those sums; the two small linears stay float32. XNNPACK's
    4-bit linear has no zero points, and this is the same decomposition as ONNX Runtime's ``offset_pass``."""

    def __init__(self, linear: nn.Linear, block: int, block_sums: nn.Linear | None = None):
        super().__init__()
        n, k = linear.weight.shape
        w = linear.weight.detach().float().reshape(n, k // block, block)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        step = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
        offset = lo + 8 * step
        self.codes = nn.Linear(k, n, bias=linear.bias is not None)
        self.block_sums = block_sums if block_sums is not None else self.sums(k, block)
        self.offsets = nn.Linear(k // block, n, bias=False)
        with torch.no_grad():
            self.codes.weight.copy_((w - offset).reshape(n, k))
            if linear.bias is not None:
                self.codes.bias.copy_(linear.bias)
            self.offsets.weight.copy_(offset[..., 0])
        for p in self.parameters():
            p.requires_grad_(False)

    @staticmethod
    def sums(k: int, block: int) -> nn.Linear:
        """The (k -> k / block) 0/1 linear summing each block of x; one per input width can serve every linear."""
        lin = nn.Linear(k, k // block, bias=False)
        with torch.no_grad():
            lin.weight.copy_((torch.arange(k)[None] // block == torch.arange(k // block)[:, None]).float())
        lin.weight.requires_grad_(False)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x) + self.offsets(self.block_sums(x))


def quantize_lm_(model: nn.Module, scheme: str) -> dict[str, Any]:
    """Quantize every ``nn.Linear`` of ``model`` (a dense causal LM, parameters frozen) in place, as ExecuTorch's
    Llama export does; returns the tool record for the manifest. Call it on the Hugging Face model itself, before
    wrapping it: torchao would visit a layer reachable by two paths twice.

    "int4": the ``lm_head`` at 8 bits (8da8w per channel: XNNPACK's groupwise kernel is 4-bit only) and every other
    linear a ``BlockOffsetLinear`` whose codes take 8da4w with ``SYMMETRIC_NO_CLIPPING_ERR`` in groups of
    ``INT4_GROUP``. Not torchao's asymmetric 8da4w: XNNPACK's qb4w linear takes one scale per group and no zero
    point, and that config is delegated all the same with its zero points dropped (measured on a two-linear toy:
    1.15 off torchao's own output, against 0.004 symmetric), a silent wrong answer."""
    import executorch
    import torchao
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    from crisp_edge.export.quantize import INT4_GROUP, LM_HEAD_BITS

    assert scheme in ("int8", "int4"), scheme  # MODES; check_scheme refuses the rest
    int8 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    int8_cfg = "Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))"
    is_head = head_filter(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if scheme == "int8":
            quantize_(model, int8, filter_fn=lambda m, _fqn: isinstance(m, nn.Linear))
            return {"name": "torchao.quantization.quantize_", "recipe": "8da8w", "config": int8_cfg,
                    "is_symmetric": True, "torchao": torchao.__version__, "executorch": _et_version(executorch)}
        body = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and not is_head(fqn)]
        odd = [fqn for fqn, m in body if m.in_features % INT4_GROUP]
        if odd:
            raise ConfigError(f"quantize='int4' needs every linear's input width divisible by {INT4_GROUP} (XNNPACK's "
                              f"4-bit groups); {odd[0]} takes {model.get_submodule(odd[0]).in_features}. Use 'int8'.")
        sums: dict[int, nn.Linear] = {}  # shared per input width: one copy in the program, not one per linear
        for fqn, m in body:
            parent, _, name = fqn.rpartition(".")
            shared = sums.setdefault(m.in_features, BlockOffsetLinear.sums(m.in_features, INT4_GROUP))
            setattr(model.get_submodule(parent) if parent else model, name, BlockOffsetLinear(m, INT4_GROUP, shared))
        int4 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_GROUP),
                                                     weight_mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR)
        quantize_(model, int4, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.endswith(".codes"))
        quantize_(model, int8, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and is_head(fqn))
    return {"name": "torchao.quantization.quantize_", "recipe": "8da4w",
            "config": f"BlockOffsetLinear codes: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, "
                      f"weight_granularity=PerGroup({INT4_GROUP}), weight_mapping_type=SYMMETRIC_NO_CLIPPING_ERR)",
            "offsets": "float32 (block sums x (min + 8 * step) per block)", "is_symmetric": False,
            "lm_head": {"bits": LM_HEAD_BITS, "config": int8_cfg, "recipe": "8da8w"},
            "torchao": torchao.__version__, "executorch": _et_version(executorch)}


def _et_version(executorch: Any) -> str:
    return getattr(getattr(executorch, "version", None), "__version__", "unknown")


def head_filter(model: nn.Module):
    """``fqn -> bool``: is this module the model's output projection (``get_output_embeddings()``)?"""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {fqn for fqn, m in model.named_modules() if m is head and head is not None}
    return lambda fqn: fqn in names

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
per-channel weights for "int8" (the Llama export's "8da8w") and int4 weights in groups of ``INT4_GROUP`` for
"int4" ("8da4w"); both with int8 activations quantized per token at run time, lowered by the plain XNNPACK
partitioner to its dynamically quantized linear (qd8-qc8w / qd8-qb4w). The token embedding stays float32 (its
quantized form, ``embedding_byte``, runs outside XNNPACK in a kernel library every runner would need).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

#: scheme -> the (mode, recipe) pairs ExecuTorch can run it in (see crisp_edge.export.quantize).
MODES: dict[str, tuple[str, ...]] = {"int8": ("dense",), "int4": ("dense",)}
RECIPES: dict[str, tuple[str, ...]] = {"int8": ("xnnpack",), "int4": ("xnnpack",)}
#: Why the other modes are refused (measured: bench/results/quantize.json, ``swappable_int8``).
REFUSALS: dict[str, str] = {
    "swappable": "XNNPACK packs a quantized linear's int8 weights once, at load, and its partitioner counts a "
                 "buffer as a static weight (backends/xnnpack/utils/utils.py is_param_node), with no option to take "
                 "a changing int8 weight (force_non_static_weights_for_f32_linear is float32 only): a set_task writing "
                 "int8 weights would be ignored by the int8 kernels, a silent wrong answer. Reloading a dense int8 "
                 "program per task costs several int8 forwards (bench/results/quantize.json, swappable_int8).",
    "factored": "A factored program computes its weights on every forward, and XNNPACK's quantized linear takes "
                "only weights it packs once, at load.",
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


def quantize_lm_(model: nn.Module, scheme: str) -> dict[str, Any]:
    """Quantize every ``nn.Linear`` of ``model`` (a dense causal LM, parameters frozen) in place, as ExecuTorch's
    Llama export does; returns the tool record for the manifest. Call it on the Hugging Face model itself, before
    wrapping it: torchao would visit a layer reachable by two paths twice.

    "int4" keeps the ``lm_head`` at 8 bits (8da8w, per channel: XNNPACK's groupwise kernel is 4-bit only) and its
    4-bit weights symmetric: XNNPACK's qb4w linear takes one scale per group and no zero point, and torchao's
    asymmetric 8da4w is delegated all the same with its zero points dropped (measured on a two-linear toy: 1.15
    off torchao's own output, against 0.004 symmetric), a silent wrong answer."""
    import executorch
    import torchao
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    from crisp_edge.export.quantize import INT4_GROUP, LM_HEAD_BITS

    assert scheme in ("int8", "int4"), scheme  # MODES; check_scheme refuses the rest
    int8 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    is_head = head_filter(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if scheme == "int4":
            int4 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_GROUP))
            quantize_(model, int4, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not is_head(fqn))
        quantize_(model, int8, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and (scheme == "int8" or is_head(fqn)))
    int4_cfg = f"Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup({INT4_GROUP}))"
    int8_cfg = "Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))"
    return {"name": "torchao.quantization.quantize_", "recipe": "8da8w" if scheme == "int8" else "8da4w",
            "config": int8_cfg if scheme == "int8" else int4_cfg,
            **({"lm_head": {"bits": LM_HEAD_BITS, "config": int8_cfg, "recipe": "8da8w"}} if scheme == "int4" else {}),
            "is_symmetric": True, "torchao": torchao.__version__,
            "executorch": getattr(getattr(executorch, "version", None), "__version__", "unknown")}


def head_filter(model: nn.Module):
    """``fqn -> bool``: is this module the model's output projection (``get_output_embeddings()``)?"""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {fqn for fqn, m in model.named_modules() if m is head and head is not None}
    return lambda fqn: fqn in names

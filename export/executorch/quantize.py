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
    wrapping it: torchao would visit a layer reachable by two paths twice."""
    import executorch
    import torchao
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    from crisp_edge.export.quantize import INT4_GROUP

    assert scheme in ("int8", "int4"), scheme  # MODES; check_scheme refuses the rest
    granularity = PerAxis(0) if scheme == "int8" else PerGroup(INT4_GROUP)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8 if scheme == "int8" else torch.int4,
                                                   weight_granularity=granularity)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        quantize_(model, config, filter_fn=lambda m, _fqn: isinstance(m, nn.Linear))
    return {"name": "torchao.quantization.quantize_", "recipe": "8da8w" if scheme == "int8" else "8da4w",
            "config": f"Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.{'int8' if scheme == 'int8' else 'int4'}, "
                      f"weight_granularity={'PerAxis(0)' if scheme == 'int8' else f'PerGroup({INT4_GROUP})'})",
            "torchao": torchao.__version__,
            "executorch": getattr(getattr(executorch, "version", None), "__version__", "unknown")}

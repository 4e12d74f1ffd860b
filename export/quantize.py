"""Quantization schemes of export bundles, the same names for every runtime (``quantize=`` in
``export_onnx`` / ``export_executorch``, ``crisp-edge export --quantize``), and the manifest record that
says what a bundle's weights and activations are.

    int8   int8 weights, symmetric, one scale per output channel; activations quantized to int8
           dynamically at run time (per tensor in ONNX Runtime's MatMulInteger path, per token in
           XNNPACK's dynamically quantized linear). The standard mobile recipe of both runtimes:
           ``onnxruntime.quantization.quantize_dynamic(per_channel=True)`` and ExecuTorch's
           ``XNNPACKQuantizer`` with ``get_symmetric_quantization_config(is_per_channel=True,
           is_dynamic=True)``. Dynamic activations need no calibration data. A language model takes the
           same meaning through each runtime's LLM recipe: ORT ``MatMulNBits`` with 8-bit weights (per block of 32
           input channels, finer than per channel; activations int8 per block of each row: ``quantize_dynamic``'s
           one scale per activation tensor ruins a LLaMA, see ``onnx/quantize.py``), and torchao's
           ``Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0))`` (ExecuTorch's Llama export's "8da8w").
    int4   language models only: 4-bit codes in groups of ``INT4_GROUP`` (32) input channels spanning each group's
           min..max (a float step and a float offset per group: GGUF's Q4_1 layout), the ``lm_head`` at
           ``LM_HEAD_BITS`` (8), and int8 activations quantized dynamically. Both runtimes' fast 4-bit kernels take
           symmetric codes only (ORT's float zero points run a slow path, XNNPACK's take none), so the offset is
           added apart: x @ W = x @ (step * c) + (x's block sums) @ offsets. ONNX Runtime: ``MatMulNBits``
           (``accuracy_level=4``) plus two small float MatMuls (``onnx/quantize.py`` ``offset_pass``), the head 8-bit
           symmetric in blocks of 32. ExecuTorch: "8da4w" (torchao ``Int8DynamicActivationIntxWeightConfig(int4,
           PerGroup(32))``, XNNPACK's qd8-qb4w linear) on the codes of a ``BlockOffsetLinear`` plus two small float32
           linears (``executorch/quantize.py``), the head 8da8w per channel. Decoding reads every weight once per
           token, so a language model's speed follows its weight bytes and 4 bits pay; a vision or encoder model
           runs large batches of tokens through small matrices (compute-bound), and crisp-edge has no measured
           accuracy for it at 4 bits: use int8 there. What int4 costs SmolLM2-135M: bench/results/lm_int4_ablation.json
           and lm_quantize.json (its source is a Q4_1 GGUF, whose grid these groups hold exactly: see the README).

In a language model every linear layer is quantized, the ``lm_head`` included (the largest matmul: about a
fifth of SmolLM2-135M's per-token work; 8 bits under both schemes); the token embedding stays float32 (a row lookup, no arithmetic to
save, and ExecuTorch's quantized embedding is a kernel outside XNNPACK that every runner would have to link).
A tied ``lm_head`` (SmolLM2) is therefore stored twice: float32 as the embedding, quantized as the head.

Which modes take which scheme is each runtime's own table (``MODES`` in ``export/onnx/quantize.py`` and
``export/executorch/quantize.py``). A factored or swappable bundle computes its weights from the bases and
mixers at run time (every forward, or every task switch). Both runtimes export ``dense`` and, for int8 on a
vision or encoder model, ``swappable``: ONNX Runtime (``export/onnx/swap_int8.py``) the dense int8 graph with
its MatMulInteger weights and per-channel scales as task inputs, written at each switch by crisp-edge's fused
fold+quantize kernel (or by the fold graph's in-graph quantization where ONNX Runtime runs alone); ExecuTorch,
whose XNNPACK packs a quantized linear's int8 weights once, at load (a buffer included), runs crisp-edge's own
int8 linear over buffers ``set_task`` writes (``crisp::qlinear``, ``crisp::fold_quant_``,
``export/executorch/custom_ops.py``). Both store the bases of a swappable int8 bundle the same way, as int8 codes
with one symmetric scale per basis term (``basis_codes``), and fold the codes with each term's scale multiplied into
the mixers. Measured in ``bench/results/quantize.json`` (``swappable_int8``). Each
runtime module says in ``REFUSALS`` why it refuses the other modes (factored; a language model's swappable
quantized bundle). A request a runtime cannot honour is refused with that reason and what to use instead, never exported in float silently.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from crisp_edge.errors import ConfigError
from crisp_edge.export.errors import BundleError

#: scheme -> what it does to weights and activations (recorded in the manifest).
SCHEMES: dict[str, dict[str, str]] = {
    "int8": {"weights": "int8, symmetric, per output channel",
             "activations": "int8, quantized dynamically at run time (no calibration data)",
             "dtype": "int8"},
    "int4": {"weights": "int4 codes in groups of 32 input channels spanning each group's min..max, a float step and "
                        "offset per group (lm_head int8; token embedding float32)",
             "activations": "int8, quantized dynamically at run time (no calibration data)",
             "dtype": "int4", "models": "causal language models only"},
}
#: The manifest's ``quantize.weights`` of a swappable int8 bundle (both runtimes store and fold its bases so).
SWAPPABLE_INT8_WEIGHTS = ("int8, symmetric, per output channel, written at each task switch from the fold of the bases "
                          "(stored int8, symmetric, one scale per basis term) and the task's float32 mixers")
#: Input channels per int4 weight scale (both runtimes; the Llama export's 8da4w default is 32 or 128:
#: 32 keeps more accuracy on a small model for one more float scale per 32 weights).
INT4_GROUP = 32
#: Bits of a language model's ``lm_head`` under "int4" (and "int8"): 8, per block of 32 (ONNX Runtime) or per
#: channel (ExecuTorch). The head is about a fifth of a small LM's per-token work but its errors land on the logits
#: directly; at 4 bits it cost SmolLM2-135M most of int4's perplexity (bench/results/lm_int4_ablation.json).
LM_HEAD_BITS = 8
#: Schemes only a causal language model can take, and why (what a ViT or encoder asking gets told).
LM_ONLY: dict[str, str] = {
    "int4": "int4 (4-bit group-wise weights) is the language-model recipe: decoding reads every weight per token, "
            "so its speed follows weight bytes. A vision or encoder model is compute-bound on small matrices, and "
            "crisp-edge has no measured accuracy for it at 4 bits. Use quantize='int8' for this model."}


#: What to use instead of a quantized bundle whose weights change at run time.
INSTEAD = ("For one task, apply its mixer file and export mode='dense' with quantize={q!r} (one {q} bundle per "
           "task); to switch tasks on device, export a float32 swappable bundle.")


def basis_codes(basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 scales) of a (r, u) basis stored transposed, one symmetric scale per term (row):
    scale = max |row| / 127 (1 for an all-zero row), codes round-half-even(row / scale). How a swappable int8 bundle
    of either runtime stores its bases (``onnx/swap_int8.py`` ``quantize_bases``, ``executorch/programs.py``): a
    term's scale is one number for its u values, so a fold sums the codes and multiplies the scale into the
    mixers."""
    m = np.abs(basis).max(axis=1)
    scale = np.where(m > 0, m / 127, 1).astype(np.float32)
    return np.rint(basis / scale[:, None]).astype(np.int8), scale


def check_scheme(quantize: str | None, mode: str, runtime: str, modes: dict[str, tuple[str, ...]],
                 reasons: dict[str, str] | None = None, lm: bool = False) -> str | None:
    """``quantize`` if ``runtime`` can export it in ``mode`` (``modes``: scheme -> modes it supports) for this
    kind of model (``lm``: a causal language model); otherwise a ``ConfigError`` with the reason (``LM_ONLY``,
    or the runtime's for that mode, ``reasons``) and what to use."""
    if quantize is None:
        return None
    if quantize not in SCHEMES:
        raise ConfigError(f"quantize must be one of {sorted(SCHEMES)} (or None for float32), got {quantize!r}.")
    if quantize in LM_ONLY and not lm:
        raise ConfigError(f"{runtime}: quantize={quantize!r} is for causal language models only. {LM_ONLY[quantize]}")
    if mode not in modes.get(quantize, ()):
        why = (reasons or {}).get(mode) or (
            f"A {mode!r} bundle computes its weights from the bases and mixers at run time, in float32.")
        raise ConfigError(f"{runtime}: quantize={quantize!r} is available for mode(s) {modes.get(quantize, ())} only. "
                          f"{why} {INSTEAD.format(q=quantize)}")
    return quantize


def quantize_record(scheme: str, tool: dict[str, Any], weights: str | None = None) -> dict[str, Any]:
    """The manifest's ``quantize`` record: the scheme, what it means (``weights``: where a runtime's recipe
    stores them more finely than the scheme's minimum, e.g. per block instead of per channel), and the tool."""
    return {"scheme": scheme, **SCHEMES[scheme], **({"weights": weights} if weights else {}), "tool": tool}


def check_quantize_record(meta: dict, where: str) -> str | None:
    """The scheme of a manifest's optional ``quantize`` record (``None``: a float bundle)."""
    rec = meta.get("quantize")
    if rec is None:
        return None
    if not isinstance(rec, dict) or rec.get("scheme") not in SCHEMES:
        raise BundleError(f"{where}: 'quantize' must be null or an object whose 'scheme' is one of {sorted(SCHEMES)}; "
                          f"found {rec!r:.200}.")
    return rec["scheme"]

"""Quantized ONNX bundles: ONNX Runtime's own dynamic quantization of the inference graph.

``quantize_graph(path, "int8")`` rewrites ``model.onnx`` in place with
``onnxruntime.quantization.quantize_dynamic``: every MatMul / Gemm weight becomes int8 with one scale per
output channel (``per_channel=True``), 7-bit codes (``reduce_range``, ``WEIGHT_QMAX``: exact on x86-64 CPUs
without VNNI, where 8-bit codes saturate ORT's kernel), and activations are quantized at run time
(``DynamicQuantizeLinear`` -> ``MatMulInteger``). Layer norms, biases, embeddings and the convolution
patch embedding stay float32 (ORT's dynamic path quantizes matrix products only).

``quantize_lm_graph(proto, scheme)`` does it for a language model's with-past graph, which is exported
without constant folding (every weight an initializer feeding ``Transpose`` then ``MatMul``):
``fold_weight_transposes`` first stores each transposed weight as the MatMul's own initializer (what ORT's
quantizers look for), then every MatMul becomes a ``MatMulNBits`` with blocks of ``INT4_GROUP`` input channels and
``accuracy_level=4`` (the kernel quantizes each row's activations to int8 per block: ORT's 8da8w / 8da4w), as
``LM_SCHEMES`` says: "int8" 8-bit symmetric throughout (``MatMulNBitsQuantizer``); "int4" 4-bit codes spanning
each block's min..max with a float offset (``offset_pass``), the ``lm_head`` 8-bit symmetric. Not
``quantize_dynamic`` here: it quantizes a MatMul's activations with one scale per tensor, and a LLaMA's hidden
states carry a few outlier channels that then crush every other value; measured on SmolLM2-135M, its logits were
18.7 off the float model's (cosine 0.967) and greedy decoding left the float path at the second token, where
``MatMulNBits`` 8-bit stays close (bench/results/lm_quantize.json). The embedding's Gather stays float32; the
``lm_head`` is a MatMul like the others, so tied to the embedding (SmolLM2) it is stored twice, float32 for the
Gather and quantized for the head.

Why int4 is not ORT's symmetric (or integer-zero-point) round-to-nearest: measured on SmolLM2-135M
(bench/results/lm_int4_ablation.json), symmetric blocks of 32 cost +35% / +39% perplexity, the lm_head at 8 bits
and integer zero points only part of it, where min..max blocks with float offsets lose almost nothing. That model's
weights come from a Q4_1 GGUF (4-bit codes, a float scale and minimum per block of 32) whose embedding (the tied
head) is Q8_0: these blocks hold its grids exactly, which an integer zero point or a symmetric grid cannot. On a
model trained in float the same blocks are ordinary asymmetric 4-bit round-to-nearest with a float minimum.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from crisp_edge.export.errors import ExportError
from crisp_edge.export.logs import quiet_loggers
from crisp_edge.export.quantize import INT4_GROUP, LM_HEAD_BITS

#: The largest int8 weight code ONNX Runtime's int8 bundles (dense and swappable) use: 7-bit weights, -64..64
#: (``quantize_dynamic``'s ``reduce_range``), not -127..127. ONNX Runtime's x86-64 integer kernel on a CPU without
#: VNNI (AVX2, and AVX-512 without VNNI: e.g. AMD Zen 3, Intel before Cascade Lake) multiplies uint8 activations
#: by int8 weights with ``vpmaddubsw``, which sums each pair of products in int16 and saturates there: 255 x 127
#: x 2 = 64,770 > 32,767. With 7-bit weights a pair sums to at most 255 x 64 x 2 = 32,640: exact on every CPU, at
#: the cost of one bit of weight resolution. Measured on an AMD EPYC (Zen 3, AVX2): a toy ViT's swappable int8
#: bundle with 8-bit weights missed parity on a task (logits 0.165 off, cosine 0.991 < 0.995), with 7-bit ones
#: 0.039 (cosine 0.9998); ExecuTorch's int8 kernels (XNNPACK's qd8, crisp::qlinear) widen to int16 before
#: multiplying or use VNNI, so its bundles keep -127..127.
WEIGHT_QMAX = 64
#: scheme -> the bundle modes ONNX Runtime can run it in (see crisp_edge.export.quantize). A swappable int8 bundle:
#: ``swap_int8.py``.
MODES: dict[str, tuple[str, ...]] = {"int8": ("dense", "swappable"), "int4": ("dense",)}
#: The same for a causal language model (its with-past graph, ``quantize_lm_graph``: MatMulNBits).
LM_MODES: dict[str, tuple[str, ...]] = {"int8": ("dense",), "int4": ("dense",)}
#: Why the other modes are refused.
REFUSALS: dict[str, str] = {
    "swappable": "A swappable quantized language model would feed its integer products weights that change at "
                 "each switch, which ONNX Runtime's language-model kernel (MatMulNBits: int8 activations in blocks "
                 "of 32 within a token, what the dense int8 and int4 bundles use) takes only as constants it "
                 "pre-packs at load. The kernel that takes them as inputs (DynamicQuantizeMatMul / MatMulInteger, a "
                 "vision or encoder model's swappable int8) quantizes activations per tensor, at best per token, "
                 "and a real model's activation outliers defeat that: measured on SmolLM2-135M (its down_proj "
                 "inputs reach 3,064 against a median of 0.07), per-token int8 activations with per-channel int8 "
                 "weights miss parity's int8 bound (logits 5.15 off, bound 5.0) and cost +2.2% / +5.0% perplexity "
                 "(KJV New Testament / Devil's Dictionary; the dense int8 bundle +0.3% / +0.2%), though they "
                 "decode 1.75x as fast as the float32 swappable bundle.",
    "factored": "A factored bundle builds its weights in float32 on every forward; quantizing them there would "
                "add a requantization to every forward.",
}


def quantize_graph(path: Path, scheme: str) -> dict[str, Any]:
    """Quantize the ONNX file at ``path`` in place; returns the tool record for the manifest."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert scheme == "int8", scheme  # the only scheme in MODES; check_scheme refuses the rest
    tmp = path.with_name(f".{path.name}.int8.tmp")
    try:
        with _quiet_root():
            quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"name": "onnxruntime.quantization.quantize_dynamic", "onnxruntime": onnxruntime.__version__,
            "per_channel": True, "weight_type": "QInt8", "reduce_range": True, "weight_codes": [-WEIGHT_QMAX, WEIGHT_QMAX]}


def _quiet_root():
    """ORT's quantizers log a "consider pre-processing" warning (and progress) at every call."""
    return quiet_loggers("")


def fold_weight_transposes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every 2-D ``Transpose`` of an initializer by the transposed initializer (named as the Transpose's
    output), in place; the original stays only while another node reads it (a tied embedding's Gather)."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    keep, folded = [], []
    for node in graph.node:
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if node.op_type == "Transpose" and node.input[0] in inits and perm in ([], [[1, 0]]):
            w = numpy_helper.to_array(inits[node.input[0]])
            if w.ndim == 2:
                folded.append(numpy_helper.from_array(w.T.copy(), node.output[0]))
                uses[node.input[0]] -= 1
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    left = [t for t in graph.initializer if uses.get(t.name, 0) > 0]
    del graph.initializer[:]
    graph.initializer.extend(left + folded)
    return proto


def head_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the ``MatMul`` nodes that write the graph output ``logits`` from a constant weight (the lm_head)."""
    inits = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and "logits" in n.output and len(n.input) == 2 and n.input[1] in inits]


def nbits_pass(proto: onnx.ModelProto, bits: int, block: int, *, symmetric: bool, accuracy_level: int,
               offsets: bool | str = False, exclude: Sequence[str] = (), include: Sequence[str] | None = None
               ) -> onnx.ModelProto:
    """Rewrite every ``MatMul`` with a constant weight (``include``: only those; ``exclude``: not those) as a
    ``MatMulNBits`` of ``bits``-bit weights in blocks of ``block`` input channels. ``offsets``: asymmetric blocks
    spanning each block's min..max with a float offset (``offset_pass``; "float16": the offsets stored in float16);
    otherwise ORT's ``MatMulNBitsQuantizer`` round-to-nearest (symmetric, or asymmetric with an integer zero
    point)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    skip = set(exclude)
    if include is not None:
        skip |= {n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in set(include)}
    if offsets:
        return offset_pass(proto, bits, block, accuracy_level, skip, offsets_fp16=offsets == "float16")
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                          bits=bits, op_types_to_quantize=("MatMul",))
    with _quiet_root():
        quantizer = MatMulNBitsQuantizer(proto, algo_config=config, nodes_to_exclude=sorted(skip))
        quantizer.process()
    return quantizer.model.model


def minmax_block_quant(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed codes, scales, block minima) of a (K, N) float weight in ``MatMulNBits``' layout (per output column
    and block of ``block`` input rows): scale = (max - min) / (2**bits - 1), code q = round((w - min) / scale), so a
    block's values are min + scale * q (GGUF's Q4_1, exactly, at 4 bits and blocks of 32). A K not a multiple of
    ``block`` is padded with the last row (the kernel ignores the padding; a repeated value keeps the range)."""
    k, n = w.shape
    blocks = -(-k // block)
    w = np.pad(w, ((0, blocks * block - k), (0, 0)), mode="edge") if blocks * block != k else w
    wb = np.ascontiguousarray(w.T, dtype=np.float32).reshape(n, blocks, block)
    lo, hi = wb.min(-1, keepdims=True), wb.max(-1, keepdims=True)
    top = (1 << bits) - 1
    scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
    q = np.clip(np.rint((wb - lo) / scale), 0, top).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale.reshape(n, blocks), lo.reshape(n, blocks)


def offset_pass(proto: onnx.ModelProto, bits: int, block: int, accuracy_level: int, skip: set[str],
                offsets_fp16: bool = False) -> onnx.ModelProto:
    """Asymmetric blocks with float offsets through ORT's fast kernels: ``x @ W`` with W = min + scale * q per
    block (``minmax_block_quant``) is written as ``MatMulNBits(x; q, scale)`` (no zero points: the kernel subtracts
    2**(bits-1)) plus ``(x @ J) @ M``, where J (K, blocks) sums each block of x and M (blocks, N) holds
    min + 2**(bits-1) * scale. ``MatMulNBits`` takes float zero points too, but ONNX Runtime 1.32 runs them in a
    reference path hundreds of times slower than its integer-zero-point kernels (bench/results/lm_int4_ablation.json);
    integer zero points cannot hold a float minimum, and rounding it moves every value of the block.
    ``offsets_fp16``: M stored as float16 and cast at load (ONNX Runtime folds the Cast once)."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, dropped, sums = [], set(), {}
    half = 1 << (bits - 1)
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or node.name in skip or len(weight.dims) != 2:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        k, n = w.shape
        packed, scales, lo = minmax_block_quant(w, bits, block)
        if (k, block) not in sums:  # one block-sum matrix per input width, shared by every linear reading it
            j = (np.arange(k)[:, None] // block == np.arange(scales.shape[1])[None]).astype(np.float32)
            sums[(k, block)] = numpy_helper.from_array(j, f"block_sum_{k}x{block}")
            graph.initializer.append(sums[(k, block)])
        base = weight.name
        offsets = np.ascontiguousarray((lo + half * scales).T)
        graph.initializer.extend([numpy_helper.from_array(packed, f"{base}_Q{bits}"),
                                  numpy_helper.from_array(scales, f"{base}_scales"),
                                  numpy_helper.from_array(offsets.astype(np.float16) if offsets_fp16 else offsets,
                                                          f"{base}_offsets" + ("_fp16" if offsets_fp16 else ""))])
        out, x = node.output[0], node.input[0]
        if offsets_fp16:
            nodes.append(helper.make_node("Cast", [f"{base}_offsets_fp16"], [f"{base}_offsets"], to=TensorProto.FLOAT,
                                          name=f"{node.name}_offsets_cast"))
        nodes += [helper.make_node("MatMulNBits", [x, f"{base}_Q{bits}", f"{base}_scales"], [f"{out}_codes"],
                                   name=f"{node.name}_Q{bits}", domain="com.microsoft", K=k, N=n, bits=bits,
                                   block_size=block, accuracy_level=accuracy_level),
                  helper.make_node("MatMul", [x, sums[(k, block)].name], [f"{out}_block_sums"], name=f"{node.name}_block_sums"),
                  helper.make_node("MatMul", [f"{out}_block_sums", f"{base}_offsets"], [f"{out}_offsets"],
                                   name=f"{node.name}_offsets"),
                  helper.make_node("Add", [f"{out}_codes", f"{out}_offsets"], [out], name=f"{node.name}_add_offsets")]
        dropped.add(weight.name)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    left = [t for t in graph.initializer if t.name not in dropped or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(left)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


#: scheme -> how ``quantize_lm_graph`` writes the body's linears and the ``lm_head``: (bits, symmetric, min..max
#: blocks with float offsets) each, blocks of ``INT4_GROUP``, ``accuracy_level=4``. int4's choice:
#: bench/results/lm_int4_ablation.json.
LM_SCHEMES: dict[str, dict[str, tuple[int, bool, bool]]] = {
    "int8": {"body": (8, True, False), "lm_head": (8, True, False)},
    "int4": {"body": (4, False, True), "lm_head": (LM_HEAD_BITS, True, False)},
}
ACCURACY_LEVEL = 4


def quantize_lm_graph(proto: onnx.ModelProto, scheme: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """(the quantized with-past graph, the tool record for the manifest); see the module docstring."""
    import onnxruntime

    assert scheme in LM_SCHEMES, scheme  # MODES holds the rest; check_scheme refuses them
    proto = fold_weight_transposes(proto)
    head = head_nodes(proto)
    if not head:
        raise ExportError("the with-past graph has no MatMul with a constant weight writing 'logits' (the lm_head); "
                          "optimum's graph changed, so the lm_head's bits cannot be set: export in float32.")
    parts = {}
    for part, nodes in (("body", {"exclude": head}), ("lm_head", {"include": head})):
        bits, sym, offsets = LM_SCHEMES[scheme][part]
        proto = nbits_pass(proto, bits, INT4_GROUP, symmetric=sym, accuracy_level=ACCURACY_LEVEL, offsets=offsets,
                           **nodes)
        parts[part] = {"bits": bits, "block_size": INT4_GROUP, "is_symmetric": sym,
                       "zero_points": f"float32 offsets from block sums (min + {1 << (bits - 1)} * scale)" if offsets
                       else None if sym else "uint8",
                       "quantizer": "crisp_edge offset_pass (min..max blocks)" if offsets
                       else "onnxruntime MatMulNBitsQuantizer (round to nearest)"}
    return proto, {"name": "MatMulNBits", "op": "MatMulNBits", "onnxruntime": onnxruntime.__version__,
                   **parts["body"], "accuracy_level": ACCURACY_LEVEL, "lm_head": parts["lm_head"]}


def weights_text(scheme: str) -> str:
    """The manifest's ``quantize.weights`` line for a language model's ONNX bundle."""
    bits, sym, offsets = LM_SCHEMES[scheme]["body"]
    head_bits, head_sym, _ = LM_SCHEMES[scheme]["lm_head"]
    body = (f"int{bits}, symmetric, one scale per block of {INT4_GROUP} input channels" if sym else
            f"int{bits}, asymmetric, one scale and one float offset per block of {INT4_GROUP} input channels "
            "(the block's min..max)")
    head = ("lm_head included" if head_bits == bits else
            f"lm_head int{head_bits}, {'symmetric' if head_sym else 'asymmetric'}, blocks of {INT4_GROUP}")
    return f"{body} ({head}; token embedding float32)"

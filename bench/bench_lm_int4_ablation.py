"""Ablation: which 4-bit weight scheme an int4 language-model bundle should use (ONNX Runtime MatMulNBits).

One with-past graph of SmolLM2-135M (CRISP full capacity, exact, as bench_lm_quantize.py builds it) is exported
once; each variant quantizes a copy of it and scores it in an ONNX Runtime session made from the bytes: model
bytes vs float32, perplexity on the two held-out texts (same windows as bench_lm_quantize.py, fewer tokens) and
one-token decode time at a 64-token cache vs float32 (each variant interleaved with the float32 session, one
variant held at a time). A variant names its 4-bit
quantizer (ORT's own: ``default`` symmetric or asymmetric round-to-nearest with integer zero points, ``hqq`` and
``k_quant``; ``offsets``: crisp-edge's min..max blocks, MatMulNBits plus a float offset per block computed from
block sums, ``export/onnx/quantize.py`` ``offset_pass``, ``offsets16`` with the offsets stored in float16;
``floatzp``: the same blocks through MatMulNBits' float zero points),
the block size, whether the ``lm_head`` stays at 8 bits, and ``accuracy_level`` (4: int8 activations).

Why the variants: SmolLM2's weights come from a Q4_1 GGUF (every linear 4-bit, asymmetric, blocks of 32 along
the input, a float scale and minimum per block) whose token embedding (the tied ``lm_head``) is Q8_0 (8-bit
symmetric, blocks of 32). A scheme that can represent those grids loses little here for that reason; see the
README for what that says (and does not) about other models.

    .venv/bin/python bench/bench_lm_int4_ablation.py [--tokens 512] [--variants NAME ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from _common import RESULTS_DIR, interleave, machine_info, steady, summarize, write_json
from bench_lm_quantize import THREADS, TARGETS, bundle_perplexity, build_model, heldout_ids  # pins threads first

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: name -> (algorithm, bits, block, symmetric, lm_head bits or None = same as the rest, accuracy_level)
VARIANTS: dict[str, tuple] = {
    "sym_b32": ("default", 4, 32, True, None, 4),          # int4 as shipped before this ablation
    "offsets_b32_head8": ("offsets", 4, 32, False, 8, 4),
    "sym_b32_head8": ("default", 4, 32, True, 8, 4),
    "asym_b32_head8": ("default", 4, 32, False, 8, 4),
    "offsets_b32": ("offsets", 4, 32, False, None, 4),
    "offsets16_b32_head8": ("offsets16", 4, 32, False, 8, 4),
    "offsets_b32_head8_acc0": ("offsets", 4, 32, False, 8, 0),
    "offsets_b64_head8": ("offsets", 4, 64, False, 8, 4),
    "offsets_b128_head8": ("offsets", 4, 128, False, 8, 4),
    "asym_b32": ("default", 4, 32, False, None, 4),
    "kquant_b32_head8": ("k_quant", 4, 32, False, 8, 4),
    "int8_sym_b32": ("default", 8, 32, True, None, 4),      # int8 as shipped, for reference
    "floatzp_b32_head8": ("floatzp", 4, 32, False, 8, 4),
    "hqq_b32_head8": ("hqq", 4, 32, False, 8, 4),
}


class _Session:
    """What ``bundle_perplexity`` needs of a session: ``run(feeds)`` -> dict, the cache fed empty."""

    def __init__(self, sess, empty: dict):
        self.sess, self.empty = sess, empty
        self.outputs = [o.name for o in sess.get_outputs()]

    def run(self, feeds: dict) -> dict:
        return dict(zip(self.outputs, self.sess.run(None, {**self.empty, **feeds})))


def past_feeds(proto, length: int, rng) -> dict:
    """Cache inputs of the with-past graph, batch 1, ``length`` positions (0: empty)."""
    feeds = {}
    for v in proto.graph.input:
        if v.name.startswith("past_key_values"):
            dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
            feeds[v.name] = rng.standard_normal((1, dims[1], length, dims[3])).astype(np.float32)
    return feeds


def quantize_variant(proto, spec):
    from crisp_edge.export.onnx.quantize import fold_weight_transposes, head_nodes, nbits_pass

    algo, bits, block, sym, head_bits, acc = spec
    proto = fold_weight_transposes(copy.deepcopy(proto))
    head = head_nodes(proto)
    skip = head if head_bits else ()
    if algo in ("default", "offsets", "offsets16"):
        offsets = {"default": False, "offsets": True, "offsets16": "float16"}[algo]
        proto = nbits_pass(proto, bits, block, symmetric=sym, accuracy_level=acc, offsets=offsets, exclude=skip)
    elif algo == "floatzp":
        proto = _float_zero_point_pass(proto, bits, block, acc, set(skip))
    else:
        proto = _ort_algo_pass(proto, algo, bits, block, acc, exclude=skip)
    if head_bits:
        proto = nbits_pass(proto, head_bits, 32, symmetric=True, accuracy_level=acc, include=head)
    return proto


def _float_zero_point_pass(proto, bits, block, acc, skip):
    """The same min..max blocks as ``offsets`` with MatMulNBits' own float zero points (-min / scale)."""
    from onnx import helper, numpy_helper

    from crisp_edge.export.onnx.quantize import minmax_block_quant

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or node.name in skip:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        packed, scales, lo = minmax_block_quant(w, bits, block)
        names = [f"{weight.name}_Q", f"{weight.name}_s", f"{weight.name}_zp"]
        graph.initializer.extend(numpy_helper.from_array(a, nm) for a, nm in zip((packed, scales, -lo / scales), names))
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output), domain="com.microsoft",
                                      K=w.shape[0], N=w.shape[1], bits=bits, block_size=block, accuracy_level=acc))
        graph.initializer.remove(weight)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


def _ort_algo_pass(proto, algo, bits, block, acc, exclude):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if algo == "hqq":
        cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=("MatMul",))
        q = MatMulNBitsQuantizer(proto, algo_config=cfg, nodes_to_exclude=list(exclude))
    else:  # k_quant goes through ORT's neural_compressor rtn path; its block size is the quantizer's
        cfg = KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
        q = MatMulNBitsQuantizer(proto, block_size=block, is_symmetric=False, accuracy_level=acc, algo_config=cfg,
                                 nodes_to_exclude=list(exclude))
    q.process()
    out = q.model.model
    for node in out.graph.node:  # HQQ writes no accuracy_level (0: float32 compute); give it the same as others
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(__import__("onnx").helper.make_attribute("accuracy_level", acc))
    return out


#: ExecuTorch's int4 candidates, scored in eager PyTorch with torchao's quantized linears (XNNPACK computes the
#: same arithmetic: a two-linear toy's lowered program matched torchao's eager output within 0.004; symmetric
#: only, XNNPACK drops asymmetric zero points): name -> (body config, lm_head config or None = body's).
TORCHAO = {"et_8da4w": ("int4", None), "et_8da4w_head8": ("int4", "int8"), "et_8da8w": ("int8", None),
           "et_offsets_head8": ("int4 (export/executorch/quantize.py quantize_lm_: BlockOffsetLinear)", "int8")}


def torchao_eager(model, ids: dict, window: int, names) -> dict:
    """Perplexity of each ``TORCHAO`` scheme applied to a copy of the materialized model, on the same windows."""
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    from crisp_edge.export.executorch.quantize import head_filter
    from crisp_edge.method.convert import is_crisp, materialize_
    from crisp_edge.models.causal_lm import perplexity

    cfg = {"int4": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
           "int8": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))}
    dense = copy.deepcopy(model)
    if is_crisp(dense):
        materialize_(dense)
    out = {}
    for name in ["float32", *names]:
        m = copy.deepcopy(dense).eval()
        if name == "et_offsets_head8":
            from crisp_edge.export.executorch.quantize import quantize_lm_

            for p in m.parameters():
                p.requires_grad_(False)
            quantize_lm_(m, "int4")
        elif name != "float32":
            body, head = TORCHAO[name]
            is_head = head_filter(m)
            quantize_(m, cfg[body], filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and not (head and is_head(fqn)))
            if head:
                quantize_(m, cfg[head], filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and is_head(fqn))
        out[name] = {t: perplexity(m, rows.reshape(-1), window=window, max_tokens=rows.numel(),
                                   progress=False)["perplexity"] for t, rows in ids.items()}
        print(name, out[name], flush=True)
        del m
    for name in names:
        out[name] = {"perplexity": out[name], "ratios": {t: round(out[name][t] / out["float32"][t], 4) for t in ids}}
    out["float32"] = {"perplexity": out["float32"]}
    return out


def main() -> None:
    import onnxruntime as ort

    from crisp_edge.export.onnx.export import DEFAULT_OPSET
    from crisp_edge.export.onnx.lm_export import lm_graph
    from crisp_edge.export.onnx.session import session_options

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--torchao", nargs="*", choices=list(TORCHAO), default=None,
                    help="score these ExecuTorch (torchao) schemes in eager PyTorch instead of the ORT variants")
    ap.add_argument("--resume", action="store_true", help="keep the variants --out already holds; measure the rest")
    ap.add_argument("--out", default=str(RESULTS_DIR / "lm_int4_ablation.json"))
    args = ap.parse_args()
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() and (args.resume or args.torchao is not None) else None
    model, tok, described = build_model(False)
    ids = heldout_ids(tok, args.tokens, args.window)
    if args.torchao is not None:  # the ExecuTorch candidates, into the same file
        result = old or {"schema": 1, "variants": {}}
        prev = result.get("torchao_eager", {})
        result["torchao_eager"] = {**prev, "machine": machine_info(), "tokens": args.tokens, "window": args.window,
                                   "note": "torchao quantized linears in eager PyTorch, the arithmetic XNNPACK runs",
                                   **torchao_eager(model, ids, args.window, args.torchao or list(TORCHAO))}
        write_json(out, result)
        return
    base = lm_graph(model, DEFAULT_OPSET)
    del model
    rng = np.random.default_rng(0)
    empty, cache = past_feeds(base, 0, rng), past_feeds(base, 64, rng)
    result = {"schema": 1, "machine": machine_info(), "threads": THREADS, "model": described, "tokens": args.tokens,
              "window": args.window, "targets": TARGETS, "decode_cache": 64, "repeats": args.repeats,
              "variants_spec": {k: dict(zip(("algorithm", "bits", "block", "symmetric", "lm_head_bits",
                                             "accuracy_level"), v)) for k, v in VARIANTS.items()},
              "variants": {}, "complete": False}
    if old and args.resume:
        result["variants"] = {k: v for k, v in old["variants"].items() if k != "float32"}
        result.update({k: old[k] for k in ("torchao_eager",) if k in old})
    feeds = {"input_ids": np.array([[17]], np.int64), "attention_mask": np.ones((1, 65), np.int64),
             "position_ids": np.array([[64]], np.int64), **cache}
    fsess = None
    for name in ["float32", *[v for v in args.variants if v not in result["variants"]]]:
        t0 = time.perf_counter()
        proto = base if name == "float32" else quantize_variant(base, VARIANTS[name])
        blob = proto.SerializeToString()
        qs = round(time.perf_counter() - t0, 1)
        sess = ort.InferenceSession(blob, session_options(1), providers=["CPUExecutionProvider"])
        s = _Session(sess, empty)
        entry = {"quantize_s": qs, "model_bytes": len(blob), "perplexity": {}}
        for text, rows in ids.items():
            entry["perplexity"][text] = bundle_perplexity(s, "onnxruntime", rows)["perplexity"]
        f = result["variants"].get("float32", entry)
        if fsess is None:
            fsess = sess
        else:  # one variant at a time beside the float32 session (memory), interleaved rounds
            cases = {n: steady(lambda x=x: x.run(["logits"], feeds)) for n, x in (("float32", fsess), (name, sess))}
            t = {k: summarize(v)["median"] for k, v in interleave(cases, args.repeats).items()}
            entry["decode_s"], entry["float32_decode_s"] = t[name], t["float32"]
            entry["ratios"] = {"bytes": round(entry["model_bytes"] / f["model_bytes"], 4),
                               "perplexity": {x: round(entry["perplexity"][x] / f["perplexity"][x], 4) for x in ids},
                               "decode_speed": round(t["float32"] / t[name], 3)}
            del sess, s
        result["variants"][name] = entry
        del proto, blob
        write_json(out, result)
        print(name, json.dumps(entry), flush=True)
    result["complete"] = True
    write_json(out, result)
    for name, e in result["variants"].items():
        if "ratios" not in e:
            continue
        print(f"{name:24s} bytes {e['ratios']['bytes']:.3f}  ppl " +
              " ".join(f"{t} {100 * (r - 1):+.1f}%" for t, r in e["ratios"]["perplexity"].items()) +
              f"  decode {e['ratios']['decode_speed']:.2f}x")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

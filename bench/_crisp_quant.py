"""``bench_fold_layouts.py --crisp-quant``: crisp-edge's fold fused with per-channel int8 quantization
(``fold_kernel.fold_quant_group``, a swappable int8 bundle's switch) over ViT-S's groups, by how the basis is stored.

Kinds: ``f32`` (the basis (r, u) float32), ``i8`` (its int8 codes, each term's scale in the mixers) and ``i8_cm``
(the same codes channel-major, ``fold_kernel.channel_major``, as both runtimes' swappable int8 bundles store them
where the shapes allow). Checked before timing: ``i8`` gives the codes and scales of the float fold of its codes,
``i8_cm`` exactly ``i8``'s, ``f32`` numpy's product's to a rounding step.
"""
from __future__ import annotations

import sys

import numpy as np

KINDS = ("f32", "i8", "i8_cm")


def crisp_quant_cases(groups: int, rng: np.random.Generator, roles, n: int, r: int, s: int, timer) -> dict:
    """``fold_crisp_quant_<kind>_<role>`` -> one timed ``fold_quant_group`` over ``groups`` groups of each role
    (``roles``: (name, d_out, d_in)), outputs written in place; ``timer`` wraps a function into a timed case."""
    from crisp_edge.export import fold_kernel

    if fold_kernel.kernel() is None:
        sys.exit(f"--crisp-quant: {fold_kernel.error()}")
    cases = {}
    for role, d_out, d_in in roles:
        calls = {k: [] for k in KINDS}
        for _ in range(groups):
            bt = (rng.standard_normal((r, d_out * d_in // s)) / np.sqrt(r)).astype(np.float32)
            g = rng.standard_normal((n, r, s)).astype(np.float32)
            scale = np.abs(bt).max(1) / 127
            codes, g8 = np.round(bt / scale[:, None]).astype(np.int8), (g * scale[None, :, None]).astype(np.float32)
            cm = fold_kernel.channel_major(codes, d_out, d_in, s)
            calls["f32"].append((bt, g, False, fold_kernel.fold_quant_group(bt, g, True, d_out, d_in)))
            calls["i8"].append((codes, g8, False, fold_kernel.fold_quant_group(codes, g8, True, d_out, d_in)))
            calls["i8_cm"].append((cm, g8, True, fold_kernel.fold_quant_group(cm, g8, True, d_out, d_in, cm=True)))
            same = fold_kernel.fold_quant_group(codes.astype(np.float32), g8, True, d_out, d_in)
            if not all(np.array_equal(a, b) for a, b in zip(sum(calls["i8"][-1][3], []), sum(same, []))):
                sys.exit(f"--crisp-quant {role}: the int8 basis' codes differ from the float fold of its codes")
            if not all(np.array_equal(a, b) for a, b in zip(sum(calls["i8_cm"][-1][3], []), sum(same, []))):
                sys.exit(f"--crisp-quant {role}: the channel-major codes differ from the product-order ones")
            for c, sc, a in zip(*calls["f32"][-1][3], g):
                if not (np.abs(c.T * sc[:, None] - (bt.T @ a).reshape(d_out, d_in)) <= 0.51 * sc[:, None]).all():
                    sys.exit(f"--crisp-quant {role}: the float basis' codes are not numpy's product quantized")
        for kind, group in calls.items():
            def run(group=group, d_out=d_out, d_in=d_in) -> None:
                for b, g, cm, outs in group:
                    fold_kernel.fold_quant_group(b, g, True, d_out, d_in, outs, cm=cm)
            cases[f"fold_crisp_quant_{kind}_{role}"] = timer(run)
    return cases


def summarize(med: dict, roles: list[str]) -> dict:
    """The result keys: seconds per kind and role, and int8 (product order, channel-major) against float32."""
    sec = {k: {r: med[f"fold_crisp_quant_{k}_{r}"]["median"] for r in roles} for k in KINDS}
    return {"crisp_quant_seconds": sec,
            "crisp_quant_i8_vs_f32": {r: round(sec["i8"][r] / sec["f32"][r], 4) for r in roles},
            "crisp_quant_i8_cm_vs_i8": {r: round(sec["i8_cm"][r] / sec["i8"][r], 4) for r in roles}}

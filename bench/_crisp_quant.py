"""``bench_fold_layouts.py --crisp-quant``: crisp-edge's fold fused with per-channel int8 quantization
(``fold_kernel.fold_quant_group``, a swappable int8 bundle's switch) over ViT-S's groups, by how the basis is stored.

Kinds: ``f32`` (the basis (r, u) float32), ``i8`` (its int8 codes, each term's scale in the mixers) and ``i8_cm``
(the same codes channel-major, ``fold_kernel.channel_major``, as both runtimes' swappable int8 bundles store them
where the shapes allow). Checked before timing: ``i8`` gives the codes and scales of the float fold of its codes,
``i8_cm`` exactly ``i8``'s, ``f32`` numpy's product's to a rounding step. ``--baseline REV`` also times ``i8_cm``
with the kernel as of git revision REV, built beside this one (``i8_cm_baseline``; its codes checked to be the same).
"""
from __future__ import annotations

import contextlib
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

KINDS = ("f32", "i8", "i8_cm")


def baseline_library(rev: str):
    """``export/kernels/fold_c.cpp`` and ``fold_core.h`` as of git revision ``rev``, built in a temporary folder,
    loaded and bound (``fold_kernel.bind``; the folder is removed, the library stays loaded): the kernel before a
    change, to time beside it in one run."""
    from crisp_edge.export import fold_kernel

    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="crisp-fold-baseline-") as tmp:
        folder = Path(tmp)
        for name in ("fold_c.cpp", "fold_core.h"):
            got = subprocess.run(["git", "show", f"{rev}:export/kernels/{name}"], cwd=repo, capture_output=True)
            if got.returncode != 0:
                sys.exit(f"--baseline {rev}: git has no export/kernels/{name} there "
                         f"({got.stderr.decode().strip()[:200]})")
            (folder / name).write_bytes(got.stdout)
        lib = fold_kernel.build(folder / "libcrisp_fold_baseline.so", source=folder / "fold_c.cpp")
        return fold_kernel.bind(ctypes.CDLL(str(lib)))


@contextlib.contextmanager
def using(lib):
    """``fold_kernel``'s calls go to ``lib`` (None: unchanged) inside the block."""
    from crisp_edge.export import fold_kernel

    if lib is None:
        yield
        return
    fold_kernel.kernel()
    saved, fold_kernel._state["lib"] = fold_kernel._state["lib"], lib
    try:
        yield
    finally:
        fold_kernel._state["lib"] = saved


def crisp_quant_cases(groups: int, rng: np.random.Generator, roles, n: int, r: int, s: int, timer,
                      baseline=None) -> dict:
    """``fold_crisp_quant_<kind>_<role>`` -> one timed ``fold_quant_group`` over ``groups`` groups of each role
    (``roles``: (name, d_out, d_in)), outputs written in place; ``timer`` wraps a function into a timed case.
    ``baseline``: another build of the kernel (``baseline_library``), whose channel-major case is added as
    ``fold_crisp_quant_i8_cm_baseline_<role>`` after its codes and scales are checked to be this build's."""
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
            if baseline is not None:
                with using(baseline):
                    base = fold_kernel.fold_quant_group(cm, g8, True, d_out, d_in, cm=True)
                if not all(np.array_equal(a, b) for a, b in zip(sum(base, []), sum(same, []))):
                    sys.exit(f"--crisp-quant {role}: the baseline build's codes differ from this build's")
                calls.setdefault("i8_cm_baseline", []).append((cm, g8, True, base))
            for c, sc, a in zip(*calls["f32"][-1][3], g):
                if not (np.abs(c.T * sc[:, None] - (bt.T @ a).reshape(d_out, d_in)) <= 0.51 * sc[:, None]).all():
                    sys.exit(f"--crisp-quant {role}: the float basis' codes are not numpy's product quantized")
        for kind, group in calls.items():
            def run(group=group, d_out=d_out, d_in=d_in, lib=baseline if kind.endswith("_baseline") else None) -> None:
                with using(lib):
                    for b, g, cm, outs in group:
                        fold_kernel.fold_quant_group(b, g, True, d_out, d_in, outs, cm=cm)
            cases[f"fold_crisp_quant_{kind}_{role}"] = timer(run)
    return cases


def summarize(med: dict, roles: list[str]) -> dict:
    """The result keys: seconds per kind and role, and int8 (product order, channel-major) against float32."""
    kinds = KINDS + (("i8_cm_baseline",) if f"fold_crisp_quant_i8_cm_baseline_{roles[0]}" in med else ())
    sec = {k: {r: med[f"fold_crisp_quant_{k}_{r}"]["median"] for r in roles} for k in kinds}
    out = {"crisp_quant_seconds": sec,
           "crisp_quant_i8_vs_f32": {r: round(sec["i8"][r] / sec["f32"][r], 4) for r in roles},
           "crisp_quant_i8_cm_vs_i8": {r: round(sec["i8_cm"][r] / sec["i8"][r], 4) for r in roles}}
    if "i8_cm_baseline" in sec:
        out["crisp_quant_i8_cm_vs_baseline"] = {r: round(sec["i8_cm"][r] / sec["i8_cm_baseline"][r], 4) for r in roles}
        out["crisp_quant_i8_cm_vs_baseline_all_groups"] = round(sum(sec["i8_cm"].values())
                                                                / sum(sec["i8_cm_baseline"].values()), 4)
    return out

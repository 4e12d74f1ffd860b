"""The main job: the CRISP path on the embedded Fashion-MNIST ViT, printed for a person to read."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import CrispConfig, RoleConfig
from .data import load_fashion_mnist
from .evaluate import accuracy, max_abs_diff, predict, top1_agreement
from .models import EMBEDDED_VIT_NAME, embedded_vit_card, load_embedded_vit
from .report import format_table
from .retrofit import retrofit_

#: The demo's CRISP layout for the 6-block embedded ViT: two groups of 3 blocks per role, s=4, full
#: rank r = 3*4 = 12 (48 mixer numbers per layer).
DEMO_CONFIG = CrispConfig(default=RoleConfig(s=4, group_size=3))


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 72 - len(title)))


def run_demo(out_dir: str | Path = "crisp-edge-demo", limit: int | None = None, threads: int | None = None) -> dict:
    """Run the demo, print what it finds, and return the numbers as a dict."""
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    results: dict = {}

    _section("1. the embedded model")
    card = embedded_vit_card()
    model = load_embedded_vit()
    x, y = load_fashion_mnist("test", limit=limit)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{EMBEDDED_VIT_NAME}: timm VisionTransformer, {n_params:,} parameters, trained by this project on "
          f"Fashion-MNIST (recorded test accuracy {100 * card['test_accuracy']:.2f}%).")
    ref = predict(model, x, progress=True, desc="original")
    results["original_accuracy"] = accuracy(ref, y)
    print(f"original model: {100 * results['original_accuracy']:.2f}% on {len(x):,} test images")

    _section("2. retrofit at full capacity (closed form, Alg. 2)")
    crisp = copy.deepcopy(model)
    report = retrofit_(crisp, DEMO_CONFIG)
    print(report.format())
    out = predict(crisp, x, progress=True, desc="CRISP")
    results.update(crisp_accuracy=accuracy(out, y), top1_agreement=top1_agreement(out, ref),
                   max_abs_logit_diff=max_abs_diff(out, ref), worst_layer_error=report.max_error,
                   retrofit_seconds=report.seconds)
    print(f"CRISP model: {100 * results['crisp_accuracy']:.2f}% accuracy; top-1 agreement with the original "
          f"{100 * results['top1_agreement']:.2f}%; max |logit diff| {results['max_abs_logit_diff']:.1e}")

    _section("3. checkpoint: safetensors + JSON, reloaded")
    ckpt = save_checkpoint(crisp, out_dir / "checkpoint", extra={"retrofit": report.to_dict(), "model": EMBEDDED_VIT_NAME})
    reloaded = load_checkpoint(ckpt)
    same = torch.equal(predict(reloaded, x[:256]), predict(crisp, x[:256]))
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    results["checkpoint_roundtrip_identical"] = same
    print(f"wrote {ckpt}/ ({size / 1e6:.2f} MB); reloaded outputs identical: {same}")

    _section("4. data-free compression preview (closed form below full rank)")
    rows = []
    for r in (12, 9, 6, 3):
        student = copy.deepcopy(model)
        rep = retrofit_(student, CrispConfig(default=RoleConfig(s=4, group_size=3, r=r)), progress=False)
        acc = accuracy(predict(student, x), y)
        rows.append([f"r={r}", f"{100 * rep.budget.kept_fraction:.0f}%", rep.max_error, f"{100 * acc:.2f}%"])
        results.setdefault("preview", []).append({"r": r, "kept_fraction": rep.budget.kept_fraction,
                                                  "worst_layer_error": rep.max_error, "accuracy": acc})
    print(format_table(["rank", "kept weights", "worst layer err", "accuracy"], rows))
    print("(data-free best rank-r fits: at s=4 they lose accuracy fast, which is why compression is\n"
          " trained by distillation from the full-capacity model, DESIGN.md section 2)")

    results["seconds"] = time.perf_counter() - t0
    _section(f"done in {results['seconds']:.0f} s")
    return results

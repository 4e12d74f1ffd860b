"""Train the embedded default model: a small timm VisionTransformer on Fashion-MNIST.

No pretrained ViT can be downloaded here, so crisp-edge ships one it trained itself. This script is
how: the architecture is ``crisp_edge.models.sources.EMBEDDED_VIT_SOURCE`` (6 blocks, width 192, 7x7 patches
on 28x28 grey images, 2.7M parameters), trained from scratch on the 60,000 training images with
AdamW, a cosine schedule, label smoothing and light augmentation (random shifts, horizontal flips).
It writes ``crisp_edge/assets/fmnist_vit/model.safetensors`` and ``card.json`` (the recipe, the
per-epoch test accuracy and the wall time).

    python examples/train_fmnist_vit.py --epochs 12 --threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from tqdm import tqdm

from crisp_edge.data.fashion_mnist import load_fashion_mnist
from crisp_edge.files.io import atomic_write_bytes, atomic_write_json
from crisp_edge.models.sources import EMBEDDED_VIT_SOURCE, build_model

OUT_DIR = Path(__file__).resolve().parents[1] / "crisp_edge" / "assets" / "fmnist_vit"


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random shifts of up to 2 pixels and horizontal flips (both label-preserving for clothing)."""
    n = x.shape[0]
    padded = F.pad(x[:, 0], (2, 2, 2, 2), value=float(x.min()))
    dy = torch.randint(0, 5, (n,), generator=generator)
    dx = torch.randint(0, 5, (n,), generator=generator)
    rows = (torch.arange(28)[None, :] + dy[:, None])[:, :, None].expand(n, 28, 28)
    cols = (torch.arange(28)[None, :] + dx[:, None])[:, None, :].expand(n, 28, 28)
    out = padded[torch.arange(n)[:, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        out[mask] = out[mask].flip(-1)
    return out[:, None]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--continue", dest="cont", action="store_true",
                   help="start from the weights in --out (a second stage; its card keeps the first stage's)")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--no-flip", action="store_true", help="shifts only, no horizontal flips")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    model = build_model(EMBEDDED_VIT_SOURCE)
    previous = None
    if args.cont:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.out / "model.safetensors")))
        previous = json.loads((args.out / "card.json").read_text())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, max(1, args.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    )
    history, start = [], time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for step in bar:
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb = augment(x_train[idx], gen, flip=not args.no_flip)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "test_accuracy": acc, "elapsed_s": round(time.time() - start, 1)})
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.time() - start:.0f}s)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(args.out / "model.safetensors", st_save(state, metadata={"format": "pt"}))
    card = {
        "name": "fmnist-vit",
        "trained_by": "the crisp-edge project, with examples/train_fmnist_vit.py (not a third-party model)",
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist): 60,000 train / 10,000 test images",
        "source": EMBEDDED_VIT_SOURCE,
        "parameters": sum(v.numel() for v in state.values()),
        "test_accuracy": history[-1]["test_accuracy"],
        "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "history": history,
        "train_time_s": round(time.time() - start, 1) + (previous["train_time_s"] if previous else 0.0),
        "torch_version": torch.__version__,
    }
    if previous:
        card["previous_stages"] = previous.get("previous_stages", []) + [
            {k: previous[k] for k in ("recipe", "history", "test_accuracy", "train_time_s")}]
    atomic_write_json(args.out / "card.json", card)
    print(json.dumps({k: card[k] for k in ("test_accuracy", "parameters", "train_time_s")}))


if __name__ == "__main__":
    main()

"""``crisp-edge compress``: shrink a CRISP checkpoint's bases to a budget by distillation (Alg. 4).

    crisp-edge compress ckpt/ --keep 0.5 --out small/                 # 50% of the targeted weights
    crisp-edge compress fmnist-vit --keep 0.25 --method greedy --out small/ --eval

Under ``torchrun`` (``torchrun --nproc-per-node N -m crisp_edge.cli compress ...``) each process
joins the process group (NCCL on CUDA, else gloo), distillation runs data-parallel (DDP), and rank 0
alone writes the checkpoint and prints.

The teacher is a CRISP checkpoint folder (or ``fmnist-vit``: the embedded ViT retrofitted at full
capacity). Distillation data: ``--data PATH`` (images or tensors your model takes, read with its own
input spec; labels optional), else, for a model that takes the embedded ViT's 28x28 grey images, a seeded
random slice (``--fraction``) of the Fashion-MNIST training split. ``--no-distill`` needs no data at
all. Accuracy: ``--val PATH`` (labelled), or ``--eval`` (Fashion-MNIST test, embedded-ViT inputs only).
Listed in ``crisp_edge.cli.main.VERBS``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from crisp_edge.errors import ConfigError


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def load_teacher(source: str):
    """A CRISP teacher from a checkpoint folder, or the embedded ViT retrofitted at full capacity."""
    from crisp_edge.files.checkpoint import load_checkpoint
    from crisp_edge.models.sources import (
        EMBEDDED_CRISP_CONFIG,
        EMBEDDED_VIT_NAME,
        load_embedded_vit,
    )
    from crisp_edge.training.retrofit import retrofit_

    if source == EMBEDDED_VIT_NAME:
        model = load_embedded_vit()
        retrofit_(model, EMBEDDED_CRISP_CONFIG, progress=False)
        return model
    if not Path(source).is_dir():
        raise ConfigError(f"{source!r} is neither a CRISP checkpoint folder nor {EMBEDDED_VIT_NAME!r}; "
                          "make one with `crisp-edge retrofit MODEL --out DIR`.")
    return load_checkpoint(source)


def distillation_slice(fraction: float, seed: int = 0):
    """``(x, y, indices)``: a seeded random ``fraction`` of the Fashion-MNIST training images."""
    import torch

    from crisp_edge.data.fashion_mnist import load_fashion_mnist

    x, y = load_fashion_mnist("train")
    n = max(1, round(fraction * len(x)))
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx], idx


def _join_torchrun() -> tuple[int, bool]:
    """``(rank, started)``: join the process group torchrun set up in the environment, if any."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return (dist.get_rank() if dist.is_initialized() else 0), False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), True


def cmd_compress(args: argparse.Namespace) -> int:
    rank, started = _join_torchrun()
    try:
        return _compress(args, rank)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _compress(args: argparse.Namespace, rank: int) -> int:
    from crisp_edge.data.fashion_mnist import load_fashion_mnist
    from crisp_edge.files.checkpoint import save_checkpoint
    from crisp_edge.training.compress.distill import DistillConfig
    from crisp_edge.training.compress.vit import compress_vit
    from crisp_edge.training.evaluate import accuracy, predict

    from crisp_edge.data.formats import load_dataset
    from crisp_edge.data.input_spec import KNOWN_SPECS, input_spec_of
    from crisp_edge.errors import DataError
    from crisp_edge.models.sources import EMBEDDED_VIT_NAME

    out = Path(args.out)
    if rank == 0:
        from crisp_edge.files.checkpoint import check_checkpoint_target

        check_checkpoint_target(out, args.overwrite)
    teacher = load_teacher(args.source)
    spec = input_spec_of(teacher)
    # models that take the embedded ViT's 28x28 grey images get Fashion-MNIST as before
    fmnist_inputs = spec.kind == "image" and spec.shape == KNOWN_SPECS[EMBEDDED_VIT_NAME][1].shape
    val = None
    if args.val is not None:
        val = load_dataset(args.val, spec, progress=not args.no_progress)
    if args.eval and not fmnist_inputs:
        raise DataError(f"--eval evaluates on Fashion-MNIST, but the model takes {spec.describe()}; pass --val PATH "
                        "(labelled data in your model's form) instead.")
    if args.data is not None:
        data = load_dataset(args.data, spec, labels="optional", progress=not args.no_progress)
        x, dataset = data.x, {"dataset": str(args.data), "examples": len(data)}
        if x is None or not x.is_floating_point():
            raise DataError(f"{args.data}: `compress` distils vision models on images; use compress-llm for text.")
    elif args.no_distill:
        x, dataset = None, None  # data-free: the SVD init alone, ranks from the weights
    elif fmnist_inputs:
        x, _, _ = distillation_slice(args.fraction, args.seed)
        dataset = {"dataset": "fashion-mnist/train", "fraction": args.fraction, "images": len(x), "seed": args.seed}
    else:
        raise DataError(f"compress distils on inputs the model takes ({spec.describe()}, {spec.source}): pass --data "
                        "PATH (an image folder, flat or in class subfolders, or a .safetensors / .npz with x; labels "
                        "optional), or --no-distill for the data-free SVD init.")
    config = DistillConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lambda_kl=args.lambda_kl,
                           lambda_feat=args.lambda_feat, seed=args.seed)
    student, report = compress_vit(teacher, args.keep, x, method=args.method, init=args.init, config=config,
                                   distill=not args.no_distill, progress=not args.no_progress)
    if rank != 0:
        return 0
    extra = {"compress": report.to_dict() | {"data": dataset}}
    print(report.format())
    if val is not None:
        acc_t = accuracy(predict(teacher, val.x), val.y)
        acc_s = accuracy(predict(student, val.x), val.y)
        extra["compress"]["eval"] = {"data": str(args.val), "examples": len(val), "teacher_accuracy": acc_t,
                                     "student_accuracy": acc_s}
        print(f"{args.val} ({len(val):,} examples): teacher {acc_t:.2%}, compressed {acc_s:.2%}")
    if args.eval:
        xt, yt = load_fashion_mnist("test", limit=args.eval_limit)
        acc_t = accuracy(predict(teacher, xt), yt)
        acc_s = accuracy(predict(student, xt), yt)
        extra["compress"]["eval"] = {"test_images": len(xt), "teacher_accuracy": acc_t, "student_accuracy": acc_s}
        print(f"Fashion-MNIST test ({len(xt):,} images): teacher {acc_t:.2%}, compressed {acc_s:.2%}")
    save_checkpoint(student, out, extra=extra)
    print(f"wrote {out}/ (load with crisp_edge.load_checkpoint; adapt and export it like any CRISP checkpoint)")
    if args.json:
        print(json.dumps(extra["compress"], indent=2))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``compress`` command to ``crisp-edge``'s subparsers; returns its parser."""
    c = subparsers.add_parser("compress", help="shrink a CRISP checkpoint's bases to a parameter budget (distillation)")
    c.add_argument("source", help="a CRISP checkpoint folder (the teacher), or fmnist-vit")
    c.add_argument("--keep", type=_fraction, required=True,
                   help="kept fraction of the targeted linear weights, e.g. 0.5 (a 50%% reduction)")
    c.add_argument("--out", required=True, help="folder for the compressed checkpoint")
    c.add_argument("--method", default="greedy", choices=["uniform", "greedy"], help="rank allocation (default greedy)")
    c.add_argument("--init", default=None, choices=["svd-whitened", "svd", "random"],
                   help="student init (default: svd, Alg. 4's init; svd-whitened: weighted by the distillation "
                        "inputs, closer on their distribution, worse as bases for other tasks)")
    c.add_argument("--data", help="distillation inputs your model takes: an image folder (flat or in class "
                                  "subfolders) or a .safetensors / .npz with x; labels optional")
    c.add_argument("--val", help="labelled data to report the teacher's and the student's accuracy on")
    c.add_argument("--fraction", type=_fraction, default=0.03,
                   help="without --data: the fraction of the Fashion-MNIST training split to distil on (default 0.03)")
    c.add_argument("--epochs", type=int, default=4)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--lr", type=float, default=2e-3)
    c.add_argument("--lambda-kl", type=float, default=1.0)
    c.add_argument("--lambda-feat", type=float, default=0.2)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-distill", action="store_true",
                   help="stop after the SVD init (data-free, 'mimicry only'; with --data, ranks still use it)")
    c.add_argument("--eval", action="store_true", help="report teacher and student accuracy on the test split")
    c.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    c.add_argument("--overwrite", action="store_true", help="replace the checkpoint already in --out")
    c.add_argument("--json", action="store_true", help="also print the report as JSON")
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")
    c.set_defaults(func=cmd_compress)
    return c

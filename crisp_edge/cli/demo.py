"""crisp-edge demo: the whole path on the embedded Fashion-MNIST ViT."""
from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    from crisp_edge.apps.demo import run_demo

    run_demo(out_dir=args.out, limit=args.limit, threads=args.threads, adapt_epochs=args.adapt_epochs,
             keep_fraction=args.keep, distill_fraction=args.distill_fraction, distill_epochs=args.distill_epochs)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = subparsers.add_parser("demo", help="run the whole path on the embedded Fashion-MNIST ViT")
    d.add_argument("--out", default="crisp-edge-demo", help="folder for the artifacts (default: ./crisp-edge-demo)")
    d.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    d.add_argument("--adapt-epochs", type=int, default=3, help="epochs per task adaptation (default 3)")
    d.add_argument("--keep", type=float, default=0.5, help="kept fraction of the targeted weights (default 0.5)")
    d.add_argument("--distill-fraction", type=float, default=0.02, help="training slice to distil on (default 0.02)")
    d.add_argument("--distill-epochs", type=int, default=3, help="distillation epochs (default 3)")
    d.set_defaults(func=cmd_demo)
    return d

"""``crisp-edge parity``: check an exported bundle against its PyTorch reference, with CI reports.

    crisp-edge parity bundle/                                   # run it in its runtime here
    crisp-edge parity bundle/ --outputs device_outputs.npz      # outputs produced elsewhere (or a .npy folder)
    crisp-edge parity bundle/ --save-outputs outs.npz           # also write what the runtime produced
    crisp-edge parity bundle/ --checkpoint ckpt/ --mixers mnist.safetensors --reference-dtype float64
                                                                # a fresh reference (GPU when present)
    crisp-edge parity bundle/ --checkpoint ckpt/ --inputs val_images/   # also on your data: top-1 agreement
    crisp-edge parity bundle/ --allow-unchecked digits         # skip a task added without a reference, by name

Writes ``parity.json`` (versioned schema: docs/parity-report.md), ``parity.junit.xml`` and
``parity.png`` into ``--report-dir`` (default ``parity-report/``), prints a short summary, and exits
0 when every output matches, 1 on any mismatch or refused file (the reports name the fault), 2 on
bad arguments. Listed in ``crisp_edge.cli.main.VERBS``.
"""
from __future__ import annotations

import argparse
import io
import sys

from crisp_edge.cli.options import THREADS, float_in

EXIT_PASS, EXIT_FAIL = 0, 1
MAX_LISTED = 10


def cmd_parity(args: argparse.Namespace) -> int:
    import numpy as np

    from crisp_edge.errors import ConfigError
    from crisp_edge.export.parity.check import check_bundle, check_outputs, run_outputs
    from crisp_edge.export.parity.report import check_outputs_target, write_reports
    from crisp_edge.files.io import atomic_write_bytes

    if args.save_outputs and not args.outputs:
        check_outputs_target(args.save_outputs)  # before any run: never replaces a file it did not write
    tasks = args.task or None
    reference = model = None
    if args.inputs and not args.checkpoint:
        raise ConfigError("--inputs needs --checkpoint CKPT: the PyTorch reference on your data is computed from the "
                          "checkpoint the bundle was exported from.")
    if args.tokenizer and not args.inputs:
        raise ConfigError("--tokenizer tokenizes --inputs text; pass --inputs too.")
    if args.checkpoint:
        if args.outputs:
            raise ConfigError("--checkpoint recomputes the reference for a run here; it does not combine with --outputs.")
        from crisp_edge.export.parity.check import recompute_reference
        from crisp_edge.files.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint)
        reference = recompute_reference(args.bundle, model, args.mixers or (), device=args.reference_device,
                                        dtype=args.reference_dtype)
    elif args.mixers or args.reference_device != "auto" or args.reference_dtype != "float32":
        raise ConfigError("--mixers, --reference-device and --reference-dtype recompute the reference from a "
                          "checkpoint: pass --checkpoint CKPT too.")
    if args.outputs:
        report = check_outputs(args.bundle, args.outputs, tasks=tasks, atol=args.atol, min_cosine=args.min_cosine,
                               runtime=args.runtime, allow_unchecked=args.allow_unchecked or ())
    else:
        report = check_bundle(args.bundle, threads=args.threads, tasks=tasks, atol=args.atol,
                              min_cosine=args.min_cosine, progress=not args.no_progress, reference=reference,
                              allow_unchecked=args.allow_unchecked or ())
        if args.inputs:
            from crisp_edge.export.parity.data import check_inputs
            from crisp_edge.models.tokenizers import tokenizer_of

            text = args.tokenizer or str(args.inputs).lower().endswith((".jsonl", ".csv"))
            check_inputs(report, args.bundle, args.inputs, model, args.mixers or (), threads=args.threads,
                         tokenizer=tokenizer_of(model, args.tokenizer) if text else None,
                         device=args.reference_device, dtype=args.reference_dtype)
    if (args.per_layer or not report.passed) and not args.outputs:
        from crisp_edge.export.parity.layers import locate_divergence

        locate_divergence(report, args.bundle, model, threads=args.threads)
    written = write_reports(report, args.report_dir, json_path=args.json, junit_path=args.junit,
                            plot_path=args.plot, plot=not args.no_plot)
    if args.save_outputs:
        if args.outputs:
            print("crisp-edge parity: --save-outputs ignored with --outputs (nothing was run here)", file=sys.stderr)
        else:
            buf = io.BytesIO()
            np.savez(buf, **run_outputs(args.bundle, threads=args.threads, tasks=tasks))
            atomic_write_bytes(args.save_outputs, buf.getvalue())
            written["outputs"] = args.save_outputs
    if args.verbose and report.comparisons:
        print(report.format())
    print(report.summary().split("\n")[0])
    for task, d in (report.data.get("tasks") or {}).items():
        acc = "" if d["pytorch_accuracy"] is None else (f"; accuracy on the labels: PyTorch {d['pytorch_accuracy']:.1%}, "
                                                        f"runtime {d['runtime_accuracy']:.1%}")
        agree = "n/a" if d["top1_agreement"] is None else f"{d['top1_agreement']:.1%}"
        print(f"  your data ({report.data['examples']} examples), task {task!r}: top-1 agreement {agree}{acc}")
    if report.layers.get("first_over"):
        print(f"  diverged first at layer {report.layers['first_over']['layer']!r} "
              f"(max abs {report.layers['first_over']['max_abs']:.3g})")
    problems = report.problems()
    for line in problems[:MAX_LISTED]:
        print(f"  FAIL {line}")
    if len(problems) > MAX_LISTED:
        print(f"  ... and {len(problems) - MAX_LISTED} more (see the JSON report)")
    print("reports: " + ", ".join(f"{k} {v}" for k, v in written.items()))
    return EXIT_PASS if report.passed else EXIT_FAIL


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``parity`` command to ``crisp-edge``'s subparsers; returns its parser."""
    p = subparsers.add_parser(
        "parity", help="check an exported bundle against its PyTorch reference (JSON, JUnit XML and PNG reports)",
        description="Run a bundle in its runtime (or take outputs produced elsewhere with --outputs) and compare every "
                    "output with the PyTorch reference stored in the bundle. Exit status 0: parity; 1: a mismatch or a "
                    "refused file (named in the reports); 2: bad arguments.")
    p.add_argument("bundle", help="an export bundle folder (ONNX Runtime or ExecuTorch)")
    p.add_argument("--outputs", help="outputs produced elsewhere: an .npz, or a folder of .npy files, keyed "
                                     "output.{task}.{i}.{name}; nothing is run here")
    p.add_argument("--task", action="append", help="check only this task (repeatable; default: every task with "
                                                   "reference outputs, or every task present in --outputs)")
    p.add_argument("--threads", type=THREADS, default=1, help="runtime threads (default 1)")
    p.add_argument("--atol", type=float_in(0.0), default=None, help="override the tolerance table's absolute "
                                                                   "tolerance (a finite number >= 0)")
    p.add_argument("--min-cosine", type=float_in(-1.0, 1.0), default=None,
                   help="override the tolerance table's minimum cosine (-1..1)")
    p.add_argument("--runtime", default=None, help="with --outputs: whose tolerance applies (onnxruntime, executorch; "
                                                   "default: the bundle's runtime)")
    p.add_argument("--checkpoint", default=None, help="recompute the reference from this CRISP checkpoint (the "
                                                      "model the bundle was exported from) instead of the stored one")
    p.add_argument("--mixers", action="append", help="with --checkpoint: a task's mixer file, checked as its task "
                                                     "(repeatable)")
    p.add_argument("--reference-device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="with --checkpoint: where PyTorch runs (auto: CUDA when present, else CPU)")
    p.add_argument("--reference-dtype", default="float32", choices=["float32", "float64"],
                   help="with --checkpoint: float64 for a tighter reference")
    p.add_argument("--allow-unchecked", action="append", metavar="NAME",
                   help="skip this task, added without a PyTorch reference, instead of failing on it (repeatable)")
    p.add_argument("--inputs", default=None, help="with --checkpoint: your own inputs (an image folder, .npz / "
                                                  ".safetensors with x [and y], JSONL / CSV text with --tokenizer), run "
                                                  "through the bundle and PyTorch; the report adds top-1 agreement")
    p.add_argument("--tokenizer", default=None, help="with --inputs text: a local Hugging Face tokenizer folder or a .gguf file "
                        "(default: the one recorded with the checkpoint's weights)")
    p.add_argument("--per-layer", action="store_true",
                   help="compare intermediate outputs layer by layer with PyTorch's and name the first layer over "
                        "tolerance (done on any FAIL; the model: --checkpoint, or the checkpoint the bundle records)")
    p.add_argument("--report-dir", default="parity-report", help="folder for parity.json, parity.junit.xml and "
                                                                 "parity.png (default ./parity-report)")
    p.add_argument("--json", default=None, help="JSON report path (default REPORT_DIR/parity.json)")
    p.add_argument("--junit", default=None, help="JUnit XML path (default REPORT_DIR/parity.junit.xml)")
    p.add_argument("--plot", default=None, help="PNG plot path (default REPORT_DIR/parity.png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the error-distribution plot")
    p.add_argument("--save-outputs", default=None, help="also write the runtime's outputs to this .npz (the format "
                                                        "--outputs reads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="print every comparison")
    p.set_defaults(func=cmd_parity)
    return p

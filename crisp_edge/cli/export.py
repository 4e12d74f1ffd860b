"""``crisp-edge export``: the command-line face of ``export_onnx`` and ``export_executorch``.

    crisp-edge export --target onnx --mode swappable ckpt/ --out bundle/ --task mnist.mixers.safetensors
    crisp-edge export --target executorch --recipe xnnpack --mode swappable ckpt/ --out et/ --task mnist.mixers.safetensors
    crisp-edge export-task et/ digits.mixers.safetensors      # add a task to a swappable bundle (.ptd / .onnx_adapter)

Listed in ``crisp_edge.cli.main.VERBS``; ``export-task`` lives in ``crisp_edge.cli.export_task``.
"""
from __future__ import annotations

import argparse
import sys

from crisp_edge.cli.options import BATCH, COUNT, THREADS, int_in

TARGETS = ("onnx", "executorch")


def cmd_export(args: argparse.Namespace) -> int:
    from crisp_edge.export.onnx.export import export_onnx
    from crisp_edge.files.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    if args.target == "executorch":
        return _export_executorch(model, args)
    lm = _lm_options(model, args)
    bundle = export_onnx(model, args.out, mode=args.mode, tasks=args.task or (), opset=args.opset,
                         overwrite=args.overwrite, threads=args.threads, exporter=args.exporter,
                         quantize=args.quantize, checkpoint=args.checkpoint, **lm)
    m = bundle.manifest
    p = m["params"]
    print(f"wrote {args.out}: {args.mode} ONNX bundle (opset {m['opset']}{_precision(m)}), weights "
          f"{p['weights_bytes']:,} bytes for {p['stored']:,} stored parameters")
    _print_contents(m)
    return 0


def _lm_options(model, args: argparse.Namespace) -> dict:
    """A causal LM's export options: the cache length and its tokenizer (``--tokenizer``, else the one of the
    GGUF / Hugging Face folder the checkpoint's weights came from, when it is still there)."""
    from crisp_edge.errors import ConfigError
    from crisp_edge.export.lm import is_causal_lm
    from crisp_edge.models.tokenizers import tokenizer_of

    if not is_causal_lm(model):
        if args.max_seq_len is not None or args.tokenizer is not None:
            raise ConfigError("--max-seq-len and --tokenizer apply to causal language models (LlamaForCausalLM).")
        return {}
    tok = tokenizer_of(model, args.tokenizer)
    if tok is None:
        print("note: no tokenizer found for this model (pass --tokenizer); the bundle takes token ids.", file=sys.stderr)
    return {"tokenizer": tok, "max_seq_len": args.max_seq_len}


def _export_executorch(model, args: argparse.Namespace) -> int:
    from crisp_edge.export.executorch.export import export_executorch
    from crisp_edge.testing import example_inputs

    lm = _lm_options(model, args)
    example = None if lm else example_inputs(model, batch=args.batch)
    bundle = export_executorch(model, args.out, mode=args.mode, recipe=args.recipe, tasks=args.task or (),
                               example_input=example, max_classes=args.max_classes,
                               overwrite=args.overwrite, threads=args.threads, quantize=args.quantize,
                               checkpoint=args.checkpoint, **lm)
    m = bundle.manifest
    shape = f"cache {m['lm']['max_seq_len']} tokens" if lm else f"batch {m['batch']}"
    print(f"wrote {args.out}: {args.mode} ExecuTorch bundle ({args.recipe}{_precision(m)}, {shape}), program "
          f"{m['params']['program_bytes']:,} bytes for {m['params']['stored']:,} stored parameters")
    for method, ops in m["non_delegated_ops"].items():
        if ops and args.recipe != "portable":
            print(f"  {method}: not delegated: " + ", ".join(f"{k} x{v}" for k, v in ops.items()))
    _print_contents(m)
    return 0


def _print_contents(m: dict) -> None:
    """What every bundle reports after its header line: its tasks, the language-model section, parity."""
    for name, t in m["tasks"].items():
        print(f"  task {name}: {t['file']} ({t['bytes']:,} bytes)")
    if "lm" in m:
        tok = m["lm"]["tokenizer"]
        print(f"  language model: key/value cache of {m['lm']['max_seq_len']} tokens, "
              + (f"tokenizer {tok['file']} ({tok['vocab_size']:,} tokens)" if tok else "no tokenizer (prompts are token ids)")
              + f", generation references for {sorted(m['lm']['generation'])}")
    print(f"parity vs PyTorch: max abs {m['parity']['max_abs']:.2e} over {m['parity']['checked_cases']} outputs "
          f"(tolerance {m['tolerance']['atol']:g})")


def _precision(manifest: dict) -> str:
    q = manifest.get("quantize")
    return f", {q['scheme']}: weights {q['weights']}" if q else ""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` command to ``crisp-edge``'s subparsers; returns its parser."""
    e = subparsers.add_parser("export", help="export a CRISP checkpoint to an edge runtime bundle (validated)")
    e.add_argument("checkpoint", help="a CRISP checkpoint folder")
    e.add_argument("--target", default="onnx", choices=TARGETS, help="runtime (default onnx)")
    e.add_argument("--exporter", default="auto", choices=["torch", "optimum", "auto"],
                   help="onnx: torch (TorchScript, every mode) or optimum (Hugging Face ViT/LLaMA, dense only); "
                        "auto (default): optimum for a Hugging Face model in dense mode, else torch")
    e.add_argument("--mode", default="swappable", choices=["dense", "factored", "swappable"],
                   help="dense: folded weights; factored: bases stored once; swappable (default): per-task adapters")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--task", action="append", help="a mixer file to ship as a task adapter (repeatable; swappable)")
    e.add_argument("--recipe", default="xnnpack", choices=["xnnpack", "portable"],
                   help="executorch: XNNPACK delegate (default) or portable kernels only")
    e.add_argument("--batch", type=BATCH, default=1, help="executorch: the program's (static) batch size")
    e.add_argument("--max-classes", type=COUNT, default=None,
                   help="executorch swappable: head capacity for tasks added later (default: the largest head shipped)")
    e.add_argument("--opset", type=int_in(1, 99), default=18,
                   help="onnx: ONNX opset (default 18; the exporter and ONNX Runtime here take 14..23 for dense "
                        "bundles, 18..23 for factored and swappable)")
    e.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="dense mode (default: float32): int8 weights (per channel) with dynamically quantized int8 "
                        "activations; int4 (language models only): 4-bit weights in groups of 32 spanning each group's "
                        "min..max (a float step and offset per group), lm_head 8-bit, int8 activations")
    e.add_argument("--max-seq-len", type=int_in(8, 1 << 20), default=None,
                   help="language models: the longest prompt + generation a session accepts (default 256, at most "
                        "the model's max_position_embeddings)")
    e.add_argument("--tokenizer", default=None,
                   help="language models: the tokenizer to store in the bundle (tokenizer.json, a Hugging Face "
                        "folder, a .gguf file or 'smollm2')")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing bundle of the same runtime (any other folder is refused, never deleted)")
    e.add_argument("--threads", type=THREADS, default=1, help="runtime threads for validation")
    e.set_defaults(func=cmd_export)
    return e

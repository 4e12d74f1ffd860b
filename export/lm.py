"""The runtime-neutral part of language-model bundles: the manifest's ``lm`` section, the fixed
reference prompts, and the ``generate`` / ``check_generation`` every runtime's LM session shares.

A language-model bundle (ExecuTorch or ONNX Runtime, dense or swappable) adds to the usual manifest::

    "lm": {"kind": "causal-lm", "max_seq_len": 256, "vocab_size": 49152,
           "tokenizer": {"file": "tokenizer.json", "sha256": ..., "vocab_size": ..., "bos_id": ..., "eos_ids": [...]},
           "generation": {"<task>": <record_generation record>, ...}}

``tokenizer`` is null when the model came without one (then prompts are token ids). ``generation`` holds
one greedy reference per task (the default task of a dense bundle is ``"default"``), recorded from the
PyTorch model at export, so ``crisp-edge parity`` checks generation without PyTorch.

A runtime's LM session mixes in :class:`LMSessionMixin` and provides ``lm_stepper()`` (a
:class:`crisp_edge.generation.CachedStepper` over its cache) and ``set_task`` (swappable bundles).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from crisp_edge.errors import ConfigError, DataError
from crisp_edge.export.errors import BundleError
from crisp_edge.export.parity.generation import GENERATION_TOKENS, GenerationParity, check_generation, record_generation
from crisp_edge.generation import BundleTokenizer, LMStepper, Sampling, generate

LM_KIND = "causal-lm"
#: The cache length a bundle gets when none is asked for (at most the model's position range).
DEFAULT_MAX_SEQ_LEN = 256
#: Hugging Face causal-LM classes the exporters handle with a key/value cache.
LM_CLASSES = ("LlamaForCausalLM",)
#: Reference prompts (text; tokenized with the bundle's tokenizer) of three styles: fact, scripture, code.
REFERENCE_TEXTS = ("The capital of France is", "In the beginning God created", "def fibonacci(n):")
#: Token counts of the reference prompts when the model has no tokenizer (seeded random ids).
REFERENCE_LENGTHS = (5, 9, 3)
DEFAULT_TASK = "default"


def is_causal_lm(model: Any) -> bool:
    """A Hugging Face causal LM the exporters handle (CRISP or plain)."""
    return type(model).__name__ in LM_CLASSES and hasattr(model, "config") and hasattr(model, "lm_head")


def resolve_max_seq_len(model: Any, max_seq_len: int | None) -> int:
    """The bundle's cache length: ``max_seq_len`` (default 256), within the model's position range."""
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if max_seq_len is None:
        return min(DEFAULT_MAX_SEQ_LEN, limit) if limit else DEFAULT_MAX_SEQ_LEN
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 8:
        raise ConfigError(f"max_seq_len must be an integer >= 8, got {max_seq_len!r:.40}.")
    if limit and max_seq_len > limit:
        raise ConfigError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings ({limit}); "
                          f"use at most {limit}.")
    return max_seq_len


def task_models(model: Any, mixers: Sequence[Any]) -> dict[str, Any]:
    """"default" (the model as exported) and one copy per mixer file with its mixers applied: the PyTorch
    models whose generation each task of a bundle must reproduce."""
    import copy

    from crisp_edge.files.mixers import apply_mixers_

    out = {DEFAULT_TASK: model}
    for mf in mixers:
        m = copy.deepcopy(model)
        apply_mixers_(m, mf)
        out[mf.task] = m
    return out


def reference_prompts(tokenizer: BundleTokenizer | None, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token ids of the reference prompts: ``REFERENCE_TEXTS`` tokenized (with BOS when the tokenizer has
    one), or seeded random ids when the model has no tokenizer."""
    if tokenizer is not None:
        return [tokenizer.encode(t, add_bos=tokenizer.record.get("bos_id") is not None) for t in REFERENCE_TEXTS]
    rng = np.random.default_rng(seed)
    return [[int(v) for v in rng.integers(0, vocab_size, n)] for n in REFERENCE_LENGTHS]


def lm_section(*, max_seq_len: int, vocab_size: int, tokenizer_record: dict | None,
               references: dict[str, dict]) -> dict[str, Any]:
    """The manifest's ``lm`` section (checked by ``check_lm_section`` on load)."""
    section = {"kind": LM_KIND, "max_seq_len": int(max_seq_len), "vocab_size": int(vocab_size),
               "tokenizer": tokenizer_record, "generation": references}
    check_lm_section(section, "lm section")
    return section


def record_references(steppers: dict[str, LMStepper], prompts: Sequence[Sequence[int]],
                      max_new_tokens: int = GENERATION_TOKENS) -> dict[str, dict]:
    """One ``record_generation`` per task, from each task's PyTorch reference stepper; the new tokens are
    capped so every prompt fits the cache."""
    if not steppers:
        raise ConfigError("no task to record a generation reference for.")
    out = {}
    for task, stepper in steppers.items():
        room = stepper.max_seq_len - max(len(p) for p in prompts)
        out[task] = record_generation(stepper, prompts, max(1, min(max_new_tokens, room)))
    return out


def check_lm_section(section: Any, where: str) -> dict:
    """Validate a manifest's ``lm`` section; raises ``BundleError`` naming the bad field."""
    if not isinstance(section, dict) or section.get("kind") != LM_KIND:
        raise BundleError(f"{where}: not a language-model bundle section (kind must be {LM_KIND!r}).")
    for key in ("max_seq_len", "vocab_size"):
        v = section.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 < v < 1 << 24):
            raise BundleError(f"{where}: {key} must be an integer > 1, got {v!r:.40}; re-export the bundle.")
    tok = section.get("tokenizer")
    if tok is not None and not (isinstance(tok, dict) and isinstance(tok.get("sha256"), str)
                                and isinstance(tok.get("file"), str)):
        raise BundleError(f"{where}: the tokenizer record is malformed; re-export the bundle.")
    gen = section.get("generation")
    if not isinstance(gen, dict) or not gen:
        raise BundleError(f"{where}: no generation reference; re-export the bundle.")
    return section


class LMSessionMixin:
    """``generate`` and ``check_generation`` for a runtime's LM session. The session provides
    ``self.bundle`` (a Bundle with an ``lm`` section), ``lm_stepper()`` and, when swappable, ``set_task``."""

    bundle: Any

    @property
    def lm(self) -> dict:
        return check_lm_section(self.bundle.manifest.get("lm"), str(self.bundle.path))

    def lm_stepper(self) -> LMStepper:
        raise NotImplementedError

    def tokenizer(self, path: Any = None) -> BundleTokenizer:
        """The bundle's tokenizer (verified), or a user's ``tokenizer.json`` checked against it."""
        rec = self.lm.get("tokenizer")
        if path is not None:
            return BundleTokenizer.from_file(path, rec, model_vocab=self.lm["vocab_size"])
        if rec is None:
            raise DataError(f"{self.bundle.path} carries no tokenizer (the model came without one): pass token "
                            "ids as the prompt, or a tokenizer.json with --tokenizer.")
        return BundleTokenizer.load(self.bundle.path, rec, model_vocab=self.lm["vocab_size"])

    def _switch(self, task: str | None) -> None:
        if task is None:
            return
        if not hasattr(self, "set_task"):
            raise ConfigError(f"{self.bundle.path} is a {self.bundle.mode} bundle: it has no tasks to switch; "
                              "export in swappable mode to switch tasks.")
        self.set_task(task)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *, task: str | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None, tokenizer: Any = None,
                 stop_at_eos: bool = True) -> dict[str, Any]:
        """Generate after ``prompt`` (text, tokenized with the bundle's tokenizer, or token ids).

        Returns ``{"text", "token_ids", "prompt_ids", "stop_reason", "prefill_tokens_per_s",
        "decode_tokens_per_s"}`` (the rates of the runtime's own steps; a rate is None when there was no
        such step); ``on_text(piece)`` streams the decoded text as tokens come (``text`` is None without a
        tokenizer).
        """
        self._switch(task)
        tok = self.tokenizer(tokenizer) if (isinstance(prompt, str) or tokenizer is not None
                                            or self.lm.get("tokenizer")) else None
        if isinstance(prompt, str):
            ids = tok.encode(prompt, add_bos=tok.record.get("bos_id") is not None)
        else:
            ids = [int(t) for t in prompt]
            if any(not 0 <= t < self.lm["vocab_size"] for t in ids):
                raise DataError(f"prompt token ids must be in [0, {self.lm['vocab_size']}).")
        push = tok.streamer() if (tok is not None and on_text is not None) else None
        out = generate(self.lm_stepper(), ids, max_new_tokens,
                       sampling=Sampling(temperature=temperature, top_p=top_p, seed=seed),
                       stop_ids=tok.eos_ids if (tok is not None and stop_at_eos) else (),
                       on_token=(lambda t: on_text(push(t))) if push else None)
        return {"text": tok.decode(out.new_ids) if tok is not None else None, "token_ids": out.new_ids,
                "prompt_ids": out.prompt_ids, "stop_reason": out.stop_reason, **out.rates()}

    def check_generation(self, tolerance: Any, tasks: Iterable[str] | None = None) -> list[GenerationParity]:
        """Generation parity of every task (or ``tasks``) against the bundle's recorded references."""
        refs = self.lm["generation"]
        names = list(tasks) if tasks is not None else list(refs)
        results = []
        for task in names:
            if task not in refs:
                raise ConfigError(f"{self.bundle.path} has no generation reference for task {task!r}; it has {sorted(refs)}.")
            if task != DEFAULT_TASK or self.bundle.mode == "swappable":  # "default" is a task to switch to there
                self._switch(task)
            results.append(check_generation(self.lm_stepper(), refs[task], tolerance, task=task))
        return results


def print_stream(piece: str) -> None:
    """``on_text`` for a terminal: write each piece as it comes."""
    sys.stdout.write(piece)
    sys.stdout.flush()

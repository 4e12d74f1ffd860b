"""The decoding loop every runtime shares, and the stepper contract a runtime implements.

A stepper owns one sequence's key/value cache. ``step(ids, start_pos)`` feeds ``ids`` (a prefill of
many tokens or a decode of one) at positions ``start_pos ...`` and returns the logits of the last one.
:class:`CachedStepper` does the bookkeeping every runtime needs (position, cache capacity, the
checks that catch a stale cache) so a runtime only writes ``_run``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from crisp_edge.errors import ConfigError, DataError
from crisp_edge.generation.sampling import Sampling, choose_token


@runtime_checkable
class LMStepper(Protocol):
    """What ``generate`` needs from a runtime."""

    max_seq_len: int

    def reset(self) -> None: ...

    def step(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray: ...


class CachedStepper:
    """Base of the steppers: tracks the cache's filled length and refuses what would corrupt it.

    Subclasses set ``max_seq_len`` and implement ``_run(ids: np.ndarray[int64] (n,), start_pos) ->
    logits (vocab,)`` and ``_clear()`` (forget the cache). ``step`` checks that ``start_pos`` is where
    the cache ends (a mismatch means a stale cache: the caller forgot ``reset`` or skipped a token) and
    that the tokens fit.
    """

    max_seq_len: int = 0

    def __init__(self) -> None:
        self.position = 0

    def reset(self) -> None:
        """Start a new sequence (the cache is logically empty; a static cache is overwritten as it fills)."""
        self._clear()
        self.position = 0

    def step(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise DataError("a step needs at least one token id.")
        if start_pos != self.position:
            raise ConfigError(f"stale cache: the step starts at position {start_pos} but the cache holds "
                              f"{self.position} tokens; call reset() before a new sequence.")
        if start_pos + ids.size > self.max_seq_len:
            raise DataError(f"{start_pos + ids.size} tokens do not fit the key/value cache of {self.max_seq_len}; "
                            "use a shorter prompt or fewer new tokens, or export with a larger --max-seq-len.")
        logits = np.asarray(self._run(ids, start_pos))
        self.position = start_pos + int(ids.size)
        return logits.reshape(-1)

    def _run(self, ids: np.ndarray, start_pos: int) -> np.ndarray:
        raise NotImplementedError

    def _clear(self) -> None:
        pass


@dataclass
class Generation:
    """What ``generate`` produced: the prompt's ids, the new ids, why it stopped ("eos", "length" or
    "cache": the cache filled up first), with ``keep_logits`` each step's logits (one per new token), and
    the seconds spent in the runtime's steps: the prefill (the prompt's step) and the decode steps."""

    prompt_ids: list[int]
    new_ids: list[int]
    stop_reason: str
    logits: list[np.ndarray] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    def rates(self) -> dict[str, float | None]:
        """``{"prefill_tokens_per_s", "decode_tokens_per_s"}`` of the runtime's steps (None if not timed)."""
        return {"prefill_tokens_per_s": len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else None,
                "decode_tokens_per_s": self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else None}


def _check_prompt(stepper: LMStepper, prompt_ids: Sequence[int]) -> list[int]:
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise DataError("the prompt is empty: give at least one token (a text that tokenizes to something).")
    if len(ids) >= stepper.max_seq_len:
        raise DataError(f"the prompt has {len(ids)} tokens but the key/value cache holds {stepper.max_seq_len}, "
                        "leaving no room to generate; shorten the prompt or export with a larger --max-seq-len.")
    return ids


def generate(stepper: LMStepper, prompt_ids: Sequence[int], max_new_tokens: int = 64, *,
             sampling: Sampling | None = None, stop_ids: Sequence[int] = (),
             on_token: Callable[[int], None] | None = None, keep_logits: bool = False) -> Generation:
    """Decode up to ``max_new_tokens`` after ``prompt_ids`` with ``stepper`` (reset first).

    Stops at a token in ``stop_ids`` (included in ``new_ids``), after ``max_new_tokens``, or when the
    cache is full. ``on_token(id)`` is called as each token is chosen (streaming).
    """
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    sampling = sampling or Sampling()
    rng = sampling.rng()
    ids = _check_prompt(stepper, prompt_ids)
    stops = {int(t) for t in stop_ids}
    stepper.reset()
    t = time.perf_counter()
    logits = stepper.step(ids, 0)
    out = Generation(prompt_ids=ids, new_ids=[], stop_reason="length", prefill_seconds=time.perf_counter() - t)
    pos = len(ids)
    while True:
        if keep_logits:
            out.logits.append(np.array(logits, dtype=np.float32))
        token = choose_token(logits, sampling, rng)
        out.new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in stops:
            out.stop_reason = "eos"
            break
        if len(out.new_ids) >= max_new_tokens:
            break
        if pos >= stepper.max_seq_len:
            out.stop_reason = "cache"
            break
        t = time.perf_counter()
        logits = stepper.step([token], pos)
        out.decode_seconds += time.perf_counter() - t
        out.decode_steps += 1
        pos += 1
    return out


def forced_logits(stepper: LMStepper, prompt_ids: Sequence[int], continuation: Sequence[int]) -> list[np.ndarray]:
    """Each step's logits when ``stepper`` is fed ``continuation`` after ``prompt_ids`` (teacher forcing):
    entry ``i`` predicts ``continuation[i]``. Parity feeds the reference's tokens so every step's logits
    are compared on the same context even where two runtimes would pick different tokens."""
    ids = _check_prompt(stepper, prompt_ids)
    if len(ids) + max(len(continuation) - 1, 0) > stepper.max_seq_len:
        raise DataError(f"prompt ({len(ids)}) + continuation ({len(continuation)}) do not fit the cache of "
                        f"{stepper.max_seq_len} tokens.")
    stepper.reset()
    out = [np.array(stepper.step(ids, 0), dtype=np.float32)]
    pos = len(ids)
    for token in list(continuation)[:-1]:
        out.append(np.array(stepper.step([int(token)], pos), dtype=np.float32))
        pos += 1
    return out

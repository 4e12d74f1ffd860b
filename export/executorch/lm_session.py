"""Generating text with an ExecuTorch language-model bundle (``export.executorch.lm_export``).

    sess = load_et_bundle("lm/").session(threads=1)         # an EtLMSession (the manifest has an lm section)
    out = sess.generate("In the beginning", 32, task="kjv")  # {"text", "token_ids", ...}

The session is the ExecuTorch bundle session (``EtCrispSession``: the program's hash, methods, I/O tag,
bases tag and ``set_task`` signature are verified on load, task ``.ptd`` files before they are used) with
the shared LM front end (``export.lm.LMSessionMixin``: tokenizer, sampling, streaming, generation parity)
and one :class:`EtStepper` over the program's static key/value cache. Switching task resets the stepper:
the cache holds keys and values computed with the previous task's weights, so a sequence cannot go on
across a switch (``step`` at a later position is refused as a stale cache); a new one starts at 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crisp_edge.export.bundle import feeds_by_name
from crisp_edge.export.errors import BundleError, ExportError, NoTaskError, ParityError
from crisp_edge.export.executorch.bundle import DECODE_METHOD, EtBundle
from crisp_edge.export.executorch.session import EtCrispSession
from crisp_edge.export.lm import DEFAULT_TASK, LMSessionMixin, check_lm_section
from crisp_edge.export.parity.compare import Tolerance
from crisp_edge.generation import CachedStepper


class EtStepper(CachedStepper):
    """The program's ``forward(tokens [1, n], input_pos [n]) -> logits [1, vocab]`` over its static cache; a
    single token goes to its ``decode`` method when it has one (the same step, the same cache)."""

    def __init__(self, session: "EtLMSession") -> None:
        super().__init__()
        self.session = session
        self.max_seq_len = int(session.lm["max_seq_len"])

    def _run(self, ids: np.ndarray, start_pos: int) -> np.ndarray:
        sess = self.session
        if sess.swappable and sess.task is None:
            raise NoTaskError("no task is set: pass a task (set_task(name), or 'default' for the exported mixers); "
                              "a swappable program has no weights until then.")
        tokens = torch.from_numpy(np.ascontiguousarray(ids.reshape(1, -1)))
        pos = torch.arange(start_pos, start_pos + ids.size, dtype=torch.int64)
        method = sess.decode_method if ids.size == 1 and sess.decode_method is not None else sess.forward
        try:
            out = method.execute([tokens, pos])
        except Exception as e:  # noqa: BLE001 - the runtime's own error
            raise ExportError(f"ExecuTorch failed on {ids.size} tokens at position {start_pos}: {str(e)[:300]}") from None
        return out[0].detach().numpy().reshape(-1).copy()


class EtLMSession(LMSessionMixin, EtCrispSession):
    """An ExecuTorch LM bundle's program with one sequence's cache; ``generate`` / ``check_generation``
    from ``LMSessionMixin``; ``set_task`` (swappable bundles) as for every ExecuTorch bundle, resetting
    the sequence."""

    def __init__(self, bundle: EtBundle | str | os.PathLike, threads: int = 1) -> None:
        super().__init__(bundle, threads=threads)
        lm = check_lm_section(self.bundle.manifest.get("lm"), str(self.bundle.path))
        vocab = [o["shape"] for o in self.bundle.manifest["outputs"]]
        if vocab != [[1, lm["vocab_size"]]] or self._input_shapes.get("tokens") != [1, lm["max_seq_len"]]:
            raise BundleError(f"{self.bundle.path}: the program's tokens / logits shapes ({self._input_shapes}, {vocab}) "
                              f"do not match the lm section (max_seq_len {lm['max_seq_len']}, vocabulary "
                              f"{lm['vocab_size']}); the manifest was edited. Export the bundle again.")
        # a swappable XNNPACK program's one-token step (its task weights read in place; lm_export._programs)
        self.decode_method = None
        if DECODE_METHOD in self.program.method_names:
            meta = self.program.metadata(DECODE_METHOD)
            have = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
            if have != [[1, 1], [1]]:
                raise BundleError(f"{self.bundle.path}: the program's {DECODE_METHOD} method takes inputs of shapes "
                                  f"{have}, not one token ([1, 1], [1]): not a crisp-edge program. Export it again.")
            self.decode_method = self._method(DECODE_METHOD)
        self._stepper = EtStepper(self)

    def lm_stepper(self) -> EtStepper:
        return self._stepper

    def set_task(self, task: str | os.PathLike) -> str:
        """Switch to ``task`` (a task of the bundle, a task ``.ptd`` path, or "default") and start a new sequence."""
        self._stepper.reset()
        return super().set_task(task)

    def run(self, feeds: Any) -> dict[str, np.ndarray]:
        """A tensor case (``crisp-edge parity``'s): a prefill of ``tokens`` [1, T] at ``input_pos`` 0..T-1 from an
        empty cache; returns ``{"logits": [1, vocab]}`` of the last position. Decoding: ``generate``."""
        feeds = feeds_by_name(feeds, self.input_names)
        tokens, pos = np.asarray(feeds["tokens"]), np.asarray(feeds["input_pos"])
        if not (tokens.ndim == 2 and tokens.shape[0] == 1 and np.issubdtype(tokens.dtype, np.integer)
                and pos.shape == (tokens.shape[1],) and (pos == np.arange(pos.size)).all()):
            raise ExportError(f"{self.bundle.path} is a language-model bundle: run() takes one prefill from an empty "
                              "cache (tokens [1, T], input_pos 0..T-1); decode with generate(prompt, ...) or "
                              "lm_stepper().step(token_ids, position).")
        self._stepper.reset()
        return {self.output_names[0]: self._stepper.step(tokens[0], 0).reshape(1, -1)}


@dataclass
class LMParityReport:
    """Generation parity of every task of an LM bundle (what ``write_validated`` records in the manifest)."""

    results: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs_diff for r in self.results for c in r.cases), default=0.0)

    @property
    def comparisons(self) -> list:
        return [c for r in self.results for c in r.cases]

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.results)


def validate_lm_bundle(bundle: EtBundle, *, threads: int = 1, raise_on_failure: bool = True) -> LMParityReport:
    """Generation parity of every task (greedy tokens and teacher-forced logits against the recorded
    PyTorch references); ``ParityError`` on a mismatch."""
    sess = EtLMSession(bundle, threads=threads)
    tol = bundle.manifest["tolerance"]
    top1 = tol.get("min_top1")  # set for a quantized bundle: top-1 agreement instead of equal greedy tokens
    tolerance = Tolerance(float(tol["atol"]), float(tol["min_cosine"]), str(tol.get("reason", "")),
                          None if top1 is None else float(top1))
    tasks = [t for t in sess.lm["generation"] if t == DEFAULT_TASK or t in bundle.tasks]
    report = LMParityReport(sess.check_generation(tolerance, tasks))
    if raise_on_failure and not report.passed:
        raise ParityError(f"{bundle.path}: ExecuTorch's generation differs from PyTorch's:\n{report.summary()}", report)
    return report


__all__ = ["EtLMSession", "EtStepper", "LMParityReport", "validate_lm_bundle"]

"""Parity for generation: a runtime's greedy decoding against the PyTorch reference's, token for token,
and each step's logits within the runtime's named tolerance.

The reference is recorded at export (``record_generation``) so a bundle checks itself without PyTorch:
for each fixed prompt, the greedy tokens and, at every step, the reference's ``TOP_K`` largest logits with
their ids. The check (``check_generation``) (1) decodes greedily with the runtime and compares tokens, and
(2) feeds the *reference's* tokens (teacher forcing) and compares the runtime's logits at the stored ids,
so one early flip of a near-tie does not hide how far every later step's logits are.

A quantized bundle (a tolerance with ``min_top1``: ``parity.compare``'s ``*-lm`` int8 / int4 entries) is not the
float model, and its greedy tokens may leave the float path at any near-tie, after which nothing downstream is
comparable. For it, (1) is reported but not required; what must hold is (2) and the top-1 agreement along the
teacher-forced reference: the share of steps where the runtime's largest logit is the reference's token, at
least ``min_top1`` over the task's prompts together.

    record = record_generation(TorchStepper(model, 128), prompts, max_new_tokens=64)   # manifest / JSON
    result = check_generation(runtime_stepper, record, tolerance_for("onnxruntime", "swappable"))
    assert result.passed, result.summary()
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from crisp_edge.errors import ConfigError
from crisp_edge.export.parity.compare import Tolerance
from crisp_edge.generation.loop import LMStepper, forced_logits, generate

#: Logits stored per reference step: enough to see the competition around the chosen token.
TOP_K = 16
#: New tokens decoded per prompt (issue 18).
GENERATION_TOKENS = 64


def record_generation(stepper: LMStepper, prompts: Sequence[Sequence[int]], max_new_tokens: int = GENERATION_TOKENS,
                      top_k: int = TOP_K) -> dict[str, Any]:
    """Greedy reference decoding of each prompt: ``{"max_new_tokens", "top_k", "cases": [{"prompt",
    "tokens", "top_ids", "top_logits"}]}`` (JSON-ready; no stop tokens, so every case has the same length
    unless the cache fills)."""
    cases = []
    for prompt in prompts:
        out = generate(stepper, prompt, max_new_tokens, keep_logits=True)
        top_ids, top_vals = [], []
        for logits in out.logits:
            ids = np.argsort(-logits, kind="stable")[:top_k]
            top_ids.append([int(i) for i in ids])
            top_vals.append([float(v) for v in logits[ids]])
        cases.append({"prompt": list(out.prompt_ids), "tokens": out.new_ids, "top_ids": top_ids, "top_logits": top_vals})
    return {"max_new_tokens": int(max_new_tokens), "top_k": int(top_k), "cases": cases}


@dataclass
class GenerationCase:
    """One prompt's comparison: the first step where the runtime's greedy token differs (None: all equal)
    and the largest logit difference at the reference's top ids over every teacher-forced step."""

    prompt_tokens: int
    steps: int
    first_divergence: int | None
    max_abs_diff: float
    worst_step: int
    got_tokens: list[int] = field(default_factory=list)
    #: steps (teacher-forced along the reference) where the runtime's top-1 token is the reference's
    top1_agree: int = 0


@dataclass
class GenerationParity:
    """Every case of one task against its reference, under ``tolerance``."""

    task: str
    tolerance: dict[str, Any]
    cases: list[GenerationCase]

    @property
    def tokens_match(self) -> bool:
        return all(c.first_divergence is None for c in self.cases)

    @property
    def logits_match(self) -> bool:
        return all(c.max_abs_diff <= self.tolerance["atol"] for c in self.cases)

    @property
    def top1_agreement(self) -> float:
        """Share of teacher-forced steps, over every prompt, where the runtime's top-1 is the reference's token."""
        steps = sum(c.steps for c in self.cases)
        return sum(c.top1_agree for c in self.cases) / steps if steps else 0.0

    @property
    def quantized(self) -> bool:
        """The tolerance asks for top-1 agreement instead of equal greedy tokens (a quantized bundle)."""
        return self.tolerance.get("min_top1") is not None

    @property
    def top1_ok(self) -> bool:
        return not self.quantized or self.top1_agreement >= self.tolerance["min_top1"]

    @property
    def passed(self) -> bool:
        return (self.top1_ok if self.quantized else self.tokens_match) and self.logits_match

    def summary(self) -> str:
        top1 = (f", top-1 agreement {self.top1_agreement:.3f} (min {self.tolerance['min_top1']:g}; greedy tokens "
                "reported, not required)") if self.quantized else ""
        lines = [f"task {self.task}: {'PASS' if self.passed else 'FAIL'} (atol {self.tolerance['atol']:g}{top1})"]
        for i, c in enumerate(self.cases):
            tok = "tokens equal" if c.first_divergence is None else f"tokens differ from step {c.first_divergence}"
            lines.append(f"  prompt {i} ({c.prompt_tokens} tokens, {c.steps} steps): {tok}; "
                         f"max |logit diff| {c.max_abs_diff:.3g} at step {c.worst_step}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "passed": self.passed, "tokens_match": self.tokens_match,
                "logits_match": self.logits_match, "top1_agreement": self.top1_agreement,
                "tokens_required": not self.quantized, "tolerance": self.tolerance,
                "cases": [asdict(c) for c in self.cases]}


def _check_record(record: Any) -> list[dict]:
    if not isinstance(record, dict) or not isinstance(record.get("cases"), list) or not record["cases"]:
        raise ConfigError("the generation reference is missing or malformed (no cases); re-export the bundle.")
    for i, c in enumerate(record["cases"]):
        if not (isinstance(c, dict) and all(isinstance(c.get(k), list) for k in ("prompt", "tokens", "top_ids", "top_logits"))
                and len(c["tokens"]) == len(c["top_ids"]) == len(c["top_logits"]) and c["tokens"]):
            raise ConfigError(f"generation reference case {i} is malformed; re-export the bundle.")
    return record["cases"]


def check_generation(stepper: LMStepper, record: dict[str, Any], tolerance: Tolerance, task: str = "default") -> GenerationParity:
    """Compare ``stepper`` (a runtime, already switched to ``task``) with a ``record_generation`` record."""
    cases = []
    for c in _check_record(record):
        ref_tokens = [int(t) for t in c["tokens"]]
        got = generate(stepper, c["prompt"], len(ref_tokens)).new_ids
        diverge = next((i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b), None)
        if diverge is None and len(got) != len(ref_tokens):
            diverge = min(len(got), len(ref_tokens))
        worst, worst_step, agree = 0.0, 0, 0
        for step, logits in enumerate(forced_logits(stepper, c["prompt"], ref_tokens)):
            agree += int(np.argmax(logits)) == ref_tokens[step]
            ids = np.asarray(c["top_ids"][step], dtype=np.int64)
            if ids.size and int(ids.max()) >= logits.size:
                raise ConfigError(f"the reference names token {int(ids.max())} but the runtime returns {logits.size} "
                                  "logits: the bundle's reference belongs to another model; re-export.")
            diff = float(np.max(np.abs(logits[ids] - np.asarray(c["top_logits"][step], dtype=np.float32))))
            if not np.isfinite(diff) or diff > worst:
                worst, worst_step = (diff if np.isfinite(diff) else float("inf")), step
        cases.append(GenerationCase(prompt_tokens=len(c["prompt"]), steps=len(ref_tokens), first_divergence=diverge,
                                    max_abs_diff=worst, worst_step=worst_step, got_tokens=got,
                                    top1_agree=agree))
    return GenerationParity(task=task, tolerance=tolerance.to_dict(), cases=cases)

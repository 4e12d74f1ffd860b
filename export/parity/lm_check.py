"""Generation parity inside ``check_bundle`` (and so ``crisp-edge parity BUNDLE``) for language-model
bundles of any runtime: a manifest with an ``lm`` section is checked, beyond its stored tensor cases, by
greedy decoding of the recorded prompts for every task against the PyTorch tokens and logits
(``export.parity.generation``), under the runtime's named LM tolerance (``lm_tolerance``).

A task that fails (tokens differ, or a step's logits beyond the tolerance) is a ``Failure`` of stage
``generation`` naming the prompt and step, so the report's pass/fail, problems, JSON and exit status
cover it with no other change; ``report.generation`` holds every task's details for the JSON report.
"""
from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from crisp_edge.errors import CrispEdgeError
from crisp_edge.export.parity.compare import TOLERANCES, Failure, ParityReport, Tolerance


def lm_tolerance(runtime: str, mode: str, tensor_tolerance: Tolerance, dtype: str = "float32") -> Tolerance:
    """The tolerance of a language-model bundle (its tensor cases and its generation): the table's
    ``<runtime>-lm`` entry for (mode, dtype) when it has one (deep models drift more than a ViT), else the
    runtime's own ``tensor_tolerance``."""
    for key in ((f"{runtime}-lm", mode, dtype), (f"{runtime}-lm", "*", dtype)):
        if key in TOLERANCES:
            return TOLERANCES[key]
    return tensor_tolerance


def case_tolerance(tol: Tolerance, manifest: dict) -> Tolerance:
    """The tolerance of a bundle's stored tensor cases: a language model's top-1 agreement (quantized bundles) is
    judged along its generation reference (``lm_check``, tens of steps), not on a tensor case's one or two rows
    of last-position logits (one near-tie would fail it) nor on its key/value outputs (argmax meaningless)."""
    return replace(tol, min_top1=None) if "lm" in manifest else tol


def check_lm_generation(report: ParityReport, sess: Any, tol: Tolerance, tasks: Iterable[str] | None,
                        failed: Callable[[str, str, Exception], None]) -> None:
    """Generation parity of every task of the bundle's ``lm`` section (or of ``tasks`` that have a
    generation reference) into ``report``, under ``tol`` (the report's: ``lm_tolerance`` or the caller's)."""
    refs = sess.lm["generation"]
    names = [t for t in (refs if tasks is None else tasks) if t in refs]
    t0 = time.perf_counter()
    for task in names:
        try:
            [result] = sess.check_generation(tol, tasks=[task])
        except CrispEdgeError as e:
            failed(task, "generation", e)
            continue
        report.generation.append(result.to_dict())
        if not result.passed:
            report.failures.append(Failure(task, "generation", "GenerationMismatch", _problem(result)))
    report.timings["generation_s"] = time.perf_counter() - t0


def _problem(result: Any) -> str:
    if result.quantized and not result.top1_ok:
        return (f"top-1 agreement along the reference {result.top1_agreement:.3f} < {result.tolerance['min_top1']:g} "
                "(teacher-forced steps where the runtime's largest logit is the reference's token)")
    bad = [(i, c) for i, c in enumerate(result.cases) if c.max_abs_diff > result.tolerance["atol"]
           or (c.first_divergence is not None and not result.quantized)]
    i, c = bad[0]
    tokens = "tokens equal" if c.first_divergence is None else f"greedy tokens differ from step {c.first_divergence}"
    return (f"prompt {i}: {tokens}; max |logit diff| {c.max_abs_diff:.3g} at step {c.worst_step} (atol "
            f"{result.tolerance['atol']:g})" + (f"; and {len(bad) - 1} more prompt(s)" if len(bad) > 1 else ""))


def cache_names(prefix: str, layers: int) -> list[str]:
    """``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for every layer (optimum's names)."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def reference_model(model: nn.Module, manifest: dict) -> nn.Module:
    """``model`` as the bundle's reference runs it: wrapped in ``WithPast`` when the bundle's graph takes a
    key/value cache (``recompute_reference`` of an LM bundle), else as it is."""
    names = [i.get("name") for i in manifest.get("inputs", []) if isinstance(i, dict)]
    return WithPast(model) if "past_key_values.0.key" in names else model


class WithPast(nn.Module):
    """A Hugging Face causal LM called with the with-past graph's named inputs (``input_ids``,
    ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/.value``), returning its named outputs
    (``logits``, ``present.{i}.key/.value``): the PyTorch reference of an LM bundle's tensor cases."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.layers = model, int(model.config.num_hidden_layers)

    def forward(self, input_ids, attention_mask, position_ids, **past) -> dict[str, torch.Tensor]:
        from transformers import DynamicCache

        cache = DynamicCache()
        if past["past_key_values.0.key"].shape[2]:
            for i in range(self.layers):
                cache.update(past[f"past_key_values.{i}.key"], past[f"past_key_values.{i}.value"], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        named = {"logits": out.logits}
        for i, layer in enumerate(_cache_layers(out.past_key_values)):
            named[f"present.{i}.key"], named[f"present.{i}.value"] = layer
        return named


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(l.keys, l.values) for l in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]

"""Generating text with an ONNX Runtime language-model bundle (``crisp_edge.export.onnx.lm_export``).

    sess = load_bundle("lm/").session(threads=1)          # an OnnxLMSession (the manifest has an "lm" section)
    out = sess.generate("In the beginning", 32, task="kjv")
    for r in sess.check_generation(tolerance_for("onnxruntime", "swappable", recipe="lm")): print(r.summary())

``OnnxLMSession`` is the bundle's ``OnnxCrispSession`` (the same file checks, fold runs and
``.onnx_adapter`` checks; ``run`` still runs the graph on named tensors) plus the shared
``LMSessionMixin`` (``generate``, ``check_generation``, the verified tokenizer) over an
``OrtStepper``: a prefill then one decode step per token, each step's ``present.*`` outputs fed back as
the next step's ``past_key_values.*`` inputs. The stepper keeps one ``IOBinding`` per sequence: the
task's dense weights (swappable) are bound once, the cache stays in ONNX Runtime's own ``OrtValue``s
(never copied to numpy), and only the new token ids, the mask and the positions are bound per step.
(The model graph takes no adapter, so ``run_with_iobinding`` is safe here; the fold run that builds a
task's weights goes through ``run_with_ort_values``, which applies the adapter.)

Switching task resets the sequence: a step that continues a sequence begun under another task is a
stale cache (``ConfigError``), never a silent mix of two tasks' keys and values.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from crisp_edge.errors import ConfigError
from crisp_edge.export.errors import BundleError, ExportError, NoTaskError
from crisp_edge.export.lm import LMSessionMixin
from crisp_edge.export.onnx.session import OnnxCrispSession
from crisp_edge.generation import CachedStepper

PAST = "past_key_values."
PRESENT = "present."


class OrtStepper(CachedStepper):
    """The ``CachedStepper`` of an ``OnnxLMSession`` (one sequence at a time, batch 1; not thread-safe)."""

    def __init__(self, sess: "OnnxLMSession") -> None:
        super().__init__()
        self.sess = sess
        self.max_seq_len = int(sess.lm["max_seq_len"])
        inputs = {i["name"]: i for i in sess.bundle.manifest["inputs"]}
        self.past_names = [n for n in sess.input_names if n.startswith(PAST)]
        self.present_names = [n for n in sess.output_names if n.startswith(PRESENT)]
        want = [n.replace(PAST, PRESENT, 1) for n in self.past_names]
        if not self.past_names or want != self.present_names or sess.output_names[0] != "logits":
            raise BundleError(f"{sess.bundle.path}: the graph's cache inputs {self.past_names!r:.200} and outputs "
                              f"{self.present_names!r:.200} do not pair up (past_key_values.i.* -> present.i.*).")
        shape = inputs[self.past_names[0]]["shape"]  # [batch, kv_heads, past, head_dim]
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            raise BundleError(f"{sess.bundle.path}: cache input shape {shape} is not [batch, heads, past, head_dim].")
        self._empty = np.zeros((1, shape[1], 0, shape[3]), np.float32)
        self._binding: ort.IOBinding | None = None
        self._task_generation = -1  # the session's task generation the binding's weights belong to
        self._past: list[ort.OrtValue] | None = None

    def _clear(self) -> None:
        self._past = None

    def _bind_weights(self) -> ort.IOBinding:
        sess = self.sess
        if self._binding is None or self._task_generation != sess._generation:
            binding = sess.session.io_binding()
            if sess.swappable:
                for name, value in sess._weights.items():
                    binding.bind_ortvalue_input(name, value)
            self._binding, self._task_generation = binding, sess._generation
        return self._binding

    def _run(self, ids: np.ndarray, start_pos: int) -> np.ndarray:
        sess = self.sess
        if sess.swappable and sess._weights is None:
            raise NoTaskError("no task is set: call set_task(name) first (set_task('default') for the exported "
                              "mixers), or pass task= to generate.")
        if start_pos and self._task_generation != sess._generation:
            raise ConfigError("stale cache: the task was switched after this sequence began, so its cached keys and "
                              "values belong to the other task; call reset() and start the sequence again.")
        binding = self._bind_weights()
        n = ids.size
        total = start_pos + n
        binding.bind_cpu_input("input_ids", ids.reshape(1, n))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        binding.bind_cpu_input("position_ids", np.arange(start_pos, total, dtype=np.int64).reshape(1, n))
        if self._past is None:
            for name in self.past_names:
                binding.bind_cpu_input(name, self._empty)
        else:
            for name, value in zip(self.past_names, self._past):
                binding.bind_ortvalue_input(name, value)
        binding.clear_binding_outputs()
        for name in sess.output_names:
            binding.bind_output(name, "cpu")
        try:
            sess.session.run_with_iobinding(binding)
        except Exception as e:  # noqa: BLE001 - ORT's own error
            raise ExportError(f"ONNX Runtime failed on a generation step: {str(e)[:300]}") from None
        outs = binding.get_outputs()
        self._past = list(outs[1:])
        return outs[0].numpy()[0, -1]


class OnnxLMSession(LMSessionMixin, OnnxCrispSession):
    """An ONNX Runtime session of a language-model bundle: ``generate``, ``check_generation``, ``set_task``."""

    def __init__(self, bundle, threads: int = 1, providers: list[str] | None = None) -> None:
        super().__init__(bundle, threads=threads, providers=providers)
        self._stepper = OrtStepper(self)

    def lm_stepper(self) -> OrtStepper:
        return self._stepper

    def run(self, feeds) -> dict[str, np.ndarray]:
        """``OnnxCrispSession.run``; inputs given without ``past_key_values.*`` run with an empty cache
        (a whole sequence at once: scoring, perplexity), so ``{input_ids, attention_mask, position_ids}``
        is enough."""
        if isinstance(feeds, dict) and "input_ids" in feeds and not any(n in feeds for n in self._stepper.past_names):
            batch = int(np.shape(feeds["input_ids"])[0]) if np.ndim(feeds["input_ids"]) == 2 else 1
            empty = np.zeros((batch, *self._stepper._empty.shape[1:]), np.float32)
            feeds = {**feeds, **{n: empty for n in self._stepper.past_names}}
        return super().run(feeds)

    def set_task(self, task) -> str:
        """Switch task (``OnnxCrispSession.set_task``: one fold run) and start a new sequence."""
        self._stepper.reset()
        return super().set_task(task)

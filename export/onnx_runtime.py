"""Running a bundle in ONNX Runtime, with task switching for swappable bundles.

Swappable bundles run *switch-then-dense* (DESIGN.md sections 3-4): two sessions. ``set_task`` runs
the fold session once with the task's ``.onnx_adapter`` active (``RunOptions.add_active_adapter``)
and keeps its outputs, every layer's dense weight, as ``OrtValue``s; ``run`` feeds them with the
input to the inference session through ``run_with_ort_values``. Never ``run_with_iobinding`` here:
ORT silently ignores an active adapter on that path (the default mixers run, no error).

    sess = load_bundle("bundle/").session(threads=1)
    sess.set_task("mnist")          # a task of the bundle, an .onnx_adapter path, or "default"
    logits = sess(x)                # numpy (or torch) in, numpy out
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .bundle import Bundle, load_bundle
from .errors import AdapterError, ExportError, NoTaskError
from .onnx_adapter import read_adapter

#: The exported model's own mixers, biases and head (the fold with no adapter active).
DEFAULT_TASK = "default"


def session_options(threads: int = 1) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # overridable initializers are the point here: not worth ORT's warning
    return so


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class OnnxCrispSession:
    """One bundle in ONNX Runtime; for swappable bundles, one live task at a time."""

    def __init__(self, bundle: Bundle | str | os.PathLike, threads: int = 1,
                 providers: list[str] | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        m = self.bundle.manifest
        self.providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.bundle.file(m["models"]["model"]["file"])),
                                            session_options(threads), providers=self.providers)
        self.input_names = [i["name"] for i in m["inputs"]]
        self.output_names = [o["name"] for o in m["outputs"]]
        self.fold = None
        self.task: str | None = None
        self._weights: dict[str, ort.OrtValue] | None = None
        self._adapters: dict[str, ort.LoraAdapter] = {}
        if self.swappable:
            self.swap = m["swappable"]
            self.fold = ort.InferenceSession(str(self.bundle.file(m["models"]["fold"]["file"])),
                                             session_options(threads), providers=self.providers)
            self.weight_names = [o.name for o in self.fold.get_outputs()]

    @property
    def swappable(self) -> bool:
        return self.bundle.mode == "swappable"

    def _adapter_path(self, task: str | os.PathLike) -> tuple[str, Path]:
        if isinstance(task, str) and task in self.bundle.manifest.get("tasks", {}):
            return task, self.bundle.task_path(task)
        path = Path(task)
        if path.suffix == ".onnx_adapter" or path.exists():
            return path.stem, path
        raise AdapterError(f"{task!r} is neither a task of this bundle ({sorted(self.bundle.tasks)} or "
                           f"{DEFAULT_TASK!r}) nor an .onnx_adapter file.")

    def load_adapter(self, task: str | os.PathLike) -> str:
        """Read, check and keep a task's adapter (names, shapes and bases tag); returns its name."""
        name, path = self._adapter_path(task)
        read_adapter(path, self.swap)  # our checks first: ORT's own errors do not say what to fix
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self._adapters[name] = adapter
        return name

    def set_task(self, task: str | os.PathLike) -> str:
        """Switch to ``task``: fold its mixers into dense weights once. Returns the task's name.

        ``task`` is a task of the bundle, a path to an ``.onnx_adapter``, or ``"default"``.
        """
        if not self.swappable:
            raise ExportError(f"this bundle is {self.bundle.mode!r}; only 'swappable' bundles switch tasks.")
        opts = ort.RunOptions()
        if task == DEFAULT_TASK:
            name = DEFAULT_TASK
        else:
            key = task if isinstance(task, str) and task in self._adapters else None
            name = key or self.load_adapter(task)
            opts.add_active_adapter(self._adapters[name])
        try:
            values = self.fold.run_with_ort_values(self.weight_names, {}, opts)
        except Exception as e:  # ORT's own error, e.g. an adapter edited after our checks
            self._weights, self.task = None, None
            raise AdapterError(f"task {name!r}: the fold run failed in ONNX Runtime: {e}") from None
        self._weights = dict(zip(self.weight_names, values))
        self.task = name
        return name

    def run(self, feeds: dict[str, Any] | Any) -> dict[str, np.ndarray]:
        """All outputs by name, for inputs given by name (or the single input as an array)."""
        if not isinstance(feeds, dict):
            if len(self.input_names) != 1:
                raise ExportError(f"the model takes {self.input_names}; pass a dict of inputs.")
            feeds = {self.input_names[0]: feeds}
        missing = sorted(set(self.input_names) - set(feeds))
        if missing:
            raise ExportError(f"missing inputs {missing}; the model takes {self.input_names}.")
        arrays = {k: _as_numpy(feeds[k]) for k in self.input_names}
        if not self.swappable:
            return dict(zip(self.output_names, self.session.run(self.output_names, arrays)))
        if self._weights is None:
            raise NoTaskError("no task is set: call set_task(name) first (set_task('default') for the "
                              "exported mixers); a swappable session has no weights until then.")
        values = dict(self._weights)  # the task's dense weights, built once by set_task
        values.update({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
        outs = self.session.run_with_ort_values(self.output_names, values, None)
        return {n: o.numpy() for n, o in zip(self.output_names, outs)}

    def __call__(self, x: Any) -> np.ndarray:
        """The first output for input ``x`` (numpy or torch)."""
        return self.run(x)[self.output_names[0]]

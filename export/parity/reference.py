"""The PyTorch reference every exported artifact is checked against: fixed inputs, reference outputs.

Shared by every exporter (ONNX Runtime, ExecuTorch) and by ``crisp-edge parity``:

    cases = reference_inputs(example)                                  # fixed seeded inputs
    outs = reference_outputs(model, cases, device="auto", dtype="float32")   # eager PyTorch
    record = write_reference(folder, cases, {"default": outs})         # reference.npz (+ manifest record)
    ref = read_reference(folder, manifest["reference"])                # later, anywhere (no pickle)

The reference runs in PyTorch eager mode on CUDA when a GPU is present (``device="auto"``, the GPU
reference) and on the CPU otherwise, in float32 or, for a tighter reference, float64 (the model and
its float inputs are cast; outputs are stored in that dtype). On CUDA, TF32 matmuls and
convolutions are switched off for the run: they would make the reference itself ~1e-3 off.

``reference.npz`` holds plain arrays keyed ``input.{i}.{name}`` and ``output.{task}.{i}.{name}``
(case ``i``, task ``default`` for the exported model's own weights) and is read with
``allow_pickle=False``. The manifest's ``reference`` record (``reference_record``) names the inputs,
outputs, tasks, case count, batch sizes, seed, and the device and dtype that produced the outputs.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crisp_edge.export.errors import BundleError
from torch import nn

from crisp_edge.errors import ConfigError
from crisp_edge.files.io import atomic_write_bytes
from crisp_edge.files.io import inside as io_inside
from crisp_edge.files.io import check_regular

REFERENCE = "reference.npz"
#: Batch sizes of the stored reference cases: two sizes, so a dynamic batch axis is exercised.
REFERENCE_BATCHES = (2, 3)
REFERENCE_SEED = 0
#: The task name of the exported model's own mixers and head.
DEFAULT_TASK = "default"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")
#: Largest reference file read back (a sanity bound; real ones are kilobytes to a few megabytes).
MAX_REFERENCE_BYTES = 1 << 30


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when ``torch.cuda.is_available()`` else ``"cpu"``; checks the others."""
    if device not in DEVICES:
        raise ConfigError(f"reference device must be one of {DEVICES}, got {device!r}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("reference device 'cuda' asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'.")
    return device


def resolve_reference(device: str = "auto", dtype: str = "float32") -> dict[str, str]:
    """``{"device": "cpu"|"cuda", "dtype": "float32"|"float64"}``, checked (a ``ConfigError`` otherwise)."""
    _torch_dtype(dtype)
    return {"device": resolve_device(device), "dtype": dtype}


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"reference dtype must be one of {DTYPES}, got {dtype!r}.")
    return getattr(torch, dtype)


def reference_inputs(example: dict[str, torch.Tensor], *, batches: Sequence[int] = REFERENCE_BATCHES,
                     seed: int = REFERENCE_SEED, int_high: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Fixed seeded inputs shaped like ``example`` (axis 0 is the batch): one dict per batch size.

    Float inputs are standard normal in the example's dtype; integer inputs (token ids) are uniform
    in ``[0, int_high)``, by default ``[0, example.max() + 1)``.
    """
    if not isinstance(example, dict) or not example:
        raise ConfigError("example must be a non-empty dict of named tensors.")
    g = torch.Generator().manual_seed(seed)
    cases = []
    for b in batches:
        case = {}
        for n, t in example.items():
            shape = (b, *t.shape[1:])
            if t.is_floating_point():
                case[n] = torch.randn(shape, generator=g).to(t.dtype)
            else:
                high = int_high if int_high is not None else int(t.max()) + 1
                case[n] = torch.randint(0, max(high, 1), shape, generator=g).to(t.dtype)
        cases.append(case)
    return cases


def default_outputs(out: Any, output_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """A model's return value as named tensors: a tensor, a tuple/list, a dict, or an object with ``.logits``."""
    if isinstance(out, torch.Tensor):
        values = [out]
    elif isinstance(out, (tuple, list)):
        values = list(out)
    elif isinstance(out, dict) and all(n in out for n in output_names):
        values = [out[n] for n in output_names]
    elif hasattr(out, "logits"):
        values = [out.logits]
    else:
        raise ConfigError(f"cannot name the outputs of a model returning {type(out).__name__}; pass outputs=.")
    if len(values) != len(output_names):
        raise ConfigError(f"the model returns {len(values)} outputs, {len(output_names)} names given: {list(output_names)}.")
    return dict(zip(output_names, values))


@contextlib.contextmanager
def _exact_cuda():
    """No TF32 for the duration (matmul and cuDNN), restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@torch.no_grad()
def reference_outputs(model: nn.Module, cases: Sequence[dict[str, torch.Tensor]], *,
                      output_names: Sequence[str] = ("logits",), device: str = "auto", dtype: str = "float32",
                      outputs: Callable[[Any, Sequence[str]], dict[str, torch.Tensor]] = default_outputs,
                      ) -> list[dict[str, np.ndarray]]:
    """Eager PyTorch outputs of ``model(**case)`` for each case, as numpy arrays by output name.

    ``model`` is not modified: a copy is moved to ``device`` and cast to ``dtype`` when either
    differs from the model's own (CPU float32 runs on the model itself, in eval mode).
    """
    dev, tdt = resolve_device(device), _torch_dtype(dtype)
    p = next(iter(model.parameters()), None)
    same = p is None or (p.device.type == dev and p.dtype == tdt)
    m = model if same else copy.deepcopy(model).to(device=dev, dtype=tdt)
    was_training = m.training
    m.eval()
    results = []
    try:
        with _exact_cuda() if dev == "cuda" else contextlib.nullcontext():
            for case in cases:
                feeds = {n: (t.to(device=dev, dtype=tdt) if t.is_floating_point() else t.to(dev)) for n, t in case.items()}
                named = outputs(m(**feeds), output_names)
                results.append({n: v.detach().to("cpu").numpy() for n, v in named.items()})
    finally:
        if same and was_training:
            m.train()
    return results


def reference_record(input_names: Sequence[str], output_names: Sequence[str], cases: int, tasks: Sequence[str], *,
                     batches: Sequence[int] = REFERENCE_BATCHES, seed: int = REFERENCE_SEED, device: str = "cpu",
                     dtype: str = "float32") -> dict[str, Any]:
    """The manifest's ``reference`` record (``device`` is the resolved one: "cpu" or "cuda")."""
    return {"file": REFERENCE, "inputs": list(input_names), "outputs": list(output_names), "cases": int(cases),
            "batch_sizes": [int(b) for b in batches], "seed": int(seed), "tasks": list(tasks),
            "device": device, "dtype": dtype}


def write_reference(folder: str | os.PathLike, inputs: Sequence[dict[str, Any]],
                    outputs: dict[str, Sequence[dict[str, Any]]], name: str = REFERENCE) -> Path:
    """Write ``folder/name`` (atomically): ``input.{i}.{n}`` and ``output.{task}.{i}.{n}`` arrays."""
    arrays: dict[str, np.ndarray] = {}
    for i, case in enumerate(inputs):
        for n, v in case.items():
            arrays[f"input.{i}.{n}"] = _numpy(v)
    for task, cases in outputs.items():
        if len(cases) != len(inputs):
            raise ConfigError(f"task {task!r} has {len(cases)} reference cases, the inputs {len(inputs)}.")
        for i, case in enumerate(cases):
            for n, v in case.items():
                arrays[f"output.{task}.{i}.{n}"] = _numpy(v)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = Path(folder) / name
    atomic_write_bytes(path, buf.getvalue())
    return path


def _numpy(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def load_arrays(path: str | os.PathLike, error: type[Exception] = BundleError, what: str = "reference file") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (``allow_pickle=False``: an object array is refused, never unpickled)."""
    path = Path(path)
    check_regular(path, error, what, MAX_REFERENCE_BYTES)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist.") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise error(f"{path} is not a readable {what} ({type(e).__name__}: {str(e)[:200]}); it must be an .npz of "
                    "plain numeric arrays (no pickled objects).") from None


@dataclass
class Reference:
    """A bundle's stored reference: inputs per case, outputs per task and case, and the record."""

    inputs: list[dict[str, np.ndarray]]
    outputs: dict[str, list[dict[str, np.ndarray]]]
    record: dict[str, Any] = field(default_factory=dict)
    #: tasks of the bundle with no reference outputs -> why (``read_bundle_reference``)
    unchecked: dict[str, str] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return list(self.record.get("inputs", self.inputs[0] if self.inputs else []))

    @property
    def output_names(self) -> list[str]:
        return list(self.record.get("outputs", []))

    @property
    def tasks(self) -> list[str]:
        return list(self.outputs)

    @property
    def device(self) -> str:
        return str(self.record.get("device", "cpu"))

    @property
    def dtype(self) -> str:
        return str(self.record.get("dtype", "float32"))


def read_reference(folder: str | os.PathLike, record: Any, error: type[Exception] = BundleError) -> Reference:
    """Read ``folder/reference.npz`` as the manifest's ``reference`` ``record`` describes it."""
    folder = Path(folder)
    if not isinstance(record, dict):
        raise error(f"{folder}: the manifest records no reference data; export the bundle again.")
    try:
        names_in, names_out, tasks = list(record["inputs"]), list(record["outputs"]), list(record["tasks"])
        cases = record["cases"]
    except (KeyError, TypeError) as e:
        raise error(f"{folder}: the manifest's 'reference' record lacks {e}; export the bundle again.") from None
    if not all(isinstance(v, str) for v in names_in + names_out + tasks) or not all(
            isinstance(record[k], list) for k in ("inputs", "outputs", "tasks")):
        raise error(f"{folder}: the manifest's reference inputs, outputs and tasks must be lists of names.")
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 0:
        raise error(f"{folder}: the manifest's reference case count {cases!r:.40} is not a count.")
    name = record.get("file", REFERENCE)
    if not isinstance(name, str) or not name.endswith(".npz") or any(c in name for c in "/\\:\x00") or name.startswith("."):
        raise error(f"{folder}: the reference file name {name!r:.80} must be a plain .npz file name inside the bundle.")
    path = folder / name
    data = load_arrays(path, error)
    try:
        inputs = [{n: data[f"input.{i}.{n}"] for n in names_in} for i in range(cases)]
        outputs = {t: [{n: data[f"output.{t}.{i}.{n}"] for n in names_out} for i in range(cases)] for t in tasks}
    except KeyError as e:
        raise error(f"{path} lacks {e} that the manifest's 'reference' record lists.") from None
    return Reference(inputs, outputs, dict(record))


#: Why a task without a reference record has none (tasks added by crisp-edge before 0.2 never had one).
NO_REFERENCE = "the task was added to the bundle without a PyTorch reference"


def read_bundle_reference(folder: str | os.PathLike, manifest: dict, error: type[Exception] = BundleError) -> Reference:
    """A bundle's whole reference: ``reference.npz`` (the inputs, and the outputs of the tasks exported with
    the bundle) plus the outputs of every task added later with a reference file (its task record's
    ``reference.file``, keys ``output.{task}.{i}.{name}``). Tasks with neither are listed in
    ``Reference.unchecked`` with the reason the task record gives."""
    folder = Path(folder)
    ref = read_reference(folder, manifest.get("reference"), error)
    tasks = manifest.get("tasks")
    for task, rec in (tasks if isinstance(tasks, dict) else {}).items():
        if task in ref.outputs:
            continue
        r = rec.get("reference") if isinstance(rec, dict) else None
        if not (isinstance(r, dict) and isinstance(r.get("file"), str) and r["file"].endswith(".npz")):
            why = rec.get("unchecked") if isinstance(rec, dict) else None
            ref.unchecked[task] = str(why)[:500] if isinstance(why, str) and why else NO_REFERENCE
            continue
        where = f"{folder / 'manifest.json'}: tasks[{task!r}].reference.file"
        if r["file"] not in (manifest.get("files") or {}):
            raise error(f"{where}: {r['file']!r:.80} is not listed (with its SHA-256) under 'files'; the manifest was "
                        "edited. Add the task again (crisp-edge export-task).")
        path = io_inside(folder, r["file"], where, error, "bundle")
        data = load_arrays(path, error, f"reference file of task {task!r}")
        try:
            ref.outputs[task] = [{n: data[f"output.{task}.{i}.{n}"] for n in ref.output_names}
                                 for i in range(len(ref.inputs))]
        except KeyError as e:
            raise error(f"{path} lacks {e}: it is not the reference of task {task!r} on this bundle's inputs.") from None
    return ref

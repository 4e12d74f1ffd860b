"""Running an ExecuTorch bundle from Python (``executorch.runtime``), with task switching.

Swappable bundles run *switch-then-dense* in one program (DESIGN.md section 4): ``set_task`` takes the
task's mixers and head as inputs and writes every layer's dense weight into the program's shared
mutable buffers; ``forward`` reads them. ``executorch.runtime.Program`` shares one set of arenas between
the host methods of a program, which this design needs (the legacy ``_load_for_executorch`` does not,
and ``forward`` would read garbage). ``forward`` before any ``set_task`` would read uninitialised
memory: ``run`` raises ``NoTaskError`` instead.

    sess = load_et_bundle("bundle/").session(threads=1)
    sess.set_task("mnist")        # a task of the bundle, a task .ptd path, or "default"
    out = sess.run({"x": x})      # {"logits": array}

Every task file is parsed and checked (bases tag, names, shapes, dtypes, values) before the program
sees its tensors; the program's own ``crisp_tag`` is compared with the manifest's when it is loaded.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from crisp_edge.export.bundle import feeds_by_name
from crisp_edge.export.errors import AdapterError, BundleError, ExportError, KernelsError, NoTaskError
from crisp_edge.export.inputs import as_input_array, input_dtype
from crisp_edge.export.executorch.bundle import (
    DEFAULT_PTD,
    PROGRAM,
    PTD_SUFFIX,
    EtBundle,
    load_et_bundle,
)
from crisp_edge.export.executorch.digest import IO_METHOD, io_tag
from crisp_edge.export.executorch.tasks import check_task_ptd, read_ptd_bytes

from crisp_edge.files.io import VerifiedFiles, read_regular, sha256_bytes

DEFAULT_TASK = "default"


@contextlib.contextmanager
def _native_log_quiet():
    """Hold back what native code writes to stderr (file descriptor 2) meanwhile; replay it on an error.

    ExecuTorch's threadpool logs its CPU probing ("[cpuinfo_utils.cpp:71] Reading file ...") the first
    time it is queried: information for runtime developers, noise in a user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            buf.seek(0)
            sys.stderr.write(buf.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def set_threads(threads: int) -> None:
    """Pin ExecuTorch's CPU threadpool (XNNPACK's threads) and torch's to ``threads``."""
    from executorch.extension.pybindings import portable_lib

    torch.set_num_threads(threads)
    with _native_log_quiet():
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)


def require_kernels(ops: list | None, where: str) -> None:
    """Register the kernels of crisp-edge's own operators that a program calls (the manifest's ``custom_ops``,
    ExecuTorch operator names such as ``crisp::rowmajor_linear.out``) in this process's runtime; a
    ``KernelsError`` says which cannot be. A program without custom operators needs nothing."""
    if not ops:
        return
    if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
        raise BundleError(f"{where}: the manifest's custom_ops is not a list of operator names: it was edited. "
                          "Export the bundle again.")
    from executorch.extension.pybindings import portable_lib

    from crisp_edge.export.executorch import custom_ops

    try:
        custom_ops.load_kernels()
    except ExportError as e:
        raise KernelsError(f"{where}: the program calls crisp-edge's own operators ({', '.join(ops)}) and "
                           f"their kernels cannot be loaded: {e}") from None
    missing = sorted(set(ops) - set(portable_lib._get_operator_names()))
    if missing:
        raise KernelsError(f"{where}: the program calls {missing}, which this crisp-edge's kernels "
                           f"({custom_ops.LIBRARY}) do not provide: the bundle is from a newer crisp-edge. Update "
                           "crisp-edge, or export the bundle again with this one.")


def load_program(data: bytes, where: str):
    """An ``executorch.runtime.Program`` from a ``.pte``'s bytes; a damaged file is a ``BundleError``."""
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(data)
    except Exception as e:  # noqa: BLE001 - the runtime's own errors
        raise BundleError(f"{where}: ExecuTorch cannot load this program ({type(e).__name__}: {str(e)[:300]}). "
                          "The file is damaged or truncated; export the bundle again.") from None


class EtCrispSession:
    """One bundle's program in ExecuTorch's Python runtime; for swappable bundles, one live task at a time."""

    def __init__(self, bundle: EtBundle | str | os.PathLike, threads: int = 1) -> None:
        self.bundle = bundle if isinstance(bundle, EtBundle) else load_et_bundle(bundle)
        m = self.bundle.manifest
        set_threads(threads)
        path = self.bundle.file(PROGRAM)
        data = read_regular(path, BundleError, "program", m["files"][PROGRAM]["bytes"])
        if sha256_bytes(data) != m["files"][PROGRAM]["sha256"]:
            raise BundleError(f"{path} does not match its recorded SHA-256; export the bundle again.")
        self._data = data  # the runtime may keep pointers into the program's bytes
        require_kernels(m.get("custom_ops"), str(path))  # before loading: the runtime resolves operators at load_method
        self.program = load_program(data, str(path))
        self.input_names = [i["name"] for i in m["inputs"]]
        self.output_names = [o["name"] for o in m["outputs"]]
        self._input_shapes = {i["name"]: list(i["shape"]) for i in m["inputs"]}
        self._input_dtypes = {i["name"]: input_dtype(i.get("dtype", "float32"), f"{path}: inputs[{i['name']!r}]")
                              for i in m["inputs"]}
        want = {"forward", "set_task", "crisp_tag"} if self.swappable else {"forward"}
        if not want <= self.program.method_names:
            raise BundleError(f"{path} has the methods {sorted(self.program.method_names)}; a {self.bundle.mode!r} "
                              f"bundle's program has {sorted(want)}.")
        if not self.swappable and "set_task" in self.program.method_names:
            raise BundleError(f"{path} is a swappable program, but the manifest says {self.bundle.mode!r}: the manifest "
                              "was edited (forward without set_task would read unwritten weights). Export the bundle again.")
        if IO_METHOD in self.program.method_names:  # programs exported before crisp_io lack it
            got = list(self._method(IO_METHOD).execute([]))
            if got != [io_tag(m)]:
                raise BundleError(f"{path}: the manifest's inputs, outputs, set_task inputs or head (names, order, "
                                  f"shapes) are not the ones this program was exported with ({IO_METHOD} {got} != "
                                  f"{io_tag(m)}): the manifest was edited. Export the bundle again.")
        self.forward = self._method("forward")
        self.task: str | None = None
        self.num_classes: int | None = None
        if self.swappable:
            self.swap = m["swappable"]
            tag = self._method("crisp_tag").execute([])
            if list(tag) != [self.swap["tag"]]:
                raise BundleError(f"{path}: the program's crisp_tag is {list(tag)}, the manifest's {self.swap['tag']}: "
                                  "the program and manifest come from different exports.")
            self._check_set_task_signature(path)
            self.set_task_method = self._method("set_task")
            # the bundle's task files by name, kept while each file is unchanged (read and verified again otherwise)
            self._tasks = VerifiedFiles()
            self._default_arrays()

    def _check_set_task_signature(self, path: Path) -> None:
        """The manifest's ``set_task_inputs`` are the program's own: as many, with the same shapes, in the
        same order (names and order are covered by the program's ``crisp_io`` tag, checked on load). The
        manifest's hash covers every file but itself, so a reordered entry would otherwise feed one
        layer's mixers to another, silently."""
        want = self.swap["set_task_inputs"]
        try:
            meta = self.program.metadata("set_task")
            have = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
        except Exception as e:  # noqa: BLE001 - the runtime's own errors
            raise BundleError(f"{path}: cannot read the set_task method's signature ({type(e).__name__}: {e}).") from None
        if have != [list(i["shape"]) for i in want]:
            raise BundleError(f"{path}: set_task takes {len(have)} inputs of shapes {have!r:.300}; the manifest's "
                              f"set_task_inputs list {len(want)} of shapes {[i['shape'] for i in want]!r:.300}. The "
                              "manifest was edited or belongs to another export; export the bundle again.")

    def _method(self, name: str):
        try:
            return self.program.load_method(name)
        except Exception as e:  # noqa: BLE001 - the runtime's own errors
            raise BundleError(f"{self.bundle.path}: ExecuTorch cannot load method {name!r} "
                              f"({type(e).__name__}: {str(e)[:300]}).") from None

    @property
    def swappable(self) -> bool:
        return self.bundle.mode == "swappable"

    def _read_task(self, path: Path, record: dict | None, name: str) -> tuple[dict, int | None]:
        data = read_ptd_bytes(path)
        if record is not None and sha256_bytes(data) != record["sha256"]:
            raise BundleError(f"task {name!r}: {path} does not match its recorded SHA-256; it was changed after "
                              "export. Convert the task's mixer file again (add_task).")
        return check_task_ptd(data, self.swap, str(path), hashed=record is not None)

    def _default_arrays(self) -> dict:
        """The exported mixers and head (``default.ptd``), verified by the manifest's SHA-256."""
        path = self.bundle.file(DEFAULT_PTD)
        return self._tasks.get((DEFAULT_PTD,), path, lambda: self._read_task(
            path, self.bundle.manifest["files"][DEFAULT_PTD], DEFAULT_TASK))[0]

    def _resolve(self, task: str | os.PathLike) -> tuple[str, dict, int | None]:
        if isinstance(task, str) and task == DEFAULT_TASK:
            return DEFAULT_TASK, self._default_arrays(), None
        if isinstance(task, str) and task in self.bundle.tasks:
            path = self.bundle.task_path(task)
            return (task, *self._tasks.get(task, path, lambda: self._read_task(path, self.bundle.tasks[task], task)))
        if not isinstance(task, (str, os.PathLike)):
            raise AdapterError(f"a task is a name or a {PTD_SUFFIX} path, not {type(task).__name__}.")
        path = Path(task)
        if path.suffix != PTD_SUFFIX and not path.exists():
            raise AdapterError(f"{task!r:.200} is neither a task of this bundle ({sorted(self.bundle.tasks)} or "
                               f"{DEFAULT_TASK!r}) nor a {PTD_SUFFIX} file.")
        return (path.stem, *self._read_task(path, None, path.stem))

    def set_task(self, task: str | os.PathLike) -> str:
        """Switch to ``task``: rebuild every layer's dense weight from its mixers, once. Returns the name.

        A failed switch leaves the session with no task (a forward is then ``NoTaskError``)."""
        if not self.swappable:
            raise ExportError(f"this bundle is {self.bundle.mode!r}; only 'swappable' bundles switch tasks.")
        self.task = None
        name, arrays, classes = self._resolve(task)
        full = {**self._default_arrays(), **arrays}
        feeds = []
        for item in self.swap["set_task_inputs"]:
            a = full[item["name"]]
            if item["name"].startswith("head.") and a.shape[0] < item["shape"][0]:  # pad to the head capacity
                a = np.concatenate([a, np.zeros((item["shape"][0] - a.shape[0], *a.shape[1:]), np.float32)])
            feeds.append(torch.from_numpy(np.ascontiguousarray(a)))
        try:
            self.set_task_method.execute(feeds)
        except Exception as e:  # noqa: BLE001 - the runtime's own error
            raise AdapterError(f"task {name!r}: set_task failed in ExecuTorch: {str(e)[:300]}") from None
        head = self.swap.get("head")
        self.num_classes = classes or (head["num_classes"] if head else None)
        self.task = name
        return name

    def run(self, feeds: dict[str, Any] | Any) -> dict[str, np.ndarray]:
        """All outputs by name, for inputs given by name (or the single input as an array)."""
        feeds = feeds_by_name(feeds, self.input_names)
        xs = []
        for k in self.input_names:
            a = torch.as_tensor(as_input_array(feeds[k], self._input_dtypes[k], k))
            if list(a.shape) != self._input_shapes[k]:
                raise ExportError(f"input {k!r} has shape {list(a.shape)}; this program takes exactly "
                                  f"{self._input_shapes[k]} (ExecuTorch programs have static shapes; pad or split "
                                  "the batch, or export with another batch size).")
            xs.append(a)
        if self.swappable and self.task is None:
            raise NoTaskError("no task is set: call set_task(name) first (set_task('default') for the exported "
                              "mixers); a swappable program has no weights until then.")
        try:
            outs = self.forward.execute(xs)
        except Exception as e:  # noqa: BLE001 - the runtime's own error
            raise ExportError(f"ExecuTorch failed on these inputs: {str(e)[:300]}") from None
        result = {}
        for name, o in zip(self.output_names, outs):
            o = o.detach().numpy().copy()
            if self.swappable and self.num_classes is not None:
                o = o[..., :self.num_classes]
            result[name] = o
        return result

    def __call__(self, x: Any) -> np.ndarray:
        """The first output for input ``x`` (numpy or torch)."""
        return self.run(x)[self.output_names[0]]

    def predict(self, x: Any) -> np.ndarray:
        """The first output for any number of rows of the single input: ``x`` runs in batches of the
        program's static batch size (the last one zero-padded) and the padding rows are dropped."""
        if len(self.input_names) != 1:
            raise ExportError(f"predict takes the single input of a one-input program; this one takes {self.input_names}.")
        name = self.input_names[0]
        x = as_input_array(x, self._input_dtypes[name], name)
        batch = self._input_shapes[name][0]
        outs = []
        for i in range(0, len(x), batch):
            b = x[i:i + batch]
            if len(b) < batch:
                b = np.concatenate([b, np.zeros((batch - len(b), *b.shape[1:]), b.dtype)])
            outs.append(self(b)[: min(batch, len(x) - i)])
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def write_runner_inputs(bundle: EtBundle | str | os.PathLike, folder: str | os.PathLike) -> int:
    """Write the bundle's reference inputs as ``input.{i}.{name}.npy`` files for the C++ runner; returns
    the number of cases."""
    from crisp_edge.export.parity.validate import reference_cases

    b = bundle if isinstance(bundle, EtBundle) else load_et_bundle(bundle)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inputs, _ = reference_cases(b)
    dtypes = {i["name"]: input_dtype(i.get("dtype", "float32"), f"{b.path}: inputs[{i['name']!r}]")
              for i in b.manifest["inputs"]}
    for i, case in enumerate(inputs):
        for name, a in case.items():  # in the program's own input dtype (a float64 reference's inputs too)
            np.save(folder / f"input.{i}.{name}.npy", np.ascontiguousarray(a, dtype=dtypes.get(name, np.float32)))
    return len(inputs)


__all__ = ["DEFAULT_TASK", "EtCrispSession", "require_kernels", "set_threads", "write_runner_inputs"]

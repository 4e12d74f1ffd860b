"""Running a bundle in ONNX Runtime, with task switching for swappable bundles.

Swappable bundles run *switch-then-dense* (DESIGN.md sections 3-4): two sessions. ``set_task`` runs
the fold session once with the task's tensors fed as its overridable initializers (what an active
``.onnx_adapter`` does in ORT: the same names, replacing the same tensors) and keeps its outputs, every layer's dense weight, as ``OrtValue``s; ``run`` feeds them with the
input to the inference session through an ``IOBinding`` that holds them bound (one per thread,
rebound after a switch), so a forward passes only the input: about 10% faster than handing ~100
``OrtValue``s to ``run_with_ort_values`` on every call (embedded ViT, batch 1). Where it can, the session
folds the weights with crisp-edge's fused kernel instead of the fold graph's products (``kernel_fold``: the
same weights within float32 rounding; on ViT-S a switch 0.26 instead of 0.49 forwards); biases and head come
straight from the task's tensors. A swappable int8 bundle (``swap_int8``) binds int8 weights and per-channel
scales instead, which the kernel folds and quantizes in one pass (``fold_kernel.fold_quant_group``); tasks are the
same float32 mixer files.

    sess = load_bundle("bundle/").session(threads=1)
    sess.set_task("mnist")          # a task of the bundle, an .onnx_adapter path, or "default"
    logits = sess(x)                # numpy (or torch) in, numpy out

Everything the session takes from files is checked before ONNX Runtime sees it: the manifest by
``load_bundle``, the graphs against the manifest (input, output and overridable tensor names and
shapes), and every adapter by crisp-edge's own FlatBuffer reader (``adapter_format``), whose checked
copies of the tensors are what the fold is fed: ORT never reads a task file itself (its own adapter
loader, ``ort.LoraAdapter``, would parse the file a second time, from a temporary copy: 0.06 of a ViT-S
forward per switch from a file). ORT's own errors become typed ones.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from crisp_edge.export.bundle import Bundle, feeds_by_name
from crisp_edge.export.errors import AdapterError, BundleError, ExportError, NoTaskError
from crisp_edge.export.inputs import as_input_array
from crisp_edge.export.onnx.adapter import check_adapter, check_adapter_record, read_adapter_bytes
from crisp_edge.export.onnx.bundle import ADAPTER_SUFFIX, load_bundle
from crisp_edge.export.onnx.kernel_fold import KernelFold

from crisp_edge.files.io import VerifiedFiles, check_regular, file_state, sha256_bytes
from crisp_edge.files.pages import release_file_pages

#: The exported model's own mixers, biases and head (the fold with no adapter active).
DEFAULT_TASK = "default"


def session_options(threads: int = 1) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # overridable initializers are the point here: not worth ORT's warning
    return so


#: ONNX Runtime input types the sessions feed, as numpy dtypes (float inputs are cast to float32
#: as before; integer inputs such as token ids must be given as integers).
_ORT_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OnnxCrispSession:
    """One bundle in ONNX Runtime; for swappable bundles, one live task at a time.

    ``release_bases`` (default True): after each switch, hand back the resident pages of the fold graph's
    memory-mapped external data, the bases (``crisp_edge.files.pages``): at full capacity as large as the
    dense weights, and idle until the next switch, which then reads them again from the page cache
    (SmolLM2-shaped, 113 MB of bases: resident memory 1.77x -> 1.18x the dense bundle's, a switch 72 -> 112
    ms; ``bench/results/lm_onnx_shaped.json``). Set it False to keep them resident for faster switches.
    """

    release_bases = True
    #: Fold a task with crisp-edge's fused kernel (``kernel_fold``: the fold graph's weights in about half its
    #: time) where the bundle and this machine allow; False: the fold graph in ONNX Runtime, as an app
    #: using ONNX Runtime alone runs it. ``fold_with`` says which one this session uses.
    use_fold_kernel = True

    def __init__(self, bundle: Bundle | str | os.PathLike, threads: int = 1,
                 providers: list[str] | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        m = self.bundle.manifest
        self.providers = providers or ["CPUExecutionProvider"]
        self.session = self._open("model", threads)
        self.input_names = [i["name"] for i in m["inputs"]]
        self.output_names = [o["name"] for o in m["outputs"]]
        self.fold = None
        self.task: str | None = None
        self._weights: dict[str, ort.OrtValue] | None = None
        # the bundle's own tasks by name, kept while their files are unchanged (read and verified again otherwise)
        self._adapters = VerifiedFiles()
        self._generation = 0  # bumped by every switch: a thread's binding of older weights is stale
        self._local = threading.local()
        self._fold_data: list = []  # (path, file_state) of the fold graph's external data file
        self._kernel_fold: KernelFold | None = None
        weight_names: list[str] = []
        if self.swappable:
            self.swap = m["swappable"]
            self.fold = self._open("fold", threads)
            # the fold's external data (the bases), memory-mapped by ORT: read at a switch, idle in between
            data = self.bundle.manifest["models"]["fold"]["file"] + ".data"
            self._fold_data = [(p, file_state(p)) for p in [self.bundle.file(data)] if data in m["files"]]
            self.weight_names = weight_names = [o.name for o in self.fold.get_outputs()]
            self._check_fold()
            fold_file = self.bundle.file(self.bundle.manifest["models"]["fold"]["file"])
            self._kernel_fold = KernelFold.build(self.fold, fold_file, self._fold_data[0][0] if self._fold_data
                                                 else None, self.swap, weight_names) if self.use_fold_kernel else None
        self.fold_with = None if not self.swappable else "crisp-edge kernel" if self._kernel_fold else "onnxruntime"
        self._check_model(weight_names)

    def _open(self, role: str, threads: int) -> ort.InferenceSession:
        rel = self.bundle.manifest["models"][role]["file"]
        path = self.bundle.file(rel)
        # the manifest lists every model file with its size; ORT itself would block on a FIFO
        check_regular(path, BundleError, f"the bundle's {role} graph", self.bundle.manifest["files"][rel]["bytes"])
        so = session_options(threads)
        if role == "fold":
            # The fold's product takes the bases as its right-hand operand, which ORT would pre-pack: a second,
            # always resident copy of them. Unpacked, they stay where ORT mapped or loaded them (and a switch
            # can hand their pages back: ``release_bases``); MLAS packs each block as it goes.
            so.add_session_config_entry("session.disable_prepacking", "1")
        try:
            return ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT's own (untyped) errors, e.g. a file that is no ONNX graph
            raise BundleError(f"{path}: ONNX Runtime cannot load the bundle's {role} graph "
                              f"({type(e).__name__}: {str(e)[:300]}).") from None

    def _check_model(self, weight_names: list[str]) -> None:
        """The inference graph's inputs and outputs are the ones the manifest names."""
        where = f"{self.bundle.path}: the model graph"
        graph_in = [i.name for i in self.session.get_inputs()]
        graph_out = [o.name for o in self.session.get_outputs()]
        want_in = self.input_names + weight_names
        if sorted(graph_in) != sorted(want_in):
            raise BundleError(f"{where} takes {graph_in!r:.300}; the manifest (and fold graph) name {want_in!r:.300}.")
        if graph_out != self.output_names:
            raise BundleError(f"{where} returns {graph_out!r:.300}; the manifest names {self.output_names!r:.300}.")
        self._input_shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self._input_dtypes = {i.name: _ORT_INT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    def _check_fold(self) -> None:
        """The fold graph takes no inputs, and its overridable tensors are the manifest's, with the
        same shapes: the adapter checks (against the manifest) then hold for the graph itself."""
        where = f"{self.bundle.path}: the fold graph"
        if self.fold.get_inputs():
            raise BundleError(f"{where} has inputs {[i.name for i in self.fold.get_inputs()]}; a fold graph takes none.")
        graph = {o.name: o for o in self.fold.get_overridable_initializers()}
        want = self.swap["overridable"]
        if sorted(graph) != sorted(want):
            raise BundleError(f"{where} can swap {sorted(graph)!r:.300}; the manifest says {sorted(want)!r:.300}.")
        for name, arg in graph.items():
            shape, dims = want[name], list(arg.shape)
            same = len(shape) == len(dims) and all(
                (isinstance(w, str) and not isinstance(d, int)) or (isinstance(w, int) and w == d)
                for w, d in zip(shape, dims))
            if not same or arg.type != "tensor(float)":
                raise BundleError(f"{where}: {name} is {arg.type} of shape {dims}; the manifest says float {shape}.")
        if sorted(self.weight_names) != sorted(self.swap["weights"]):
            raise BundleError(f"{where} returns {self.weight_names!r:.300}; the manifest says "
                              f"{sorted(self.swap['weights'])!r:.300}.")

    @property
    def swappable(self) -> bool:
        return self.bundle.mode == "swappable"

    def _adapter_path(self, task: str | os.PathLike) -> tuple[str, Path, dict | None]:
        """(name, path, manifest record or None) of a bundle task or an adapter file."""
        if isinstance(task, str) and task in self.bundle.tasks:
            return task, self.bundle.task_path(task), self.bundle.tasks[task]
        if not isinstance(task, (str, os.PathLike)):
            raise AdapterError(f"a task is a name or an .onnx_adapter path, not {type(task).__name__}.")
        path = Path(task)
        try:
            exists = path.exists()
        except OSError:  # e.g. no permission to look: read_adapter_bytes says so below
            exists = True
        if path.suffix == ADAPTER_SUFFIX or exists:
            for task_name in self.bundle.tasks:  # the bundle's own file, given by path: its manifest record
                try:
                    if os.path.samefile(path, self.bundle.task_path(task_name)):
                        return task_name, path, self.bundle.tasks[task_name]
                except (OSError, ValueError):
                    pass
            return path.stem, path, None
        raise AdapterError(f"{task!r:.200} is neither a task of this bundle ({sorted(self.bundle.tasks)} or "
                           f"{DEFAULT_TASK!r}) nor an .onnx_adapter file.")

    def _read(self, task: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
        """(name, checked task tensors) of a task: read, SHA-256 against its record, parsed and checked."""
        name, path, record = self._adapter_path(task)
        data = read_adapter_bytes(path)
        if record is not None and sha256_bytes(data) != record["sha256"]:
            raise BundleError(f"task {name!r}: {path} does not match its recorded SHA-256; it was changed after "
                              "export. Convert the task's mixer file again (mixers_to_onnx_adapter).")
        if record is None:
            check_adapter_record(data, path)
        # our own strict reader's copies: nothing ORT sees can change after the checks (no file mapping)
        return name, check_adapter(data, self.swap, str(path))

    def _bundle_adapter(self, name: str) -> dict[str, np.ndarray]:
        """The bundle's task ``name``, read and verified on first use and again whenever its file changed
        (``VerifiedFiles``: a file replaced or edited since is read anew and refused by its SHA-256)."""
        return self._adapters.get(name, self.bundle.task_path(name), lambda: self._read(name)[1])

    def load_adapter(self, task: str | os.PathLike) -> str:
        """Read, check and keep a task of the bundle (names, shapes, bases tag and SHA-256), so that
        switching to it later is one fold run while its file is unchanged; returns its name. An adapter
        *file* is checked but not kept: ``set_task(path)`` reads and verifies it on every call."""
        if not self.swappable:
            raise ExportError(f"this bundle is {self.bundle.mode!r}; only 'swappable' bundles load adapters.")
        if isinstance(task, str) and task in self.bundle.tasks:
            self._bundle_adapter(task)
            return task
        return self._read(task)[0]

    def set_task(self, task: str | os.PathLike) -> str:
        """Switch to ``task``: fold its mixers into dense weights once. Returns the task's name.

        ``task`` is a task of the bundle, a path to an ``.onnx_adapter``, or ``"default"``. A failed
        switch (any error) leaves the session with no task: a forward is then a ``NoTaskError``, never
        the previous task's answer to a caller who missed the error.
        """
        if not self.swappable:
            raise ExportError(f"this bundle is {self.bundle.mode!r}; only 'swappable' bundles switch tasks.")
        self._weights, self.task = None, None
        self._generation += 1
        for path, state in self._fold_data:  # its pages were dropped: ORT would read whatever the file holds now
            if file_state(path) != state:
                raise BundleError(f"{path} changed after this session opened the bundle; the fold graph reads it "
                                  "at every switch. Load the bundle again (load_bundle verifies it).")
        if isinstance(task, str) and task == DEFAULT_TASK:
            name, arrays = DEFAULT_TASK, {}
        elif isinstance(task, str) and task in self.bundle.tasks:
            name, arrays = task, self._bundle_adapter(task)
        else:
            name, arrays = self._read(task)  # a file by path: read and verified on every call
        if self._kernel_fold is not None:
            self._weights = self._kernel_fold.run(name, arrays)
        else:
            # the task's tensors replace the fold's overridable initializers of the same names, as ORT's active
            # adapter would (no copy: an OrtValue over each checked array, alive for the run)
            feeds = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}
            try:
                values = self.fold.run_with_ort_values(self.weight_names, feeds, ort.RunOptions())
            except Exception as e:  # noqa: BLE001 - ORT's own error
                raise AdapterError(f"task {name!r}: the fold run failed in ONNX Runtime: {e}") from None
            self._weights = dict(zip(self.weight_names, values))
        self.task = name
        for path, _ in self._fold_data if self.release_bases else ():  # still mapped; resident again at next switch
            release_file_pages(path)
        return name

    def _check_input(self, name: str, a: np.ndarray) -> None:
        want = self._input_shapes.get(name)
        if want is None:
            return
        ok = a.ndim == len(want) and all(not isinstance(w, int) or w == d for w, d in zip(want, a.shape))
        if not ok:
            raise ExportError(f"input {name!r} has shape {list(a.shape)}; the model takes {list(want)} "
                              "(names are free sizes, e.g. the batch).")

    def run(self, feeds: dict[str, Any] | Any) -> dict[str, np.ndarray]:
        """All outputs by name, for inputs given by name (or the single input as an array)."""
        feeds = feeds_by_name(feeds, self.input_names)
        try:
            arrays = {k: as_input_array(feeds[k], self._input_dtypes.get(k, np.float32), k) for k in self.input_names}
        except (TypeError, ValueError) as e:
            raise ExportError(f"inputs must be numeric arrays or tensors ({type(e).__name__}: {e}).") from None
        for k, a in arrays.items():
            self._check_input(k, a)
        if not self.swappable:
            try:
                return dict(zip(self.output_names, self.session.run(self.output_names, arrays)))
            except Exception as e:  # noqa: BLE001 - ORT's own error
                raise ExportError(f"ONNX Runtime failed on these inputs: {str(e)[:300]}") from None
        if self._weights is None:
            raise NoTaskError("no task is set: call set_task(name) first (set_task('default') for the "
                              "exported mixers); a swappable session has no weights until then.")
        binding = self._binding()
        try:
            for k, a in arrays.items():
                binding.bind_cpu_input(k, a)
            binding.clear_binding_outputs()  # outputs keep the last run's shape otherwise (another batch fails)
            for name in self.output_names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        except Exception as e:  # noqa: BLE001 - ORT's own error
            raise ExportError(f"ONNX Runtime failed on these inputs: {str(e)[:300]}") from None
        return dict(zip(self.output_names, outs))

    def _binding(self) -> ort.IOBinding:
        """This thread's binding of the inference session, with the current task's dense weights bound
        (built once per thread and task: the weights are not passed again on every forward)."""
        local = self._local
        if getattr(local, "generation", None) != self._generation:
            binding = self.session.io_binding()
            for name, value in self._weights.items():  # the task's dense weights, built once by set_task
                binding.bind_ortvalue_input(name, value)
            local.binding, local.generation = binding, self._generation
        return local.binding

    def __call__(self, x: Any) -> np.ndarray:
        """The first output for input ``x`` (numpy or torch)."""
        return self.run(x)[self.output_names[0]]

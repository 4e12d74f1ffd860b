"""Fuzzing harness for ONNX export bundles, shared by ``runtime_tests/test_fuzz_bundles.py`` and
``bench/reliability.py``.

One tiny swappable bundle (a CRISP toy timm ViT with two tasks) is exported once; then

* ``manifest`` cases: ``manifest.json`` mutated (byte flips, truncations, JSON edits of every field:
  wrong types, huge numbers, deep nesting, missing keys, file names with ``..``, absolute paths and
  NUL bytes, and well-formed manifests that lie) go through ``load_bundle`` + ``Bundle.session()``
  (+ ``set_task`` and a forward pass for the ones accepted). An accepted manifest must name only
  files inside the bundle folder, and no Python-level ``open`` may reach outside it (decoy copies
  of the bundle's files lie in the folder above, so a loader that follows ``../`` would succeed);
* ``adapter`` cases: ``.onnx_adapter`` files mutated (bytes, truncations, random bytes, adapters
  written by ONNX Runtime's own ``AdapterFormat`` with wrong names, shapes, dtypes, values or tags,
  and hand-built FlatBuffers with fields missing or lying) go through ``OnnxCrispSession.set_task``
  on one live session. After a refusal the session must hold no task (a forward is a
  ``NoTaskError``) and stay usable: switching to a bundle task gives its exact outputs again.

Native code may crash on a corrupt file, so the cases run in a fresh interpreter (``python -m
tests.fuzzing_bundles SPEC``), which reports each case as a JSON line. A worker that dies (a
signal, e.g. SIGSEGV) or stops making progress (a hang) is recorded as an escape on the case it was
running, the input is kept, and a new worker goes on from the next case.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from tests import fuzzing
from tests.fuzzing import CASE_TIME_LIMIT_S, Tally, attempt, mutate_bytes, mutate_json

REPO_ROOT = Path(__file__).resolve().parent.parent
#: A worker gets this long to import onnxruntime and torch and open the bundle (a loaded 2-core box).
STARTUP_LIMIT_S = 180.0
KINDS = ("manifest", "adapter")


# --- the bundle --------------------------------------------------------------------------------------
def build_bundle(folder: Path) -> Path:
    """Export the fuzzing bundle into ``folder/bundle`` (a swappable toy ViT with tasks t1 and t2) and
    put decoys beside it: exact copies of its files one folder up, where ``../name`` would find them."""
    import torch
    from crisp_edge.export import export_onnx

    from crisp_edge.files.mixers import save_mixers

    torch.set_num_threads(1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = fuzzing.crisp_toy()
    tasks = []
    for i, (name, classes) in enumerate((("t1", 3), ("t2", 5))):
        task = copy.deepcopy(model)
        fuzzing.perturb_task_(task, seed=10 + i, classes=classes)
        tasks.append(save_mixers(task, folder / f"{name}.safetensors", task=name, biases=i == 0))
    bundle = export_onnx(model, folder / "bundle", mode="swappable", tasks=tasks)
    decoys(bundle.path)
    return bundle.path


def decoys(bundle_dir: Path) -> None:
    for p in bundle_dir.rglob("*"):
        if p.is_file():
            target = bundle_dir.parent / p.relative_to(bundle_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copyfile(p, target)


def case_bundle(bundle_dir: Path, work: Path) -> Path:
    """A private copy of the bundle for mutating its manifest, with decoys one folder up."""
    root = work / "manifest-case"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(bundle_dir, root / "bundle")
    decoys(root / "bundle")
    return root / "bundle"


# --- manifest mutations --------------------------------------------------------------------------------
DEEP = "\x00DEEP\x00"  # replaced by 5000 nested brackets in the text (json.dumps could not write them)
HOSTILE_VALUES: list[Any] = [None, True, False, 0, -1, 1, 1.5, -0.0, 2**31, 2**63, 2**64, 10**30, 10**400, 1e308, float("inf"),
                             float("nan"), "", "x", "\x00", "../", [], [None], {}, {"a": 1}, [[[[[[1]]]]]], "1" * 5000,
                             DEEP]
HOSTILE_PATHS = ["../model.onnx", "../fold.onnx", "../tasks/t1.onnx_adapter", "../../etc/passwd", "/etc/passwd",
                 "tasks/../model.onnx", "tasks/../../model.onnx", "./model.onnx", "model.onnx\x00.txt", "", ".", "..",
                 "tasks", "tasks/", "model.onnx/", "C:\\model.onnx", "\\\\host\\share\\model.onnx", "tasks\\t1.onnx_adapter",
                 "reference.npz", "manifest.json", "fold.onnx", "tasks/t2.onnx_adapter", "nosuch.onnx", "x" * 5000,
                 "~/model.onnx", "%2e%2e/model.onnx", "tasks//t1.onnx_adapter"]


def file_fields(m: dict) -> list[tuple]:
    """Paths (in ``fuzzing._paths`` form) of every value in the manifest that names a file."""
    out: list[tuple] = []
    for section in ("models", "tasks"):
        for k, v in (m.get(section) or {}).items():
            if isinstance(v, dict) and "file" in v:
                out.append((section, k, "file"))
    if isinstance(m.get("reference"), dict):
        out.append(("reference", "file"))
    return out


def _set(obj: Any, path: tuple, value: Any) -> None:
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value


def _dumps(obj: Any) -> bytes:
    text = json.dumps(obj, allow_nan=True)
    return text.replace(json.dumps(DEEP), "[" * 5000 + "]" * 5000).encode()


def lying_manifest(m: dict, rng: random.Random) -> dict:
    """Well-formed manifests whose parts disagree with each other or with the files."""
    m = copy.deepcopy(m)
    swap = m.get("swappable", {})
    op = rng.randrange(14)
    if op == 0:  # the two graphs exchanged
        m["models"]["model"]["file"], m["models"]["fold"]["file"] = m["models"]["fold"]["file"], m["models"]["model"]["file"]
    elif op == 1:  # a hash-checked file that is no ONNX graph
        m["models"][rng.choice(["model", "fold"])]["file"] = rng.choice(["reference.npz", "tasks/t1.onnx_adapter"])
    elif op == 2:  # a task pointing at another task's file (its record copied, so hashes check)
        m["tasks"]["t1"] = copy.deepcopy(m["tasks"]["t2"])
    elif op == 3:
        m["mode"] = rng.choice(["dense", "factored"])
    elif op == 4:
        m.pop("swappable", None)
    elif op == 5 and swap:  # an overridable tensor of another shape or name
        name = rng.choice(sorted(swap["overridable"]))
        if rng.random() < 0.5:
            swap["overridable"][name] = rng.choice([[1], [2, 3], [], ["num_classes"], [0, 0], [-1, 4], [2**40, 2]])
        else:
            swap["overridable"]["mixer.renamed"] = swap["overridable"].pop(name)
    elif op == 6 and swap:
        swap["adapter_model_version"] = rng.choice([0, -1, swap["adapter_model_version"] ^ 1, 2**31, 2**63])
    elif op == 7 and swap:  # the layout edited (the adapter tag no longer matches it)
        key = rng.choice(sorted(swap["layout"]))
        swap["layout"][key][rng.choice(["r", "s", "n", "gate", "role"])] = rng.choice([0, 99, "relu", None])
    elif op == 8:  # input or output names the graph does not have
        m[rng.choice(["inputs", "outputs"])][0]["name"] = rng.choice(["x", "logits", "", "input"])
    elif op == 9:  # a file dropped from the hash list (still on disk)
        m["files"].pop(rng.choice(sorted(m["files"])))
    elif op == 10:  # a task without its hash, or with another one
        rec = m["tasks"][rng.choice(sorted(m["tasks"]))]
        if rng.random() < 0.5:
            rec.pop("sha256")
        else:
            rec["sha256"] = m["files"]["model.onnx"]["sha256"]
    elif op == 11:  # a task named like a path
        m["tasks"][rng.choice(["../t1", "/t1", "default", "", "t\x001"])] = m["tasks"].pop("t1")
    elif op == 12 and swap:  # fold outputs / weights renamed
        w = swap["weights"]
        k = rng.choice(sorted(w))
        w[k + ".x"] = w.pop(k)
    else:  # the reference record
        m["reference"][rng.choice(["cases", "inputs", "tasks", "file"])] = rng.choice([10**9, -1, ["nope"], "x", None])
    return m


def manifest_case(raw: bytes, m: dict, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choices(["bytes", "json", "field", "path", "lying"], weights=[3, 2, 4, 3, 3])[0]
    if kind == "bytes":
        return kind, mutate_bytes(raw, rng)
    if kind == "json":
        return kind, _dumps(mutate_json(m, rng))
    if kind == "field":  # one field, chosen section first (the tensor lists would draw most picks otherwise)
        section = rng.choice(sorted(m))
        paths = [p for p in fuzzing._paths(m) if p and p[0] == section]
        path = rng.choice(paths)
        out = copy.deepcopy(m)
        if rng.random() < 0.25:
            parent = out
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        else:
            _set(out, path, rng.choice(HOSTILE_VALUES) if rng.random() < 0.8 else fuzzing.random_json(rng))
        return kind, _dumps(out)
    if kind == "path":
        out = copy.deepcopy(m)
        target = rng.choice(HOSTILE_PATHS)
        if rng.random() < 0.5:  # a file record's name (its record kept, so a decoy's hash matches)
            section = rng.choice(["files", "files", "tasks"])
            if section == "files":
                old = rng.choice(sorted(out["files"]))
                out["files"][target] = out["files"].pop(old)
                for model in out["models"].values():
                    if model.get("file") == old and rng.random() < 0.7:
                        model["file"] = target
            else:
                out["tasks"][rng.choice(sorted(out["tasks"]))]["file"] = target
        else:
            field = rng.choice(file_fields(out))
            _set(out, field, target)
            if field[0] == "models" and rng.random() < 0.7:  # and vouch for it in the hash list
                src = {"../model.onnx": "model.onnx", "../fold.onnx": "fold.onnx"}.get(target, "model.onnx")
                out["files"][target] = copy.deepcopy(m["files"].get(src, {}))
        return kind, _dumps(out)
    return kind, _dumps(lying_manifest(m, rng))


# --- adapter mutations ---------------------------------------------------------------------------------
def flatbuffer_adapter(params: list[dict], format_version: int = 1, adapter_version: int = 1, model_version: int = 0,
                       identifier: bytes = b"TORT", omit_parameters: bool = False) -> bytes:
    """An ``.onnx_adapter`` FlatBuffer built field by field, so that fields can be left out or lie.

    Each parameter: ``name`` (str), ``dims`` (ints), ``data_type`` (int, 1 = FLOAT), ``raw`` (bytes);
    a key set to None leaves that field out."""
    import flatbuffers

    b = flatbuffers.Builder(1024)
    offsets = []
    for p in params:
        name = b.CreateString(p["name"]) if p.get("name") is not None else None
        dims = None
        if p.get("dims") is not None:
            b.StartVector(8, len(p["dims"]), 8)
            for d in reversed(p["dims"]):
                b.PrependInt64(d)
            dims = b.EndVector()
        raw = None
        if p.get("raw") is not None:
            data = bytes(p["raw"])
            b.StartVector(1, len(data), 8)
            b.head -= len(data)
            b.Bytes[b.head:b.head + len(data)] = data
            raw = b.EndVector()
        b.StartObject(4)
        if name is not None:
            b.PrependUOffsetTRelativeSlot(0, name, 0)
        if dims is not None:
            b.PrependUOffsetTRelativeSlot(1, dims, 0)
        if p.get("data_type") is not None:
            b.PrependInt32Slot(2, p["data_type"], 0)
        if raw is not None:
            b.PrependUOffsetTRelativeSlot(3, raw, 0)
        offsets.append(b.EndObject())
    vec = None
    if not omit_parameters:
        b.StartVector(4, len(offsets), 4)
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        vec = b.EndVector()
    b.StartObject(4)
    b.PrependInt32Slot(0, format_version, 0)
    b.PrependInt32Slot(1, adapter_version, 0)
    b.PrependInt32Slot(2, model_version, 0)
    if vec is not None:
        b.PrependUOffsetTRelativeSlot(3, vec, 0)
    b.Finish(b.EndObject(), file_identifier=identifier)
    return bytes(b.Output())


def _params(arrays: dict) -> list[dict]:
    import numpy as np

    return [{"name": k, "dims": list(v.shape), "data_type": 1, "raw": np.ascontiguousarray(v, "<f4").tobytes()}
            for k, v in arrays.items()]


def flatbuffer_case(arrays: dict, tag: int, rng: random.Random) -> bytes:
    """A hand-built adapter with one field missing or lying (everything else valid)."""
    params = _params(arrays)
    kw: dict[str, Any] = {"model_version": tag}
    op = rng.randrange(12)
    p = rng.choice(params)
    if op == 0:  # a field left out
        p[rng.choice(["name", "dims", "raw", "data_type"])] = None
    elif op == 1:
        kw["omit_parameters"] = True
    elif op == 2:  # another element type code, data unchanged
        p["data_type"] = rng.choice([0, 2, 3, 7, 8, 9, 10, 11, 16, 20, 21, 99, -1, 2**31 - 1])
    elif op == 3:  # dims that disagree with the data
        p["dims"] = rng.choice([[], [0], [-1], [-4, -4], [2**62, 2**62], [2**63 - 1], [1] * 12, [len(p["raw"])],
                                [len(p["raw"]) // 4 + 1], [2**31, 2**31, 4], p["dims"][::-1] + [1]])
    elif op == 4:  # data shorter or longer than the dims say
        p["raw"] = rng.choice([b"", p["raw"][:-4], p["raw"][: len(p["raw"]) // 2], p["raw"] + b"\0" * 4,
                               p["raw"][:1]])
    elif op == 5:
        kw["format_version"] = rng.choice([0, 2, -1, 2**31 - 1])
    elif op == 6:  # the same name twice
        params.append(dict(p))
    elif op == 7:
        kw["identifier"] = rng.choice([b"TORX", b"\0\0\0\0", b"ORTM"])
    elif op == 8:
        p["name"] = rng.choice(["", "\x00", "é", "mixer.", "x" * 5000,
                                "head.weight" if p["name"] != "head.weight" else "head.bias"])
    elif op == 9:  # non-finite values
        import numpy as np

        a = np.frombuffer(p["raw"], "<f4").copy()
        if a.size:
            a[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        p["raw"] = a.tobytes()
    elif op == 10:
        params = []
    else:
        kw["model_version"] = rng.choice([tag ^ 1, 0, -1, -(2**31)])
    data = flatbuffer_adapter(params, **kw)
    if rng.random() < 0.2:  # and damaged on top
        data = mutate_bytes(data, rng)
    return data


def ort_writer_case(arrays: dict, tag: int, rng: random.Random, path: Path) -> bytes:
    """An adapter written by ONNX Runtime's own ``AdapterFormat`` with wrong names, shapes, dtypes,
    values or tags."""
    import numpy as np
    import onnxruntime as ort

    arrays = {k: v.copy() for k, v in arrays.items()}
    version = tag
    for _ in range(rng.randint(1, 2)):
        op = rng.randrange(11)
        name = rng.choice(sorted(arrays)) if arrays else None
        if op == 0 and name:  # renamed
            arrays[rng.choice(["junk", "mixer.nope", "", "bias.qkv_0_1", "head.bias", "head.weight", "mixer.fc1_0_1"])] = arrays.pop(name)
        elif op == 1 and name:  # reshaped
            shape = rng.choice([(), (0,), (3,), (2, 3), (1, 1, 1, 1), (0, 32), (7, 32), (3, 31),
                                tuple(rng.randint(0, 6) for _ in range(rng.randint(1, 3)))])
            arrays[name] = np.zeros(shape, np.float32) + 0.5
        elif op == 2 and name:  # another dtype
            arrays[name] = arrays[name].astype(rng.choice([np.float16, np.float64, np.int64, np.int32, np.int8,
                                                           np.uint8, np.bool_]))
        elif op == 3 and name:
            del arrays[name]
        elif op == 4:
            arrays = {}
        elif op == 5 and name:  # non-finite or extreme values
            a = arrays[name]
            if a.size:
                a.flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf, np.finfo(np.float32).max])
        elif op == 6:
            version = rng.choice([tag ^ 1, 0, -1, 2**31 - 1])
        elif op == 7 and "head.weight" in arrays:  # the head and its bias disagree, or no classes
            c = rng.choice([0, 1, arrays["head.weight"].shape[0] + 1])
            arrays["head.weight"] = np.zeros((c, arrays["head.weight"].shape[1]), np.float32)
        elif op == 8 and name:  # non-contiguous / Fortran-order source
            arrays[name] = np.asfortranarray(arrays[name])
        elif op == 9:  # a head with many classes
            arrays["head.weight"] = np.ones((rng.choice([1, 64, 1000]), 32), np.float32)
            arrays.pop("head.bias", None)
        else:
            arrays[rng.choice(["bias.extra", "mixer.extra"])] = np.zeros((2, 2), np.float32)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(rng.choice([1, 1, 0, 7]))
    fmt.set_model_version(version)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    fmt.export_adapter(str(path))
    return path.read_bytes()


def adapter_case(valid: list[bytes], arrays: list[dict], tag: int, rng: random.Random, scratch: Path) -> tuple[str, bytes]:
    kind = rng.choices(["bytes", "random", "ort-writer", "flatbuffer"], weights=[5, 1, 3, 4])[0]
    i = rng.randrange(len(valid))
    if kind == "bytes":
        if rng.random() < 0.5:  # past the root offset and identifier: reaches the tables, vectors and data
            return kind, valid[i][:8] + mutate_bytes(valid[i][8:], rng)
        return kind, mutate_bytes(valid[i], rng, valid)
    if kind == "random":
        n = rng.choice([0, 1, 4, 8, 16, 64, 1000])
        head = rng.choice([b"", b"\x10\x00\x00\x00TORT", struct.pack("<I", rng.randrange(2**32)) + b"TORT"])
        return kind, head + bytes(rng.randrange(256) for _ in range(n))
    try:
        if kind == "ort-writer":
            return kind, ort_writer_case(arrays[i], tag, rng, scratch)
        return kind, flatbuffer_case(arrays[i], tag, rng)
    except Exception:  # noqa: BLE001 - a writer refused to write this one (e.g. ORT's, a dtype it cannot store)
        return "bytes", mutate_bytes(valid[i], rng, valid)


# --- the worker (one fresh interpreter per batch of cases) -------------------------------------------------
class OutsideRead(Exception):
    """An accepted manifest made the loader use a file outside the bundle folder."""


class SessionStateError(Exception):
    """After a set_task, the session held a task it should not, or switched to wrong weights."""


def _manifest_files(m: Any) -> list[str]:
    names: list[str] = []
    if not isinstance(m, dict):
        return names
    if isinstance(m.get("files"), dict):
        names += list(m["files"])
    for section in ("models", "tasks"):
        if isinstance(m.get(section), dict):
            names += [v["file"] for v in m[section].values() if isinstance(v, dict) and isinstance(v.get("file"), str)]
    return [n for n in names if isinstance(n, str)]


class Worker:
    def __init__(self, bundle_dir: Path, work: Path) -> None:
        import numpy as np
        import onnxruntime as ort
        from crisp_edge.export import load_bundle

        self.work = work
        self.bundle = load_bundle(bundle_dir)
        self.swap = self.bundle.manifest["swappable"]
        self.raw_manifest = (bundle_dir / "manifest.json").read_bytes()
        self.manifest = json.loads(self.raw_manifest)
        self.case_dir = Path(os.path.realpath(case_bundle(bundle_dir, work)))
        self.outside: list[str] = []
        self.watch: str | None = None
        sys.addaudithook(self._audit)
        self.valid = [self.bundle.task_path(t).read_bytes() for t in sorted(self.bundle.tasks)]
        self.arrays = []
        for t in sorted(self.bundle.tasks):
            fmt = ort.AdapterFormat.read_adapter(str(self.bundle.task_path(t)))  # a valid file of ours
            self.arrays.append({k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()})
        self.x = np.random.default_rng(0).standard_normal((2, *self.manifest["inputs"][0]["shape"][1:])).astype(np.float32)
        self.session = self.bundle.session()
        self.expected = {}
        for t in sorted(self.bundle.tasks):
            self.session.set_task(t)
            self.expected[t] = self.session(self.x)
        self.session.set_task("t1")
        self.adapter_dir = work / "adapters"
        self.adapter_dir.mkdir(exist_ok=True)
        self.scratch = work / "scratch.onnx_adapter"

    # Python-level opens during a manifest case: anything under the case folder but outside the bundle
    def _audit(self, event: str, args: tuple) -> None:
        if self.watch is None or event != "open" or not args:
            return
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(path))
            root = os.path.dirname(self.watch)
            if p.startswith(root + os.sep) and not p.startswith(self.watch + os.sep):
                self.outside.append(p)

    def manifest_case(self, tally: Tally, seed: int, i: int) -> None:
        from crisp_edge.export import load_bundle

        rng = random.Random(f"manifest:{seed}:{i}")
        kind, data = manifest_case(self.raw_manifest, self.manifest, rng)
        (self.case_dir / "manifest.json").write_bytes(data)
        self.outside.clear()
        folder = os.path.realpath(self.case_dir)

        def load():
            self.watch = folder
            try:
                bundle = load_bundle(self.case_dir)
                session = bundle.session()
                if session.swappable:
                    for task in ["default", *sorted(bundle.tasks)[:2]]:
                        session.set_task(task)
                        out = session(self.x)
                else:
                    out = session(self.x)
                assert out.shape[0] == len(self.x), out.shape
            finally:
                self.watch = None
            bad = [n for n in _manifest_files(bundle.manifest)
                   if not os.path.realpath(os.path.join(folder, n)).startswith(folder + os.sep)]
            if bad or self.outside:
                raise OutsideRead(f"accepted, naming files outside the bundle: {bad[:3]}, opened {self.outside[:3]}")

        try:
            attempt(tally, load, f"manifest/{kind}/seed{seed}/case{i}")
        finally:
            self.watch = None

    def adapter_case(self, tally: Tally, seed: int, i: int) -> None:
        from crisp_edge.export import NoTaskError

        rng = random.Random(f"adapter:{seed}:{i}")
        kind, data = adapter_case(self.valid, self.arrays, self.swap["adapter_model_version"], rng, self.scratch)
        # a file named like a bundle task now and then: it must not replace that task
        path = self.adapter_dir / rng.choice(["case.onnx_adapter", "case.onnx_adapter", "t1.onnx_adapter", "case.bin"])
        path.write_bytes(data)
        from crisp_edge.export.onnx.adapter import record_path, write_adapter_record

        if rng.random() < 0.9:  # a record recomputed for the mutated bytes: the parser and checks must hold
            write_adapter_record(path)
        else:  # no record (or a stale one): refused before the bytes are parsed
            record_path(path).unlink(missing_ok=True)
        what = f"adapter/{kind}/seed{seed}/case{i}"
        refused = tally.refused
        sess = self.session

        def run():
            sess.set_task(path if rng.random() < 0.5 else str(path))
            out = sess(self.x)
            assert out.ndim == 2 and out.shape[0] == len(self.x), out.shape

        attempt(tally, run, what)
        try:
            if tally.refused > refused:
                if sess.task is not None:
                    raise SessionStateError(f"a refused set_task left task {sess.task!r} active")
                try:
                    sess(self.x)
                    raise SessionStateError("a refused set_task left weights a forward runs on")
                except NoTaskError:
                    pass
            if i % 4 == 0 or rng.random() < 0.1:  # still usable: a bundle task gives its own outputs
                task = rng.choice(sorted(self.expected))
                sess.set_task(task)
                got = sess(self.x)
                if got.shape != self.expected[task].shape or not (got == self.expected[task]).all():
                    raise SessionStateError(f"set_task({task!r}) after this case gives other outputs")
        except Exception as e:  # noqa: BLE001 - recorded as an escape of this case
            tb = traceback.extract_tb(e.__traceback__)
            tally.escapes.append({"input": what, "type": type(e).__name__, "message": str(e)[:300],
                                  "at": f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"})


def worker_main(spec: dict) -> int:
    """Run ``spec["jobs"]`` ([kind, seed, start, stop] each), one JSON line per case on ``spec["log"]``."""
    import torch

    torch.set_num_threads(1)
    log = open(spec["log"], "a", buffering=1)

    def emit(obj: dict) -> None:
        log.write(json.dumps(obj) + "\n")
        log.flush()

    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    worker = Worker(Path(spec["bundle"]), work)
    emit({"ready": True})
    crash_at = os.environ.get("CRISP_FUZZ_CRASH_AT")  # the harness's own test: die like a segfault here
    for kind, seed, start, stop in spec["jobs"]:
        run = worker.manifest_case if kind == "manifest" else worker.adapter_case
        for i in range(start, stop):
            emit({"start": [kind, seed, i]})
            if crash_at == f"{kind}:{seed}:{i}":
                os.kill(os.getpid(), signal.SIGKILL)
            tally = Tally(kind)
            run(tally, seed, i)
            emit({"case": [kind, seed, i], "accepted": tally.accepted, "refused": tally.refused,
                  "seconds": tally.seconds, "errors": tally.errors, "escapes": tally.escapes})
    log.close()
    return 0


# --- the parent ----------------------------------------------------------------------------------------------
def _spawn(spec: dict, stderr) -> subprocess.Popen:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    tmp = Path(spec["work"]) / "tmp"  # a killed worker's temporary files go with the work folder
    tmp.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmp)
    return subprocess.Popen([sys.executable, "-m", "tests.fuzzing_bundles", json.dumps(spec)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def run_jobs(bundle_dir: Path, jobs: list[tuple[str, int, int]], work: Path | None = None,
             case_limit: float = CASE_TIME_LIMIT_S + 10) -> dict[str, Tally]:
    """Run ``jobs`` ((kind, n cases, seed) each) in fresh interpreters; returns a Tally per kind.

    A worker that crashes or hangs is recorded as an escape on its current case (its input is kept
    under ``work/crashes``), and a new worker goes on from the next case."""
    tallies = {kind: Tally(kind) for kind, _, _ in jobs}
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="crisp-bundle-fuzz-")) if own else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    todo = [[kind, seed, 0, n] for kind, n, seed in jobs if n > 0]
    try:
        while todo:
            rc, current, stderr, spec = _run_worker(bundle_dir, work, todo, tallies, case_limit)
            if rc == 0 and current is None:
                break
            if current is None:  # died before its first case or between cases: nothing to blame
                raise RuntimeError(f"the bundle fuzz worker exited {rc} outside any case:\n{stderr[-3000:]}")
            kind, seed, i = current
            kept = work / "crashes" / f"{kind}-seed{seed}-case{i}"
            kept.parent.mkdir(parents=True, exist_ok=True)
            src = Path(spec["work"]) / ("manifest-case/bundle/manifest.json" if kind == "manifest" else "adapters")
            if src.is_dir():
                shutil.copytree(src, kept, dirs_exist_ok=True)
            elif src.exists():
                shutil.copyfile(src, kept)
            how = f"hang (no progress in {case_limit:g} s)" if rc == "hang" else (
                f"crash (signal {-rc})" if isinstance(rc, int) and rc < 0 else f"worker exit {rc}")
            t = tallies[kind]
            t.cases += 1
            t.escapes.append({"input": f"{kind}/seed{seed}/case{i}", "type": how, "message": stderr[-300:],
                              "at": "worker", "kept": str(kept)})
            at = next(n for n, j in enumerate(todo) if j[:2] == [kind, seed])
            todo = [[kind, seed, i + 1, todo[at][3]]] + todo[at + 1:]  # the jobs before it are done
            todo = [j for j in todo if j[2] < j[3]]
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return tallies


def _run_worker(bundle_dir: Path, work: Path, todo: list, tallies: dict[str, Tally], case_limit: float):
    """One worker over ``todo``; merges its case reports. Returns (exit code or "hang", the case it was
    in when it ended or None, its stderr, its spec)."""
    log = work / f"worker-{time.time_ns()}.jsonl"
    log.touch()
    spec = {"bundle": str(bundle_dir), "work": str(work / "w"), "log": str(log), "jobs": todo}
    err = open(work / "stderr.txt", "w+b")
    proc = _spawn(spec, err)
    current, ready, pending = None, False, ""
    last = time.monotonic()
    with open(log) as f:
        while True:
            rc = proc.poll()
            chunk = f.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    rec = json.loads(line)
                    if "ready" in rec:
                        ready = True
                    elif "start" in rec:
                        current = rec["start"]
                    else:
                        _merge(tallies[rec["case"][0]], rec)
                        current = None
                last = time.monotonic()
            if rc is not None:
                break
            if time.monotonic() - last > (case_limit if ready else STARTUP_LIMIT_S):
                proc.kill()
                proc.wait()
                rc = "hang"
                break
            time.sleep(0.05)
    err.seek(0)
    stderr = err.read().decode(errors="replace")
    err.close()
    return rc, current, stderr, spec


def _merge(t: Tally, rec: dict) -> None:
    t.cases += 1
    t.accepted += rec["accepted"]
    t.refused += rec["refused"]
    t.seconds += rec["seconds"]
    t.slowest_s = max(t.slowest_s, rec["seconds"])
    for k, v in rec["errors"].items():
        t.errors[k] = t.errors.get(k, 0) + v
    t.escapes += rec["escapes"]


def fuzz_bundles(n_manifests: int, n_adapters: int, seed: int, bundle_dir: Path | None = None) -> dict[str, Tally]:
    """Build the bundle (unless given) and run ``n_manifests`` + ``n_adapters`` cases."""
    with tempfile.TemporaryDirectory(prefix="crisp-bundle-fuzz-") as tmp:
        bundle_dir = bundle_dir or build_bundle(Path(tmp) / "b")
        return run_jobs(bundle_dir, [("manifest", n_manifests, seed), ("adapter", n_adapters, seed)],
                        work=Path(tmp) / "work")


if __name__ == "__main__":
    sys.exit(worker_main(json.loads(sys.argv[1])))

"""The C++ runner (export/executorch/runner) trusts no file it has not checked.

* its SHA-256 is SHA-256 (against hashlib), and its crisp.digest and crisp_io records are the ones
  Python computes (``crisp_edge.export.executorch.digest``);
* the three attacks of issue 16 fail with a defined exit code and a message: a bit-flipped program, an
  edited manifest (same-shaped set_task inputs swapped; 'swappable' -> 'dense'), a damaged task file
  given by path; a task file without a digest runs only inside a bundle whose manifest hashes it;
* fuzzing: mutated manifests, programs, task files, input .npy files and command lines (bit flips,
  truncation, swaps, FIFOs, /dev/zero links, huge sizes) always end in a documented exit code, never a
  signal or a hang, and exit 0 only with outputs that pass the parity check against the clean bundle
  (a program mutated *and* re-hashed into the manifest may run: there only the exit code is checked);
* the aarch64 build of the runner runs under qemu-user and its outputs pass ``crisp-edge parity --outputs``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from crisp_edge.export.executorch.bundle import MIXERS_KEY
from crisp_edge.export.executorch.digest import (
    DIGEST_KEY,
    io_spec_text,
    io_tag,
    ptd_digest,
)
from crisp_edge.export.parity.check import check_outputs

import crisp_edge as ce
from crisp_edge.files.io import sha256_file
from crisp_edge.testing import make_task_file, toy_model

pytestmark = pytest.mark.runtime
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
RUNNER_DIR = ROOT / "export" / "executorch" / "runner"
#: The runner's documented exit codes (README): 0 ok, 1 internal, 2 usage/inputs, 3 task, 4 program, 5 bundle.
EXIT_CODES = {0, 1, 2, 3, 4, 5}
RUN_TIMEOUT_S = 60


def raw_ptd(tensors: dict[str, np.ndarray]) -> bytes:
    """A FlatTensor file holding ``tensors`` as given (any order, uint8 / int64 / float32), nothing added."""
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.exir.tensor_layout import TensorLayout
    from executorch.extension.flat_tensor.serialize.serialize import (
        FlatTensorConfig,
        FlatTensorSerializer,
    )

    buffers, named = [], {}
    for i, (k, a) in enumerate(tensors.items()):
        t = torch.from_numpy(np.ascontiguousarray(a))
        buffers.append(t.numpy().tobytes())
        named[k] = DataEntry(buffer_index=i, alignment=16, tensor_layout=TensorLayout.from_tensor(t))
    return bytes(FlatTensorSerializer(FlatTensorConfig(segment_alignment=16)).serialize(
        DataPayload(buffers=buffers, named_data=named)))


def ptd_arrays(path: Path) -> dict[str, np.ndarray]:
    from crisp_edge.export.executorch.tasks import parse_ptd

    return parse_ptd(path.read_bytes(), str(path))


def same_tensors(a: bytes, b: bytes) -> bool:
    """Whether two .ptd files hold the same tensors (names, dtypes, shapes, bytes), by Python's reader."""
    from crisp_edge.export.errors import AdapterError
    from crisp_edge.export.executorch.tasks import parse_ptd

    try:
        x, y = parse_ptd(a, "a"), parse_ptd(b, "b")
    except AdapterError:
        return False
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                                        and x[k].tobytes() == y[k].tobytes() for k in x)


def with_digest(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = {k: v for k, v in arrays.items() if k != DIGEST_KEY}
    return {**arrays, DIGEST_KEY: ptd_digest(arrays)}


def rehash(folder: Path) -> None:
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    for name, rec in list(m["files"].items()) + [(t["file"], t) for t in m.get("tasks", {}).values()]:
        rec.update(sha256=sha256_file(folder / name), bytes=(folder / name).stat().st_size)
    path.write_text(json.dumps(m, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Path:
    assert shutil.which("g++"), "the C++ runner needs g++ (`make setup` installs it)"
    exe = tmp_path_factory.mktemp("runner") / "crisp_et_runner"
    r = subprocess.run(["bash", str(RUNNER_DIR / "build.sh"), sys.executable, str(exe)], capture_output=True,
                       text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    from crisp_edge.export.executorch.export import export_executorch
    from crisp_edge.export.executorch.session import write_runner_inputs

    d = tmp_path_factory.mktemp("et")
    model = toy_model("timm-vit", seed=0, depth=2)
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    tasks = [make_task_file(model, d / "t1.safetensors", "t1", 1, 3),
             make_task_file(model, d / "t2.safetensors", "t2", 2, 7)]
    swap = export_executorch(model, d / "swap", mode="swappable", recipe="portable", tasks=tasks).path
    dense = export_executorch(model, d / "dense", mode="dense", recipe="portable").path
    write_runner_inputs(swap, d / "in")
    return {"swap": swap, "dense": dense, "in": d / "in"}


def run(runner: Path, *args, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """The runner with ``args``; a hang (timeout) or a signal fails the test right here."""
    try:
        # errors=: ExecuTorch's own log echoes names read from a damaged program (e.g. a flipped operator name)
        r = subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, errors="backslashreplace",
                           timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the runner hung (> {timeout} s): {args}")
    assert r.returncode >= 0, f"the runner died of signal {-r.returncode}: {args}\n{r.stderr[-2000:]}"
    assert r.returncode in EXIT_CODES, (r.returncode, args, r.stderr[-2000:])
    if r.returncode:
        assert "crisp_et_runner: " in r.stderr and "error" in r.stderr, r.stderr[-2000:]  # a message, not a crash
    return r


def run_bundle(runner, bundle, out: Path, inputs: Path, *tasks, extra=(), timeout: float = RUN_TIMEOUT_S):
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    args = [bundle, out, "--inputs", inputs, "--cases", 2, *extra]
    for t in tasks:
        args += ["--task", t]
    return run(runner, *args, timeout=timeout)


# ------------------------------------------------------------------------------------ records agree
@pytest.mark.slow
def test_sha256_is_sha256(runner, tmp_path):
    rng = np.random.default_rng(0)
    for n in [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, (1 << 20) + 7]:
        p = tmp_path / f"f{n}"
        p.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        assert run(runner, "--sha256", p).stdout.strip() == hashlib.sha256(p.read_bytes()).hexdigest(), n


@pytest.mark.slow
def test_ptd_digest_python_equals_cpp(runner, bundles, tmp_path):
    """Python's ptd_digest and the runner's agree on files of every dtype a task file may hold, any
    tensor order, rank 1 to 3, non-ASCII names; the digest ignores the file layout."""
    rng = np.random.default_rng(1)
    cases = [
        with_digest(ptd_arrays(bundles["swap"] / "tasks" / "t1.ptd")),
        {"b": rng.standard_normal((3, 4)).astype(np.float32), "a": np.arange(5, dtype=np.int64),
         "crisp.tag": np.array([123], np.int64), "z\u00e9": rng.integers(0, 256, 7, dtype=np.uint8)},
        {"one": np.array([2.5], np.float32), "a.b": np.ones((1, 1, 1), np.int64)},
        {f"m{i}": rng.standard_normal((2, 1, 3)).astype(np.float32) for i in range(12)},
    ]
    for i, arrays in enumerate(cases):
        arrays = with_digest(arrays)
        for j, order in enumerate([list(arrays), list(reversed(arrays))]):  # two layouts, one digest
            p = tmp_path / f"c{i}_{j}.ptd"
            p.write_bytes(raw_ptd({k: arrays[k] for k in order}))
            out = run(runner, "--ptd-digest", p).stdout.split()
            want = ptd_digest(arrays).tobytes().hex()
            assert out == ["digest", want, "stored", want], (i, j, out)
    # the digest covers names, dtypes, shapes and values: any change moves it
    base = cases[1]
    for changed in [{**base, "b": base["b"].reshape(4, 3)}, {**base, "a": base["a"].astype(np.float32)},
                    {**{k.replace("b", "c"): v for k, v in base.items()}},
                    {**base, "crisp.tag": np.array([124], np.int64)}]:
        assert ptd_digest(changed).tobytes() != ptd_digest(base).tobytes()


@pytest.mark.slow
def test_io_spec_python_equals_cpp(runner, bundles):
    for b in (bundles["swap"], bundles["dense"]):
        m = json.loads((b / "manifest.json").read_text())
        out = run(runner, "--io-spec", b).stdout
        assert out == io_spec_text(m) + f"io_tag {io_tag(m)}\n"


# ------------------------------------------------------------------------------------ issue 16 attacks
@pytest.mark.slow
def test_clean_bundles_pass_parity(runner, bundles, tmp_path):
    b = bundles["swap"]
    r = run_bundle(runner, b, tmp_path / "o", bundles["in"], "t1", f"t2={b}/tasks/t2.ptd", "default")
    assert r.returncode == 0, r.stderr
    report = check_outputs(b, tmp_path / "o")
    assert report.passed and report.tasks == ["default", "t1", "t2"]
    r = run_bundle(runner, bundles["dense"], tmp_path / "d", bundles["in"])
    assert r.returncode == 0, r.stderr
    assert check_outputs(bundles["dense"], tmp_path / "d").passed


@pytest.mark.slow
def test_int8_swappable_bundle_passes_parity_in_the_runner(runner, tmp_path):
    """The runner compiles crisp-edge's int8 kernels in (crisp::qlinear, crisp::fold_quant_): an int8 swappable
    XNNPACK bundle switches tasks in C++ and meets its int8 tolerance, task by task."""
    from crisp_edge.export.executorch.export import export_executorch
    from crisp_edge.export.executorch.session import write_runner_inputs

    model = toy_model("timm-vit", seed=0, depth=2)
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    tasks = [make_task_file(model, tmp_path / "t1.safetensors", "t1", 1, 3)]
    b = export_executorch(model, tmp_path / "q8", mode="swappable", quantize="int8", tasks=tasks).path
    write_runner_inputs(b, tmp_path / "in")
    r = run_bundle(runner, b, tmp_path / "o", tmp_path / "in", "t1", "default")
    assert r.returncode == 0, r.stderr
    report = check_outputs(b, tmp_path / "o")
    assert report.passed and report.tasks == ["default", "t1"] and report.tolerance["dtype"] == "int8"


@pytest.mark.slow
def test_bit_flipped_program_is_refused(runner, bundles, tmp_path):
    b = shutil.copytree(bundles["swap"], tmp_path / "b")
    data = bytearray((b / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0x10
    (b / "model.pte").write_bytes(bytes(data))
    r = run_bundle(runner, b, tmp_path / "o", bundles["in"], "t1")
    assert r.returncode == 4 and "SHA-256" in r.stderr and not list((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_edited_manifest_is_refused(runner, bundles, tmp_path):
    """Every file hash still matches; the manifest's description of the program was edited."""
    def edited(name, edit) -> Path:
        b = shutil.copytree(bundles["swap"], tmp_path / name)
        m = json.loads((b / "manifest.json").read_text())
        edit(m)
        (b / "manifest.json").write_text(json.dumps(m))
        return b

    def swap_inputs(m):  # two set_task inputs of the same shape: only crisp_io can tell
        s = m["swappable"]["set_task_inputs"]
        assert s[0]["shape"] == s[1]["shape"]
        s[0], s[1] = s[1], s[0]

    def to_dense(m):
        m["mode"] = "dense"
        del m["swappable"]
        m["tasks"] = {}

    def rename_output(m):
        m["outputs"][0]["name"] = "logitz"

    for name, edit, code, words in [("swapped", swap_inputs, 5, "crisp_io"), ("dense", to_dense, 5, "set_task"),
                                    ("renamed", rename_output, 5, "crisp_io")]:
        r = run_bundle(runner, edited(name, edit), tmp_path / f"o_{name}", bundles["in"])
        assert r.returncode == code and words in r.stderr, (name, r.returncode, r.stderr)
    # a pinned manifest: any edit at all is refused
    b = bundles["swap"]
    pin = hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
    assert run_bundle(runner, b, tmp_path / "p", bundles["in"], extra=["--manifest-sha256", pin]).returncode == 0
    r = run_bundle(runner, edited("pinned", lambda m: m.update(crisp_edge_version="x")), tmp_path / "p2",
                   bundles["in"], extra=["--manifest-sha256", pin])
    assert r.returncode == 5 and "pinned" in r.stderr


@pytest.mark.slow
def test_task_files_by_path_need_a_valid_digest(runner, bundles, tmp_path):
    b = bundles["swap"]
    arrays = ptd_arrays(b / "tasks" / "t2.ptd")
    assert DIGEST_KEY in arrays, "task files carry a crisp.digest"
    good = tmp_path / "t2.ptd"
    good.write_bytes(raw_ptd(with_digest(arrays)))
    r = run_bundle(runner, b, tmp_path / "o", bundles["in"], f"t2={good}")
    assert r.returncode == 0 and check_outputs(b, tmp_path / "o").passed, r.stderr
    flipped = bytearray(good.read_bytes())  # one bit of a mixer value: the issue's ~1e36 logits
    at = bytes(flipped).find(arrays[MIXERS_KEY].tobytes()[:16])
    assert at > 0
    flipped[at + 3] ^= 0x40
    bad = tmp_path / "flipped.ptd"
    bad.write_bytes(bytes(flipped))
    r = run_bundle(runner, b, tmp_path / "o2", bundles["in"], f"t2={bad}")
    assert r.returncode == 3 and "crisp.digest" in r.stderr and not list((tmp_path / "o2").iterdir())
    old = tmp_path / "old.ptd"  # a task file written before digests: by path it is refused, with the fix
    old.write_bytes(raw_ptd({k: v for k, v in arrays.items() if k != DIGEST_KEY}))
    r = run_bundle(runner, b, tmp_path / "o3", bundles["in"], f"t2={old}")
    assert r.returncode == 3 and "crisp-edge export-task" in r.stderr
    inside = shutil.copytree(b, tmp_path / "b_old")  # ... and runs inside a bundle whose manifest hashes it
    shutil.copyfile(old, inside / "tasks" / "t2.ptd")
    rehash(inside)
    r = run_bundle(runner, inside, tmp_path / "o4", bundles["in"], "t2", f"t1={inside}/tasks/t1.ptd")
    assert r.returncode == 0 and check_outputs(b, tmp_path / "o4").passed, r.stderr


@pytest.mark.slow
def test_runner_cuts_crisp_mixers_as_python_does(runner, bundles, tmp_path):
    """The runner cuts ``crisp.mixers`` into the manifest's groups by name (the same outputs as the file
    with one tensor per group, written before packing, which still runs), and refuses a ``crisp.mixers``
    of another length or a group stored twice (valid digest and tag: only the cut is wrong)."""
    from crisp_edge.export.executorch.tasks import check_task_ptd

    b = bundles["swap"]
    swap = json.loads((b / "manifest.json").read_text())["swappable"]
    packed = ptd_arrays(b / "tasks" / "t2.ptd")
    groups, _ = check_task_ptd((b / "tasks" / "t2.ptd").read_bytes(), swap, "t2")
    tag = {"crisp.tag": packed["crisp.tag"]}
    cases = {"per_group": ({**groups, **tag}, 0, ""),
             "short": ({**packed, MIXERS_KEY: packed[MIXERS_KEY][:-1]}, 3, "crisp.mixers is not float32"),
             "twice": ({**packed, "mixer.fc1_0_1": groups["mixer.fc1_0_1"]}, 3, "both in crisp.mixers")}
    for name, (arrays, code, message) in cases.items():
        path = tmp_path / f"{name}.ptd"
        path.write_bytes(raw_ptd(with_digest(arrays)))
        r = run_bundle(runner, b, tmp_path / name, bundles["in"], f"t2={path}")
        assert r.returncode == code and message in r.stderr, (name, r.stderr)
        assert (check_outputs(b, tmp_path / name).passed if code == 0 else not list((tmp_path / name).iterdir())), name


@pytest.mark.slow
def test_special_files_are_refused_without_hanging(runner, bundles, tmp_path):
    b = bundles["swap"]
    for target in ["manifest.json", "model.pte", "default.ptd", "tasks/t1.ptd"]:
        for kind in ["fifo", "zero", "dir"]:
            c = shutil.copytree(b, tmp_path / f"{target.replace('/', '_')}_{kind}")
            (c / target).unlink()
            if kind == "fifo":
                os.mkfifo(c / target)
            elif kind == "zero":
                os.symlink("/dev/zero", c / target)
            else:
                (c / target).mkdir()
            r = run_bundle(runner, c, tmp_path / "o", bundles["in"], "t1", timeout=20)
            assert r.returncode in (3, 4, 5) and "not a regular file" in r.stderr, (target, kind, r.stderr)
    fifo_in = shutil.copytree(bundles["in"], tmp_path / "in_fifo")
    (fifo_in / "input.1.x.npy").unlink()
    os.mkfifo(fifo_in / "input.1.x.npy")
    r = run_bundle(runner, b, tmp_path / "o", fifo_in, "t1", timeout=20)
    assert r.returncode == 2 and "not a regular file" in r.stderr
    out = tmp_path / "o_fifo"  # a FIFO where an output's temporary file goes
    r = run_bundle(runner, b, out, bundles["in"], "t1")
    os.mkfifo(out / "output.t1.0.logits.npy.tmp")
    r = run(runner, b, out, "--inputs", bundles["in"], "--cases", 2, "--task", "t1", timeout=20)
    assert r.returncode == 0 and check_outputs(b, out).passed


@pytest.mark.slow
def test_python_session_checks_the_same_records(bundles, tmp_path):
    """EtCrispSession: the same digest rule for task files by path, and the same crisp_io check."""
    from crisp_edge.export.errors import AdapterError, BundleError
    from crisp_edge.export.executorch.bundle import load_et_bundle

    b = bundles["swap"]
    arrays = ptd_arrays(b / "tasks" / "t2.ptd")
    sess = load_et_bundle(b).session()
    good = tmp_path / "t2.ptd"
    good.write_bytes((b / "tasks" / "t2.ptd").read_bytes())
    sess.set_task(good)
    flipped = bytearray(good.read_bytes())
    at = bytes(flipped).find(arrays[MIXERS_KEY].tobytes()[:16])
    flipped[at + 3] ^= 0x40
    (tmp_path / "flipped.ptd").write_bytes(bytes(flipped))
    with pytest.raises(AdapterError, match="crisp.digest"):
        sess.set_task(tmp_path / "flipped.ptd")
    assert sess.task is None
    old = tmp_path / "old.ptd"
    old.write_bytes(raw_ptd({k: v for k, v in arrays.items() if k != DIGEST_KEY}))
    with pytest.raises(AdapterError, match="crisp-edge export-task"):
        sess.set_task(old)
    inside = shutil.copytree(b, tmp_path / "b_old")
    shutil.copyfile(old, inside / "tasks" / "t2.ptd")
    rehash(inside)
    s2 = load_et_bundle(inside).session()
    assert s2.set_task("t2") == "t2" and s2(np.zeros(s2._input_shapes["x"], np.float32)).shape[-1] == 7
    for name, edit in [("swapped", lambda m: m["swappable"]["set_task_inputs"].reverse()),
                       ("renamed", lambda m: m["outputs"][0].update(name="logitz"))]:
        c = shutil.copytree(b, tmp_path / name)
        m = json.loads((c / "manifest.json").read_text())
        edit(m)
        (c / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match="crisp_io"):
            load_et_bundle(c).session()


@pytest.mark.slow
def test_bundle_of_0_1_0_still_runs(runner, tmp_path):
    """A bundle exported by 0.1.0 (no crisp_io, task files without digests) runs its own tasks, with a
    note; its task file copied out and given by path is refused with the fix."""
    from crisp_edge.export.executorch.session import write_runner_inputs

    old = ROOT / "tests" / "fixtures" / "v0.1.0" / "et"
    n = write_runner_inputs(old, tmp_path / "in")
    out = tmp_path / "o"
    out.mkdir()
    r = run(runner, old, out, "--inputs", tmp_path / "in", "--cases", n, "--task", "default", "--task", "task1")
    assert r.returncode == 0 and "no crisp_io" in r.stderr, r.stderr
    assert check_outputs(old, out).passed
    shutil.copyfile(old / "tasks" / "task1.ptd", tmp_path / "task1.ptd")
    r = run(runner, old, out, "--inputs", tmp_path / "in", "--cases", n, "--task", f"task1={tmp_path / 'task1.ptd'}")
    assert r.returncode == 3 and "crisp-edge export-task" in r.stderr


# ------------------------------------------------------------------------------------ fuzzing
def _mutants(data: bytes, rng: random.Random, n: int):
    """Bit flips, truncations, byte insertions/deletions and block swaps of ``data``."""
    for _ in range(n):
        d = bytearray(data)
        kind = rng.choice(["flip", "flip", "flip", "cut", "insert", "delete", "swap"])
        if kind == "flip" or not d:
            if d:
                i = rng.randrange(len(d))
                d[i] ^= 1 << rng.randrange(8)
            else:
                d = bytearray(b"\0")
        elif kind == "cut":
            d = d[:rng.randrange(len(d))]
        elif kind == "insert":
            i = rng.randrange(len(d) + 1)
            d[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8])))
        elif kind == "delete":
            i = rng.randrange(len(d))
            del d[i:i + rng.choice([1, 4, 8])]
        else:
            k = rng.choice([4, 8, 16])
            if len(d) > 2 * k:
                i, j = sorted(rng.sample(range(len(d) - k), 2))
                if j - i >= k:
                    d[i:i + k], d[j:j + k] = d[j:j + k], d[i:i + k]
        yield kind, bytes(d)


def _json_mutants(text: str, rng: random.Random):
    """Manifest edits that keep it valid JSON: swapped list entries, huge and negative numbers, changed
    strings, removed keys, deep nesting."""
    m0 = json.loads(text)
    paths = []

    def walk(v, path):
        paths.append(path)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, path + [k])
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, path + [i])

    walk(m0, [])
    for _ in range(60):
        m = json.loads(text)
        path = rng.choice(paths[1:])
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = rng.choice(["huge", "neg", "str", "drop", "swap", "nest", "null", "float"])
        if op == "huge":
            parent[key] = rng.choice([2 ** 40, 2 ** 63, 10 ** 30, 1e308])
        elif op == "neg":
            parent[key] = -1
        elif op == "str":
            parent[key] = rng.choice(["", "../../etc/passwd", "x" * 5000, "dense", "swappable", "a b"])
        elif op == "drop":
            del parent[key]
        elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
            j = rng.randrange(len(parent))
            parent[key], parent[j] = parent[j], parent[key]
        elif op == "nest":
            parent[key] = json.loads("[" * 200 + "]" * 200)
        elif op == "null":
            parent[key] = None
        else:
            parent[key] = 1.5
        yield f"{op}:{path}", json.dumps(m).encode()


@pytest.mark.slow
def test_fuzz_runner_inputs(runner, bundles, tmp_path):
    """Every mutant ends in a documented exit code within the timeout, never a signal; exit 0 only
    with outputs that pass the parity check of the clean bundle."""
    rng = random.Random(16)
    clean = bundles["swap"]
    b = tmp_path / "b"
    shutil.copytree(clean, b)
    ins = tmp_path / "in"
    shutil.copytree(bundles["in"], ins)
    by_path = tmp_path / "t2_path.ptd"
    by_path.write_bytes(raw_ptd(with_digest(ptd_arrays(clean / "tasks" / "t2.ptd"))))
    out = tmp_path / "out"
    tasks = ["t1", f"t2={by_path}"]
    stats = {0: 0, 2: 0, 3: 0, 4: 0, 5: 0}

    def check(what: str, *extra_tasks, inputs=ins, clean_ref=clean):
        r = run_bundle(runner, b, out, inputs, *(extra_tasks or tasks))
        stats[r.returncode] = stats.get(r.returncode, 0) + 1
        assert r.returncode != 1, (what, r.stderr[-1000:])  # no internal error: every bad file has its message
        if r.returncode == 0:
            report = check_outputs(clean_ref, out)
            assert report.passed, (what, "exit 0 with outputs that fail parity", report.problems()[:3])
        return r

    targets = {"manifest.json": 40, "model.pte": 30, "default.ptd": 30, "tasks/t1.ptd": 30}
    for name, n in targets.items():
        original = (clean / name).read_bytes()
        for kind, blob in _mutants(original, rng, n):
            (b / name).write_bytes(blob)
            r = check(f"{name} {kind}")
            if blob != original and name != "manifest.json":
                assert r.returncode != 0, (name, kind)  # a changed hashed file never runs
        (b / name).write_bytes(original)
    # a program changed *and* re-hashed in the manifest (the root of trust vouches for a bad program):
    # ExecuTorch's loader may crash on it; the runner's worker process turns that into exit 4
    pte, manifest = (clean / "model.pte").read_bytes(), json.loads((clean / "manifest.json").read_text())
    for kind, blob in _mutants(pte[:8192], rng, 40):
        (b / "model.pte").write_bytes(blob + pte[8192:] if kind == "flip" else blob)
        manifest["files"]["model.pte"] = {"sha256": hashlib.sha256((b / "model.pte").read_bytes()).hexdigest(),
                                          "bytes": (b / "model.pte").stat().st_size}
        (b / "manifest.json").write_text(json.dumps(manifest))
        r = run_bundle(runner, b, out, ins, *tasks)  # asserts: no signal, no hang, a documented code
        stats[r.returncode] = stats.get(r.returncode, 0) + 1
    (b / "model.pte").write_bytes(pte)
    for what, blob in _json_mutants((clean / "manifest.json").read_text(), rng):
        (b / "manifest.json").write_bytes(blob)
        check(f"manifest {what}")
    (b / "manifest.json").write_bytes((clean / "manifest.json").read_bytes())
    original = by_path.read_bytes()
    for kind, blob in _mutants(original, rng, 40):  # a task by path: its digest is all that vouches for it
        by_path.write_bytes(blob)
        r = check(f"task by path {kind}")
        # the digest covers the tensors, not the FlatTensor layout: a flip in padding or in a bit the format
        # leaves unused may run, only if the file still holds exactly the original tensors
        assert r.returncode != 0 or same_tensors(blob, original), kind
    by_path.write_bytes(original)
    x_path = ins / "input.0.x.npy"
    x_orig = x_path.read_bytes()
    for kind, blob in _mutants(x_orig, rng, 30):  # inputs: exit 0 only when numpy reads the same tensor
        x_path.write_bytes(blob)
        r = run_bundle(runner, b, out, ins, "t1")
        # 2: a malformed file; 4: finite but extreme values that drive forward to inf/NaN (never written)
        assert r.returncode in (0, 2) or (r.returncode == 4 and "NaN or infinite" in r.stderr), (kind, r.stderr[-500:])
        if r.returncode == 0:
            import io

            x = np.load(io.BytesIO(blob), allow_pickle=False)
            assert x.dtype == np.float32 and x.shape == np.load(io.BytesIO(x_orig)).shape and np.isfinite(x).all()
            if np.array_equal(x, np.load(io.BytesIO(x_orig))):
                assert check_outputs(clean, out).passed
    x_path.write_bytes(x_orig)
    # the command line
    for args in [[], [b], [b, out], [b, out, "--inputs"], [b, out, "--inputs", ins, "--cases", "0"],
                 [b, out, "--inputs", ins, "--cases", "-1"], [b, out, "--inputs", ins, "--cases", "99999999999"],
                 [b, out, "--inputs", ins, "--cases", "2x"], [b, out, "--inputs", ins, "--cases", "3"],
                 [b, out, "--inputs", ins, "--cases", "2", "--task", "=x"],
                 [b, out, "--inputs", ins, "--cases", "2", "--task", "t1", "--task", "t1"],
                 [b, out, "--inputs", ins, "--cases", "2", "--task", "nope"],
                 [b, out, "--inputs", ins, "--cases", "2", "--task", "t1=/nonexistent.ptd"],
                 [b, out, "--inputs", ins, "--cases", "2", "--task", "t1=/dev/zero"],
                 [b, out, "--inputs", ins, "--cases", "2", "--task", f"t1={b}/model.pte"],
                 [b, out, "--inputs", ins, "--cases", "2", "--task", "../x=" + str(by_path)],
                 [b, out, "--inputs", ins, "--cases", "2", "--task", "a" * 5000],
                 [b, out, "--inputs", "/dev/null", "--cases", "2"],
                 [tmp_path / "nope", out, "--inputs", ins, "--cases", "2"],
                 [b, tmp_path / "nope", "--inputs", ins, "--cases", "2"],
                 [b, out, "--inputs", ins, "--cases", "2", "--bogus", "1"],
                 [b, out, "--inputs", ins, "--cases", "2", "--manifest-sha256", "0" * 64],
                 [b, out, "--inputs", ins, "--cases", "2", "--manifest-sha256", "zz"],
                 ["--sha256", "/dev/zero"], ["--ptd-digest", b / "model.pte"], ["--io-spec", tmp_path]]:
        out.mkdir(exist_ok=True)
        r = run(runner, *args)
        assert r.returncode != 0, args
        stats[r.returncode] = stats.get(r.returncode, 0) + 1
    print("exit codes over all mutants:", stats)
    assert stats[0] > 0 and stats[3] > 0 and stats[4] > 0 and stats[5] > 0  # the fuzzer reached every layer


# ------------------------------------------------------------------------------------ ARM64 (issue 20)
@pytest.mark.slow
def test_arm64_runner_under_qemu_meets_parity(bundles, tmp_path):
    """The runner cross-compiled for aarch64 (Debian's g++-aarch64-linux-gnu, the executorch 1.5.1
    aarch64 wheel from PyPI) runs under qemu-user on the same bundles: portable kernels and XNNPACK's
    ARM kernels, a task switch in one program; `crisp-edge parity --outputs` passes its outputs and
    fails them once one logit is moved."""
    from crisp_edge.export.executorch.export import export_executorch

    r = subprocess.run(["bash", str(RUNNER_DIR / "build_arm64.sh"), str(tmp_path / "arm64" / "crisp_et_runner")],
                       capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    exe = tmp_path / "arm64" / "crisp_et_runner"
    assert subprocess.run(["file", str(exe)], capture_output=True, text=True, check=False).stdout.find("ARM aarch64") > 0
    model = toy_model("timm-vit", seed=0, depth=2)
    ce.retrofit_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2)), progress=False)
    task = make_task_file(model, tmp_path / "t1.safetensors", "t1", 1, 3)
    xnn = export_executorch(model, tmp_path / "xnn", mode="swappable", recipe="xnnpack", tasks=[task]).path
    cli = Path(sys.executable).parent / "crisp-edge"
    for bundle, tasks in [(bundles["swap"], ["t1", "t2", "default"]), (bundles["dense"], []), (xnn, ["t1", "default"])]:
        out = tmp_path / f"out_{bundle.name}"
        out.mkdir()
        args = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(exe), str(bundle), str(out), "--inputs",
                str(bundles["in"]), "--cases", "2"]
        for t in tasks:
            args += ["--task", t]
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        assert check_outputs(bundle, out).passed
        reports = ["--report-dir", str(out.parent / "parity-report")]  # not the working directory
        r = subprocess.run([str(cli), "parity", str(bundle), "--outputs", str(out), *reports], capture_output=True,
                           text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        f = min(out.glob("output.*.npy"))
        a = np.load(f)
        a.flat[0] += 0.05
        np.save(f, a)
        r = subprocess.run([str(cli), "parity", str(bundle), "--outputs", str(out), *reports], capture_output=True,
                           text=True, timeout=600, check=False)
        assert r.returncode != 0 and "max abs" in r.stdout + r.stderr

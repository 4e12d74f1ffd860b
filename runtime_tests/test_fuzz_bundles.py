"""Fuzzed ONNX export bundles: mutated ``manifest.json`` files and ``.onnx_adapter`` files get
crisp-edge's own errors, never a crash, a hang, an untyped exception, or a read outside the bundle.

The mutation loops (``tests/fuzzing_bundles.py``) run in fresh interpreters, so a crash in native
code (ONNX Runtime reading a damaged FlatBuffer) fails the test instead of killing pytest. The slow
run feeds the loaders more than 10,000 files; ``bench/reliability.py`` runs the same loops and
records them. Below them, one regression test per escape found.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the shared harness lives in tests/ (bare `pytest runtime_tests/...` too)
    sys.path.insert(0, str(ROOT))

from crisp_edge.export import AdapterError, BundleError, NoTaskError, load_bundle
from crisp_edge.export.onnx.adapter import write_adapter, write_adapter_record
from crisp_edge.export.onnx.adapter_format import parse_adapter

from crisp_edge.errors import BasisMismatchError, CrispEdgeError
from crisp_edge.files.io import sha256_file
from tests import fuzzing_bundles
from tests.fuzzing_bundles import flatbuffer_adapter

pytestmark = pytest.mark.runtime
FAST = {"manifest": 80, "adapter": 140}
SLOW = {"manifest": 4000, "adapter": 6500}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return fuzzing_bundles.build_bundle(tmp_path_factory.mktemp("fuzz-bundle"))


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture
def copy_of(bundle_dir, tmp_path):
    """A fresh copy of the bundle to edit, with the bundle's files also lying one folder up."""
    def make() -> Path:
        dst = tmp_path / "case" / "bundle"
        if dst.parent.exists():
            shutil.rmtree(dst.parent)
        shutil.copytree(bundle_dir, dst)
        fuzzing_bundles.decoys(dst)
        return dst
    return make


def edit_manifest(folder: Path, edit) -> Path:
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def valid_params(bundle) -> dict[str, np.ndarray]:
    swap = bundle.manifest["swappable"]
    return {k: np.full([3 if isinstance(d, str) else d for d in shape], 0.25, np.float32)
            for k, shape in swap["overridable"].items()}


# --- mutation loops ----------------------------------------------------------------------------------
def _check(tallies, n):
    for kind, t in tallies.items():
        t.assert_clean()
        assert t.cases == n[kind], t.to_dict()
        assert t.refused > t.cases // 3, t.to_dict()  # the mutations do reach the checks
        assert t.accepted > 0, t.to_dict()  # and the valid parts still load


@pytest.mark.timeout(300)
def test_bundle_mutation_loops_fast(bundle_dir, tmp_path):
    tallies = fuzzing_bundles.run_jobs(bundle_dir, [("manifest", FAST["manifest"], 0), ("adapter", FAST["adapter"], 0)],
                                       work=tmp_path)
    _check(tallies, FAST)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bundle_mutation_loops_slow(bundle_dir, tmp_path):
    tallies = fuzzing_bundles.run_jobs(bundle_dir, [("manifest", SLOW["manifest"], 1), ("adapter", SLOW["adapter"], 1)],
                                       work=tmp_path)
    _check(tallies, SLOW)
    assert sum(t.cases for t in tallies.values()) >= 10_000


def test_worker_crash_is_an_escape_not_a_dead_pytest(bundle_dir, tmp_path, monkeypatch):
    """The harness itself: a worker killed by a signal is reported on its case, and the run goes on."""
    monkeypatch.setenv("CRISP_FUZZ_CRASH_AT", "adapter:0:2")
    tallies = fuzzing_bundles.run_jobs(bundle_dir, [("adapter", 5, 0)], work=tmp_path)
    t = tallies["adapter"]
    assert t.cases == 5 and len(t.escapes) == 1, t.to_dict()
    assert t.escapes[0]["input"] == "adapter/seed0/case2" and t.escapes[0]["type"].startswith("crash (signal")


# --- the escapes found by fuzzing, one regression test each ----------------------------------------------
@pytest.mark.parametrize("edit, message", [
    # was: the loader read (and hash-checked, and ran) the decoy one folder up
    (lambda m: (m["files"].update({"../model.onnx": m["files"]["model.onnx"]}),
                m["models"]["model"].update(file="../model.onnx")), "not a plain relative path"),
    (lambda m: m["tasks"]["t1"].update(file="../tasks/t1.onnx_adapter"), "not a plain relative path"),
    (lambda m: m["models"]["fold"].update(file="/etc/passwd"), "not a plain relative path"),
    (lambda m: m["models"]["model"].update(file="model.onnx\x00.txt"), "not a plain relative path"),  # was: ValueError
    (lambda m: m["files"].update({"model.onnx": "abc"}), "file record must be an object"),  # was: TypeError
    (lambda m: m.update(tasks=[1]), "'tasks' is missing or not an object"),  # was: AttributeError
    (lambda m: m["tasks"]["t1"].pop("sha256"), "'sha256' must be 64 lower-case hex digits"),  # was: KeyError
    (lambda m: m.pop("swappable"), "needs the object 'swappable'"),  # was: KeyError in session()
    (lambda m: m["models"].pop("fold"), r"has the models \['fold', 'model'\]"),  # was: KeyError in session()
    (lambda m: m["inputs"].append(7), "must be an object with a non-empty 'name'"),  # was: TypeError
    (lambda m: m["tolerance"].update(atol="big"), "tolerance needs 'atol'"),
    (lambda m: m["tolerance"].update(atol=10**400), "tolerance needs 'atol'"),  # a number float() cannot take
    (lambda m: m["swappable"]["layout"][next(iter(m["swappable"]["layout"]))].update(r=99),
     "not the tag of the recorded bases and layout"),
    (lambda m: m["swappable"].update(overridable={"x": [[[[[]]]]]}), "shape .* must be a list"),
    (lambda m: m["tasks"].update({"../t9": m["tasks"]["t1"]}), "task name"),
])
def test_manifest_edits_are_refused_by_load_bundle(copy_of, edit, message):
    folder = edit_manifest(copy_of(), edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(folder)


@pytest.mark.parametrize("edit, message", [
    # a hash-listed file that is no ONNX graph: was ORT's InvalidProtobuf (untyped)
    (lambda m: (m["files"].update({"x.onnx": m["files"]["reference.npz"]}), m["models"]["model"].update(file="x.onnx")),
     "ONNX Runtime cannot load the bundle's model graph"),
    # the two graphs exchanged: was an ORT error at the first forward
    (lambda m: (m["models"]["model"].update(file="fold.onnx"), m["models"]["fold"].update(file="model.onnx")),
     "the fold graph has inputs"),
    # a swappable export declared dense: was ORT's "missing input" at the first forward
    (lambda m: (m.update(mode="dense", tasks={}), m["models"].pop("fold"), m.pop("swappable")),
     "the model graph takes"),
    # the manifest's overridable shapes no longer the graph's: adapters were checked against a lie
    (lambda m: m["swappable"]["overridable"].update({"head.bias": [7]}), "the manifest says float"),
    (lambda m: m["outputs"][0].update(name="probs"), "the manifest names"),
])
def test_manifests_that_lie_about_the_graphs_are_refused_by_session(copy_of, edit, message):
    folder = copy_of()
    files = json.loads((folder / "manifest.json").read_text())["files"]
    if "x.onnx" not in files:
        shutil.copyfile(folder / "reference.npz", folder / "x.onnx")
    folder = edit_manifest(folder, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(folder).session()


def test_symlink_out_of_the_bundle_is_refused(copy_of, tmp_path):
    folder = copy_of()
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(folder / "model.onnx", outside)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle folder"):
        load_bundle(folder)


def test_task_file_changed_after_load_is_refused(copy_of):
    folder = copy_of()
    bundle = load_bundle(folder)
    sess = bundle.session()
    data = bytearray(bundle.task_path("t1").read_bytes())
    data[-5] ^= 1
    bundle.task_path("t1").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):  # was: ran the edited file (checks passed, values changed)
        sess.set_task("t1")
    assert sess.task is None


def test_adapter_file_named_like_a_task_does_not_replace_it(bundle, tmp_path):
    """Was: adapters were cached by file stem, so ``set_task("x/t1.onnx_adapter")`` replaced the
    bundle's task t1 for every later ``set_task("t1")``."""
    sess = bundle.session()
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    sess.set_task("t1")
    want = sess(x)
    other = write_adapter(valid_params(bundle), tmp_path / "t1.onnx_adapter", bundle.manifest["swappable"]["adapter_model_version"])
    assert sess.set_task(other) == "t1"
    assert not np.array_equal(sess(x), want)
    sess.set_task("t1")
    assert np.array_equal(sess(x), want)


def test_refused_switch_leaves_no_task(bundle, tmp_path):
    """Was: a switch refused by the checks kept the previous task running (one refused in ORT did not)."""
    sess = bundle.session()
    x = np.zeros((1, 1, 16, 16), np.float32)
    sess.set_task("t2")
    bad = tmp_path / "bad.onnx_adapter"
    bad.write_bytes(b"\x00" * 64)
    write_adapter_record(bad)  # a record that matches: the parser itself must refuse the bytes
    with pytest.raises(AdapterError, match="not an .onnx_adapter file"):
        sess.set_task(bad)
    assert sess.task is None
    with pytest.raises(NoTaskError):
        sess(x)
    for task in (123, None, b"t1", "nosuch", tmp_path / "missing.onnx_adapter", "a\x00b.onnx_adapter"):
        with pytest.raises(CrispEdgeError):  # were: TypeError (123, None, bytes) and ValueError (NUL)
            sess.set_task(task)
    sess.set_task("t2")  # still usable
    assert sess(x).shape == (1, 5)


def _fb(bundle, edit=None, **kw):
    swap = bundle.manifest["swappable"]
    params = fuzzing_bundles._params(valid_params(bundle))
    if edit:
        edit(params)
    return flatbuffer_adapter(params, model_version=kw.pop("model_version", swap["adapter_model_version"]), **kw)


@pytest.mark.parametrize("edit, kw, message", [
    (lambda p: p[0].update(dims=None), {}, "has no dims"),
    (lambda p: p[0].update(raw=None), {}, "has no raw_data"),
    (lambda p: p[0].update(name=None), {}, "has no name"),
    (None, {"omit_parameters": True}, "no parameter list"),
    (lambda p: p[0].update(raw=p[0]["raw"][:-4]), {}, "bytes of data"),
    (lambda p: p[0].update(dims=[2**62, 2**62]), {}, "bytes of data"),
    (lambda p: p[0].update(dims=[-1, 4]), {}, "negative dimensions"),
    (lambda p: p[0].update(data_type=8), {}, "is STRING"),
    (lambda p: p[0].update(data_type=10, raw=p[0]["raw"][: len(p[0]["raw"]) // 2]), {}, "is FLOAT16"),
    (lambda p: p.append(dict(p[0])), {}, "appears twice"),
    (lambda p: p[0].update(raw=np.full(len(p[0]["raw"]) // 4, np.nan, "<f4").tobytes()), {}, "NaN or infinite"),
    (None, {"format_version": 2}, "format version 2"),
    (None, {"identifier": b"TORX"}, "not an .onnx_adapter file"),
])
def test_malformed_adapter_files_are_refused_before_onnx_runtime(bundle, tmp_path, edit, kw, message):
    data = _fb(bundle, edit, **kw)
    with pytest.raises(AdapterError, match=message):
        parse_adapter(data, "case")
    path = tmp_path / "case.onnx_adapter"
    path.write_bytes(data)
    write_adapter_record(path)  # the hash matches: the checks behind it must refuse the file
    sess = bundle.session()
    with pytest.raises(AdapterError, match=message):
        sess.set_task(path)
    assert sess.task is None


def test_adapter_reader_matches_onnx_runtime_on_valid_files(bundle, tmp_path):
    import onnxruntime as ort

    for task in bundle.tasks:
        path = bundle.task_path(task)
        ours = parse_adapter(path.read_bytes(), str(path))
        theirs = ort.AdapterFormat.read_adapter(str(path))
        assert ours.model_version == theirs.get_model_version() == bundle.manifest["swappable"]["adapter_model_version"]
        params = {k: v.numpy() for k, v in theirs.get_parameters().items()}
        assert sorted(ours.arrays) == sorted(params)
        for k, v in params.items():
            assert ours.arrays[k].dtype == np.float32 and np.array_equal(ours.arrays[k], v)
    # and hand-built files (the fuzzer's) read the same in both
    path = tmp_path / "fb.onnx_adapter"
    path.write_bytes(_fb(bundle))
    fmt = ort.AdapterFormat.read_adapter(str(path))  # keep it alive: its OrtValues point into its buffer
    theirs = {k: v.numpy() for k, v in fmt.get_parameters().items()}
    ours = parse_adapter(path.read_bytes()).arrays
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_wrong_tag_is_a_basis_mismatch(bundle, tmp_path):
    path = tmp_path / "tag.onnx_adapter"
    path.write_bytes(_fb(bundle, model_version=bundle.manifest["swappable"]["adapter_model_version"] ^ 1))
    write_adapter_record(path)
    with pytest.raises(BasisMismatchError, match="other bases"):
        bundle.session().set_task(path)


def test_bundle_files_are_checked_by_size_then_hash(copy_of):
    folder = copy_of()
    with open(folder / "reference.npz", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"recorded size"):
        load_bundle(folder)
    assert sha256_file(folder / "model.onnx") == load_bundle(folder, verify=False).manifest["files"]["model.onnx"]["sha256"]

"""ONNX Runtime export: dense, factored and swappable bundles of a toy timm ViT, checked in ORT."""
from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from crisp_edge.export import (
    AdapterError,
    BundleError,
    NoTaskError,
    ParityError,
    export_onnx,
    load_bundle,
    mixers_to_onnx_adapter,
    validate_bundle,
)
from crisp_edge.export.onnx.adapter import write_adapter

import crisp_edge as ce
from crisp_edge.errors import BasisMismatchError, LayoutMismatchError
from crisp_edge.files.io import sha256_file
from crisp_edge.files.mixers import apply_mixers_
from crisp_edge.testing import make_task_file, toy_model

pytestmark = pytest.mark.runtime
CONFIG = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2))


def crisp_toy(seed: int = 0, config: ce.CrispConfig = CONFIG):
    model = toy_model("timm-vit", seed=seed)
    ce.retrofit_(model, config, progress=False)
    return model




@pytest.fixture(scope="module")
def model():
    return crisp_toy()


@pytest.fixture(scope="module")
def tasks(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return [make_task_file(model, d / "t1.safetensors", "t1", 1, 4), make_task_file(model, d / "t2.safetensors", "t2", 2, 7)]


@pytest.fixture(scope="module")
def swappable(model, tasks, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("b") / "swap", mode="swappable", tasks=tasks)


def x_input(batch: int = 5, seed: int = 7) -> torch.Tensor:
    return torch.randn((batch, 1, 16, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["dense", "factored"])
def test_fixed_modes_export_and_validate(model, tmp_path, mode):
    bundle = export_onnx(model, tmp_path / mode, mode=mode)
    m = bundle.manifest
    assert m["parity"]["passed"] and m["parity"]["max_abs"] <= 1e-4
    assert m["inputs"][0]["shape"][0] == "batch" and m["outputs"][0]["shape"][0] == "batch"
    proto = onnx.load(str(bundle.file("model.onnx")))
    names = [t.name for t in proto.graph.initializer]
    ops = {n.op_type for n in proto.graph.node}
    if mode == "dense":  # the original architecture: no CRISP tensors, no gate
        assert not any("crisp" in n for n in names) and "Sigmoid" not in ops
    else:  # each shared basis stored once; the file is the stored parameters' size
        assert sorted(n for n in names if n.startswith("crisp_bases")) == sorted(
            f"crisp_bases.{k}.weight" for k in ce.crisp_bases(model))
        assert m["params"]["weights_bytes"] <= 1.02 * m["params"]["stored_bytes_fp32"]
    out = bundle.session()(x_input())
    np.testing.assert_allclose(out, model(x_input()).detach().numpy(), atol=1e-4, rtol=0)
    report = validate_bundle(bundle.path)
    assert report.passed and len(report.comparisons) == 2


def test_swappable_switches_tasks_like_pytorch(model, tasks, swappable):
    assert validate_bundle(swappable.path).passed
    weights = swappable.weights_bytes()
    assert weights <= 1.02 * swappable.manifest["params"]["stored_bytes_fp32"]
    sess = swappable.session()
    x = x_input()
    outs = {}
    for name, path in (("t1", tasks[0]), ("t2", tasks[1]), ("default", None)):
        ref_model = copy.deepcopy(model)
        if path is not None:
            apply_mixers_(ref_model, path)
        assert sess.set_task(name) == name
        outs[name] = sess(x)
        ref = ref_model(x).detach().numpy()
        assert outs[name].shape == ref.shape
        np.testing.assert_allclose(outs[name], ref, atol=1e-4, rtol=0)
    assert outs["t2"].shape == (5, 7)  # a task's head may have another class count
    sess.set_task("t1")
    assert np.array_equal(sess(x), outs["t1"])  # switching back is exact


def test_swappable_forwards_from_several_threads_and_batches(swappable):
    """Each thread binds the task's weights once (its own IOBinding); a switch rebinds every thread's."""
    from concurrent.futures import ThreadPoolExecutor

    sess = swappable.session()
    sess.set_task("t1")
    xs = [np.random.default_rng(i).standard_normal((b, *x_input().shape[1:])).astype(np.float32)
          for i, b in enumerate((1, 3, 5, 2))]
    want = [sess(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(sess, xs * 4))
    for i, out in enumerate(got):
        assert np.array_equal(out, want[i % len(xs)])
    sess.set_task("t2")  # every thread's binding is stale now: the new task's weights run
    with ThreadPoolExecutor(2) as pool:
        after = list(pool.map(sess, xs[:2]))
    assert after[0].shape[1] == 7 and not np.array_equal(after[0][:, :5], want[0][:, :5])


def test_forwards_while_another_thread_switches_tasks(swappable):
    """Forwards running while the main thread switches between two tasks each answer with one task's weights
    (or NoTaskError mid-switch), never with freed memory: a thread keeps the weights it bound alive, also the
    kernel fold's, whose numpy memory its binding does not own."""
    import threading

    sess = swappable.session()
    x = x_input(batch=2).numpy()
    want = {}
    for t in ("t1", "t2"):
        sess.set_task(t)
        want[t] = sess(x)
    stop, bad, runs = threading.Event(), [], [0]

    def forwards():
        while not stop.is_set():
            try:
                out = sess(x)
            except NoTaskError:
                continue
            runs[0] += 1
            if not any(out.shape == w.shape and np.allclose(out, w, atol=1e-5) for w in want.values()):
                bad.append(out)

    threads = [threading.Thread(target=forwards) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            sess.set_task("t1" if i % 2 else "t2")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert runs[0] > 0 and not bad


def test_a_thread_keeps_the_kernel_folds_weights_it_bound_alive(swappable, monkeypatch):
    """The kernel fold's weights are numpy memory that ORT's C++ values point into without owning it; ORT's
    Python IOBinding keeps the values it binds, so after a switch the arrays a thread bound stay alive while
    that thread holds its binding (a forward it is running reads them)."""
    import gc
    import threading
    import weakref

    from crisp_edge.export import fold_kernel

    made = []
    real = fold_kernel.fold_group

    def recording(*a, **k):
        outs = real(*a, **k)
        made.extend(weakref.ref(o) for o in outs)
        return outs

    monkeypatch.setattr(fold_kernel, "fold_group", recording)
    sess = swappable.session()
    assert sess.fold_with == "crisp-edge kernel"
    sess.set_task("t1")
    first, x = list(made), x_input(batch=1).numpy()
    bound, go, done = threading.Event(), threading.Event(), threading.Event()

    def worker():
        sess(x)  # binds t1's weights in this thread
        bound.set()
        go.wait()
        sess(x)  # a forward after the switch: rebinds to t2's
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    bound.wait()
    sess.set_task("t2")
    gc.collect()
    alive = all(r() is not None for r in first)
    go.set()
    t.join()
    assert first and alive  # held by the worker's binding across the switch


def test_the_kernel_fold_rewrites_only_weights_nothing_is_bound_to(swappable, monkeypatch):
    """Switches reuse the weight arrays of an earlier switch (memory already mapped) once no session, binding or
    caller refers to them; arrays a thread's binding still holds keep their values through later switches."""
    import threading
    import weakref

    from crisp_edge.export import fold_kernel

    made = []
    real = fold_kernel.fold_group

    def recording(*a, **k):
        outs = real(*a, **k)
        made.append([(weakref.ref(o), o.ctypes.data) for o in outs])
        return outs

    monkeypatch.setattr(fold_kernel, "fold_group", recording)
    sess = swappable.session()
    x = x_input(batch=1).numpy()
    for task in ("t1", "t2", "t1", "t2"):  # a forward after each switch: the binding of two switches ago is gone
        sess.set_task(task)
        sess(x)
    groups = len(made) // 4
    first, third = made[:groups], made[2 * groups:3 * groups]
    assert [p for g in third for _, p in g] == [p for g in first for _, p in g]  # the first switch's arrays again
    assert made[groups] != first  # not the arrays the second switch's binding was still holding

    made.clear()
    sess.set_task("t1")
    held = [(r, r().copy()) for g in made for r, _ in g]
    bound, go = threading.Event(), threading.Event()

    def worker():
        sess(x)  # binds t1's arrays in this thread, then holds the binding
        bound.set()
        go.wait()

    t = threading.Thread(target=worker)
    t.start()
    bound.wait()
    for task in ("t2", "t1", "t2", "t1", "t2"):
        sess.set_task(task)
        sess(x)
    try:
        assert all(r() is not None and np.array_equal(r(), v) for r, v in held)  # untouched while bound
    finally:
        go.set()
        t.join()


def test_forward_before_set_task_is_an_error(swappable):
    sess = swappable.session()
    with pytest.raises(NoTaskError, match="set_task"):
        sess(x_input())


def test_adapter_sizes_match_the_mixers(swappable):
    for t in swappable.tasks.values():
        assert t["bytes"] <= 1.10 * t["mixer_file_raw_bytes"] + 1024


def test_mixer_file_converts_for_an_existing_bundle(model, tasks, swappable, tmp_path):
    path = make_task_file(model, tmp_path / "t3.safetensors", "t3", 3, 4)
    adapter = mixers_to_onnx_adapter(path, swappable.path)
    assert adapter.name == "t3.onnx_adapter"
    bundle = load_bundle(swappable.path)  # manifest updated, hashes still check
    sess = bundle.session()
    sess.set_task("t3")
    ref_model = copy.deepcopy(model)
    apply_mixers_(ref_model, path)
    np.testing.assert_allclose(sess(x_input()), ref_model(x_input()).detach().numpy(), atol=1e-4, rtol=0)


def test_mixer_file_for_other_bases_or_layout_is_refused(swappable, tmp_path):
    other = crisp_toy(seed=1)  # same layout, other bases
    with pytest.raises(BasisMismatchError, match="other bases"):
        mixers_to_onnx_adapter(make_task_file(other, tmp_path / "a.safetensors", "a", 1, 4), swappable.path)
    regrouped = crisp_toy(config=ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=4)))
    with pytest.raises(LayoutMismatchError, match="groups differ"):
        mixers_to_onnx_adapter(make_task_file(regrouped, tmp_path / "b.safetensors", "b", 1, 4), swappable.path)
    assert "a" not in load_bundle(swappable.path).tasks


def test_adapter_with_wrong_name_shape_or_bases_is_a_clear_error(swappable, tmp_path):
    swap = swappable.manifest["swappable"]
    tag = swap["adapter_model_version"]
    sess = swappable.session()
    good = {"mixer.qkv_0_1": np.zeros(swap["overridable"]["mixer.qkv_0_1"], np.float32)}
    bad_name = write_adapter({"mixer.nope": good["mixer.qkv_0_1"]}, tmp_path / "name.onnx_adapter", tag)
    with pytest.raises(AdapterError, match="not overridable"):
        sess.set_task(bad_name)
    bad_shape = write_adapter({"mixer.qkv_0_1": np.zeros((2, 3, 4), np.float32)}, tmp_path / "shape.onnx_adapter", tag)
    with pytest.raises(AdapterError, match="has shape"):
        sess.set_task(bad_shape)
    other = write_adapter(good, tmp_path / "other.onnx_adapter", tag ^ 1)
    with pytest.raises(BasisMismatchError):
        sess.set_task(other)
    assert sess.task is None
    sess.set_task(write_adapter(good, tmp_path / "ok.onnx_adapter", tag))  # the same tensors, right tag: fine


def _perturb(bundle_dir, name: str, delta: float) -> None:
    path = bundle_dir / "model.onnx"
    proto = onnx.load(str(path))
    for t in proto.graph.initializer:
        if t.name == name:
            a = onnx.numpy_helper.to_array(t).copy()
            a.flat[0] += delta
            t.CopyFrom(onnx.numpy_helper.from_array(a, name))
    onnx.save(proto, str(path))


def test_perturbed_bundle_fails_validation(model, tmp_path):
    bundle = export_onnx(model, tmp_path / "d", mode="dense")
    _perturb(bundle.path, "patch_embed.proj.bias", 0.05)
    with pytest.raises(BundleError, match="SHA-256"):  # an edited file is caught by its hash first
        validate_bundle(bundle.path)
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    manifest["files"]["model.onnx"]["sha256"] = sha256_file(bundle.path / "model.onnx")
    (bundle.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ParityError, match="max abs") as err:
        validate_bundle(bundle.path)
    assert not err.value.report.passed and err.value.report.max_abs > 1e-4


def test_export_refuses_bad_requests(model, tasks, tmp_path):
    with pytest.raises(ce.ConfigError, match="swappable"):
        export_onnx(model, tmp_path / "x", mode="dense", tasks=tasks)
    with pytest.raises(ce.ConfigError, match="CRISP"):
        export_onnx(toy_model("timm-vit"), tmp_path / "y", mode="factored")
    (tmp_path / "z").mkdir()
    with pytest.raises(ce.CrispEdgeError, match="exists"):
        export_onnx(model, tmp_path / "z", mode="dense")
    assert not list(tmp_path.glob(".*tmp"))  # no temporary folder left behind


def test_cli_export(model, tasks, tmp_path, capsys):
    import argparse

    from crisp_edge.cli.export import add_parser as add_export_parser

    ce.save_checkpoint(model, tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--target", "onnx", "--mode", "swappable", str(tmp_path / "ckpt"),
                              "--out", str(tmp_path / "bundle"), "--task", str(tasks[0])])
    assert args.func(args) == 0
    assert "task t1" in capsys.readouterr().out
    assert load_bundle(tmp_path / "bundle").tasks.keys() == {"t1"}


@pytest.mark.parametrize("gate,placement", [("gelu", "post"), ("relu", "temp"), ("none", "pre")])
def test_fold_graph_covers_every_gate_and_placement(tmp_path, gate, placement):
    model = toy_model("timm-vit", depth=2)
    ce.convert_(model, ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2, gate=gate, placement=placement)),
                generator=torch.Generator().manual_seed(0))
    bundle = export_onnx(model.eval(), tmp_path / "b", mode="swappable")  # validated inside
    assert bundle.manifest["parity"]["max_abs"] <= 1e-4
    # the fused kernel takes "pre" groups with a gate it applies (silu, relu, none); the fold graph the others
    assert bundle.session().fold_with == ("crisp-edge kernel" if placement == "pre" else "onnxruntime")


#: fc1 transposed at a small s, fc2 transposed with s = d_out (an input-side basis, as LLaMA's down_proj).
TRANSPOSED = ce.CrispConfig(default=ce.RoleConfig(s=4, group_size=2),
                            roles={"fc1": ce.RoleConfig(s=4, group_size=2, transpose=True),
                                   "fc2": ce.RoleConfig(s=32, group_size=2, transpose=True)})


@pytest.mark.parametrize("mode", ["factored", "swappable"])
def test_transposed_groups_export_and_switch(tmp_path, mode):
    """Transposed groups (W.T = reshape(B @ G(A))) fold to the same weights as PyTorch in every mode,
    and an untransposed model's mixer file is refused by the bundle."""
    model = crisp_toy(config=TRANSPOSED)
    task = make_task_file(model, tmp_path / "t.safetensors", "t", 1, 4)
    bundle = export_onnx(model, tmp_path / mode, mode=mode, tasks=[task] if mode == "swappable" else ())
    assert bundle.manifest["parity"]["passed"] and bundle.manifest["parity"]["max_abs"] <= 1e-4
    if mode == "factored":
        return
    assert bundle.manifest["swappable"]["layout"]["fc2_0_1"]["transpose"] is True
    assert "transpose" not in bundle.manifest["swappable"]["layout"]["qkv_0_1"]
    ref = copy.deepcopy(model)
    apply_mixers_(ref, task)
    sess = bundle.session()
    sess.set_task("t")
    np.testing.assert_allclose(sess(x_input()), ref(x_input()).detach().numpy(), atol=1e-4, rtol=0)
    plain = crisp_toy()  # same shapes for qkv/proj, fc1 untransposed
    with pytest.raises(LayoutMismatchError, match="transpose"):
        mixers_to_onnx_adapter(make_task_file(plain, tmp_path / "p.safetensors", "p", 1, 4), bundle.path)


def test_an_adapter_given_by_path_runs_only_when_it_matches_a_record(swappable, model, tmp_path):
    """Was: one flipped bit in an adapter loaded by path gave logits around 1e36. The bundle's own file
    is checked against the manifest; a file elsewhere against the record written beside it."""
    import shutil

    from crisp_edge.export.onnx.adapter import record_path, write_adapter_record

    sess = swappable.session()
    x = x_input()
    sess.set_task("t1")
    want = sess(x)
    own = swappable.task_path("t1")
    assert sess.set_task(own) == "t1" and np.array_equal(sess(x), want)  # by path: its manifest record

    copied = tmp_path / "t1.onnx_adapter"
    shutil.copyfile(own, copied)
    with pytest.raises(AdapterError, match="no record"):
        sess.set_task(copied)
    assert sess.task is None
    write_adapter_record(copied)
    sess.set_task(copied)
    assert np.array_equal(sess(x), want)
    data = bytearray(copied.read_bytes())
    data[-9] ^= 0x10  # one bit of a tensor value
    copied.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="does not match the SHA-256"):
        sess.set_task(copied)
    record_path(copied).write_text("[]")
    with pytest.raises(AdapterError, match="adapter record"):
        sess.set_task(copied)


def test_overwrite_replaces_only_a_bundle_of_the_same_kind(model, tmp_path):
    out = tmp_path / "b"
    first = export_onnx(model, out, mode="dense")
    again = export_onnx(model, out, mode="dense", overwrite=True)  # its own kind: replaced
    assert again.manifest["parity"]["passed"] and first.path == again.path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging or old folder left beside it
    with pytest.raises(BundleError, match="exists; pass overwrite=True"):
        export_onnx(model, out, mode="dense")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(BundleError, match="not a crisp-edge onnxruntime bundle"):
        export_onnx(model, mine, mode="dense", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("opset, mode", [(7, "dense"), (17, "swappable"), (24, "dense"), ("18", "dense")])
def test_unsupported_opsets_are_config_errors(model, tmp_path, opset, mode):
    with pytest.raises(ce.ConfigError, match="is not supported"):
        export_onnx(model, tmp_path / "b", mode=mode, opset=opset)
    assert not (tmp_path / "b").exists()


def test_an_empty_batch_is_refused(model, tmp_path):
    """Was: a bundle with 0-sized inputs was written and 'passed' parity (nothing compared)."""
    with pytest.raises(ce.ConfigError, match="no elements"):
        export_onnx(model, tmp_path / "b", mode="dense", example_input=torch.zeros(0, 1, 16, 16))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["fifo", "link-outside", "link-to-dev-zero"])
def test_a_manifest_that_is_no_regular_file_inside_the_bundle_is_refused(swappable, tmp_path, how):
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(swappable.path, folder)
    manifest = folder / "manifest.json"
    outside = tmp_path / "elsewhere.json"
    shutil.copyfile(manifest, outside)
    manifest.unlink()
    if how == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to(outside if how == "link-outside" else "/dev/zero")
    with pytest.raises(BundleError, match="FIFO" if how == "fifo" else "outside the bundle folder"):
        load_bundle(folder)


def test_parity_refuses_a_nan_tolerance(swappable):
    from crisp_edge.export.parity.check import check_bundle

    for atol in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ce.ConfigError, match="finite number"):
            check_bundle(swappable, atol=atol, progress=False)


def test_an_interrupted_multi_file_update_is_finished_when_the_bundle_is_opened(swappable, tmp_path, monkeypatch):
    """``commit_files`` (the primitive export-task uses to add a task, its reference and the manifest
    together): killed after its commit point, the next ``load_bundle`` completes it and the hashes verify."""
    import shutil

    from crisp_edge.files import transaction as tx

    folder = tmp_path / "b"
    shutil.copytree(swappable.path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "tasks" / "t1.onnx_adapter").read_bytes()
    manifest["tasks"]["t3"] = {**manifest["tasks"]["t1"], "file": "tasks/t3.onnx_adapter"}
    real = os.replace

    def killed(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt  # stands in for SIGKILL after the task file was renamed
        return real(src, dst)

    monkeypatch.setattr(tx.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        tx.commit_files(folder, {"tasks/t3.onnx_adapter": data,
                                 "manifest.json": json.dumps(manifest).encode()})
    monkeypatch.setattr(tx.os, "replace", real)
    assert "t3" in load_bundle(folder).tasks
    assert not (folder / tx.JOURNAL).exists()


def test_a_task_file_changed_after_its_first_use_is_caught(swappable, tmp_path):
    """set_task(name) keeps a verified task only while its file is unchanged: a file swapped underneath,
    or edited in place with its size and mtime put back, is read again and refused by its SHA-256;
    set_task(path) reads and verifies the file on every call."""
    folder = tmp_path / "b"
    shutil.copytree(swappable.path, folder)
    sess = load_bundle(folder).session()
    x = x_input().numpy()
    t1 = folder / "tasks" / "t1.onnx_adapter"
    good = t1.read_bytes()
    sess.set_task("t1")
    want = sess(x)
    tmp = folder / "tasks" / "swapped.tmp"
    tmp.write_bytes((folder / "tasks" / "t2.onnx_adapter").read_bytes())
    os.replace(tmp, t1)  # another task's (valid) adapter renamed into t1's place
    for task in ("t1", t1):
        with pytest.raises(BundleError, match="recorded SHA-256"):
            sess.set_task(task)
    with pytest.raises(NoTaskError):
        sess(x)  # a failed switch leaves no task
    t1.write_bytes(good)
    sess.set_task("t1")
    assert np.array_equal(sess(x), want)
    st = t1.stat()
    damaged = bytearray(good)
    damaged[-5] ^= 0x40  # a bit of the head's last value
    with open(t1, "r+b") as f:
        f.write(damaged)
    os.utime(t1, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BundleError, match="recorded SHA-256"):
        sess.set_task("t1")


def test_a_switch_feeds_the_fold_what_orts_own_adapter_loader_reads(swappable, tmp_path, monkeypatch):
    """set_task feeds the fold crisp-edge's checked copies of the task's tensors (no second parse of the file
    by ORT's adapter loader): the dense weights are bit for bit those of the fold run with the file as ORT's
    active adapter (what a device runs), and a file damaged or cut short after the switch changes nothing.
    (The fold graph here, as an app using ONNX Runtime alone runs it; the kernel fold is compared below.)"""
    import onnxruntime as ort

    from crisp_edge.export.onnx.session import OnnxCrispSession, session_options

    monkeypatch.setattr(OnnxCrispSession, "use_fold_kernel", False)

    own = swappable.task_path("t1")
    copied = tmp_path / own.name
    shutil.copyfile(own, copied)
    shutil.copyfile(str(own) + ".json", str(copied) + ".json")
    sess = swappable.session()
    sess.set_task(copied)
    x = x_input().numpy()
    want = sess(x)
    fold = ort.InferenceSession(str(swappable.file(swappable.manifest["models"]["fold"]["file"])), session_options(1))
    adapter = ort.LoraAdapter()
    adapter.Load(str(own))
    opts = ort.RunOptions()
    opts.add_active_adapter(adapter)
    names = [o.name for o in fold.get_outputs()]
    for name, value in zip(names, fold.run(names, {}, opts)):
        assert np.array_equal(sess._weights[name].numpy(), value), name
    copied.write_bytes(copied.read_bytes()[:100])  # cut short under the running task
    assert np.array_equal(sess(x), want)


def _fold_graph_session(bundle, monkeypatch):
    from crisp_edge.export.onnx.session import OnnxCrispSession

    with monkeypatch.context() as m:
        m.setattr(OnnxCrispSession, "use_fold_kernel", False)
        sess = bundle.session()
    assert sess.fold_with == "onnxruntime"
    return sess


def test_the_kernel_fold_gives_the_fold_graphs_weights(swappable, model, tasks, monkeypatch):
    """set_task folds with crisp-edge's fused kernel (export/fold_kernel.py: the basis read once, each weight
    written in its layout) where it can: the same dense weights as the bundle's fold graph run in ONNX Runtime
    (what an app using ONNX Runtime alone runs), within float32 rounding, for every task; biases and head exactly;
    and the logits PyTorch gives."""
    sess, graph = swappable.session(), _fold_graph_session(swappable, monkeypatch)
    assert sess.fold_with == "crisp-edge kernel"
    assert sess._kernel_fold.others == []  # every output from the kernel or the task's tensors: no graph run
    x = x_input().numpy()
    for task, path in [("default", None), ("t1", tasks[0]), ("t2", tasks[1])]:
        sess.set_task(task)
        graph.set_task(task)
        assert sess._weights.keys() == graph._weights.keys()
        for name, value in graph._weights.items():
            got, want = sess._weights[name].numpy(), value.numpy()
            assert got.shape == want.shape, name
            if name.endswith(".weight") and name.startswith("dense.blocks"):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
            else:
                assert np.array_equal(got, want), name
        ref = copy.deepcopy(model)
        if path is not None:
            apply_mixers_(ref, path)
        np.testing.assert_allclose(sess(x), ref(torch.from_numpy(x)).detach().numpy(), atol=1e-4, rtol=0)


def test_the_kernel_fold_reads_the_bases_from_the_external_data_file(tmp_path, monkeypatch):
    """A bundle whose bases live in the fold graph's external data file (any real model's): the kernel reads
    them there (a read-only map of the file ORT maps), with the fold graph's weights."""
    import crisp_edge.export.onnx.bundle as ob
    import crisp_edge.export.onnx.kernel_fold as kf

    with monkeypatch.context() as m:
        m.setattr(ob, "EXTERNAL_DATA_BYTES", 0)  # as a real model's: the toy's graphs would be saved whole
        bundle = export_onnx(crisp_toy(), tmp_path / "b", mode="swappable")
    assert "fold.onnx.data" in bundle.manifest["files"]
    maps = []
    real = kf._initializer
    monkeypatch.setattr(kf, "_initializer", lambda *a: maps.append(type(r := real(*a))) or r)
    sess, graph = bundle.session(), _fold_graph_session(bundle, monkeypatch)
    assert np.memmap in maps and sess.fold_with == "crisp-edge kernel"
    sess.set_task("default")
    graph.set_task("default")
    for name, value in graph._weights.items():
        np.testing.assert_allclose(sess._weights[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_without_the_kernel_the_fold_graph_runs(swappable, model, monkeypatch):
    """Where crisp-edge's fold kernel cannot be built (no g++) the session runs the bundle's fold graph."""
    from crisp_edge.export import fold_kernel

    monkeypatch.setattr(fold_kernel, "kernel", lambda: None)
    sess = swappable.session()
    assert sess.fold_with == "onnxruntime"
    sess.set_task("default")
    x = x_input()
    np.testing.assert_allclose(sess(x.numpy()), model(x).detach().numpy(), atol=1e-4, rtol=0)

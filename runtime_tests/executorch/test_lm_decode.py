"""The swappable XNNPACK language model's ``decode`` method: its task weights (the buffers ``set_task``
writes) are read in place by ``crisp::rowmajor_linear`` instead of being packed by XNNPACK at every step;
``forward`` (the prefill) keeps XNNPACK with its task products flipped (the weight buffer is the product's
input, read in place; the prompt's activation is the operand XNNPACK packs). Generation through it equals PyTorch's per task, in Python and in
the C++ runner, and a session that cannot register crisp-edge's kernels says so with a typed error."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from crisp_edge.export.errors import ExportError, KernelsError
from crisp_edge.export.executorch import custom_ops
from crisp_edge.export.executorch.bundle import DECODE_METHOD, load_et_bundle
from crisp_edge.export.executorch.export import export_executorch
from crisp_edge.export.executorch.lm_session import EtLMSession
from crisp_edge.export.executorch.lowering import non_delegated_ops, partition
from crisp_edge.method.convert import crisp_bases
from crisp_edge.testing import make_lm_task_file
from runtime_tests.executorch.test_lm import TASKS, _assert_each_task_generates_its_own_tokens, _products, crisp_llama

pytestmark = pytest.mark.runtime
ROLES = 7  # q, k, v, o, gate, up, down: the task weights of one LLaMA block
SEQ = 16


def _task_weights(model) -> int:
    return sum(len(b.layer_names) for b in crisp_bases(model).values())


def test_decode_method_reads_every_task_weight_with_rowmajor_linear():
    """The lowering itself (no program written): the swappable XNNPACK programs have a decode method in
    which every task weight's product is ``crisp::rowmajor_linear`` (outside XNNPACK, reading the buffer
    forward reads), as is the head's, and every other product is delegated. Before the decode method
    existed there was no such method: this fails on that lowering."""
    from crisp_edge.export.executorch.lm_export import _programs

    model = crisp_llama()
    n = ROLES * model.config.num_hidden_layers
    assert _task_weights(model) == n
    methods, examples, swap, _ = _programs(model, "swappable", SEQ, "xnnpack")
    assert DECODE_METHOD in methods and swap is not None
    with torch.no_grad():
        ep = torch.export.export(methods[DECODE_METHOD], examples[DECODE_METHOD], strict=True)
    # the decode graph reads the very buffers forward reads (same names: ExecuTorch shares them by name)
    weights = {b for b in ep.graph_signature.buffers if b.endswith(".weight")}
    assert len(weights) == n and weights <= {b for b, _ in methods["forward"].named_buffers(remove_duplicate=False)}
    edge = partition({DECODE_METHOD: ep}, "xnnpack", "swappable")
    ops = non_delegated_ops(edge)[DECODE_METHOD]
    assert not {k for k in _products(ops) if not k.startswith("crisp.")}, ops  # the rest: XNNPACK's
    # what each crisp::rowmajor_linear reads (not decomposed, not claimed by XNNPACK): every task weight
    # buffer once, and the vocabulary projection's constant (the head, one position per call)
    lowered = edge.exported_program(DECODE_METHOD)
    sig = lowered.graph_signature
    read = [n.args[1].name for n in lowered.graph.nodes
            if n.op == "call_function" and "crisp.rowmajor_linear" in str(n.target)]
    assert sorted(sig.inputs_to_buffers[a] for a in read if a in sig.inputs_to_buffers) == sorted(weights)
    constants = [sig.inputs_to_parameters[a] for a in read if a in sig.inputs_to_parameters]
    assert len(constants) == 1 and constants[0].endswith("lm_head.weight"), constants
    # a portable program keeps to stock operators: no decode method, no kernels needed
    assert DECODE_METHOD not in _programs(model, "swappable", SEQ, "portable")[0]


def test_prefill_reads_every_task_weight_as_the_input_of_an_xnnpack_product():
    """forward (the prefill) computes every task weight's product flipped, ``(W @ x^T)^T``: the buffer is the
    first operand of a matrix product (the input XNNPACK reads in place; the packed operand is the prompt's
    activation), every product of forward goes to XNNPACK, and the flipped product is the linear layer's.
    The lowering before the flip had each buffer as ``linear``'s weight: this fails on it."""
    from crisp_edge.export.executorch.lm_export import _programs
    from crisp_edge.export.executorch.programs import _FlippedBufLinear

    model = crisp_llama()
    n = ROLES * model.config.num_hidden_layers
    methods, examples, _, _ = _programs(model, "swappable", SEQ, "xnnpack")
    tokens = torch.export.Dim("tokens", min=1, max=SEQ)
    with torch.no_grad():
        ep = torch.export.export(methods["forward"], examples["forward"], strict=True,
                                 dynamic_shapes=({1: tokens}, {0: tokens}))
    sig = ep.graph_signature
    weights = {p for p, b in sig.inputs_to_buffers.items() if b.endswith(".weight")}
    assert len(weights) == n
    first = {}
    for node in ep.graph.nodes:
        for i, a in enumerate(node.args):
            if getattr(a, "name", None) in weights:
                first.setdefault(a.name, []).append((str(node.target), i))
    assert all(uses == [("aten.matmul.default", 0)] for uses in first.values()) and len(first) == n, first
    edge = partition({"forward": ep}, "xnnpack", "swappable")
    ops = non_delegated_ops(edge)["forward"]
    assert _products(ops) == {"crisp.rowmajor_linear.default": 1}, ops  # the head; every task product: XNNPACK's
    torch.manual_seed(0)
    for bias in (False, True):
        lin = torch.nn.Linear(13, 7, bias=bias)
        flipped = _FlippedBufLinear(lin.weight, lin.bias)
        x = torch.randn(1, 5, 13)
        torch.testing.assert_close(flipped(x), lin(x))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_decode")
    model = crisp_llama(tied=True)  # SmolLM2's tied head
    paths = [make_lm_task_file(model, d / f"{t}.mixers.safetensors", task=t, seed=i + 1) for i, t in enumerate(TASKS)]
    return model, paths, export_executorch(model, d / "swap", mode="swappable", tasks=paths, max_seq_len=SEQ)


@pytest.mark.slow
def test_generation_through_decode_is_each_tasks_pytorch_reference(bundle, monkeypatch):
    """The exported bundle (validated at export: every task's greedy tokens and logits) lists the kernels it
    needs; its tied head reads the embedding (no copy); its session steps single tokens through decode:
    greedy tokens equal PyTorch's for every task, after set_task and after a switch."""
    model, paths, b = bundle
    assert b.manifest["custom_ops"] == ["crisp::fold_", "crisp::rowmajor_linear.out"]  # set_task folds, decode reads
    assert b.manifest["parity"]["passed"] and b.manifest["parity"]["max_abs"] < 1e-4
    ops = b.manifest["non_delegated_ops"]
    assert ops[DECODE_METHOD].get("crisp.rowmajor_linear.default") == ROLES * model.config.num_hidden_layers + 1
    # the prefill's products stay XNNPACK's but the head's (one position: read in place, the embedding itself)
    assert _products(ops["forward"]) == {"crisp.rowmajor_linear.default": 1}, ops["forward"]
    assert b.manifest["params"]["head_copy"] == 0
    sess = b.session(threads=1)
    calls = {"decode": 0}
    real = sess.decode_method

    class Counting:
        def execute(self, inputs):
            calls["decode"] += 1
            assert inputs[0].shape == (1, 1)
            return real.execute(inputs)

    monkeypatch.setattr(sess, "decode_method", Counting())
    _assert_each_task_generates_its_own_tokens(sess, model, paths, SEQ)
    assert calls["decode"] > 0  # the tokens above came through decode


@pytest.mark.slow
def test_kernels_that_cannot_be_loaded_are_a_typed_error(bundle, tmp_path, monkeypatch):
    _, _, b = bundle
    edited = tmp_path / "edited"
    shutil.copytree(b.path, edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["custom_ops"] = ["crisp::rowmajor_linear.out", "crisp::from_the_future.out"]
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KernelsError, match="from_the_future.*newer crisp-edge"):
        EtLMSession(load_et_bundle(edited))

    def broken():
        raise ExportError("no g++ here")

    monkeypatch.setattr(custom_ops, "load_kernels", broken)
    with pytest.raises(KernelsError, match="crisp::rowmajor_linear.out.*no g\\+\\+ here"):
        EtLMSession(b)


@pytest.mark.slow
def test_cpp_runner_generates_through_decode(bundle, tmp_path):
    """The C++ runner (crisp-edge's kernels compiled in) checks the decode method's signature and generates
    each task's session tokens with it."""
    from runtime_tests.executorch.test_runner import RUNNER_DIR

    _, _, b = bundle
    exe = tmp_path / "crisp_et_runner"
    r = subprocess.run(["bash", str(RUNNER_DIR / "build.sh"), sys.executable, str(exe)], capture_output=True,
                       text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    out.mkdir()
    prompt = [5, 9, 3, 7]
    r = subprocess.run([str(exe), str(b.path), str(out), "--generate", ",".join(map(str, prompt)), "--max-new-tokens",
                        "10", "--task", "alpha", "--task", "beta"], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    sess = b.session(threads=1)
    for task in TASKS:
        want = sess.generate(prompt, 10, task=task, stop_at_eos=False)["token_ids"]
        assert (out / f"tokens.{task}.txt").read_text().strip() == ",".join(map(str, want)), task

"""Fuzzed loaders: mutated mixer files, checkpoints and configs get crisp-edge's own errors, never a
crash, a hang or an untyped exception (KeyError, struct.error, RecursionError, MemoryError, ...).

Two kinds of test over the same loaders: hypothesis properties (inputs that shrink to a minimal
failing case), and seeded mutation loops from ``tests/fuzzing.py`` (volume: the slow run feeds the
loaders more than 10,000 files; ``bench/reliability.py`` runs the same loops and records them).
"""
from __future__ import annotations

import copy
import json
import struct
from datetime import timedelta
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crisp_edge import CrispConfig
from crisp_edge.errors import CrispEdgeError, MixerFileError
from crisp_edge.files.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint
from crisp_edge.files.io import sha256_bytes
from crisp_edge.files.mixers import META_KEY, _data_digest, apply_mixers_, parse_mixers
from tests import fuzzing
from tests.fuzzing import (
    CASE_TIME_LIMIT_S,
    dumps,
    join_safetensors,
    split_safetensors,
    time_limit,
)

# Property runs: a deadline per example, no example database written into the repository.
_SETTINGS = dict(deadline=timedelta(seconds=CASE_TIME_LIMIT_S), database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAST_EXAMPLES, SLOW_EXAMPLES = 40, 1000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
byte_edits = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                                st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)), min_size=1, max_size=4)


def only_typed_errors(fn) -> None:
    """Run one loader call: a result or a CrispEdgeError pass, anything else (or a hang) fails."""
    try:
        with time_limit(CASE_TIME_LIMIT_S):
            fn()
    except CrispEdgeError:
        pass


def apply_edits(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for op, at, payload in edits:
        i = at % (len(buf) + 1)
        if op == "flip" and buf:
            buf[i % len(buf)] ^= payload[0] or 1
        elif op == "set" and buf:
            buf[i % len(buf)] = payload[0]
        elif op == "insert":
            buf[i:i] = payload
        elif op == "delete":
            del buf[i:i + len(payload)]
        else:
            del buf[i:]
    return bytes(buf)


@lru_cache(maxsize=1)
def _artifacts():
    """A CRISP toy, its valid mixer files and checkpoint (built once; treat as read-only)."""
    import tempfile
    from pathlib import Path

    model = fuzzing.crisp_toy()
    folder = Path(tempfile.mkdtemp(prefix="crisp-fuzz-"))
    mixers = fuzzing.valid_mixer_files(model, folder)
    checkpoint = fuzzing.valid_checkpoint(model, folder / "valid")
    return model, mixers, checkpoint


@pytest.fixture(scope="module")
def artifacts():
    return _artifacts()


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("case")


def write_checkpoint(folder, files):
    for name in (META_FILE, WEIGHTS_FILE):
        (folder / name).unlink(missing_ok=True)
        if name in files:
            (folder / name).write_bytes(files[name])
    return folder


# --- hypothesis properties ----------------------------------------------------------------------------
def _mixer_bytes(examples):
    @settings(max_examples=examples, **_SETTINGS)
    @given(which=st.integers(0, 3), edits=byte_edits)
    def check(artifacts, which, edits):
        model, mixers, _ = artifacts
        data = apply_edits(mixers[which], edits)
        only_typed_errors(lambda: apply_mixers_(copy.deepcopy(model), parse_mixers(data)))
    return check


def _mixer_random_bytes(examples):
    @settings(max_examples=examples, **_SETTINGS)
    @given(head=st.sampled_from([b"", b"\x00" * 8, struct.pack("<Q", 2), struct.pack("<Q", 1 << 63)]),
           data=st.binary(max_size=600))
    def check(head, data):
        only_typed_errors(lambda: parse_mixers(head + data))
    return check


def _mixer_metadata(examples):
    @settings(max_examples=examples, **_SETTINGS)
    @given(which=st.integers(0, 3), key=st.sampled_from(["format", "version", "task", "layout", "bases_sha256", "dtype",
                                                         "storage_dtype", "data_sha256", "labels", "extra", "new"]),
           value=json_values, drop=st.booleans())
    def check(artifacts, which, key, value, drop):
        model, mixers, _ = artifacts
        header, body = split_safetensors(mixers[which])
        meta = json.loads(header["__metadata__"][META_KEY])
        if drop:
            meta.pop(key, None)
        else:
            meta[key] = value
        header["__metadata__"][META_KEY] = dumps(meta).decode("utf-8", "surrogatepass")
        data = join_safetensors(header, body)
        only_typed_errors(lambda: apply_mixers_(copy.deepcopy(model), parse_mixers(data)))
    return check


def _mixer_lying_tensors(examples):
    """Well-formed files (hash recomputed) whose tensors have any shape, dtype or values."""
    @settings(max_examples=examples, **_SETTINGS)
    @given(which=st.integers(0, 3), pick=st.integers(0, 100), shape=st.lists(st.integers(0, 7), max_size=4),
           dtype=st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.bool]),
           fill=st.floats(allow_nan=True, allow_infinity=True), rename=st.sampled_from([None, "junk", "head.bias", "mixer.x"]))
    def check(artifacts, which, pick, shape, dtype, fill, rename):
        model, mixers, _ = artifacts
        header, _ = split_safetensors(mixers[which])
        meta = json.loads(header["__metadata__"][META_KEY])
        tensors = dict(st_load(mixers[which]))
        name = sorted(tensors)[pick % len(tensors)]
        tensors[rename or name] = torch.full(shape, fill if dtype.is_floating_point else 1, dtype=torch.float64).to(dtype)
        meta["data_sha256"] = _data_digest(tensors)
        data = st_save(tensors, metadata={META_KEY: json.dumps(meta)})
        only_typed_errors(lambda: apply_mixers_(copy.deepcopy(model), parse_mixers(data)))
    return check


def _checkpoint_meta(examples):
    @settings(max_examples=examples, **_SETTINGS)
    @given(data=st.data(), value=json_values)
    def check(artifacts, case_dir, data, value):
        _, _, files = artifacts
        meta = json.loads(files[META_FILE])
        paths = [p for p in fuzzing._paths(meta) if p and p[0] != "tensors"] + [("tensors",), ("tensors", "head.bias")]
        path = data.draw(st.sampled_from(paths))
        parent = meta
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = value
        write_checkpoint(case_dir, {**files, META_FILE: dumps(meta)})
        only_typed_errors(lambda: load_checkpoint(case_dir))
    return check


def _checkpoint_bytes(examples):
    @settings(max_examples=examples, **_SETTINGS)
    @given(which=st.sampled_from([META_FILE, WEIGHTS_FILE]), edits=byte_edits, vouch=st.booleans())
    def check(artifacts, case_dir, which, edits, vouch):
        _, _, files = artifacts
        case = {**files, which: apply_edits(files[which], edits)}
        if vouch and which == WEIGHTS_FILE:  # crisp.json vouches for the damaged weights: the parser must cope
            meta = json.loads(files[META_FILE])
            meta["weights"].update(bytes=len(case[WEIGHTS_FILE]), sha256=sha256_bytes(case[WEIGHTS_FILE]))
            case[META_FILE] = dumps(meta)
        write_checkpoint(case_dir, case)
        only_typed_errors(lambda: load_checkpoint(case_dir))
    return check


def _config_any_json(examples):
    @settings(max_examples=examples, **_SETTINGS)
    @given(value=json_values, base=st.sampled_from(fuzzing.VALID_CONFIGS), key=st.sampled_from(
        ["format", "version", "default", "roles", "targets", "gate_init_max", "other"]), inner=st.booleans())
    def check(value, base, key, inner):
        only_typed_errors(lambda: CrispConfig.from_dict(value))
        d = base.to_dict()
        if inner and key in ("default", "roles"):
            d["default"][("s", "r", "group_size", "gate", "placement", "x")[len(str(value)) % 6]] = value
        else:
            d[key] = value
        only_typed_errors(lambda: CrispConfig.from_dict(d))
        only_typed_errors(lambda: CrispConfig.from_json(dumps(d).decode("utf-8", "surrogatepass")))
    return check


def _config_text(examples):
    @settings(max_examples=examples, **_SETTINGS)
    @given(text=st.text(max_size=200) | st.binary(max_size=200) | st.builds(lambda n: "[" * n, st.integers(0, 100000)))
    def check(text):
        only_typed_errors(lambda: CrispConfig.from_json(text))
    return check


PROPERTIES = {"mixer_bytes": _mixer_bytes, "mixer_random_bytes": _mixer_random_bytes, "mixer_metadata": _mixer_metadata,
              "mixer_lying_tensors": _mixer_lying_tensors, "checkpoint_meta": _checkpoint_meta,
              "checkpoint_bytes": _checkpoint_bytes, "config_any_json": _config_any_json, "config_text": _config_text}
for _name, _make in PROPERTIES.items():
    globals()[f"test_{_name}"] = pytest.mark.timeout(300)(_make(FAST_EXAMPLES))
    globals()[f"test_{_name}_slow"] = pytest.mark.slow(pytest.mark.timeout(1800)(_make(SLOW_EXAMPLES)))


# --- seeded mutation loops ------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_mutation_loops_fast(artifacts):
    model = copy.deepcopy(artifacts[0])
    for tally in (fuzzing.fuzz_mixers(150, seed=0, model=model), fuzzing.fuzz_checkpoints(60, seed=0, model=model),
                  fuzzing.fuzz_configs(300, seed=0), fuzzing.fuzz_run_states(40, seed=0, model=model)):
        tally.assert_clean()
        assert tally.refused > tally.cases // 2, tally.to_dict()  # the mutations do reach the checks


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_mutation_loops_slow(artifacts):
    model = copy.deepcopy(artifacts[0])
    tallies = [fuzzing.fuzz_mixers(6000, seed=1, model=model), fuzzing.fuzz_checkpoints(2000, seed=1, model=model),
               fuzzing.fuzz_configs(3000, seed=1), fuzzing.fuzz_run_states(1000, seed=1, model=model)]
    for tally in tallies:
        tally.assert_clean()
    assert sum(t.cases for t in tallies) >= 10_000


# --- the escapes found by fuzzing, one regression test each ----------------------------------------------
def test_zero_dim_tensor_in_mixer_file(artifacts):
    _, mixers, _ = artifacts
    header, _ = split_safetensors(mixers[0])
    meta = json.loads(header["__metadata__"][META_KEY])
    tensors = {**st_load(mixers[0]), "head.bias": torch.tensor(1.0)}
    meta["data_sha256"] = _data_digest(tensors)  # was: RuntimeError (a 0-dim tensor cannot be viewed as bytes)
    with pytest.raises(MixerFileError, match="head.bias has shape"):
        parse_mixers(st_save(tensors, metadata={META_KEY: json.dumps(meta)}))


@pytest.mark.parametrize("raw, message", [("[" * 100000, "RecursionError"), ("1" * 5000, "ValueError")])
def test_mixer_metadata_that_breaks_the_json_parser(artifacts, raw, message):
    header, body = split_safetensors(artifacts[1][0])
    header["__metadata__"][META_KEY] = raw
    with pytest.raises(MixerFileError, match=message):
        parse_mixers(join_safetensors(header, body))


def test_head_bias_that_disagrees_with_the_head(artifacts):
    model, mixers, _ = artifacts
    header, _ = split_safetensors(mixers[1])
    meta = json.loads(header["__metadata__"][META_KEY])
    tensors = {**st_load(mixers[1]), "head.bias": torch.zeros(5)}  # was: RuntimeError inside apply_mixers_
    meta["data_sha256"] = _data_digest(tensors)
    with pytest.raises(MixerFileError, match=r"head.bias has shape \(5,\), head.weight has 3 classes"):
        apply_mixers_(copy.deepcopy(model), parse_mixers(st_save(tensors, metadata={META_KEY: json.dumps(meta)})))


@pytest.mark.parametrize("value", [[1], {"s": 4}, "ab", 3.5])
def test_config_fields_of_the_wrong_json_type(value):
    d = CrispConfig().to_dict()
    for key in ("roles", "targets"):
        with pytest.raises(CrispEdgeError):
            CrispConfig.from_dict({**d, key: value})
    with pytest.raises(CrispEdgeError, match="gate must be one of"):
        CrispConfig.from_dict({**d, "default": {**d["default"], "gate": [value]}})  # was: TypeError unhashable


@pytest.mark.parametrize("text", [b"\xff{}", "[" * 100000, "1" * 5000, 12])
def test_config_json_that_breaks_the_parser(text):
    with pytest.raises(CrispEdgeError):
        CrispConfig.from_json(text)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["kwargs"].update(checkpoint_path="/tmp/evil.pth"), r"source sets \['checkpoint_path'\]"),
    (lambda s: s["kwargs"].update(depth=100000), "records depth=100000 but the weights hold 4 blocks"),
    (lambda s: s["kwargs"].update(embed_dim=1 << 40), "-bit number, beyond any architecture setting"),
    (lambda s: s["kwargs"].update(embed_dim=20000), "config implies .* CRISP factor values"),
    # a 12 GB head: refused on the meta-device skeleton, before anything is allocated
    (lambda s: s["kwargs"].update(num_classes=10**8), r"head.weight: file has shape \(4, 32\), config implies \(100000000, 32\)"),
    (lambda s: s["kwargs"].update(patch_size=0), "cannot build the recorded architecture"),
    (lambda s: s.update(kwargs=[1]), "source field 'kwargs' must be a dict"),
    (lambda s: s.update(name="vit_tiny_patch16_2240"), "cannot build the recorded architecture"),
])
def test_checkpoint_sources_that_would_misbuild(artifacts, case_dir, edit, message):
    _, _, files = artifacts
    meta = json.loads(files[META_FILE])
    edit(meta["source"])
    write_checkpoint(case_dir, {**files, META_FILE: dumps(meta)})
    with pytest.raises(CrispEdgeError, match=message):
        load_checkpoint(case_dir)


def test_checkpoint_config_implying_huge_factors(artifacts, case_dir):
    _, _, files = artifacts
    meta = json.loads(files[META_FILE])
    meta["config"]["default"]["r"] = 1 << 40  # was: convert_ asked the allocator for terabytes
    write_checkpoint(case_dir, {**files, META_FILE: dumps(meta)})
    with pytest.raises(CrispEdgeError, match="the config implies .* CRISP factor values"):
        load_checkpoint(case_dir)


@pytest.mark.parametrize("name, message", [("model\x00.safetensors", "not a plain relative path"), (7, "must be a string"),
                                           ("/etc/passwd", "not a plain relative path"), ("sub/../../x", "not a plain relative path")])
def test_checkpoint_weights_file_names(artifacts, case_dir, name, message):
    _, _, files = artifacts
    meta = json.loads(files[META_FILE])
    meta["weights"]["file"] = name
    write_checkpoint(case_dir, {**files, META_FILE: dumps(meta)})
    with pytest.raises(CrispEdgeError, match=message):
        load_checkpoint(case_dir)


def test_checkpoint_tensor_list_and_values_are_checked(artifacts, case_dir):
    _, _, files = artifacts
    meta = json.loads(files[META_FILE])
    tensors = dict(st_load(files[WEIGHTS_FILE]))
    tensors["norm.weight"] = tensors["norm.weight"].clone()
    tensors["norm.weight"][0] = float("nan")
    weights = st_save(tensors)
    meta["weights"].update(bytes=len(weights), sha256=sha256_bytes(weights))
    write_checkpoint(case_dir, {META_FILE: dumps(meta), WEIGHTS_FILE: weights})
    with pytest.raises(CrispEdgeError, match=r"NaN or Inf values in \['norm.weight'\]"):
        load_checkpoint(case_dir)
    meta["tensors"]["norm.weight"]["shape"] = [31]
    write_checkpoint(case_dir, {META_FILE: dumps(meta), WEIGHTS_FILE: weights})
    with pytest.raises(CrispEdgeError, match=r"does not hold the tensors crisp.json lists .*norm.weight"):
        load_checkpoint(case_dir)


def test_run_state_with_misshapen_optimizer_moments_or_parameters(artifacts, tmp_path):
    """Were: a RuntimeError inside Adam mid-training, and a silent broadcast into the parameters."""
    from crisp_edge.files.run_state import RUN_STATE_FILE
    from crisp_edge.training.adapt import adapt_

    model = artifacts[0]
    base = fuzzing._state_at(model, tmp_path, 7, 1)
    header, _ = split_safetensors(base)
    x, y, config = fuzzing._tiny_adaptation()
    for name, value, message in [("optim.0.exp_avg", torch.tensor(0.0), "neither a scalar for every parameter"),
                                 ("param.1", torch.zeros(1), r"the saved parameter 1 is \(\(1,\), torch.float32\)")]:
        tensors = {**st_load(base), name: value}
        (tmp_path / RUN_STATE_FILE).write_bytes(st_save(tensors, metadata=header["__metadata__"]))
        with pytest.raises(CrispEdgeError, match=message):
            adapt_(copy.deepcopy(model), x, y, num_classes=3, config=config, progress=False, checkpoint_dir=tmp_path,
                   resume=True)


def test_unreadable_paths_get_typed_errors(tmp_path):
    """Were: IsADirectoryError and ValueError (a NUL byte in a path) out of read_json and read_mixers."""
    from crisp_edge.errors import CheckpointError
    from crisp_edge.files.io import read_json
    from crisp_edge.files.mixers import read_mixers

    (tmp_path / "c" / META_FILE).mkdir(parents=True)
    with pytest.raises(CheckpointError, match="cannot be read .*IsADirectoryError"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(CheckpointError, match="cannot be read .*ValueError"):
        read_json(tmp_path / "a\x00b.json", CheckpointError, "metadata")
    with pytest.raises(MixerFileError, match="cannot be read .*ValueError"):
        read_mixers(tmp_path / "a\x00b.safetensors")

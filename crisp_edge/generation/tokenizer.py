"""The tokenizer a language-model bundle carries: ``tokenizer.json`` (the Hugging Face ``tokenizers``
format: JSON, loaded without executing code) plus a record in the manifest pinning its SHA-256, vocabulary
size and special ids, so a bundle never decodes with a tokenizer it was not exported with.

    record = write_tokenizer(hf_tokenizer, bundle_folder)      # at export; goes into manifest["tokenizer"]
    tok = BundleTokenizer.load(bundle_folder, record)          # at generation; verified
    ids = tok.encode("In the beginning"); text = tok.decode(ids)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from crisp_edge.errors import ConfigError, DataError
from crisp_edge.files.io import read_regular

TOKENIZER_FILE = "tokenizer.json"
#: Largest tokenizer.json read (SmolLM2's is 2 MB; Llama 3's 9 MB).
MAX_TOKENIZER_BYTES = 64 << 20


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _special_ids(hf_tokenizer: Any, model_config: Any = None) -> tuple[int | None, list[int]]:
    bos = getattr(hf_tokenizer, "bos_token_id", None)
    eos: list[int] = []
    for src in (getattr(model_config, "eos_token_id", None), getattr(hf_tokenizer, "eos_token_id", None)):
        for v in (src if isinstance(src, (list, tuple)) else [src]):
            if isinstance(v, int) and v not in eos:
                eos.append(v)
    return (int(bos) if isinstance(bos, int) else None), eos


def write_tokenizer(hf_tokenizer: Any, folder: str | Path, model_config: Any = None) -> dict[str, Any]:
    """Write ``hf_tokenizer`` (a Hugging Face *fast* tokenizer, or a ``tokenizers.Tokenizer``) as
    ``folder/tokenizer.json``; returns the manifest record (file, sha256, vocab_size, bos_id, eos_ids)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", hf_tokenizer)
    if not hasattr(backend, "to_str"):
        raise ConfigError(f"{type(hf_tokenizer).__name__} is not a fast tokenizer: load it with "
                          "AutoTokenizer.from_pretrained(..., use_fast=True) so it can be stored as tokenizer.json.")
    data = backend.to_str().encode("utf-8")
    path = Path(folder) / TOKENIZER_FILE
    path.write_bytes(data)
    bos, eos = _special_ids(hf_tokenizer, model_config)
    return {"file": TOKENIZER_FILE, "sha256": _sha256(data), "vocab_size": int(backend.get_vocab_size()),
            "bos_id": bos, "eos_ids": eos}


@dataclass
class BundleTokenizer:
    """A verified ``tokenizers.Tokenizer`` with the bundle's special ids."""

    backend: Any
    record: dict[str, Any]

    @classmethod
    def load(cls, folder: str | Path, record: dict[str, Any], model_vocab: int | None = None) -> "BundleTokenizer":
        """Read and verify ``folder/<record['file']>`` (size cap, SHA-256, vocabulary within the model's)."""
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise DataError(f"{folder}: the manifest's tokenizer record is missing or malformed; re-export the bundle.")
        name = record.get("file", TOKENIZER_FILE)
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise DataError(f"{folder}: tokenizer file name {name!r} is not a plain file name; re-export the bundle.")
        path = Path(folder) / name
        data = read_regular(path, DataError, "the bundle's tokenizer", MAX_TOKENIZER_BYTES)
        if _sha256(data) != record["sha256"]:
            raise DataError(f"{path} does not match the tokenizer this bundle was exported with (SHA-256 differs); "
                            "restore the bundle's own tokenizer.json or re-export.")
        return cls.from_bytes(data, record, str(path), model_vocab)

    @classmethod
    def from_file(cls, path: str | Path, record: dict[str, Any] | None = None,
                  model_vocab: int | None = None) -> "BundleTokenizer":
        """A user's ``tokenizer.json`` (e.g. ``generate --tokenizer``); with ``record`` it must be the same
        tokenizer the bundle was exported with (same vocabulary size and special ids; content may differ in
        formatting)."""
        data = read_regular(path, DataError, "tokenizer", MAX_TOKENIZER_BYTES)
        tok = cls.from_bytes(data, record or {}, str(path), model_vocab)
        if record:
            vocab = tok.backend.get_vocab_size()
            if vocab != record.get("vocab_size"):
                raise DataError(f"{path}: a tokenizer with {vocab} tokens does not match the bundle's "
                                f"({record.get('vocab_size')}); use the tokenizer the model was exported with.")
        return tok

    @classmethod
    def from_bytes(cls, data: bytes, record: dict[str, Any], where: str, model_vocab: int | None) -> "BundleTokenizer":
        from tokenizers import Tokenizer

        try:
            json.loads(data)
            backend = Tokenizer.from_str(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, Exception) as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise DataError(f"{where}: not a valid tokenizer.json ({type(e).__name__}: {str(e)[:200]}).") from None
        vocab = backend.get_vocab_size()
        if model_vocab is not None and vocab > model_vocab:
            raise DataError(f"{where}: the tokenizer has {vocab} tokens but the model only {model_vocab} logits: "
                            "it belongs to another model.")
        return cls(backend=backend, record=dict(record))

    @property
    def eos_ids(self) -> list[int]:
        return [int(t) for t in self.record.get("eos_ids") or []]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` without the tokenizer's own post-processing; ``add_bos`` prepends the BOS id."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.record.get("bos_id")
        return ([int(bos)] if add_bos and isinstance(bos, int) else []) + list(ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def streamer(self):
        """A callable ``push(id) -> new text`` for streaming: decodes everything so far and returns what
        was added, so multi-byte characters split across tokens come out whole."""
        ids: list[int] = []
        shown = [""]

        def push(token: int) -> str:
            ids.append(int(token))
            text = self.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return ""
            new = text[len(shown[0]):]
            shown[0] = text
            return new

        return push

"""English prose from Debian packages, for language-model calibration and held-out evaluation.

Calibrating a compressed LM on one book teaches it that book (DESIGN.md section 7: a KJV-calibrated
SmolLM2 judged on other English is twice as far off as on the KJV). So calibration takes a mix of styles
and evaluation texts of styles the mix does not hold:

    calib = calibration_mix()          # dasher + debian-reference + jargon, interleaved, equal shares
    held = heldout_texts()             # devil, fortunes, kjv-nt: none of them in the mix
    ids = tokenize(tok, calib.text, max_tokens=65536)      # crisp_edge.models.causal_lm

Every text is clean UTF-8, one paragraph a line (hard-wrapped lines joined, markup, tables, headings
and code-like lines dropped), and records its source and character count. ``ENGLISH_SOURCES`` lists the
sources with their Debian package, style and licence.
"""
from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from crisp_edge.data.corpora import fortune_files, read_fortune_file
from crisp_edge.errors import DataError

_BOX = re.compile(r"[\u2500-\u257f]")  # box-drawing characters (rules, table frames)
_WS = re.compile(r"\s+")
_CLOSING = tuple(".!?;:)\"'\u201d\u2019")


@dataclass(frozen=True)
class EnglishText:
    """Clean prose: ``text`` (one paragraph a line), where it came from, ``chars == len(text)`` and, for a
    mix, the characters taken from each source."""

    name: str
    text: str
    source: str
    chars: int
    parts: dict[str, int] = field(default_factory=dict)


def clean_prose(raw: str, *, paragraphs: str = "blank", min_chars: int = 40, min_letters: float = 0.75) -> str:
    """Plain prose from plain text: paragraphs split at blank lines (``paragraphs="blank"``) or one a line
    (``"line"``), each unwrapped to one line and whitespace-normalised. Dropped: table lines (starting
    with ``|`` or ``+-``, or holding box-drawing characters); paragraphs shorter than ``min_chars``, or
    shorter than 80 characters without closing punctuation (headings, table-of-contents entries);
    paragraphs starting with a shell prompt (``$ ``, ``# ``); and those where letters and spaces are under
    ``min_letters`` of the characters (code, paths, listings)."""
    if paragraphs not in ("blank", "line"):
        raise DataError(f"paragraphs must be 'blank' or 'line', got {paragraphs!r}.")
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    blocks = re.split(r"\n[ \t]*\n", raw) if paragraphs == "blank" else raw.split("\n")
    out = []
    for block in blocks:
        lines = [l for l in block.split("\n") if not (_BOX.search(l) or l.lstrip().startswith(("|", "+-")))]
        para = _WS.sub(" ", " ".join(lines)).strip()
        if len(para) < min_chars or (len(para) < 80 and not para.endswith(_CLOSING)):
            continue
        if para.startswith(("$ ", "# ")) or sum(c.isalpha() or c == " " for c in para) < min_letters * len(para):
            continue
        out.append(para)
    return "\n".join(out)


def _read(path: Path, package: str) -> str:
    if not path.is_file():
        raise DataError(f"{path} is missing: install it with `sudo apt-get update && sudo apt-get install -y "
                        f"--no-install-recommends {package}` (`make setup` installs it). If the package is "
                        f"installed, check that dpkg does not exclude the path (/etc/dpkg/dpkg.cfg.d/).")
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):  # dictzip files are gzip files
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _b64(s: str) -> int:
    """A number in dictd's index encoding (base64 digits, most significant first)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for c in s:
        n = n * 64 + alphabet.index(c)
    return n


def read_dict_entries(index: str, body: str) -> list[str]:
    """The entries of a dictd database (``.index`` lines ``headword<TAB>offset<TAB>length``, base64 numbers,
    byte ranges of the uncompressed ``.dict``), in file order, without the ``00database*`` metadata."""
    data = body.encode("utf-8")
    spans = set()
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00database", "00-database")):
            continue
        spans.add((_b64(parts[1]), _b64(parts[2])))
    return [data[o:o + n].decode("utf-8", errors="replace") for o, n in sorted(spans)]


def _devil(root: Path) -> str:
    folder = root / "usr/share/dictd"
    entries = read_dict_entries(_read(folder / "devil.index", "dict-devil"),
                                _read(folder / "devil.dict.dz", "dict-devil"))
    text = "\n\n".join(entries).replace("{", "").replace("}", "").replace("_", "")
    return clean_prose(text)


def _jargon(root: Path) -> str:
    text = _read(root / "usr/share/doc/jargon-text/jargon.txt.gz", "jargon-text")
    return clean_prose(text.replace("{", "").replace("}", ""))


def _debian_reference(root: Path) -> str:
    return clean_prose(_read(root / "usr/share/debian-reference/debian-reference.en.txt.gz", "debian-reference-en"))


def _dasher(root: Path) -> str:
    return clean_prose(_read(root / "usr/share/dasher/training_english_GB.txt", "dasher-data"), paragraphs="line",
                       min_chars=1)


def _fortunes(root: Path) -> str:
    folder = root / "usr/share/games/fortunes"
    files = fortune_files(folder)
    if not files:
        _read(folder / "fortunes", "fortunes fortunes-min")  # raises the install hint
    seen, out = set(), []
    for p in files:
        for t in read_fortune_file(p):
            if t not in seen:
                seen.add(t)
                out.append(t)
    return "\n".join(out)


@lru_cache(maxsize=1)
def _kjv():
    from crisp_edge.models.causal_lm import load_kjv
    return load_kjv()


@dataclass(frozen=True)
class EnglishSource:
    name: str
    package: str
    style: str
    licence: str
    read: Callable[[Path], str]


ENGLISH_SOURCES: dict[str, EnglishSource] = {s.name: s for s in (
    EnglishSource("dasher", "dasher-data", "general English: shuffled sentences of fiction (Alice in "
                  "Wonderland ...), news and popular science (Dasher's training text)", "GPL-2+", _dasher),
    EnglishSource("debian-reference", "debian-reference-en", "technical documentation (Debian Reference, "
                  "system administration guide)", "GPL-2+", _debian_reference),
    EnglishSource("jargon", "jargon-text", "informal lexicon and essays (the Jargon File 4.4.7, hacker slang "
                  "and folklore)", "public domain", _jargon),
    EnglishSource("devil", "dict-devil", "literature: satire, 1881-1906 (Ambrose Bierce, The Devil's "
                  "Dictionary), prose definitions and verse", "public domain", _devil),
    EnglishSource("fortunes", "fortunes fortunes-min", "quotations, jokes, dialogue, verse (fortune "
                  "cookies, all files)", "public domain / BSD (see the package's copyright)", _fortunes),
    EnglishSource("kjv-ot", "bible-kjv", "King James Bible, Old Testament (the calibration half of "
                  "crisp_edge.models.causal_lm.load_kjv)", "public domain", lambda root: _kjv().calibration),
    EnglishSource("kjv-nt", "bible-kjv", "King James Bible, New Testament (the held-out half of "
                  "crisp_edge.models.causal_lm.load_kjv)", "public domain", lambda root: _kjv().heldout),
)}
CALIBRATION_SOURCES = ("dasher", "debian-reference", "jargon")
HELDOUT_SOURCES = ("devil", "fortunes", "kjv-nt")


def load_english(name: str, *, root: str | Path = "/") -> EnglishText:
    """Source ``name`` of ``ENGLISH_SOURCES`` as clean prose in its own order. ``root`` is where the
    Debian file tree starts (tests; the KJV sources always run ``bible``)."""
    if name not in ENGLISH_SOURCES:
        raise DataError(f"Unknown English source {name!r}; known: {', '.join(ENGLISH_SOURCES)}.")
    s = ENGLISH_SOURCES[name]
    text = s.read(Path(root))
    if not text.strip():
        raise DataError(f"English source {name!r} came out empty; reinstall Debian {s.package}.")
    return EnglishText(name, text, f"Debian {s.package}: {s.style}", len(text), {name: len(text)})


def chunks(text: str, chunk_chars: int = 2000) -> list[str]:
    """Consecutive paragraphs (lines) grouped into pieces of about ``chunk_chars`` (a longer paragraph
    is a piece alone)."""
    out, cur, n = [], [], 0
    for para in text.split("\n"):
        if cur and n + len(para) > chunk_chars:
            out.append("\n".join(cur))
            cur, n = [], 0
        cur.append(para)
        n += len(para) + 1
    if cur:
        out.append("\n".join(cur))
    return out


def _hash_order(pieces: list[str]) -> list[str]:
    return sorted(pieces, key=lambda p: (hashlib.sha256(p.encode("utf-8")).digest(), p))


def _pick(text: str, max_chars: int | None, chunk_chars: int) -> list[str]:
    out, n = [], 0
    for c in _hash_order(chunks(text, chunk_chars)):
        if out and max_chars is not None and n + len(c) + 1 > max_chars:
            break
        out.append(c)
        n += len(c) + 1
    return out


def spread(text: str, max_chars: int | None = None, chunk_chars: int = 2000) -> str:
    """``text`` cut into chunks and put in a fixed hash order, so any prefix samples the whole source;
    chunks are taken while the total stays within ``max_chars`` (at least one)."""
    return "\n".join(_pick(text, max_chars, chunk_chars))


def calibration_mix(sources: tuple[str, ...] = CALIBRATION_SOURCES, *, chars_per_source: int | None = None,
                    chunk_chars: int = 2000, root: str | Path = "/") -> EnglishText:
    """A deterministic mix for calibration: from each source, chunks of about ``chunk_chars`` in hash order
    (spread over the whole source) up to ``chars_per_source`` (default: the smallest source's size, so
    every source weighs the same), interleaved round-robin so that any prefix of the mix holds every
    source. Held-out sources (``HELDOUT_SOURCES``) are refused."""
    if not sources:
        raise DataError("calibration_mix needs at least one source.")
    held = [s for s in sources if s in HELDOUT_SOURCES]
    if held:
        raise DataError(f"{held} are held-out evaluation texts (HELDOUT_SOURCES); calibrating on them would "
                        f"leak the evaluation. Choose among: "
                        f"{', '.join(s for s in ENGLISH_SOURCES if s not in HELDOUT_SOURCES)}.")
    texts = [load_english(s, root=root) for s in dict.fromkeys(sources)]
    budget = chars_per_source if chars_per_source is not None else min(t.chars for t in texts)
    pieces = [_pick(t.text, budget, chunk_chars) for t in texts]
    mixed = [pieces[j][i] for i in range(max(map(len, pieces))) for j in range(len(pieces)) if i < len(pieces[j])]
    text = "\n".join(mixed)
    parts = {t.name: len("\n".join(p)) for t, p in zip(texts, pieces)}
    return EnglishText("calibration-mix", text, "mix of " + ", ".join(
        f"{t.name} (Debian {ENGLISH_SOURCES[t.name].package})" for t in texts), len(text), parts)


def heldout_texts(*, max_chars: int | None = None, spread_chunks: bool = True, chunk_chars: int = 2000,
                  root: str | Path = "/") -> dict[str, EnglishText]:
    """The evaluation texts, none of them in the default calibration mix: ``HELDOUT_SOURCES``. With
    ``spread_chunks`` (default) each is in fixed hash order of its chunks, so a perplexity over the first
    tokens samples the whole text (``spread_chunks=False, max_chars=None`` gives ``kjv-nt`` exactly as
    ``load_kjv().heldout``); ``max_chars`` caps each."""
    out = {}
    for name in HELDOUT_SOURCES:
        t = load_english(name, root=root)
        text = spread(t.text, max_chars, chunk_chars) if spread_chunks else t.text[:max_chars]
        out[name] = EnglishText(name, text, t.source, len(text), {name: len(text)})
    return out

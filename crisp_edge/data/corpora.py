"""Real labelled English text that installs offline from Debian packages (DESIGN.md section 7).

    task = load_text_task("wordnet-nouns", max_train=4000, max_test=2000)
    task.labels[task.train[0][1]]              # 'noun.artifact', ...
    write_jsonl(task, "data/wordnet-nouns")    # train.jsonl / val.jsonl / test.jsonl: {"text", "label"}

``wordnet-nouns`` / ``wordnet-verbs``  WordNet 3.0 glosses (Debian ``wordnet-base``: ``data.noun`` /
    ``data.verb``), each labelled with its synset's lexicographer file (the supersense: 26 noun.* and
    15 verb.* classes, the 2nd field of a synset line). The text is the whole gloss after ``| ``
    (definition plus any quoted examples).
``fortunes``  fortune-cookie topics (Debian ``fortunes`` + ``fortunes-min``): each fortune labelled
    with its file name; only files holding at least 100 fortunes (after de-duplication) are kept.

Every text is whitespace-normalised; empty texts are dropped, and so is every copy of a text that
appears under two different labels (ambiguous); a repeat under one label is kept once. The split is a
function of the text alone: ``sha256(utf-8 text)`` -> a bucket in [0, 1), train below 0.7, validation
below 0.8, test above, so the same text lands in the same split on every machine and Python version.
The test split is for the final report only: choose nothing (learning rates, epochs) on it.
Caps (``max_train`` ...) keep the items with the smallest hash (optionally round-robin over classes,
``balanced=True``), so a smaller cap is a subset of a larger one. Each split is listed in hash order.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from crisp_edge.errors import DataError

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
#: (train, validation, test) fractions of the hash buckets.
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
SPLITS = ("train", "val", "test")
MIN_FORTUNES = 100

#: WordNet lexicographer files (lexnames(5WN)): number -> name. 3..28 are nouns, 29..43 verbs.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
NOUN_CLASSES = LEXNAMES[3:29]
VERB_CLASSES = LEXNAMES[29:44]

Example = tuple[str, int]


@dataclass
class TextTask:
    """A labelled text task: ``labels[i]`` names class ``i``; each split lists ``(text, class index)``."""

    name: str
    labels: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    source: str

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise DataError(f"Unknown split {name!r}; splits are {', '.join(SPLITS)}.")
        return getattr(self, name)

    def counts(self) -> dict[str, list[int]]:
        """Examples per class in each split: ``{"train": [n_class0, ...], "val": ..., "test": ...}``."""
        out = {}
        for s in SPLITS:
            c = [0] * len(self.labels)
            for _, y in self.split(s):
                c[y] += 1
            out[s] = c
        return out


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space and strip the ends."""
    return " ".join(text.split())


def text_bucket(text: str) -> float:
    """A number in [0, 1) fixed by the UTF-8 bytes of ``text`` (the first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_of(text: str, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for ``text`` by its hash bucket."""
    b = text_bucket(text)
    return "train" if b < fractions[0] else "val" if b < fractions[0] + fractions[1] else "test"


def dedupe(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(text, label)`` pairs, whitespace-normalised: empty texts dropped, a text repeated under one label
    kept once (first place), a text found under two or more labels dropped entirely."""
    first: dict[str, str] = {}
    ambiguous: set[str] = set()
    for text, label in pairs:
        text = normalize_text(text)
        if not text:
            continue
        if text in first and first[text] != label:
            ambiguous.add(text)
        first.setdefault(text, label)
    return [(t, l) for t, l in first.items() if t not in ambiguous]


def hash_split(examples: Iterable[Example],
               fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> dict[str, list[Example]]:
    """Partition by text hash into ``{"train", "val", "test"}``, each in hash order (ties by text)."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {fractions!r}.")
    out: dict[str, list[tuple[float, str, int]]] = {s: [] for s in SPLITS}
    for text, y in examples:
        out[split_of(text, fractions)].append((text_bucket(text), text, y))
    return {s: [(t, y) for _, t, y in sorted(v)] for s, v in out.items()}


def cap(examples: list[Example], limit: int | None, *, balanced: bool = False) -> list[Example]:
    """At most ``limit`` examples, smallest hashes first. ``balanced``: take the classes round-robin (each
    class in hash order), so class counts differ by at most one until a class runs out. Returned in hash
    order; a smaller limit gives a subset of a larger one."""
    if limit is None:
        return list(examples)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DataError(f"caps must be non-negative integers or None, got {limit!r}.")
    ranked = sorted(examples, key=lambda e: (text_bucket(e[0]), e[0]))
    if not balanced:
        return ranked[:limit]
    per_class: dict[int, list[int]] = {}
    for i, (_, y) in enumerate(ranked):
        per_class.setdefault(y, []).append(i)
    order: list[int] = []
    for r in range(max((len(v) for v in per_class.values()), default=0)):
        order.extend(v[r] for _, v in sorted(per_class.items()) if r < len(v))
    return [ranked[i] for i in sorted(order[:limit])]


def _missing(what: Path, packages: str) -> DataError:
    return DataError(f"{what} is missing: install it with `sudo apt-get update && sudo apt-get install -y "
                     f"--no-install-recommends {packages}` (`make setup` installs it).")


# -- WordNet ------------------------------------------------------------------------------------------


def parse_wordnet_data(path: str | Path) -> list[tuple[str, str]]:
    """``(gloss, lexicographer file name)`` for every synset line of a WordNet ``data.*`` file. Lines that
    start with two spaces (the licence header) are skipped."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if len(fields) < 4 or not fields[1].isdigit() or int(fields[1]) >= len(LEXNAMES):
                raise DataError(f"{path}:{n} is not a WordNet synset line (offset lex_filenum ss_type ...): "
                                f"{line[:60]!r}; reinstall wordnet-base.")
            if sep:
                out.append((gloss, LEXNAMES[int(fields[1])]))
    return out


def _wordnet(pos: str, classes: tuple[str, ...], folder: Path) -> tuple[list[str], list[Example]]:
    path = folder / f"data.{pos}"
    if not path.is_file():
        raise _missing(path, "wordnet-base")
    pairs = dedupe(parse_wordnet_data(path))
    index = {c: i for i, c in enumerate(classes)}
    bad = sorted({l for _, l in pairs} - set(index))
    if bad:
        raise DataError(f"{path} has synsets of lexicographer files {bad}, not {pos} classes; reinstall wordnet-base.")
    return list(classes), [(t, index[l]) for t, l in pairs]


# -- fortunes -----------------------------------------------------------------------------------------


def read_fortune_file(path: str | Path) -> list[str]:
    """The fortunes of one strfile source file (separated by lines holding only ``%``), whitespace-normalised,
    empties dropped. UTF-8, or Latin-1 where the bytes are not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    out, cur = [], []
    for line in text.splitlines():
        if line.rstrip() == "%":
            out.append(normalize_text("\n".join(cur)))
            cur = []
        else:
            cur.append(line)
    out.append(normalize_text("\n".join(cur)))
    return [t for t in out if t]


def fortune_files(folder: str | Path) -> list[Path]:
    """Source files of a fortunes folder, by name: plain files only (no ``.dat`` indexes, no ``.u8`` links,
    no subfolders such as the offensive ``off/``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink()
                  and not p.name.endswith((".dat", ".u8")) and not p.name.startswith("."))


def _fortunes(folder: Path, min_fortunes: int = MIN_FORTUNES,
              required: dict[str, str] | None = None) -> tuple[list[str], list[Example]]:
    files = fortune_files(folder)
    if not files:
        raise _missing(folder, "fortunes fortunes-min")
    names = {p.name for p in files}
    for name, package in (required or {}).items():
        if name not in names:
            raise _missing(folder / name, package)
    pairs = dedupe((t, p.name) for p in files for t in read_fortune_file(p))
    sizes: dict[str, int] = {}
    for _, l in pairs:
        sizes[l] = sizes.get(l, 0) + 1
    labels = sorted(l for l, n in sizes.items() if n >= min_fortunes)
    if not labels:
        raise DataError(f"no fortune file in {folder} holds {min_fortunes} fortunes; reinstall fortunes fortunes-min.")
    index = {l: i for i, l in enumerate(labels)}
    return labels, [(t, index[l]) for t, l in pairs if l in index]


# -- registry -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTaskSpec:
    name: str
    description: str
    packages: str  # the Debian packages that install the data
    default_folder: Path
    build: Callable[[Path], tuple[list[str], list[Example]]]


TEXT_TASKS: dict[str, TextTaskSpec] = {s.name: s for s in (
    TextTaskSpec("wordnet-nouns", "WordNet 3.0 noun glosses -> 26 noun supersenses (lexicographer files)",
                 "wordnet-base", WORDNET_DIR, lambda d: _wordnet("noun", NOUN_CLASSES, d)),
    TextTaskSpec("wordnet-verbs", "WordNet 3.0 verb glosses -> 15 verb supersenses (lexicographer files)",
                 "wordnet-base", WORDNET_DIR, lambda d: _wordnet("verb", VERB_CLASSES, d)),
    TextTaskSpec("fortunes", f"fortune-cookie texts -> their file (topic), files with >= {MIN_FORTUNES} fortunes",
                 "fortunes fortunes-min", FORTUNES_DIR,
                 lambda d: _fortunes(d, required={"fortunes": "fortunes-min", "computers": "fortunes"}
                                     if d == FORTUNES_DIR else None)),
)}


@lru_cache(maxsize=8)
def _full(name: str, folder: str) -> tuple[tuple[str, ...], dict[str, tuple[Example, ...]]]:
    labels, examples = TEXT_TASKS[name].build(Path(folder))
    return tuple(labels), {s: tuple(v) for s, v in hash_split(examples).items()}


def load_text_task(name: str, *, max_train: int | None = None, max_val: int | None = None,
                   max_test: int | None = None, balanced: bool = False,
                   folder: str | Path | None = None) -> TextTask:
    """Task ``name`` (see ``TEXT_TASKS``) with its fixed hash split, each split capped as asked (smallest
    hashes first; ``balanced`` round-robins over classes). ``folder`` overrides where the Debian package's
    files are looked for (tests)."""
    if name not in TEXT_TASKS:
        raise DataError(f"Unknown text task {name!r}; known: {', '.join(sorted(TEXT_TASKS))}.")
    spec = TEXT_TASKS[name]
    folder = Path(folder) if folder is not None else spec.default_folder
    labels, splits = _full(name, os.fspath(folder))
    caps = {"train": max_train, "val": max_val, "test": max_test}
    parts = {s: cap(list(splits[s]), caps[s], balanced=balanced) for s in SPLITS}
    return TextTask(name=name, labels=list(labels), source=f"Debian {spec.packages}: {folder}", **parts)


def write_jsonl(task: TextTask, folder: str | Path) -> dict[str, Path]:
    """Write ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` under ``folder`` (created), one
    ``{"text": ..., "label": <class name>}`` object per line, UTF-8. Returns the paths by split."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for s in SPLITS:
        paths[s] = folder / f"{s}.jsonl"
        with open(paths[s], "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps({"text": t, "label": task.labels[y]}, ensure_ascii=False) + "\n"
                         for t, y in task.split(s))
    return paths

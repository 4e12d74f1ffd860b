"""Labelled text tasks and English prose from Debian packages: parsers on synthetic files in the real
formats, the hash split, caps, JSONL export, install hints, and the real installed data."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from crisp_edge.data import corpora, english
from crisp_edge.data.corpora import (
    NOUN_CLASSES,
    SPLITS,
    VERB_CLASSES,
    cap,
    dedupe,
    hash_split,
    load_text_task,
    parse_wordnet_data,
    read_fortune_file,
    split_of,
    text_bucket,
    write_jsonl,
)
from crisp_edge.data.english import (
    CALIBRATION_SOURCES,
    ENGLISH_SOURCES,
    HELDOUT_SOURCES,
    calibration_mix,
    clean_prose,
    heldout_texts,
    load_english,
    read_dict_entries,
)
from crisp_edge.errors import DataError

HEADER = "".join(f"  {i} This software and database is being provided to you, the LICENSEE, by  \n"
                 for i in range(1, 4))
NOUNS = HEADER + (
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred  \n"
    "01317541 05 n 01 dog 0 002 @ 01317391 n 0000 | a member of the genus Canis;  \"the dog barked\"  \n"
    "01318000 05 n 01 cat 0 000 | feline mammal usually having thick soft fur  \n"
    "02000000 06 n 01 hammer 0 000 | a hand tool with a heavy head  \n"
    "02000001 06 n 01 mallet 0 000 | a hand tool with a heavy head  \n"          # repeat within one class: kept once
    "02000002 06 n 01 bat 0 000 | a club used for hitting a ball  \n"
    "02000003 05 n 01 bat 0 000 | a club used for hitting a ball  \n"            # same gloss, two classes: dropped
    "03000000 28 n 01 noon 0 000 | the middle of the day  \n")


def _fake_wordnet(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.noun").write_text(NOUNS, encoding="utf-8")
    (folder / "data.verb").write_text(HEADER + "00001740 29 v 04 breathe 0 000 | draw air into, and expel out of, "
                                      "the lungs  \n00002000 43 v 01 rain 0 000 | precipitate as rain  \n",
                                      encoding="utf-8")
    return folder


def test_wordnet_parser_skips_the_licence_and_reads_gloss_and_lexname(tmp_path):
    pairs = parse_wordnet_data(_fake_wordnet(tmp_path / "wn") / "data.noun")
    assert len(pairs) == 8
    assert pairs[0] == ("that which is perceived or known or inferred  \n", "noun.Tops")
    assert pairs[1][1] == "noun.animal" and '"the dog barked"' in pairs[1][0]
    assert pairs[-1][1] == "noun.time"
    (tmp_path / "bad").write_text("not a synset | gloss\n")
    with pytest.raises(DataError, match="not a WordNet synset line"):
        parse_wordnet_data(tmp_path / "bad")


def test_wordnet_task_classes_labels_and_dedupe(tmp_path):
    folder = _fake_wordnet(tmp_path / "wn")
    task = load_text_task("wordnet-nouns", folder=folder)
    assert task.labels == list(NOUN_CLASSES) and len(task.labels) == 26
    got = {t: task.labels[y] for s in SPLITS for t, y in task.split(s)}
    assert got == {"that which is perceived or known or inferred": "noun.Tops",
                   'a member of the genus Canis; "the dog barked"': "noun.animal",
                   "feline mammal usually having thick soft fur": "noun.animal",
                   "a hand tool with a heavy head": "noun.artifact",
                   "the middle of the day": "noun.time"}
    verbs = load_text_task("wordnet-verbs", folder=folder)
    assert verbs.labels == list(VERB_CLASSES) and len(verbs.labels) == 15
    assert sorted(verbs.labels[y] for s in SPLITS for _, y in verbs.split(s)) == ["verb.body", "verb.weather"]
    (folder / "data.verb").write_text("00001740 05 v 01 x 0 000 | a noun class in the verb file\n")
    corpora._full.cache_clear()
    with pytest.raises(DataError, match="not verb classes"):
        load_text_task("wordnet-verbs", folder=folder)


def _fake_fortunes(folder: Path) -> Path:
    folder.mkdir(parents=True)
    many = "\n%\n".join(f"Fortune number {i}:\n   wrapped   over\tlines." for i in range(120))
    tail = "\n%\nShared by two files.\n%\n%\n   \n%\nTwice here.\n%\nTwice  here.\n"
    (folder / "big").write_text(many + tail, encoding="utf-8")
    (folder / "other").write_text("\n%\n".join(f"Other {i}" for i in range(110)) + "\n%\nShared by two files.\n",
                                  encoding="utf-8")
    (folder / "small").write_text("\n%\n".join(f"Small {i}" for i in range(30)) + "\n", encoding="utf-8")
    (folder / "latin").write_bytes("\n%\n".join(f"Caf\xe9 {i}" for i in range(100)).encode("latin-1"))
    (folder / "big.dat").write_bytes(b"\x00\x00\x00\x02%\n" + bytes(range(200)))
    os.symlink("big", folder / "big.u8")
    (folder / "off").mkdir()
    (folder / "off" / "rude").write_text("\n%\n".join(f"Rude {i}" for i in range(200)))
    return folder


def test_fortune_files_split_normalise_and_skip_indexes(tmp_path):
    folder = _fake_fortunes(tmp_path / "fortunes")
    assert [p.name for p in corpora.fortune_files(folder)] == ["big", "latin", "other", "small"]
    big = read_fortune_file(folder / "big")
    assert big[0] == "Fortune number 0: wrapped over lines." and "" not in big
    assert big[-2:] == ["Twice here.", "Twice here."]
    assert read_fortune_file(folder / "latin")[0] == "Café 0"  # not UTF-8: read as Latin-1


def test_fortunes_task_thresholds_and_drops_ambiguous_duplicates(tmp_path):
    task = load_text_task("fortunes", folder=_fake_fortunes(tmp_path / "fortunes"))
    assert task.labels == ["big", "latin", "other"]  # small (30) is under 100; off/ and .dat are not read
    texts = [t for s in SPLITS for t, _ in task.split(s)]
    assert len(texts) == len(set(texts)) == 121 + 100 + 110
    assert "Shared by two files." not in texts and "Twice here." in texts
    assert sum(task.counts()["train"]) + sum(task.counts()["val"]) + sum(task.counts()["test"]) == len(texts)


def test_hash_split_is_fixed_disjoint_and_near_its_fractions():
    assert text_bucket("hello") == int("2cf24dba5fb0a30e", 16) / 2 ** 64  # sha256("hello"), first 8 bytes
    assert split_of("hello") == "train"
    examples = [(f"text {i}", i % 7) for i in range(5000)]
    a, b = hash_split(examples), hash_split(list(reversed(examples)))
    assert a == b  # independent of input order
    sets = {s: {t for t, _ in a[s]} for s in SPLITS}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sum(map(len, sets.values())) == 5000
    for s, frac in zip(SPLITS, corpora.SPLIT_FRACTIONS):
        assert abs(len(a[s]) / 5000 - frac) < 0.03
        assert all(split_of(t) == s for t in sets[s])
    with pytest.raises(DataError, match="fractions"):
        hash_split(examples, (0.5, 0.5, 0.5))


def test_dedupe_rules():
    assert dedupe([(" a  b ", "x"), ("a b", "x"), ("", "x"), ("c", "x"), ("c", "y"), ("d", "y")]) == \
        [("a b", "x"), ("d", "y")]


def test_caps_are_nested_hash_ordered_and_optionally_balanced():
    examples = [(f"text {i}", 0 if i < 900 else 1 if i < 990 else 2) for i in range(1000)]
    small, large = cap(examples, 50), cap(examples, 200)
    assert set(small) <= set(large) and len(small) == 50
    assert [text_bucket(t) for t, _ in large] == sorted(text_bucket(t) for t, _ in large)
    bal = cap(examples, 30, balanced=True)
    assert [sum(y == c for _, y in bal) for c in range(3)] == [10, 10, 10]
    bal = cap(examples, 60, balanced=True)  # class 2 has only 10: the others fill
    assert [sum(y == c for _, y in bal) for c in range(3)] == [25, 25, 10]
    assert set(cap(examples, 30, balanced=True)) <= set(bal)
    assert cap(examples, None) == examples and cap(examples, 0) == []
    for bad in (-1, 1.5, True):
        with pytest.raises(DataError, match="caps"):
            cap(examples, bad)


def test_load_text_task_caps_and_jsonl(tmp_path):
    folder = _fake_fortunes(tmp_path / "fortunes")
    full = load_text_task("fortunes", folder=folder)
    task = load_text_task("fortunes", folder=folder, max_train=40, max_val=5, max_test=7, balanced=True)
    assert (len(task.train), len(task.val), len(task.test)) == (40, 5, 7)
    assert set(task.train) <= set(full.train) and set(task.test) <= set(full.test)
    assert max(task.counts()["train"]) - min(task.counts()["train"]) <= 1
    paths = write_jsonl(task, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["test.jsonl", "train.jsonl", "val.jsonl"]
    rows = [json.loads(l) for l in paths["test"].read_text(encoding="utf-8").splitlines()]
    assert rows == [{"text": t, "label": task.labels[y]} for t, y in task.test]
    with pytest.raises(DataError, match="Unknown text task"):
        load_text_task("imdb")


def test_missing_debian_packages_name_the_install(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install .*wordnet-base"):
        load_text_task("wordnet-nouns", folder=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"apt-get install .*fortunes fortunes-min"):
        load_text_task("fortunes", folder=tmp_path)
    for name, package in (("devil", "dict-devil"), ("jargon", "jargon-text"), ("dasher", "dasher-data"),
                          ("debian-reference", "debian-reference-en"), ("fortunes", "fortunes fortunes-min")):
        with pytest.raises(DataError, match=rf"apt-get install .*{package}"):
            load_english(name, root=tmp_path)


def test_clean_prose_unwraps_and_drops_markup():
    raw = ("1.2. A Heading\n\n    This paragraph is hard\n    wrapped over three lines, and it is\n    prose.\n\n"
           "    +-----+-----+\n    |a    |b    |\n    +-----+-----+\n\n"
           "    $ sudo apt-get install -y something-long --no-install-recommends\n\n"
           "   ════════════════\n"
           "   A rule above this line, then prose long enough to be kept here.\n\n"
           "    /usr/share/doc/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/u/v/w/x/y/z/1/2/3/4\n\nShort.\n")
    assert clean_prose(raw).split("\n") == [
        "This paragraph is hard wrapped over three lines, and it is prose.",
        "A rule above this line, then prose long enough to be kept here."]
    assert clean_prose("one line.\r\ntwo line.\n", paragraphs="line", min_chars=1) == "one line.\ntwo line."
    with pytest.raises(DataError):
        clean_prose("x", paragraphs="page")


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out, n = alphabet[n % 64] + out, n // 64
        if n == 0:
            return out


def _fake_root(root: Path) -> Path:
    """A Debian file tree with the prose sources, in their real formats."""
    entries = ["00-database-info\n     The Devil's Dictionary (metadata, not prose)\n",
               "ABSURDITY, n.  A statement or belief manifestly inconsistent with\none's own opinion.\n",
               "ACADEMY, n.  [from {ACADEME}]   A modern school where _football_ is\ntaught in earnest.\n"]
    body, index, off = "", [], 0
    for head, e in zip(("00databaseinfo", "absurdity", "academy"), entries):
        index.append(f"{head}\t{_b64(off)}\t{_b64(len(e.encode()))}")
        body, off = body + e, off + len(e.encode())
    d = root / "usr/share/dictd"
    d.mkdir(parents=True)
    (d / "devil.index").write_text("\n".join(sorted(index)) + "\n")
    (d / "devil.dict.dz").write_bytes(gzip.compress(body.encode()))
    for rel, words in (("usr/share/doc/jargon-text/jargon.txt.gz", "hacker"),
                       ("usr/share/debian-reference/debian-reference.en.txt.gz", "system")):
        p = root / rel
        p.parent.mkdir(parents=True)
        p.write_bytes(gzip.compress("\n\n".join(
            f"   Paragraph {i} about the {words} way of\n   doing things, wrapped in two lines." for i in range(60)
        ).encode()))
    p = root / "usr/share/dasher/training_english_GB.txt"
    p.parent.mkdir(parents=True)
    p.write_text("\n".join(f"General sentence {i} of mixed English prose." for i in range(100)) + "\n")
    f = root / "usr/share/games/fortunes"
    f.mkdir(parents=True)
    (f / "fortunes").write_text("A quip.\n%\nA longer saying\nover two lines.\n%\nA quip.\n")
    return root


def test_dict_entries_and_english_sources_from_files(tmp_path):
    root = _fake_root(tmp_path)
    devil = load_english("devil", root=root)
    assert devil.text == ("ABSURDITY, n. A statement or belief manifestly inconsistent with one's own opinion.\n"
                          "ACADEMY, n. [from ACADEME] A modern school where football is taught in earnest.")
    assert devil.chars == len(devil.text) and "dict-devil" in devil.source
    assert load_english("fortunes", root=root).text == "A quip.\nA longer saying over two lines."
    jargon = load_english("jargon", root=root)
    assert jargon.text.split("\n")[0] == "Paragraph 0 about the hacker way of doing things, wrapped in two lines."
    assert read_dict_entries("00databaseurl\tA\tC\nx\tC\tC\n", "abcde") == ["cd"]
    with pytest.raises(DataError, match="Unknown English source"):
        load_english("shakespeare")


def test_calibration_mix_is_deterministic_balanced_interleaved_and_excludes_heldout(tmp_path):
    root = _fake_root(tmp_path)
    mix = calibration_mix(root=root, chunk_chars=300)
    assert mix == calibration_mix(root=root, chunk_chars=300)
    assert set(mix.parts) == set(CALIBRATION_SOURCES) and mix.chars == len(mix.text)
    smallest = min(load_english(s, root=root).chars for s in CALIBRATION_SOURCES)
    assert all(smallest - 300 <= n <= smallest for n in mix.parts.values())
    head = mix.text[:1200]  # any prefix holds every source
    assert "hacker" in head and "system" in head and "General sentence" in head
    lines = mix.text.split("\n")
    assert len(lines) == len(set(lines))  # nothing repeated
    capped = calibration_mix(root=root, chars_per_source=400, chunk_chars=100)
    assert all(n <= 400 for n in capped.parts.values())
    for bad in (("dasher", "devil"), ("kjv-nt",), ()):
        with pytest.raises(DataError):
            calibration_mix(bad, root=root)


def test_heldout_texts_are_outside_the_mix(tmp_path, monkeypatch):
    from crisp_edge.models.causal_lm import KJVText
    monkeypatch.setattr(english, "_kjv", lambda: KJVText(calibration="Old.", heldout="\n".join(
        f"Verse {i} of the new testament." for i in range(200))))
    held = heldout_texts(root=_fake_root(tmp_path), max_chars=500, chunk_chars=100)
    assert set(held) == set(HELDOUT_SOURCES) and not set(HELDOUT_SOURCES) & set(CALIBRATION_SOURCES)
    assert all(t.chars == len(t.text) <= 500 for t in held.values())
    assert "Verse 0 " not in held["kjv-nt"].text[:100]  # chunks in hash order, not book order
    plain = heldout_texts(root=tmp_path, spread_chunks=False)
    assert plain["kjv-nt"].text == english._kjv().heldout


# -- the real installed Debian data (`make setup` installs the packages) ------------------------------


def test_real_wordnet_and_fortunes():
    nouns, verbs, fort = (load_text_task(n) for n in ("wordnet-nouns", "wordnet-verbs", "fortunes"))
    assert len(nouns.labels) == 26 and len(verbs.labels) == 15
    for task, total in ((nouns, 81_000), (verbs, 13_500), (fort, 14_000)):
        counts = task.counts()
        assert all(min(counts[s]) > 0 for s in SPLITS), task.name  # every class in every split
        assert sum(map(sum, counts.values())) > total
        assert abs(sum(counts["test"]) / sum(map(sum, counts.values())) - 0.2) < 0.01
    assert len(fort.labels) == 32 and "fortunes" in fort.labels and "computers" in fort.labels
    assert min(map(sum, zip(*fort.counts().values()))) >= 100
    small = load_text_task("wordnet-nouns", max_train=4000, max_test=2000)
    assert (len(small.train), len(small.test)) == (4000, 2000) and set(small.test) <= set(nouns.test)


def test_real_english_sources():
    for name in ENGLISH_SOURCES:
        t = load_english(name)
        assert t.chars == len(t.text) > 300_000, name
        assert "\ufffd" not in t.text and "\n\n" not in t.text
    mix = calibration_mix()
    assert set(mix.parts) == set(CALIBRATION_SOURCES) and mix.chars > 900_000
    held = heldout_texts(spread_chunks=False)
    from crisp_edge.models.causal_lm import load_kjv
    assert held["kjv-nt"].text == load_kjv().heldout
    assert held["devil"].text.startswith("ABASEMENT, n.")

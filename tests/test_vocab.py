from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llmtags.records import Record
from llmtags.vocab import (
    LAYERS,
    Normaliser,
    Vocabulary,
    VocabEntry,
    build_vocabulary,
    layer_counts,
    punctuation_key,
    simplified_key,
    squash_punctuation,
    tidy,
    to_simplified,
    width_case_key,
)


def _vocab() -> Vocabulary:
    return Vocabulary([
        VocabEntry("品牌:理肤泉", ["La Roche-Posay", "理膚泉"], 12),
        VocabEntry("Brand:La Roche-Posay", [], 3),
        VocabEntry("Brand:Adidas", [], 20),
        VocabEntry("Color:Black", [], 9),
        VocabEntry("Color:Blackberry", [], 1),
        VocabEntry("Gender:Men's", [], 5),
        VocabEntry("产品词:防晒霜", [], 4),
        VocabEntry("plain", [], 1),
    ])


# --- key functions on their own ---------------------------------------------------------------------


def test_width_case_key() -> None:
    assert width_case_key("ＢＲＡＮＤ：Ａｄｉｄａｓ") == "brand:adidas"
    assert width_case_key(" Brand : Adidas ") == "brand:adidas"


def test_simplified_key() -> None:
    assert to_simplified("理膚泉") == "理肤泉"
    assert to_simplified("Adidas") == "Adidas"
    assert simplified_key("品牌:理膚泉") == "品牌:理肤泉"
    assert simplified_key("BRAND:X") == "brand:x"  # includes the width/case step


def test_punctuation_key() -> None:
    assert punctuation_key("Brand:La Roche-Posay") == punctuation_key("brand: la roche posay")
    assert punctuation_key("Brand:La Roche·Posay") == "brand:la roche posay"
    assert punctuation_key("Gender:Men’s") == punctuation_key("Gender:Mens")
    assert punctuation_key("品牌:理肤泉·ka") == "品牌:理肤泉ka"  # no spaces kept beside CJK
    assert punctuation_key("品牌:「理膚泉」") == "品牌:理肤泉"  # full-width brackets, traditional form
    assert punctuation_key("Size:5.2g") != punctuation_key("Size:52g")  # separators split, never glue
    assert squash_punctuation("a -- b") == "a b"


def test_tidy_keeps_case() -> None:
    assert tidy(" Brand :  New   Balance ") == "Brand:New Balance"
    assert tidy("Ｘ") == "X"


# --- each normaliser layer --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "layer", "expected"),
    [
        ("Brand:Adidas", "exact", "Brand:Adidas"),
        ("brand : ＡＤＩＤＡＳ", "width_case", "Brand:Adidas"),
        ("品牌:理膚泉", "simplified", "品牌:理肤泉"),
        ("Brand:La Roche Posay", "punctuation", "Brand:La Roche-Posay"),
        ("gender:mens", "punctuation", "Gender:Men's"),
        ("品牌:la roche posay", "alias", "品牌:理肤泉"),
        ("Brand:Addidas", "fuzzy", "Brand:Adidas"),
    ],
)
def test_each_layer(raw: str, layer: str, expected: str) -> None:
    normaliser = Normaliser(_vocab())
    [result] = normaliser.normalise([raw])
    assert (result.tag, result.layer, result.is_new) == (expected, layer, False)
    assert result.source == raw
    # The layer also works alone, and every earlier layer misses (so the order is what decides).
    hit = normaliser.match_layer(raw, layer)
    assert hit is not None and hit[0].tag == expected
    for earlier in LAYERS[: LAYERS.index(layer)]:
        assert normaliser.match_layer(raw, earlier) is None


def test_fuzzy_score_and_threshold() -> None:
    [result] = Normaliser(_vocab()).normalise(["Brand:Addidas"])
    assert result.score is not None and 90 <= result.score < 100
    [strict] = Normaliser(_vocab(), fuzzy_threshold=99).normalise(["Brand:Addidas"])
    assert strict.layer == "new"


def test_fuzzy_is_restricted_to_the_same_attribute() -> None:
    normaliser = Normaliser(_vocab())
    # 'Adidas' is a Brand; a near miss under Color must not become 'Brand:Adidas'.
    [result] = normaliser.normalise(["Color:Addidas"])
    assert result.layer == "new" and result.tag == "Color:Addidas"
    # Within the attribute, the closest entry wins.
    [black] = normaliser.normalise(["Color:Blackk"])
    assert black.tag == "Color:Black"


def test_open_and_closed_policy() -> None:
    vocab = _vocab()
    [new] = Normaliser(vocab, policy="open").normalise(["Material : Wool"])
    assert (new.tag, new.layer, new.is_new) == ("Material:Wool", "new", True)
    [dropped] = Normaliser(vocab, policy="closed").normalise(["Material:Wool"])
    assert (dropped.tag, dropped.layer, dropped.kept) == (None, "dropped", False)
    assert Normaliser(vocab, policy="closed").apply(["Material:Wool", "brand:adidas"]) == ["Brand:Adidas"]
    with pytest.raises(ValueError):
        Normaliser(vocab, policy="strict")


def test_output_is_deduplicated() -> None:
    normaliser = Normaliser(_vocab())
    raw = ["Brand:Adidas", "brand:ADIDAS", "Brand:Addidas", "", "Material:Wool", "material:wool"]
    results = normaliser.normalise(raw)
    assert [r.tag for r in results] == ["Brand:Adidas", "Material:Wool"]
    counts = layer_counts(results)
    assert counts["exact"] == 1 and counts["new"] == 1 and counts["fuzzy"] == 0
    assert list(counts) == list(LAYERS)


def test_attributeless_tags() -> None:
    normaliser = Normaliser(_vocab())
    assert normaliser.apply(["PLAIN"]) == ["plain"]
    # A bare value does not jump to an attribute's entry.
    assert normaliser.normalise(["Adidas"])[0].layer == "new"


def test_large_vocabulary_is_fast() -> None:
    vocab = Vocabulary(VocabEntry(f"Attr{i % 50}:value number {i}", [f"alias {i}"], 1) for i in range(100_000))
    started = time.perf_counter()
    normaliser = Normaliser(vocab)
    raw = [f"attr{i % 50}:Value Number {i}" for i in range(0, 100_000, 97)]
    raw += [f"Attr{i}:valeu number {i * 50}" for i in range(50)]
    results = [normaliser.match(t) for t in raw]
    elapsed = time.perf_counter() - started
    assert all(r.layer in ("width_case", "fuzzy", "new") for r in results)
    assert sum(r.layer == "width_case" for r in results) == len(range(0, 100_000, 97))
    assert elapsed < 20, elapsed


# --- vocabulary files -------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    vocab = _vocab()
    path = tmp_path / "vocab.jsonl"
    vocab.save(path)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"tag": "Brand:Adidas", "aliases": [], "count": 20}  # most frequent first
    loaded = Vocabulary.load(path)
    assert [e.to_json() for e in sorted(loaded, key=lambda e: e.tag)] == [
        e.to_json() for e in sorted(vocab, key=lambda e: e.tag)
    ]
    assert "品牌:理肤泉" in loaded and loaded.get("品牌 : 理肤泉").aliases == ["La Roche-Posay", "理膚泉"]


def test_plain_list(tmp_path: Path) -> None:
    path = tmp_path / "tags.txt"
    path.write_text("# brands\n品牌:理肤泉\tLa Roche-Posay|理膚泉\n\nBrand:Diesel\nbare value\n", encoding="utf-8")
    vocab = Vocabulary.load(path)
    assert len(vocab) == 3
    assert vocab.get("品牌:理肤泉").aliases == ["La Roche-Posay", "理膚泉"]
    assert vocab.get("Brand:Diesel").attribute == "Brand"
    assert vocab.get("bare value").attribute is None
    assert vocab.attributes() == ["Brand", "品牌"]


def test_bad_jsonl_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "vocab.jsonl"
    path.write_text('{"tag": "A:b"}\n{"tag": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=":2:"):
        Vocabulary.load(path)


def test_add_merges_and_dedupes() -> None:
    vocab = Vocabulary()
    vocab.add("Brand:Nike", 2, ["NIKE Inc"])
    vocab.add("brand : nike", 3, ["nike inc", "Nike", "Swoosh"])
    assert len(vocab) == 1
    entry = vocab.get("Brand:Nike")
    assert entry.count == 5 and entry.aliases == ["NIKE Inc", "Swoosh"]


def test_build_vocabulary_from_records() -> None:
    records = [
        Record("1", "t", tags=["Brand:HP", ["Processor Type:Xeon E5335", "Processor Type:Intel Xeon E5335"]]),
        Record("2", "t", tags=["Brand:HP", "brand:hp"]),  # the same tag twice in one record counts once
        Record("3", "t", tags=None),
    ]
    vocab = build_vocabulary(records)
    assert vocab.get("Brand:HP").count == 2
    entry = vocab.get("Processor Type:Xeon E5335")
    assert entry.count == 1 and entry.aliases == ["Intel Xeon E5335"]
    assert Normaliser(vocab).apply(["Processor Type:Intel Xeon E5335"]) == ["Processor Type:Xeon E5335"]

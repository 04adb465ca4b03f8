from __future__ import annotations

import time

from llmtags.baselines import DictionaryTagger
from llmtags.spans import normalise_for_match
from llmtags.metrics import score
from llmtags.records import Record


def _tagger(*tag_lists: list, **kwargs: object) -> DictionaryTagger:
    records = [Record(str(i), "text", tags=list(tags)) for i, tags in enumerate(tag_lists)]
    return DictionaryTagger.from_records(records, **kwargs)  # type: ignore[arg-type]


def test_longest_match_wins_and_spans_do_not_overlap() -> None:
    tagger = _tagger(["Brand:La Roche-Posay"], ["Brand:Roche"], ["Product:Posay Cream"], ["Product:Cream"])
    # 'La Roche-Posay' (14) beats 'Roche' inside it; 'Posay Cream' overlaps it and is shorter, so it
    # loses too, leaving 'Cream' on its own.
    assert tagger.tag("La Roche-Posay Cream") == ["Brand:La Roche-Posay", "Product:Cream"]


def test_longest_first_over_the_whole_text_not_leftmost() -> None:
    tagger = _tagger(["品牌:甲乙"], ["产品词:乙丙丁"])
    # Leftmost-first would take '甲乙' and lose '乙丙丁'; longest-first takes '乙丙丁'.
    assert tagger.tag("甲乙丙丁") == ["产品词:乙丙丁"]
    assert _tagger(["A:ab"], ["B:bcde"], word_boundaries=False).tag("abcde") == ["B:bcde"]


def test_word_boundaries_for_alphanumeric_values() -> None:
    tagger = _tagger(["Model:x"], ["Size:10"], ["Color:Red"])
    assert tagger.tag("Xbox boxer 100 Redwood") == []
    assert tagger.tag("Model X, size 10, red") == ["Model:X", "Size:10", "Color:red"]
    # CJK characters are boundaries: Chinese titles run Latin codes into the characters.
    assert tagger.tag("代购adidas,x,ro三叶草") == ["Model:x"]
    loose = _tagger(["Model:x"], word_boundaries=False)
    assert loose.tag("Xbox") == ["Model:X"]


def test_case_and_width_insensitive_and_span_from_text() -> None:
    tagger = _tagger(["品牌:adidas"], ["产品词:防晒霜"])
    # Full-width letters match and the tag carries the text's own span.
    assert tagger.tag("ＡＤＩＤＡＳ防晒霜") == ["品牌:ＡＤＩＤＡＳ", "产品词:防晒霜"]


def test_most_frequent_attribute_and_any_of_forms() -> None:
    tagger = _tagger(
        ["Brand:Apple"], ["Brand:Apple"], ["Flavor:Apple"],
        [["Processor Type:Xeon E5335", "Processor Type:Intel Xeon E5335"]],
    )
    assert tagger.tag("Apple juice") == ["Brand:Apple"]
    assert tagger.tag("Intel Xeon E5335 kit") == ["Processor Type:Intel Xeon E5335"]
    assert tagger.tag("Xeon E5335 kit") == ["Processor Type:Xeon E5335"]


def test_repeated_value_is_tagged_once_and_noise_is_skipped() -> None:
    tagger = _tagger(["其他:,", "其他:】", "品牌:宾派"], ["产品词:表"], min_length=1)
    assert tagger.tag("宾派,宾派】") == ["品牌:宾派"]  # punctuation-only values never enter
    assert len(_tagger(["产品词:表"], min_length=2)) == 0
    assert len(_tagger(["A:v"], ["A:v"], ["A:w"], min_count=2)) == 1


def test_normalise_for_match_maps_back() -> None:
    norm, origin = normalise_for_match("Ａﬁ B")
    assert norm == "afi b"
    assert origin == [0, 1, 1, 2, 3]


def test_fast_enough_and_scores() -> None:
    brands = [f"Brand{i}" for i in range(3000)]
    tagger = _tagger(*[[f"Brand:{b}", f"Color:Colour{i % 40}"] for i, b in enumerate(brands)])
    texts = [f"{brands[i]} running shoe Colour{i % 40} for men, lightweight mesh upper " * 3 for i in range(2000)]
    started = time.perf_counter()
    preds = tagger.tag_many(texts)
    assert time.perf_counter() - started < 10
    golds = [[f"Brand:{brands[i]}", f"Color:Colour{i % 40}"] for i in range(2000)]
    assert score(golds, preds).micro.f1 == 1.0

from __future__ import annotations

import math

import pytest

from llmtags.metrics import (
    bootstrap_ci,
    bootstrap_ci_counts,
    canonical,
    match_record,
    paired_bootstrap,
    prf,
    score,
    split_tag,
)


def test_canonical_width_case_and_spaces_around_separator() -> None:
    assert canonical("  Brand : DIESEL ") == "brand:diesel"
    assert canonical("品牌：ＡＤＩＤＡＳ") == "品牌:adidas"  # full-width colon and letters
    assert canonical("Size:10 D US") == "size:10 d us"  # inner spaces of the value stay
    assert canonical("Ratio : 16 : 9") == "ratio:16 : 9"  # only the first ':' separates
    assert canonical("no attribute") == "no attribute"


def test_split_tag() -> None:
    assert split_tag("Brand:Diesel") == ("Brand", "Diesel")
    assert split_tag("品牌：理肤泉") == ("品牌", "理肤泉")
    assert split_tag("Ratio:16:9") == ("Ratio", "16:9")
    assert split_tag("a：b:c") == ("a", "b:c")  # whichever colon comes first
    assert split_tag("Diesel") == (None, "Diesel")


def test_exact_match_counts() -> None:
    c = match_record(["Brand:Diesel", "Gender:Men's"], ["brand: diesel", "Color:Red"])
    assert (c.tp, c.fp, c.fn) == (1, 1, 1)
    assert c.matched == [("Brand:Diesel", "brand: diesel")]
    assert c.missed == ["Gender:Men's"]
    assert c.spurious == ["Color:Red"]
    assert c.precision == 0.5 and c.recall == 0.5 and c.f1 == 0.5


def test_duplicate_predictions_count_once() -> None:
    # One right tag predicted three times (in different surface forms) is ONE true positive, and one
    # wrong tag predicted twice is ONE false positive. If duplicates counted, tp would be 3 here.
    pred = ["Brand:Diesel", "brand:DIESEL", "Brand : Diesel", "Size:9", "Size:9"]
    c = match_record(["Brand:Diesel", "Color:Red"], pred)
    assert (c.tp, c.fp, c.fn) == (1, 1, 1)
    s = score([["Brand:Diesel", "Color:Red"]], [["Brand:Diesel", "Brand:Diesel", "Brand:Diesel"]])
    assert s.micro.tp == 1 and s.micro.fp == 0 and s.micro.fn == 1
    assert s.micro.precision == 1.0
    assert s.micro.recall == 0.5
    assert s.micro.f1 == pytest.approx(2 / 3)


def test_any_of_group_counts_once() -> None:
    gold = [["Processor Type:Xeon E5335", "Processor Type:Intel Xeon E5335"], "Manufacturer:HP"]
    # Both forms predicted: still one gold tag, so one tp and the second form is a false positive.
    c = match_record(gold, ["Processor Type:Intel Xeon E5335", "Processor Type:Xeon E5335", "Manufacturer:HP"])
    assert (c.tp, c.fp, c.fn) == (2, 1, 0)
    # Either form alone satisfies the group.
    c = match_record(gold, ["processor type:xeon e5335"])
    assert (c.tp, c.fp, c.fn) == (1, 0, 1)
    assert c.missed == ["Manufacturer:HP"]
    # Nothing predicted: the group is ONE false negative, not two.
    c = match_record(gold, [])
    assert (c.tp, c.fp, c.fn) == (0, 0, 2)


def test_one_prediction_satisfies_at_most_one_group() -> None:
    # Two groups share the form "A:x"; a single prediction may only match one of them.
    c = match_record([["A:x", "A:y"], ["A:x", "A:z"]], ["A:x"])
    assert (c.tp, c.fp, c.fn) == (1, 0, 1)
    # With "A:y" as well, a maximum matching finds both (a greedy pass giving "A:x" to the first
    # group would lose one).
    c = match_record([["A:x", "A:y"], ["A:x", "A:z"]], ["A:x", "A:y"])
    assert (c.tp, c.fp, c.fn) == (2, 0, 0)


def test_duplicate_gold_counts_once() -> None:
    c = match_record(["Brand:Nike", "brand:nike"], ["Brand:Nike"])
    assert (c.tp, c.fp, c.fn) == (1, 0, 0)


def test_empty_gold_and_empty_pred() -> None:
    c = match_record([], [])
    assert (c.tp, c.fp, c.fn) == (0, 0, 0)
    assert c.f1 == 1.0  # nothing to find and nothing claimed
    c = match_record([], ["Brand:X"])
    assert (c.tp, c.fp, c.fn) == (0, 1, 0)
    assert c.precision == 0.0 and c.f1 == 0.0
    c = match_record(["Brand:X"], [])
    assert (c.tp, c.fp, c.fn) == (0, 0, 1)
    assert c.recall == 0.0 and c.f1 == 0.0
    # An empty/empty record adds nothing to the corpus.
    with_empty = score([["Brand:X"], []], [["Brand:X", "Color:Red"], []])
    without = score([["Brand:X"]], [["Brand:X", "Color:Red"]])
    assert with_empty.micro.to_json() == without.micro.to_json()
    assert without.micro.precision == 0.5 and without.micro.recall == 1.0


def test_prf_conventions() -> None:
    assert prf(0, 0, 0) == (1.0, 1.0, 1.0)
    assert prf(0, 0, 3) == (0.0, 0.0, 0.0)
    assert prf(0, 2, 0) == (0.0, 0.0, 0.0)
    assert prf(1, 1, 2)[2] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


def test_value_only_drops_the_attribute() -> None:
    c = match_record(["Brand:Diesel"], ["Model name:Diesel"], typed=False)
    assert (c.tp, c.fp, c.fn) == (1, 0, 0)
    c = match_record(["Brand:Diesel"], ["Model name:Diesel"], typed=True)
    assert (c.tp, c.fp, c.fn) == (0, 1, 1)
    s = score([["Brand:Diesel"]], [["Model name:Diesel"]], typed=False)
    assert s.per_attribute["Brand"].tp == 1  # tp goes to the gold attribute


def test_corpus_micro_macro_and_tables() -> None:
    golds = [["Brand:A", "Color:Red"], ["Brand:B", "Size:9"]]
    preds = [["Brand:A", "Color:Blue"], ["Brand:B", "Material:Wool"]]
    s = score(golds, preds, categories=["Shoes", "Shirts"])
    # tp: Brand:A, Brand:B; fp: Color:Blue, Material:Wool; fn: Color:Red, Size:9
    assert (s.micro.tp, s.micro.fp, s.micro.fn) == (2, 2, 2)
    assert s.micro.f1 == pytest.approx(0.5)
    assert s.per_attribute["Brand"].f1 == 1.0
    assert s.per_attribute["Color"].f1 == 0.0
    assert s.per_attribute["Size"].f1 == 0.0
    assert s.per_attribute["Material"].support == 0
    # Macro over gold attributes only (Brand, Color, Size), not the invented Material.
    assert s.macro_f1 == pytest.approx(1 / 3)
    assert s.per_category is not None
    assert (s.per_category["Shoes"].tp, s.per_category["Shoes"].fp) == (1, 1)
    js = s.to_json()
    assert js["micro"]["f1"] == pytest.approx(0.5) and "Brand" in js["per_attribute"]


def test_score_rejects_mismatched_lengths_and_unlabelled() -> None:
    with pytest.raises(ValueError):
        score([["A:b"]], [])
    with pytest.raises(ValueError):
        score([None], [[]])  # type: ignore[list-item]


def _corpus() -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    golds, good, bad = [], [], []
    for i in range(60):
        golds.append([f"Brand:B{i}", f"Color:C{i % 7}"])
        good.append([f"Brand:B{i}"] + ([f"Color:C{i % 7}"] if i % 3 else ["Color:X"]))
        bad.append([f"Brand:B{i}"] if i % 2 else ["Brand:Z"])
    return golds, good, bad


def test_bootstrap_ci_is_deterministic_and_brackets_the_estimate() -> None:
    golds, good, _ = _corpus()
    first = bootstrap_ci(golds, good, n=300, seed=7)
    assert first == bootstrap_ci(golds, good, n=300, seed=7)
    assert first != bootstrap_ci(golds, good, n=300, seed=8)
    point = score(golds, good).micro.f1
    assert first[0] <= point <= first[1]
    assert first[0] < first[1]
    counts = [match_record(g, p) for g, p in zip(golds, good)]
    assert bootstrap_ci_counts(counts, n=300, seed=7) == first
    assert all(math.isnan(x) for x in bootstrap_ci([], [], n=10))


def test_paired_bootstrap() -> None:
    golds, good, bad = _corpus()
    result = paired_bootstrap(golds, bad, good, n=500, seed=1)
    assert result.delta_f1 == pytest.approx(score(golds, good).micro.f1 - score(golds, bad).micro.f1)
    assert result.delta_f1 > 0 and result.low > 0 and result.significant and result.p_value < 0.05
    assert result == paired_bootstrap(golds, bad, good, n=500, seed=1)
    same = paired_bootstrap(golds, good, good, n=200, seed=1)
    assert same.delta_f1 == 0 and same.p_value == 1.0 and not same.significant
    assert set(result.to_json()) == {"f1_a", "f1_b", "delta_f1", "ci95", "p_value", "significant"}


def test_extractgpt_protocol_counts_one_value_per_target_attribute() -> None:
    from llmtags.metrics import match_record_extractgpt

    gold = ["Brand:Nike", "Color:Black", ["Size:9", "Size:9 US"], "Material:Mesh"]
    pred = ["brand: nike", "Color:White", "Color:Black", "Size:9 us", "Gender:Men", "Material:Mesh"]
    # Brand right (VC); Color: the FIRST value is wrong (VW) although a later line is right; Size right
    # through an accepted form (VC); Gender predicted without gold (NV); Sport neither (nothing);
    # Material is gold and predicted but not a target: it does not count.
    counts = match_record_extractgpt(gold, pred, ["Brand", "color", "Size", "Gender", "Sport"])
    vc, vw, vn, nv = 2, 1, 0, 1
    assert (counts.tp, counts.fp, counts.fn) == (vc, nv + vw, vn + vw)
    assert counts.precision == pytest.approx(vc / (nv + vc + vw))
    assert counts.recall == pytest.approx(vc / (vn + vc + vw))
    assert counts.spurious == ["Color:White", "Gender:Men"] and counts.missed == ["Color:Black"]
    missed = match_record_extractgpt(["Brand:Nike"], [], ["Brand"])
    assert (missed.tp, missed.fp, missed.fn) == (0, 0, 1)  # VN

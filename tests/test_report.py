from __future__ import annotations

import json

import pytest

from llmtags.records import Record
from llmtags.report import EvalReport

GOLDS = [
    ["Brand:Diesel", "Gender:Men's"],
    ["Brand:Nike", ["Color:Black/White", "Color:Black White"]],
    ["Brand:Finn Comfort"],
    [],
]
RAW = [
    ["brand:diesel", "Gender:Mens"],  # one right, one punctuation variant
    ["Brand:Nike", "Color:Black White", "Brand:Nike"],  # duplicate must not count
    ["Model:Finn | Comfort"],  # a '|' to escape in Markdown
    [],
]
NORMALISED = [
    ["Brand:Diesel", "Gender:Men's"],
    ["Brand:Nike", "Color:Black White"],
    ["Model:Finn | Comfort"],
    [],
]


def _report() -> EvalReport:
    return EvalReport(
        GOLDS, RAW, NORMALISED,
        ids=["a", "b", "c", "d"],
        texts=["Diesel Men's", "Nike black/white", "Finn Comfort\nshoe", "nothing"],
        categories=["Shoes", "Shoes", "Shoes", None],
        name="toy", n_boot=200, seed=3,
    )


def test_figures_before_and_after_normalisation() -> None:
    report = _report()
    raw = report.scores("raw", "typed").micro
    assert (raw.tp, raw.fp, raw.fn) == (3, 2, 2)
    after = report.scores("normalised", "typed").micro
    assert (after.tp, after.fp, after.fn) == (4, 1, 1)
    values = report.scores("raw", "values").micro
    assert (values.tp, values.fp, values.fn) == (3, 2, 2)
    assert report.normalisation_delta is not None
    assert report.normalisation_delta.delta_f1 == pytest.approx(after.f1 - raw.f1)


def test_json_is_serialisable_and_complete() -> None:
    data = _report().to_json()
    text = json.dumps(data, ensure_ascii=False)
    assert json.loads(text)["n_records"] == 4
    assert set(data["raw"]) == {"typed", "values"} and set(data["normalised"]) == {"typed", "values"}
    typed = data["raw"]["typed"]
    assert {"micro", "macro_f1", "ci95", "per_attribute", "per_category"} <= set(typed)
    low, high = typed["ci95"]
    assert 0.0 <= low <= typed["micro"]["f1"] <= high <= 1.0
    assert data["bootstrap"] == {"n": 200, "seed": 3, "unit": "record"}
    without = EvalReport(GOLDS, RAW, n_boot=50).to_json()
    assert without["normalised"] is None and without["normalisation_delta"] is None


def test_worst_records_order_and_content() -> None:
    worst = _report().worst_records(4, view="raw")
    assert [r["id"] for r in worst] == ["c", "a", "b", "d"]
    first = worst[0]
    assert first["f1"] == 0.0 and first["missed"] == ["Brand:Finn Comfort"]
    assert first["spurious"] == ["Model:Finn | Comfort"]
    assert first["gold"] == GOLDS[2] and first["predicted"] == RAW[2]
    # Equal F1 (2/3 both: tp1 fp1 vs tp2 fp1 fn1): the record with more errors comes first.
    ties = EvalReport([["A:x"], ["A:x", "B:y", "D:w"]], [["A:x", "C:1"], ["A:x", "B:y", "C:2"]], n_boot=10)
    assert ties.worst_records(2)[0]["f1"] == pytest.approx(ties.worst_records(2)[1]["f1"])
    assert [r["id"] for r in ties.worst_records(2)] == ["1", "0"]


def test_markdown_tables() -> None:
    md = _report().to_markdown(worst=3)
    assert md.startswith("## toy")
    assert "| predictions | scoring | P | R | F1 | 95% CI | macro F1 | tp | fp | fn |" in md
    assert "| raw | typed | 0.600 | 0.600 | 0.600 |" in md
    assert "| normalised | typed | 0.800 | 0.800 | 0.800 |" in md
    assert "### Per attribute (typed)" in md and "### Per category (typed)" in md
    assert "Model:Finn \\| Comfort" in md  # escaped pipe
    assert "Finn Comfort shoe" in md  # newline flattened
    for line in md.splitlines():
        if line.startswith("|"):
            assert line.endswith("|")


def test_from_records_and_length_check() -> None:
    records = [Record("r1", "Diesel", category="Shoes", tags=["Brand:Diesel"])]
    report = EvalReport.from_records(records, [["Brand:Diesel"]], n_boot=10)
    assert report.worst_records(1)[0]["id"] == "r1"
    assert report.scores().micro.f1 == 1.0
    with pytest.raises(ValueError):
        EvalReport(GOLDS, RAW[:2])

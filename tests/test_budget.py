"""The prompt budget for long texts (budget.py): neighbours by title, long texts as windows."""

from __future__ import annotations

import pytest

from llmtags.budget import GAP, demo_text, value_spans, windowed
from llmtags.options import OptionsError, Settings, TaggingOptions, tagging_options
from llmtags.records import Record
from llmtags.retrieve import DemoPool
from llmtags.tagger import prompt_parts

TEXT = ("HP Xeon E5335 Processor Kit\n" + "Filler words about shipping and returns. " * 10
        + "Intel Xeon E5335 2.0GHz 8MB cache, part 435952-B21. " + "More filler about the warranty. " * 10
        + "Fits DL360 G5 servers.")


def test_a_neighbour_is_shown_whole_or_by_its_title():
    assert demo_text(TEXT, "full", 300) == TEXT[:300]
    assert demo_text(TEXT, "title", 300) == "HP Xeon E5335 Processor Kit"
    assert demo_text(TEXT, "title", 5) == "HP Xe"
    with pytest.raises(ValueError, match="demo text view"):
        demo_text(TEXT, "spans", 300)


def test_a_long_text_keeps_its_title_and_the_windows_around_what_was_found():
    spans = value_spans(TEXT, ["435952-b21", "DL360 G5", "not in the text"])
    assert [TEXT[s:e] for s, e in spans] == ["435952-B21", "DL360 G5"]
    shown = windowed(TEXT, spans, budget=300, width=30)
    assert shown.startswith("HP Xeon E5335 Processor Kit\n") and len(shown) <= 300 + len(GAP)
    assert "435952-B21" in shown and "DL360 G5" in shown and GAP in shown
    assert "Filler words about shipping" not in shown
    # A text within the budget is left alone; without anything found, its head is kept.
    assert windowed("short\ntext", spans, budget=300) == "short\ntext"
    assert windowed(TEXT, [], budget=100) == TEXT[:100]
    # Windows that touch merge into one.
    assert windowed(TEXT, [spans[0], (spans[0][1] + 2, spans[0][1] + 5)], budget=400, width=30).count(GAP) == 0


def test_the_budget_reaches_the_prompt_parts_and_bad_values_are_refused():
    pool = DemoPool([Record("n", TEXT, tags=["Part Number:435952-B21"])])
    record = Record("r", TEXT.replace("HP", "HPE"))
    parts = prompt_parts(record, TaggingOptions(template="tuned", pool=pool, retrieve=1, demo_text="title",
                                                text_budget=200, candidates=None))
    assert parts.demos[0].text == "HP Xeon E5335 Processor Kit" and parts.demos[0].tags == ["Part Number:435952-B21"]
    assert parts.record.text == TEXT.replace("HP", "HPE")[:200]  # nothing proposed: the head
    whole = prompt_parts(record, TaggingOptions(template="tuned", pool=pool, retrieve=1))
    assert whole.record.text == record.text and whole.demos[0].text == TEXT[:300]
    assert tagging_options(Settings(demo_text="title", text_budget=500)).text_budget == 500
    with pytest.raises(OptionsError, match="--demo-text"):
        tagging_options(Settings(demo_text="spans"))
    with pytest.raises(OptionsError, match="--text-budget"):
        tagging_options(Settings(text_budget=10))

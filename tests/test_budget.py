"""The prompt budget for long texts (budget.py): neighbours by title, long texts as windows."""

from __future__ import annotations

import pytest

from llmtags.budget import GAP, demo_text, windowed
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
    spans = [(TEXT.find(v), TEXT.find(v) + len(v)) for v in ("435952-B21", "DL360 G5")]
    shown = windowed(TEXT, spans, budget=300, width=30)
    assert shown.startswith("HP Xeon E5335 Processor Kit\n") and len(shown) <= 300 + len(GAP)
    assert "435952-B21" in shown and "DL360 G5" in shown and GAP in shown
    assert "Filler words about shipping" not in shown
    # A text within the budget is left alone; without anything found, its head is kept.
    assert windowed("short\ntext", spans, budget=300) == "short\ntext"
    assert windowed(TEXT, [], budget=100) == TEXT[:100]
    # Windows that touch merge into one.
    assert windowed(TEXT, [spans[0], (spans[0][1] + 2, spans[0][1] + 5)], budget=400, width=30).count(GAP) == 0
    # A tight budget keeps the span itself, not only the context left of it; one too long to fit is left out.
    tight = windowed(TEXT, spans[:1], budget=len("HP Xeon E5335 Processor Kit") + len(GAP) + 14, width=60)
    assert "435952-B21" in tight and len(tight) <= len("HP Xeon E5335 Processor Kit") + 1 + 14
    assert windowed(TEXT, spans[:1], budget=len("HP Xeon E5335 Processor Kit") + 5) == TEXT[:32]


def test_the_windows_follow_the_proposals_and_the_candidates(tmp_path):
    from llmtags.candidates import candidate_finder
    from llmtags.proposer import Proposal

    class FixedProposer:
        def read(self, record):
            at = record.text.find("DL360")
            return [Proposal("Model:DL360", "Model", "DL360", at, at + 5, 0.9)], 0.5

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("型号：435952-B21\n", encoding="utf-8")  # a full-width colon, as zh vocabularies write them
    options = TaggingOptions(template="tuned", text_budget=200, proposer=FixedProposer(),
                             candidates=candidate_finder(str(vocab)))
    shown = prompt_parts(Record("r", TEXT), options).record.text
    assert shown.startswith("HP Xeon E5335 Processor Kit\n") and "435952-B21" in shown and "DL360" in shown
    assert "Filler words" not in shown and len(shown) < len(TEXT)


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

"""Evidence spans and per-tag confidence (grounding.py), and their path through the tagger."""

from __future__ import annotations

import math

import pytest

from llmtags.engines.base import Generation
from llmtags.grounding import evidence_span, evidence_spans, highlight, piece_confidence
from llmtags.parse import parse_tag_spans
from llmtags.records import Record
from llmtags.spans import value_key
from llmtags.options import TaggingOptions
from llmtags.tagger import tag_records, to_result
from llmtags.vocab import Normaliser, Vocabulary


def _generation(pieces: list[tuple[str, float]], end: float | None = -0.1) -> Generation:
    """A reply made of (token text, log-probability) pairs."""
    text, ends = "", []
    for piece, _ in pieces:
        text += piece
        ends.append(len(text))
    return Generation(text, 10, len(pieces), [lp for _, lp in pieces], ends, end)


REPLY = _generation([("品牌", -0.01), (":", -0.02), ("理肤泉", -0.3), ("\n", -0.05),
                     ("产品词", -0.1), (":", -0.0), ("防晒", -1.0), ("霜", -0.2)], end=-0.4)


def test_confidence_is_the_probability_of_the_line_and_its_terminator():
    first, second = parse_tag_spans(REPLY.text)
    assert first.tag == "品牌:理肤泉" and REPLY.text[slice(*first.span)] == "品牌:理肤泉"
    assert piece_confidence(first.span, REPLY) == pytest.approx(math.exp(-0.01 - 0.02 - 0.3 - 0.05))
    # The last line ends with the end-of-reply token; "\n" before it belongs to the line above only
    # through the character after that line, so it is not counted here.
    assert piece_confidence(second.span, REPLY) == pytest.approx(math.exp(-0.1 - 0.0 - 1.0 - 0.2 - 0.4))
    cut = Generation(REPLY.text, 10, 8, REPLY.token_logprobs, REPLY.token_ends, None)  # cut by max_new_tokens
    assert piece_confidence(second.span, cut) == pytest.approx(math.exp(-1.3))
    assert piece_confidence(None, REPLY) is None
    assert piece_confidence(first.span, Generation(REPLY.text, 10, 8)) is None  # no log-probabilities


def test_a_token_holding_two_lines_counts_for_both():
    reply = _generation([("Brand:Nike", -0.2), ("\nColor", -0.5), (":Black", -0.1)], end=0.0)
    first, second = parse_tag_spans(reply.text)
    assert piece_confidence(first.span, reply) == pytest.approx(math.exp(-0.7))
    assert piece_confidence(second.span, reply) == pytest.approx(math.exp(-0.6))


@pytest.mark.parametrize("text, value", [
    ("理肤泉特护防晒霜SPF50+ 30ml", "spf50"),
    ("Ｎｉｋｅ Air Zoom 男子跑步鞋", "nike"),
    ("The Original Donut Shop Nutty Caramel, 72 Count", "nutty caramel"),
    ("Apple/苹果 iPhone 15 Pro", "iPhone 15 Pro"),
])
def test_evidence_offsets_slice_the_input_to_the_value(text, value):
    start, end = evidence_span(text, value)
    assert value_key(text[start:end]) == value_key(value)


def test_evidence_prefers_whole_words_and_is_none_for_an_inferred_value():
    text = "Nikeland shoes by Nike"
    assert evidence_span(text, "Nike") == (18, 22)
    assert evidence_span("耐克跑步鞋", "Nike") is None
    # After normalisation the tag may be the vocabulary's form; the model's own form still grounds it.
    assert evidence_spans("理膚泉防曬霜", ["品牌:理肤泉", "品牌:耐克"], ["品牌:理膚泉", None]) == [(0, 3), None]
    assert highlight("理肤泉防晒霜50ml", [(0, 3), (3, 6), (6, 10)]) == "[理肤泉防晒霜50ml]"
    assert highlight("a b c", [(4, 5), None, (0, 1)]) == "[a] b [c]"


def test_to_result_grounds_normalised_tags_and_filters_by_confidence_monotonically():
    record = Record("1", "法国理膚泉防晒霜")
    vocab = Vocabulary.loads("品牌:理肤泉\n产品词:防晒霜\n")
    result = to_result(record, REPLY, TaggingOptions(), Normaliser(vocab))
    assert result.tags == ["品牌:理肤泉", "产品词:防晒霜"]
    assert result.evidence == [(2, 5), (5, 8)]
    assert all(0 <= c <= 1 for c in result.confidences)
    line = result.to_json()
    assert line["evidence"] == [[2, 5], [5, 8]] and len(line["confidence"]) == 2
    kept_by_threshold = []
    for threshold in [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]:
        filtered = to_result(record, REPLY, TaggingOptions(min_confidence=threshold))
        assert set(filtered.tags) | set(filtered.below_confidence) == {"品牌:理肤泉", "产品词:防晒霜"}
        kept_by_threshold.append(set(filtered.tags))
    assert all(later <= earlier for earlier, later in zip(kept_by_threshold, kept_by_threshold[1:]))
    assert kept_by_threshold[0] == {"品牌:理肤泉", "产品词:防晒霜"} and kept_by_threshold[-1] == set()
    assert kept_by_threshold[4] == {"品牌:理肤泉"}  # 0.69 and 0.15


def test_engine_log_probabilities_are_those_of_a_forward_pass(tiny_engine):
    import torch

    prompts = ["<|im_start|>user\n兰蔻小黑瓶精华肌底液50ml<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nNike<|im_end|>\n<|im_start|>assistant\n"]
    generations = tiny_engine.generate(prompts, max_new_tokens=12, batch_size=2)
    compared = 0
    for prompt, generation in zip(prompts, generations):
        assert len(generation.token_logprobs) == len(generation.token_ends) > 0
        assert generation.token_ends[-1] == len(generation.text)
        assert all(a <= b for a, b in zip(generation.token_ends, generation.token_ends[1:]))
        prompt_ids = tiny_engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = tiny_engine.tokenizer(generation.text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + reply_ids])
        with torch.no_grad():
            logits = tiny_engine.model(ids).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        expected = [float(logprobs[len(prompt_ids) + i - 1, token]) for i, token in enumerate(reply_ids)]
        if len(expected) == len(generation.token_logprobs):  # re-tokenising the reply may merge tokens
            assert generation.token_logprobs == pytest.approx(expected, abs=1e-3)
            compared += 1
        assert all(lp <= 1e-6 for lp in generation.token_logprobs)
    assert compared


def test_tagged_results_carry_a_confidence_per_tag(tiny_engine):
    records = [Record("a", "兰蔻小黑瓶精华肌底液50ml"), Record("b", "Nike Air Zoom running shoe")]
    for result in tag_records(records, tiny_engine, TaggingOptions(max_new_tokens=16, batch_size=2)):
        assert len(result.confidences) == len(result.tags) == len(result.evidence)
        assert all(c is not None and 0 <= c <= 1 for c in result.confidences)
        for tag, span in zip(result.tags, result.evidence):
            if span is not None:
                assert value_key(result.record.text[span[0]:span[1]]) == value_key(tag.split(":", 1)[-1])

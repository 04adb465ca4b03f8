"""Stage 5b: make every tag explain itself, after parsing and normalisation.

- **Evidence**: the characters of the ORIGINAL product text that ground the tag, found the way the
  evaluator compares tags (NFKC, case folded, each whitespace character as a space, traditional
  Chinese as simplified; spans.py), with Latin words matched whole where possible. None for a tag whose value is not in the text (inferred).
- **Confidence**: the probability the model gave to the piece of its reply that the tag was read from
  (the product of its tokens' probabilities), including the token that ended the piece, a newline or
  the end of the reply, because "the value stops here" is exactly where span errors happen. It lies
  in [0, 1]; None when the reply has no token probabilities (another engine) or the piece cannot be
  located (a JSON value with escapes).

`min_confidence` drops tags below a threshold: a larger threshold keeps a subset of what a smaller one
keeps, and tags without a confidence are kept. `llmtags calibrate` (calibrate.py) picks the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .metrics import split_tag
from .parse import ParsedTag
from .spans import ValueIndex, value_key
from .vocab import to_simplified


def piece_confidence(span: tuple[int, int] | None, generation: Any) -> float | None:
    """exp(sum of the log-probabilities of the tokens overlapping reply[start:end] and its terminator)."""
    logprobs = getattr(generation, "token_logprobs", None)
    ends = getattr(generation, "token_ends", None)
    if span is None or logprobs is None or ends is None:
        return None
    start, end = span
    terminated = end < len(generation.text)  # else the end-of-reply token terminates the piece
    limit = end + 1 if terminated else end
    total, token_start = 0.0, 0
    for logprob, token_end in zip(logprobs, ends):
        # A token that ends nowhere (the first half of a two-token character) covers that character.
        covers_end = max(token_end, token_start + 1)
        if covers_end > start and token_start < limit:
            total += logprob
        token_start = token_end
        if token_start >= limit:
            break
    if not terminated and generation.end_logprob is not None:
        total += generation.end_logprob
    return min(1.0, math.exp(total))


def _searched_texts(text: str) -> list[str]:
    """The text, and its simplified form where conversion changes it but keeps every character's place."""
    simplified = to_simplified(text)
    return [text] if simplified == text or len(simplified) != len(text) else [text, simplified]


def _first_match(texts: Sequence[str], values: Sequence[str]) -> tuple[int, int] | None:
    for value in values:
        key = value_key(to_simplified(value))
        if not key:
            continue
        for searched in texts:
            for whole_words in (True, False):
                found = ValueIndex([key], word_boundaries=whole_words).matches(searched)
                if found:
                    return found[0].start, found[0].end
    return None


def evidence_span(text: str, *values: str) -> tuple[int, int] | None:
    """Offsets into `text` of the first occurrence of the first of `values` found there: whole words
    first, then anywhere (a model number glued to a word, 'SPF50' in 'SPF50+'), then in the simplified
    form of a traditional-Chinese text (where conversion keeps every character's place). None: not
    in the text."""
    return _first_match(_searched_texts(text), values)


def _tag_values(tag: str, source: str | None) -> list[str]:
    """An output tag's value, then the value the model wrote before normalisation (an alias or the
    traditional form that the vocabulary mapped to this tag)."""
    values = [split_tag(tag)[1]]
    if source is not None and split_tag(source)[1] not in values:
        values.append(split_tag(source)[1])
    return values


def evidence_spans(text: str, tags: Sequence[str], sources: Sequence[str] | None = None
                   ) -> list[tuple[int, int] | None]:
    """Evidence of every tag of one record (see evidence_span), each searched by its value and then by
    its `sources` entry, the model's tag before normalisation; the text is prepared once."""
    texts = _searched_texts(text)
    return [_first_match(texts, _tag_values(tag, source))
            for tag, source in zip(tags, sources if sources is not None else [None] * len(tags))]


def confidences_by_tag(parsed: Sequence[ParsedTag], generation: Any) -> dict[str, float | None]:
    return {p.tag: piece_confidence(p.span, generation) for p in parsed}


def merged_spans(spans: Sequence[tuple[int, int] | None]) -> list[tuple[int, int]]:
    """The evidence spans sorted, overlapping ones merged, `None`s left out."""
    merged: list[list[int]] = []
    for start, end in sorted(s for s in spans if s is not None):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def highlight(text: str, spans: Sequence[tuple[int, int] | None], open_mark: str = "[", close_mark: str = "]") -> str:
    """`text` with every evidence span bracketed (overlapping spans merged), for --explain."""
    out, at = [], 0
    for start, end in merged_spans(spans):
        out += [text[at:start], open_mark, text[start:end], close_mark]
        at = end
    out.append(text[at:])
    return "".join(out)


def explain_lines(text: str, tags: Sequence[str], confidences: Sequence[float | None],
                  evidence: Sequence[tuple[int, int] | None]) -> list[str]:
    """A human-readable view: the text with evidence bracketed, then one line per tag."""
    lines = [highlight(text, evidence)]
    for tag, confidence, span in zip(tags, confidences, evidence):
        conf = f"{round(confidence, 3):.3f}" if confidence is not None else "  -  "
        where = f"{span[0]}-{span[1]}" if span is not None else "inferred"
        lines.append(f"  {conf}  {tag}  ({where})")
    return lines

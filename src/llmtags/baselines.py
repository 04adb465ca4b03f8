"""Non-model baselines, the floor a tuned model has to beat.

`DictionaryTagger` remembers every value seen in the training tags and tags a text with each one it
finds there: longest matches first, spans never overlapping, each value under its most frequent
training attribute.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from llmtags.metrics import canonical, split_tag

_END = ""  # trie key marking the end of a value; no character of a normalised text is empty


def _is_cjk(ch: str) -> bool:
    return "\u2e80" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\U00020000" <= ch <= "\U0003134f"


def _is_word_char(ch: str) -> bool:
    # CJK characters are letters to Python but are not separated by spaces, so they count as
    # boundaries: 'ka' stands alone in '理肤泉ka舒缓'.
    return ch.isalnum() and not _is_cjk(ch)


def normalise_for_match(text: str) -> tuple[str, list[int]]:
    """Text compared character by character as the evaluator does (NFKC, case folded; whitespace as
    single spaces), with the original index of every output character so spans map back."""
    if text.isascii():
        lowered = text.lower()
        chars = [" " if ch.isspace() else ch for ch in lowered]
        return "".join(chars), list(range(len(text)))
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        mapped = " " if ch.isspace() else unicodedata.normalize("NFKC", ch).casefold()
        out.append(mapped)
        origin.extend([i] * len(mapped))
    return "".join(out), origin


def _value_key(value: str) -> str:
    normalised, _ = normalise_for_match(value)
    return " ".join(normalised.split())


class DictionaryTagger:
    """Tags every training value found in a text; `values` maps a match key to its attribute."""

    def __init__(self, values: dict[str, str | None], word_boundaries: bool = True) -> None:
        self.values = values
        self.word_boundaries = word_boundaries
        self._trie: dict[str, Any] = {}
        for key in values:
            node = self._trie
            for ch in key:
                node = node.setdefault(ch, {})
            node[_END] = key

    @classmethod
    def from_records(
        cls,
        records: Iterable[Any],
        word_boundaries: bool = True,
        min_count: int = 1,
        min_length: int = 1,
    ) -> DictionaryTagger:
        """Collect the values of the training tags (every any-of form too).

        A value seen under several attributes goes to the most frequent one (the first seen on a tie).
        Values without a single letter or digit are skipped: the Taobao NER labels contain stray
        punctuation spans such as '其他:,' that would fire on nearly every title. `min_count` and
        `min_length` (characters) are knobs against one-off and one-character noise.
        """
        by_value: dict[str, Counter[str | None]] = {}
        for record in records:
            for item in record.tags or []:
                for form in [item] if isinstance(item, str) else item:
                    attribute, value = split_tag(form)
                    key = _value_key(value)
                    if len(key) >= max(min_length, 1) and any(ch.isalnum() for ch in key):
                        by_value.setdefault(key, Counter())[attribute] += 1
        values: dict[str, str | None] = {}
        for key, attributes in by_value.items():
            if sum(attributes.values()) >= min_count:
                # most_common keeps insertion order among equal counts, hence "first seen".
                values[key] = attributes.most_common(1)[0][0]
        return cls(values, word_boundaries)

    def __len__(self) -> int:
        return len(self.values)

    def _candidates(self, norm: str) -> list[tuple[int, int, str]]:
        """Every (start, end, key) where a known value occurs, boundaries respected."""
        found: list[tuple[int, int, str]] = []
        n = len(norm)
        for start in range(n):
            if self.word_boundaries and start > 0 and _is_word_char(norm[start]) and _is_word_char(norm[start - 1]):
                continue  # a value starting with a word character cannot start inside a word
            node = self._trie
            end = start
            while end < n:
                node = node.get(norm[end])
                if node is None:
                    break
                end += 1
                key = node.get(_END)
                if key is None:
                    continue
                if self.word_boundaries and end < n and _is_word_char(norm[end - 1]) and _is_word_char(norm[end]):
                    continue
                found.append((start, end, key))
        return found

    def tag(self, text: str) -> list[str]:
        """Tags in text order, each canonical tag once."""
        norm, origin = normalise_for_match(text)
        # Longest first over the whole text, so 'La Roche-Posay' wins over 'Roche' and over a shorter
        # value that merely starts earlier.
        chosen: list[tuple[int, int, str]] = []
        taken = [False] * len(norm)
        for start, end, key in sorted(self._candidates(norm), key=lambda c: (c[0] - c[1], c[0])):
            if any(taken[start:end]):
                continue
            taken[start:end] = [True] * (end - start)
            chosen.append((start, end, key))
        tags: list[str] = []
        seen: set[str] = set()
        for start, end, key in sorted(chosen):
            span = text[origin[start] : origin[end - 1] + 1].strip()
            attribute = self.values[key]
            tag = span if attribute is None else f"{attribute}:{span}"
            if canonical(tag) not in seen:
                seen.add(canonical(tag))
                tags.append(tag)
        return tags

    def tag_many(self, texts: Sequence[str]) -> list[list[str]]:
        return [self.tag(text) for text in texts]

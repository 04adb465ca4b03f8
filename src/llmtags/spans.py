"""Finding known values in product text: a character trie over normalised values.

Text and values are compared the way the evaluator compares tags (NFKC, case folded, runs of
whitespace as one space), and every match keeps its offsets into the ORIGINAL text, so a tag can point
at the characters that ground it. The dictionary baseline, vocabulary candidates and evidence spans
all use this one index.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_END = ""  # trie key marking the end of a value; no character of a normalised text is empty


def is_cjk(ch: str) -> bool:
    return "\u2e80" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\U00020000" <= ch <= "\U0003134f"


def is_word_char(ch: str) -> bool:
    # CJK characters are letters to Python but are not separated by spaces, so they count as
    # boundaries: 'ka' stands alone in '理肤泉ka舒缓'.
    return ch.isalnum() and not is_cjk(ch)


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


def value_key(value: str) -> str:
    normalised, _ = normalise_for_match(value)
    return " ".join(normalised.split())


@dataclass(frozen=True)
class Match:
    start: int  # offsets into the original text: text[start:end] is the matched span
    end: int
    key: str  # the normalised value that matched


class ValueIndex:
    """All occurrences of a set of values in a text, on word boundaries for Latin letters and digits."""

    def __init__(self, keys: Iterable[str], word_boundaries: bool = True) -> None:
        self.word_boundaries = word_boundaries
        self._trie: dict[str, Any] = {}
        for key in keys:
            if not key:
                continue
            node = self._trie
            for ch in key:
                node = node.setdefault(ch, {})
            node[_END] = key

    def _normalised_matches(self, norm: str) -> list[tuple[int, int, str]]:
        found: list[tuple[int, int, str]] = []
        n = len(norm)
        for start in range(n):
            if self.word_boundaries and start > 0 and is_word_char(norm[start]) and is_word_char(norm[start - 1]):
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
                if self.word_boundaries and end < n and is_word_char(norm[end - 1]) and is_word_char(norm[end]):
                    continue
                found.append((start, end, key))
        return found

    def matches(self, text: str) -> list[Match]:
        """Every occurrence, overlapping ones included, in order of start then length."""
        norm, origin = normalise_for_match(text)
        return [Match(origin[s], origin[e - 1] + 1, key) for s, e, key in self._normalised_matches(norm)]

    def longest_matches(self, text: str) -> list[Match]:
        """Non-overlapping occurrences, longest first over the whole text, returned in text order:
        'La Roche-Posay' wins over 'Roche', and over a shorter value that merely starts earlier."""
        chosen: list[Match] = []
        taken: set[int] = set()
        for match in sorted(self.matches(text), key=lambda m: (m.start - m.end, m.start)):
            span = range(match.start, match.end)
            if taken.intersection(span):
                continue
            taken.update(span)
            chosen.append(match)
        return sorted(chosen, key=lambda m: m.start)

"""Non-model baselines, the floor a tuned model has to beat.

`DictionaryTagger` remembers every value seen in the training tags and tags a text with each one it
finds there: longest matches first, spans never overlapping, each value under its most frequent
training attribute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from llmtags.metrics import canonical, split_tag
from llmtags.spans import ValueIndex, value_key


class DictionaryTagger:
    """Tags every training value found in a text; `values` maps a match key to its attribute."""

    def __init__(self, values: dict[str, str | None], word_boundaries: bool = True) -> None:
        self.values = values
        self.index = ValueIndex(values, word_boundaries)

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
                    key = value_key(value)
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

    def tag(self, text: str) -> list[str]:
        """Tags in text order, each canonical tag once, spelled as the text spells them."""
        tags: list[str] = []
        seen: set[str] = set()
        for match in self.index.longest_matches(text):
            span = text[match.start : match.end].strip()
            attribute = self.values[match.key]
            tag = span if attribute is None else f"{attribute}:{span}"
            if canonical(tag) not in seen:
                seen.add(canonical(tag))
                tags.append(tag)
        return tags

    def tag_many(self, texts: Sequence[str]) -> list[list[str]]:
        return [self.tag(text) for text in texts]

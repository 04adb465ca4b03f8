"""Stage 2a: a pool of labelled records, and for each product the K most similar of them as demonstrations.

`DemoPool` ranks the pool with BM25 (the `bm25s` library) over character bigrams for Chinese and
lower-cased words for English. For one record:
- records of the same category come first, where categories exist;
- a pool record with the same text is never shown (a record must not see its own answer);
- the K best are returned least similar first, so the most similar sits nearest to the product.

The pool also supplies a schema for records that have none (`schema_for`): the attribute list of the
record's category in the pool (the pool's own list where it has no categories). A record whose category
the pool does not know gets the pool's catalogue-wide core (the attributes most of its categories
share: brand, colour, material, model, ...) and the attributes of those of its nearest neighbours that
are really similar to it (`LEND_SIMILARITY`), so jeans do not get a coffee's `Flavor`.

Building the index costs milliseconds per thousand titles, so it is built once per run, in memory, and
shared between runs in one process by the pool's content hash (no cache on disk).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence

import bm25s
import numpy as np

from .candidates import labelled_sources
from .prompts import Demo, demo_of, first_form
from .records import GoldTag, Record

# Neighbours whose attributes make the schema of a record without category: more than the K shown, so
# an attribute that only some similar products have is still named.
SCHEMA_NEIGHBOURS = 10
# A neighbour lends its attributes to a record of unknown category only when at least this similar
# (`similarity`: Jaccard of their BM25 terms). Measured by eval/schema_for_unknown.py on en dev: the τ
# whose schemas are most precise where the pool knows the category (0.70 of their attributes the
# category's own, 0.97 of gold attributes named), and, where it does not, as precise as the core alone.
LEND_SIMILARITY = 0.15
# The catalogue-wide core: attributes in at least this share of the pool's categories.
CORE_SHARE = 0.4

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_CJK_RE = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def tokens(text: str) -> list[str]:
    """BM25 terms: lower-cased words, and each run of CJK characters as its overlapping bigrams (and
    unigrams, so a one-character product word still matches)."""
    terms: list[str] = []
    for word in _WORD_RE.findall(text.casefold()):
        if _CJK_RE.search(word):
            for run in re.split(r"([\u3400-\u9fff\uf900-\ufaff]+)", word):
                if not run:
                    continue
                if _CJK_RE.match(run):
                    terms.extend(run)
                    terms.extend(run[i : i + 2] for i in range(len(run) - 1))
                else:
                    terms.append(run)
        else:
            terms.append(word)
    return terms


def attribute_of(tag: GoldTag) -> str | None:
    attribute, sep, _ = first_form(tag).partition(":")
    return attribute.strip() if sep and attribute.strip() else None


def _ordered_union(lists: Sequence[Sequence[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for items in lists:
        for item in items:
            seen.setdefault(item, None)
    return list(seen)


class DemoPool:
    """Labelled records, indexed for retrieval. `demos_for(record, k)` is what a prompt shows."""

    def __init__(self, records: Sequence[Record], source: str = "") -> None:
        self.records = [r for r in records if r.tags]
        if not self.records:
            raise ValueError(f"demo pool {source or '(records)'} holds no labelled record")
        self._texts = [r.text for r in self.records]
        terms = [tokens(t) for t in self._texts]
        self._terms = [frozenset(t) for t in terms]  # for `similarity`
        self._categories = np.array([(r.category or "").casefold() for r in self.records], dtype=object)
        self._index = bm25s.BM25()
        self._index.index(terms, show_progress=False)
        self._category_schema = self._schemas_by_category()
        # A pool without categories is one catalogue with one attribute list: all its attributes, the
        # most used first.
        counts = Counter(a for r in self.records for a in map(attribute_of, r.tags or ()) if a)
        self._pool_schema = [a for a, _ in counts.most_common()] if not self._category_schema else None
        self.core_schema = core_attributes(list(self._category_schema.values()))

    def __len__(self) -> int:
        return len(self.records)

    def _schemas_by_category(self) -> dict[str, list[str]]:
        """Each category's schema as the pool gives it, else the attributes its records use."""
        given: dict[str, list[str]] = {}
        used: dict[str, list[list[str]]] = {}
        for record in self.records:
            if not record.category:
                continue
            key = record.category.casefold()
            if record.schema and key not in given:
                given[key] = list(record.schema)
            used.setdefault(key, []).append([a for a in map(attribute_of, record.tags or ()) if a])
        return {key: given.get(key) or _ordered_union(lists) for key, lists in used.items()}

    def ranked(self, record: Record, k: int) -> list[Record]:
        """The `k` most similar pool records, best first: same category before others, then BM25."""
        return [self.records[i] for i in self._ranked(record, tokens(record.text), k)]

    def neighbours(self, record: Record, k: int) -> list[tuple[Record, float]]:
        """`ranked`, each with its `similarity` to `record`."""
        terms = tokens(record.text)
        found = frozenset(terms)
        return [(self.records[i], similarity(found, self._terms[i])) for i in self._ranked(record, terms, k)]

    def _ranked(self, record: Record, terms: list[str], k: int) -> list[int]:
        """The pool indices of `ranked`; `terms`: the record's `tokens`."""
        if k <= 0:
            return []
        # A text without a word (`★★★`) matches nothing: the pool in its own order.
        scores = self._index.get_scores(terms) if terms else np.zeros(len(self.records))
        same = self._categories == (record.category or "").casefold() if record.category else None
        # Sort by (same category, score), descending; ties keep pool order (stable).
        key = scores + (same * (scores.max() + 1.0) if same is not None else 0.0)
        order = np.argsort(-key, kind="stable")
        chosen: list[int] = []
        for i in order:
            if self._texts[i] == record.text:
                continue
            chosen.append(int(i))
            if len(chosen) == k:
                break
        return chosen

    def demos_for(self, record: Record, k: int, view: str = "full") -> list[Demo]:
        """The demonstrations for `record`: its `k` nearest pool records, the most similar last, each
        whole or by its title (`view`, budget.demo_text)."""
        return [demo_of(r, view=view) for r in reversed(self.ranked(record, k))]

    def _known_schema(self, record: Record) -> list[str] | None:
        """The schema this pool's catalogue gives `record`: its own, else the pool's (a pool without
        categories is one catalogue), else its category's; None for a product of unknown category."""
        if record.schema:
            return list(record.schema)
        if self._pool_schema is not None:
            return list(self._pool_schema)
        if record.category and record.category.casefold() in self._category_schema:
            return list(self._category_schema[record.category.casefold()])
        return None

    def knows(self, record: Record) -> bool:
        """Whether `record` is of a kind this pool's catalogue holds (`_known_schema`); one that is not is a
        product of unknown category, which `schema_for` gives the core."""
        return self._known_schema(record) is not None

    def schema_for(self, record: Record, lend_similarity: float = LEND_SIMILARITY) -> list[str] | None:
        """The attribute names a record without a schema is prompted with: its category's in the pool;
        in a pool without categories, the pool's; else the pool's catalogue-wide core followed by the
        attributes of those of its `SCHEMA_NEIGHBOURS` nearest neighbours at least `lend_similarity`
        similar to it (their categories' schemas where they have them)."""
        known = self._known_schema(record)
        if known is not None:
            return known
        lists = [self.core_schema]
        for neighbour, alike in self.neighbours(record, SCHEMA_NEIGHBOURS):
            if alike >= lend_similarity:
                lists.append(neighbour.schema or [a for a in map(attribute_of, neighbour.tags or ()) if a])
        return _ordered_union(lists) or None


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity of two texts' BM25 terms (`tokens`): 1.0 for the same words, 0.0 for none shared."""
    return len(a & b) / len(a | b) if a or b else 0.0


def core_attributes(schemas: Sequence[Sequence[str]], share: float = CORE_SHARE) -> list[str]:
    """The attributes at least `share` of `schemas` (one per category) name, the most shared first."""
    counts = Counter(a for schema in schemas for a in dict.fromkeys(schema))
    return [a for a, n in counts.most_common() if n >= share * len(schemas)] if schemas else []


def load_pool(spec: str) -> DemoPool:
    """The pool of `--demos SPEC`: one labelled file, or several joined by commas (as --candidates)."""
    return shared_pool(labelled_sources(spec), spec)


def pool_hash(records: Sequence[Record]) -> str:
    """A content hash of what prompts use of a pool: texts, categories, schemas and tags."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(repr((r.text, r.category, r.schema, r.tags)).encode("utf-8"))
    return digest.hexdigest()


_POOLS: dict[str, DemoPool] = {}


def shared_pool(records: Sequence[Record], source: str = "") -> DemoPool:
    """A `DemoPool` of `records`, built once per process for the same content."""
    key = pool_hash([r for r in records if r.tags])
    if key not in _POOLS:
        _POOLS[key] = DemoPool(records, source)
    return _POOLS[key]


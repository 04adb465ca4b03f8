"""Candidate recall: the vocabulary entries whose value (or an alias) occurs in a product's text.

Candidates are offered to the model in the prompt (the `candidates` template variable), so a tuned
model chooses and corrects what the catalogue already knows instead of re-inventing span boundaries.

Training needs care: a vocabulary built from the training set contains every training record's own
gold tags, so the model would learn that gold tags are always among the candidates. At test time they
are not (unseen values). `find(..., own_tags=record.tags)` therefore drops entries that exist only
because of the record itself (seen in one record, and it is this one), which makes training prompts
look like test prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .metrics import canonical
from .records import GoldTag, Record, load_labelled
from .spans import ValueIndex, value_key
from .vocab import VocabEntry, Vocabulary, build_vocabulary


@dataclass(frozen=True)
class Candidate:
    tag: str  # the vocabulary's canonical tag
    start: int  # text[start:end] is the span that matched
    end: int
    via: str  # "value" or "alias"


class CandidateFinder:
    def __init__(self, vocab: Vocabulary, max_candidates: int = 24, min_chars: int = 2) -> None:
        """`min_chars`: shorter values are not looked up; one-character Chinese values such as '包'
        occur in nearly every title and would crowd out the useful candidates."""
        self.max_candidates = max_candidates
        self.by_key: dict[str, list[tuple[VocabEntry, str]]] = {}
        for entry in vocab:
            for value, via in [(entry.value, "value")] + [(a, "alias") for a in entry.aliases]:
                key = value_key(value)
                if len(key) >= min_chars and any(ch.isalnum() for ch in key):
                    self.by_key.setdefault(key, []).append((entry, via))
        for entries in self.by_key.values():
            # The most frequent reading first; ties by tag, so a saved vocabulary offers what its source did.
            entries.sort(key=lambda pair: (-pair[0].count, pair[0].tag))
        self.index = ValueIndex(self.by_key)

    def find(
        self, text: str, own_tags: Sequence[GoldTag] = (), attributes: Sequence[str] | None = None
    ) -> list[Candidate]:
        """Candidates in text order; longer spans win when there are more than `max_candidates`.
        With `attributes` (a record's schema), only entries of those attributes are offered."""
        own = {canonical(form) for tag in own_tags for form in ([tag] if isinstance(tag, str) else tag)}
        allowed = {canonical(a) for a in attributes} if attributes else None
        found: list[Candidate] = []
        seen: set[str] = set()
        for match in sorted(self.index.matches(text), key=lambda m: (m.start - m.end, m.start)):
            for entry, via in self.by_key[match.key]:
                key = canonical(entry.tag)
                if key in seen or (entry.count <= 1 and key in own):
                    continue
                if allowed is not None and canonical(entry.attribute or "") not in allowed:
                    continue
                seen.add(key)
                found.append(Candidate(entry.tag, match.start, match.end, via))
        found = found[: self.max_candidates]
        return sorted(found, key=lambda c: (c.start, -c.end))

    def tags(
        self, text: str, own_tags: Sequence[GoldTag] = (), attributes: Sequence[str] | None = None
    ) -> list[str]:
        return [c.tag for c in self.find(text, own_tags, attributes)]


def candidate_recall(golds: Sequence[Sequence[GoldTag]], candidates: Sequence[Sequence[str]]) -> float:
    """Share of gold tags (an any-of group counts once) that are among the record's candidates."""
    total = hit = 0
    for gold, offered in zip(golds, candidates):
        offered_keys = {canonical(c) for c in offered}
        for tag in {canonical(t) if isinstance(t, str) else tuple(sorted(canonical(f) for f in t)) for t in gold}:
            total += 1
            forms = [tag] if isinstance(tag, str) else list(tag)
            hit += any(f in offered_keys for f in forms)
    return hit / total if total else 1.0


def candidate_sources(spec: str) -> list[str]:
    """The files behind a `--candidates` value: one path, or several joined by commas (a path that
    exists as a file is taken whole, so a comma inside a real file name still works)."""
    if Path(spec).is_file():
        return [spec]
    return [part.strip() for part in spec.split(",") if part.strip()]


def labelled_sources(spec: str) -> list[Record]:
    """The labelled records of a `--demos` or `--proposer` value: one file, or several joined by commas."""
    return [record for path in candidate_sources(spec) for record in load_labelled(path)]


def load_candidate_vocabulary(spec: str) -> Vocabulary:
    """Vocabulary files, or labelled JSONL files whose gold tags are collected on the fly (a licence
    may forbid shipping a vocabulary derived from a data set, but allow reading the set itself).
    Several comma-separated sources merge into one vocabulary."""
    merged = Vocabulary()
    for path in candidate_sources(spec):
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "tags" in row and "tag" not in row:
            vocab = build_vocabulary(load_labelled(path))
        else:
            vocab = Vocabulary.load(path)
        for entry in vocab:
            merged.add(entry.tag, entry.count, entry.aliases)
    return merged


def candidate_finder(spec: str) -> CandidateFinder:
    """The finder of `--candidates SPEC`: the entries of its vocabulary (see `load_candidate_vocabulary`)."""
    return CandidateFinder(load_candidate_vocabulary(spec))

"""Tag vocabulary and the layered normaliser that maps a model's raw tags onto it.

Vocabulary file (JSONL, one canonical tag a line):
    {"tag": "品牌:理肤泉", "aliases": ["La Roche-Posay", "理膚泉"], "count": 12}
Aliases are other surface forms of the VALUE; they apply under the entry's attribute. The attribute
(type) is the part before the first ':'; a tag without ':' has none.
A plain text list is read too: one tag a line, optionally a TAB and aliases separated by '|';
blank lines and lines starting with '#' are skipped.

The normaliser tries, in order, layers that loosen the comparison step by step, and records which
layer matched, so a report can show how much each one contributes:
    exact, width_case, simplified, punctuation, alias, fuzzy, then new (open) or dropped (closed).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rapidfuzz import fuzz, process

from llmtags.atomic import write_text
from llmtags.metrics import canonical, split_tag

LAYERS = ("exact", "width_case", "simplified", "punctuation", "alias", "fuzzy", "new", "dropped")
MATCH_LAYERS = LAYERS[:6]
POLICIES = ("open", "closed")


# --- entries and the vocabulary ---------------------------------------------------------------------


@dataclass
class VocabEntry:
    tag: str
    aliases: list[str] = field(default_factory=list)
    count: int = 0

    @property
    def attribute(self) -> str | None:
        return split_tag(self.tag)[0]

    @property
    def value(self) -> str:
        return split_tag(self.tag)[1]

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "aliases": list(self.aliases), "count": self.count}


class Vocabulary:
    """Canonical tags keyed by `canonical(tag)`, so 'Brand:Nike' and 'brand : NIKE' are one entry."""

    def __init__(self, entries: Iterable[VocabEntry] = ()) -> None:
        self._entries: dict[str, VocabEntry] = {}
        for entry in entries:
            self.add(entry.tag, entry.count, entry.aliases)

    def add(self, tag: str, count: int = 1, aliases: Iterable[str] = ()) -> VocabEntry:
        """Add a tag or merge into the existing entry: counts sum, new aliases are appended."""
        tag = tag.strip()
        if not tag:
            raise ValueError("empty tag")
        key = canonical(tag)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = VocabEntry(tag, [], 0)
        entry.count += count
        known = {canonical(entry.value)} | {canonical(a) for a in entry.aliases}
        for alias in aliases:
            alias = alias.strip()
            if alias and canonical(alias) not in known:
                entry.aliases.append(alias)
                known.add(canonical(alias))
        return entry

    def get(self, tag: str) -> VocabEntry | None:
        return self._entries.get(canonical(tag))

    def __contains__(self, tag: object) -> bool:
        return isinstance(tag, str) and canonical(tag) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[VocabEntry]:
        return iter(self._entries.values())

    def attributes(self) -> list[str]:
        return sorted({e.attribute for e in self if e.attribute is not None})

    # --- files ---

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a JSONL vocabulary or a plain tag list, telling them apart by the first content line."""
        text = Path(path).read_text(encoding="utf-8")
        return cls.loads(text, source=str(path))

    @classmethod
    def loads(cls, text: str, source: str = "<string>") -> Vocabulary:
        lines = text.splitlines()
        first = next((ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")), "")
        if _looks_like_jsonl(first):
            return cls(_jsonl_entries(lines, source))
        return cls(_plain_entries(lines))

    def save(self, path: str | Path) -> None:
        """Write JSONL (atomically), most frequent tag first (ties by tag) so diffs of re-built files stay small."""
        ordered = sorted(self, key=lambda e: (-e.count, e.tag))
        write_text(path, "".join(json.dumps(entry.to_json(), ensure_ascii=False) + "\n" for entry in ordered))


def _looks_like_jsonl(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "tag" in obj


def _jsonl_entries(lines: Sequence[str], source: str) -> Iterator[VocabEntry]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{number}: malformed JSON: {exc.msg}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("tag"), str) or not obj["tag"].strip():
            raise ValueError(f"{source}:{number}: expected an object with a non-empty string 'tag'")
        aliases = obj.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"{source}:{number}: 'aliases' must be a list of strings")
        count = obj.get("count", 0)
        if not isinstance(count, int) or isinstance(count, bool):
            raise ValueError(f"{source}:{number}: 'count' must be an integer")
        yield VocabEntry(obj["tag"], aliases, count)


def _plain_entries(lines: Sequence[str]) -> Iterator[VocabEntry]:
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        tag, _, rest = line.partition("\t")
        aliases = [a for a in (s.strip() for s in rest.split("|")) if a] if rest else []
        yield VocabEntry(tag.strip(), aliases, 0)


def build_vocabulary(records: Iterable[Any]) -> Vocabulary:
    """Gold tags of a labelled set; `count` is the number of records carrying the tag.

    For an any-of group the first form is the canonical tag and the values of the others become its
    aliases (groups in the benchmark sets never mix attributes).
    """
    vocab = Vocabulary()
    for record in records:
        seen: set[str] = set()
        for item in record.tags or []:
            forms = [item] if isinstance(item, str) else list(item)
            if not forms or not forms[0].strip():
                continue
            key = canonical(forms[0])
            aliases = [split_tag(f)[1] for f in forms[1:]]
            vocab.add(forms[0], 0 if key in seen else 1, aliases)
            seen.add(key)
    return vocab


# --- comparison keys, one per layer -----------------------------------------------------------------


_CJK = "\u2e80-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_CJK_RE = re.compile(f"[{_CJK}]")


def _has_cjk(text: str) -> bool:
    # A regex scan, not a per-character loop: this runs several times per entry of large vocabularies.
    return not text.isascii() and _CJK_RE.search(text) is not None


@lru_cache(maxsize=1)
def _converter() -> Any:
    from opencc import (
        OpenCC,  # imported on first use: building its dictionaries takes a moment
    )

    return OpenCC("t2s")


def to_simplified(text: str) -> str:
    """Traditional to simplified Chinese; other text is returned untouched without calling OpenCC."""
    return _converter().convert(text) if _has_cjk(text) else text


def width_case_key(tag: str) -> str:
    """NFKC (full-width to half-width), case folding, trimming: the evaluator's own comparison."""
    return canonical(tag)


def simplified_key(tag: str) -> str:
    key = width_case_key(tag)
    return width_case_key(to_simplified(key)) if _has_cjk(key) else key


def _punctuation_table() -> dict[int, str | None]:
    # Basic Multilingual Plane only: scanning all of Unicode would cost a second at import.
    table: dict[int, str | None] = {}
    for code in range(0x10000):
        ch = chr(code)
        if ch.isspace() or unicodedata.category(ch).startswith("P") or ch in "~|^":
            table[code] = " "
    for apostrophe in "'\u2019\u2018`\u02bc":
        table[ord(apostrophe)] = None  # "Men's" and "Mens" are the same word; a space would split it
    return table


_PUNCTUATION = _punctuation_table()
_CJK_SPACE = re.compile(f"(?<=[{_CJK}]) | (?=[{_CJK}])")


def squash_punctuation(text: str) -> str:
    """Punctuation and whitespace runs become one space; spaces beside CJK characters go (CJK text
    does not separate words with spaces), apostrophes vanish. Expects NFKC, case-folded text."""
    spaced = " ".join(text.translate(_PUNCTUATION).split())
    return _CJK_SPACE.sub("", spaced) if _has_cjk(spaced) else spaced


def _punctuation_parts(attribute: str | None, value: str) -> tuple[str | None, str]:
    def one(part: str) -> str:
        return squash_punctuation(simplified_key(part))

    return (None if attribute is None else one(attribute)), one(value)


def _join(attribute: str | None, value: str) -> str:
    return value if attribute is None else f"{attribute}:{value}"


def punctuation_key(tag: str) -> str:
    """simplified_key, then punctuation variants folded in the attribute and the value separately
    ('La Roche-Posay' = 'la roche posay', '理肤泉·ka' = '理肤泉ka', full-width punctuation included)."""
    return _join(*_punctuation_parts(*split_tag(tag)))


def tidy(tag: str) -> str:
    """A presentable form of a tag kept as new: NFKC, trimmed, spaces collapsed, ':' tight; case kept."""
    attribute, value = split_tag(unicodedata.normalize("NFKC", tag))
    value = " ".join(value.split())
    return value if attribute is None else f"{' '.join(attribute.split())}:{value}"


# --- the normaliser ---------------------------------------------------------------------------------


@dataclass
class NormalisedTag:
    tag: str | None  # the output tag; None when dropped
    source: str  # the model's raw tag
    layer: str  # one of LAYERS
    is_new: bool = False
    score: float | None = None  # fuzzy similarity (0-100), only for the fuzzy layer

    @property
    def kept(self) -> bool:
        return self.tag is not None

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "source": self.source, "layer": self.layer, "is_new": self.is_new, "score": self.score}


@dataclass
class _FuzzyPool:
    keys: list[str] = field(default_factory=list)
    entries: list[VocabEntry] = field(default_factory=list)


class Normaliser:
    """Maps raw tags onto a vocabulary through the layers of LAYERS, in order.

    Key dictionaries are built once, so a lookup costs a few dictionary probes plus, only for tags no
    cheaper layer matched, one rapidfuzz scan over the entries of the same attribute.
    """

    def __init__(self, vocab: Vocabulary, policy: str = "open", fuzzy_threshold: float = 90.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.vocab = vocab
        self.policy = policy
        self.fuzzy_threshold = fuzzy_threshold
        self._exact: dict[str, VocabEntry] = {}
        self._width_case: dict[str, VocabEntry] = {}
        self._simplified: dict[str, VocabEntry] = {}
        self._punctuation: dict[str, VocabEntry] = {}
        self._alias: dict[str, VocabEntry] = {}
        self._fuzzy: dict[str | None, _FuzzyPool] = {}
        self._cache: dict[str, NormalisedTag] = {}
        # Most frequent first: where two entries collapse onto one loose key, the common one wins.
        for entry in sorted(vocab, key=lambda e: -e.count):
            self._index(entry)

    def _index(self, entry: VocabEntry) -> None:
        self._exact.setdefault(entry.tag.strip(), entry)
        self._width_case.setdefault(width_case_key(entry.tag), entry)
        self._simplified.setdefault(simplified_key(entry.tag), entry)
        attribute, value = _punctuation_parts(entry.attribute, entry.value)
        if value:
            self._punctuation.setdefault(_join(attribute, value), entry)
            pool = self._fuzzy.setdefault(attribute, _FuzzyPool())
            pool.keys.append(value)
            pool.entries.append(entry)
        for alias in entry.aliases:
            alias_value = _punctuation_parts(None, alias)[1]
            if alias_value:
                self._alias.setdefault(_join(attribute, alias_value), entry)

    def match_layer(self, tag: str, layer: str) -> tuple[VocabEntry, float | None] | None:
        """Try one matching layer on its own: (entry, fuzzy score or None), or None if it fails."""
        if layer == "exact":
            hit = self._exact.get(tag.strip())
        elif layer == "width_case":
            hit = self._width_case.get(width_case_key(tag))
        elif layer == "simplified":
            hit = self._simplified.get(simplified_key(tag))
        elif layer in ("punctuation", "alias"):
            attribute, value = _punctuation_parts(*split_tag(tag))
            table = self._punctuation if layer == "punctuation" else self._alias
            hit = table.get(_join(attribute, value)) if value else None
        elif layer == "fuzzy":
            return self._fuzzy_match(tag)
        else:
            raise ValueError(f"{layer!r} is not a matching layer: choose one of {', '.join(MATCH_LAYERS)}")
        return None if hit is None else (hit, None)

    def _fuzzy_match(self, tag: str) -> tuple[VocabEntry, float] | None:
        # Only entries of the same attribute compete: 'Color:Black' must never become 'Brand:Blackview'.
        attribute, value = _punctuation_parts(*split_tag(tag))
        pool = self._fuzzy.get(attribute)
        if not value or pool is None:
            return None
        best = process.extractOne(
            value, pool.keys, scorer=fuzz.ratio, processor=None, score_cutoff=self.fuzzy_threshold
        )
        if best is None:
            return None
        _, similarity, index = best
        return pool.entries[index], float(similarity)

    def match(self, tag: str) -> NormalisedTag:
        """Normalise one raw tag (cached: models repeat themselves across records)."""
        cached = self._cache.get(tag)
        if cached is not None:
            return cached
        result = self._match_uncached(tag)
        self._cache[tag] = result
        return result

    def _match_uncached(self, tag: str) -> NormalisedTag:
        for layer in MATCH_LAYERS:
            hit = self.match_layer(tag, layer)
            if hit is not None:
                entry, similarity = hit
                return NormalisedTag(entry.tag, tag, layer, False, similarity)
        if self.policy == "open":
            return NormalisedTag(tidy(tag), tag, "new", True)
        return NormalisedTag(None, tag, "dropped")

    def normalise(self, tags: Sequence[str]) -> list[NormalisedTag]:
        """One result per distinct outcome, in input order: a later raw tag that lands on an output
        already produced is left out; dropped tags are listed (once per distinct source) for reports."""
        results: list[NormalisedTag] = []
        seen: set[str] = set()
        for raw in tags:
            if not raw or not raw.strip():
                continue
            result = self.match(raw)
            key = "kept\0" + canonical(result.tag) if result.tag is not None else "dropped\0" + canonical(raw)
            if key in seen:
                continue
            seen.add(key)
            results.append(result)
        return results

    def apply(self, tags: Sequence[str]) -> list[str]:
        """The kept output tags only, de-duplicated."""
        return [r.tag for r in self.normalise(tags) if r.tag is not None]


def layer_counts(results: Iterable[NormalisedTag]) -> dict[str, int]:
    """How many tags each layer handled, every layer listed (zeros included) in LAYERS order."""
    counts = dict.fromkeys(LAYERS, 0)
    for result in results:
        counts[result.layer] += 1
    return counts

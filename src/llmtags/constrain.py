"""Constrained decoding: the tags a model may write, enforced token by token while it generates.

The model answers one tag a line, `Attribute:value`, then `<|im_end|>`. `TagConstraintProcessor` (a
transformers logits processor) keeps one small state machine per batch row over the BYTES that row has
generated, and before every step sets the logits of the tokens that would break the row's constraint to
-inf. Three modes (`ConstraintSpec.mode`):

- `free`: values are not constrained;
- `extract`: every value (the part of a line after its first ':', leading spaces ignored) is a
  contiguous span of the record's text. Compared as UTF-8 bytes, so a rare character that the
  tokenizer splits over several byte tokens is written byte by byte;
- `closed`: every line is an entry of a vocabulary, written in the entry's canonical tokenization
  (a token trie of all entries; see `VocabTrie`).

In every mode a record's schema limits the attribute names (the part before ':'), a tag already written
in the row cannot be written again, and a repeated line ends the list (EOS is forced). A row that would
be left with no allowed token gets EOS. When `max_new_tokens` cuts a row inside a line, the engine drops
that incomplete line (`TagConstraintProcessor.finish`).

Only the processor needs torch; it is imported lazily, so `ConstraintSpec` is cheap to use anywhere.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import unicodedata
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MODES = ("free", "extract", "closed")
# Bump when the rules change: a cached generation made under other rules must miss.
RULES_VERSION = "constrain-1"
# parse.clean_tag reads `attribute:value` only for attributes of at most 40 characters.
ATTR_MAX_CHARS = 40

_NEWLINE = b"\n"
_SPACE = b" "
# Characters str.splitlines() breaks on besides '\n': parse.py would split a line there.
_OTHER_BREAKS = tuple(ch.encode() for ch in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# A free attribute (no schema) must not contain what would make parse.py read the line differently:
# separators of one-line lists, JSON openers, colons (the attribute ends at the first ':').
_ATTR_FORBIDDEN = tuple(ch.encode() for ch in ":：,，、;；#|[{") + (_NEWLINE,) + _OTHER_BREAKS
_ATTR_FORBIDDEN_RE = re.compile(b"|".join(re.escape(f) for f in _ATTR_FORBIDDEN))
_BREAKS_RE = re.compile(b"|".join(re.escape(f) for f in _OTHER_BREAKS))
_SPACE_DIGIT = re.compile(rb"\s\d")  # "a 1. b" would be split as inline numbering
_CONTINUATION = bytes(range(0x80, 0xC0))
_DIGITS = frozenset(b"0123456789")

ATTR, LEAD, VALUE = 0, 1, 2  # line phases: attribute, spaces after ':', value


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _chars(data: bytes) -> int:
    """Characters in UTF-8 bytes (lead bytes; an incomplete last character counts)."""
    return len(data.translate(None, _CONTINUATION))


def _utf8_prefix_ok(data: bytes) -> bool:
    """Valid UTF-8, except that the last character may be incomplete."""
    try:
        codecs.utf_8_decode(data, "strict", False)
    except UnicodeDecodeError:
        return False
    return True


def _utf8_complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _free_attr_ok(attr: bytes) -> bool:
    """A schema-less attribute (possibly unfinished) that parse.py reads back as the attribute."""
    return (
        _utf8_prefix_ok(attr)
        and not _ATTR_FORBIDDEN_RE.search(attr)
        and not _SPACE_DIGIT.search(attr)
        and _chars(attr) <= ATTR_MAX_CHARS
    )


def _attr_key(attribute: str | None) -> str | None:
    return unicodedata.normalize("NFKC", attribute).casefold().strip() if attribute else None


# --- the token table -------------------------------------------------------------------------------


class TokenTable:
    """The exact bytes of every token id of a byte-level BPE tokenizer, and lookups derived from them.

    Special and added tokens have no bytes (None): a constrained row never writes them, except EOS.
    """

    def __init__(self, tokenizer: Any):
        import numpy as np

        vocab: dict[str, int] = tokenizer.get_vocab()
        added = set(getattr(tokenizer, "added_tokens_decoder", None) or ())
        self.size = max(len(tokenizer), max(vocab.values()) + 1)
        translate = {ord(ch): b for b, ch in bytes_to_unicode().items()}
        self.token_bytes: list[bytes | None] = [None] * self.size
        for token, i in vocab.items():
            if i in added:
                continue
            try:
                self.token_bytes[i] = token.translate(translate).encode("latin-1")
            except UnicodeEncodeError:  # not a byte-level token
                continue
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if not isinstance(eos, int) or eos < 0 or eos == tokenizer.unk_token_id:
            eos = tokenizer.eos_token_id
        self.eos_id: int = int(eos)

        self.by_bytes: dict[bytes, int] = {}  # every token
        self.plain_by_bytes: dict[bytes, int] = {}  # tokens without a line break
        self.lead: dict[bytes, list[int]] = defaultdict(list)  # value start (leading spaces dropped) -> ids
        self.nl_end: dict[bytes, list[int]] = defaultdict(list)  # p -> ids of tokens p + b"\n"+
        self.lead_nl: dict[bytes, list[int]] = defaultdict(list)  # p without leading spaces -> same tokens
        self.space_ids: list[int] = []  # tokens of spaces only
        self.colon: dict[bytes, list[tuple[int, bytes]]] = defaultdict(list)  # before the first ':' -> (id, after)
        self.colon_free: list[tuple[int, bytes, bool]] = []  # (id, after ':', blank before ':') for free attributes
        self.cont_start: list[int] = []  # tokens starting inside a UTF-8 character
        n = self.size
        plain = np.zeros(n, dtype=bool)  # no line break at all
        nl = np.zeros(n, dtype=bool)  # p + "\n"+, p without line breaks
        nl_nonblank = np.zeros(n, dtype=bool)
        attr_plain = np.zeros(n, dtype=bool)  # may continue a free attribute (no ':')
        starts_digit = np.zeros(n, dtype=bool)
        attr_chars = np.zeros(n, dtype=np.int32)
        maxlen_value: dict[bytes, int] = {}
        maxlen_lead: dict[bytes, int] = {}

        def longest(table: dict[bytes, int], key: bytes) -> None:
            if len(key) >= 2 and table.get(key[:2], 0) < len(key):
                table[key[:2]] = len(key)

        for i, data in enumerate(self.token_bytes):
            if not data:
                continue
            self.by_bytes[data] = i
            longest(maxlen_value, data)
            first = data[0]
            starts_digit[i] = first in _DIGITS
            attr_chars[i] = _chars(data)
            if first & 0xC0 == 0x80:
                self.cont_start.append(i)
            breaks = _BREAKS_RE.search(data) is not None
            if _NEWLINE in data:
                p, _, after = data.partition(_NEWLINE)
                if not breaks and not after.strip(_NEWLINE):
                    nl[i] = True
                    self.nl_end[p].append(i)
                    longest(maxlen_value, p)
                    stripped = p.lstrip(_SPACE)
                    if stripped:
                        nl_nonblank[i] = True
                        self.lead_nl[stripped].append(i)
                        longest(maxlen_lead, stripped)
            elif not breaks:
                plain[i] = True
                self.plain_by_bytes[data] = i
                stripped = data.lstrip(_SPACE)
                if stripped:
                    self.lead[stripped].append(i)
                    longest(maxlen_lead, stripped)
                else:
                    self.space_ids.append(i)
            if b":" in data:
                pre, _, after = data.partition(b":")
                if _NEWLINE not in pre and not _BREAKS_RE.search(pre):
                    self.colon[pre].append((i, after))
                    if first & 0xC0 != 0x80 and _utf8_complete(pre) and _free_attr_ok(pre):
                        self.colon_free.append((i, after, not pre.strip()))
                        attr_chars[i] = _chars(pre)
            elif first & 0xC0 != 0x80 and _free_attr_ok(data):
                attr_plain[i] = True
        self.maxlen_value = maxlen_value
        self.maxlen_lead = maxlen_lead
        self._np = {"plain": plain, "nl": nl, "nl_nonblank": nl_nonblank, "attr_plain": attr_plain,
                    "starts_digit": starts_digit, "attr_chars": attr_chars}
        self.tries: OrderedDict[str, VocabTrie] = OrderedDict()

    def mask(self, name: str) -> Any:
        """A precomputed per-token numpy array: bool masks, or `attr_chars`."""
        return self._np[name]

    def trie(self, tokenizer: Any, vocab: Any) -> VocabTrie:
        """The (cached) token trie of a vocabulary for this tokenizer."""
        key = vocab_fingerprint(vocab)
        trie = self.tries.get(key)
        if trie is None:
            trie = self.tries[key] = VocabTrie(self, tokenizer, vocab)
            while len(self.tries) > 4:
                self.tries.popitem(last=False)
        self.tries.move_to_end(key)
        return trie


_TABLES: dict[int, tuple[Any, TokenTable]] = {}


def token_table(tokenizer: Any) -> TokenTable:
    """The token table of `tokenizer`, built once (about a second for Qwen's 151k tokens)."""
    cached = _TABLES.get(id(tokenizer))
    if cached is not None and cached[0]() is tokenizer:
        return cached[1]
    table = TokenTable(tokenizer)
    for key in [k for k, (r, _) in _TABLES.items() if r() is None]:
        del _TABLES[key]  # tables of tokenizers that are gone
    try:
        ref: Any = weakref.ref(tokenizer)
    except TypeError:
        ref = lambda: tokenizer  # noqa: E731
    _TABLES[id(tokenizer)] = (ref, table)
    return table


# --- what a record may generate ----------------------------------------------------------------------


_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def vocab_fingerprint(vocab: Any) -> str:
    """A hash of a vocabulary's tags (computed once per vocabulary object and size)."""
    cached = _FINGERPRINTS.get(vocab)
    if cached is not None and cached[0] == len(vocab):
        return cached[1]
    digest = hashlib.sha256("\n".join(sorted(e.tag for e in vocab)).encode("utf-8")).hexdigest()[:16]
    _FINGERPRINTS[vocab] = (len(vocab), digest)
    return digest


@dataclass(frozen=True, eq=False)
class ConstraintSpec:
    """What one record may generate. `text`: the product text as the prompt shows it (extract);
    `schema`: attribute names; `vocab`: a `Vocabulary` (closed)."""

    mode: str = "free"
    text: str | None = None
    schema: tuple[str, ...] | None = None
    vocab: Any = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown constraint mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode == "extract" and self.text is None:
            raise ValueError("extract mode needs the record's text")
        if self.mode == "closed" and self.vocab is None:
            raise ValueError("closed mode needs a vocabulary")
        if self.schema is not None:
            object.__setattr__(self, "schema", tuple(self.schema))

    def key(self) -> str:
        """Mode and a hash of what it depends on, for generation caches."""
        payload = [
            RULES_VERSION,
            self.mode,
            self.text if self.mode == "extract" else None,
            list(self.schema) if self.schema else None,
            vocab_fingerprint(self.vocab) if self.mode == "closed" else None,
        ]
        digest = hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
        return f"{self.mode}:{digest}"


def _schema_names(schema: Iterable[str] | None) -> list[bytes] | None:
    if not schema:
        return None
    names = []
    for name in schema:
        name = name.strip()
        if name and ":" not in name and "\n" not in name and not _BREAKS_RE.search(name.encode()):
            names.append(name.encode("utf-8"))
    return names or None


class _Text:
    """One record's text as bytes, with the token lookups extract mode needs."""

    def __init__(self, table: TokenTable, text: str):
        self.table = table
        self.data = data = text.encode("utf-8")
        n = len(data)
        # boundary[i]: a character starts at byte i (or i is the end).
        self.boundary = [i == n or data[i] & 0xC0 != 0x80 for i in range(n + 1)]
        self._lead: list[int] | None = None
        self._rest_ok: dict[bytes, bool] = {}
        self._colon_masks: tuple[Any, Any] | None = None

    def starts(self, s: bytes) -> list[int]:
        """Offsets where `s` occurs starting on a character boundary."""
        found = []
        i = self.data.find(s)
        while i >= 0:
            if self.boundary[i]:
                found.append(i)
            i = self.data.find(s, i + 1)
        return found

    def lead_ids(self) -> list[int]:
        """Tokens that may start a value: spaces, or a token whose bytes without leading spaces occur
        in the text at a character start (or end a one-token value before a newline)."""
        if self._lead is None:
            t, data, bd = self.table, self.data, self.boundary
            ids: set[int] = set(t.space_ids)
            n = len(data)
            for e in range(n):
                if not bd[e] or data[e] == 0x20:
                    continue
                top = min(t.maxlen_lead.get(data[e : e + 2], 1), n - e)
                for length in range(1, top + 1):
                    sub = data[e : e + length]
                    found = t.lead.get(sub)
                    if found:
                        ids.update(found)
                    if bd[e + length]:
                        found = t.lead_nl.get(sub)
                        if found:
                            ids.update(found)
            self._lead = sorted(ids)
        return self._lead

    def value_ids(self, ends: Sequence[int]) -> list[int]:
        """Tokens that continue a value occurring at `ends` (offsets where it ends), or end its line."""
        t, data, bd = self.table, self.data, self.boundary
        n = len(data)
        ids: list[int] = []
        for e in ends:
            top = min(t.maxlen_value.get(data[e : e + 2], 1), n - e)
            for length in range(1, top + 1):
                sub = data[e : e + length]
                i = t.plain_by_bytes.get(sub)
                if i is not None:
                    ids.append(i)
                if bd[e + length]:
                    found = t.nl_end.get(sub)
                    if found:
                        ids.extend(found)
        if ends and bd[ends[0]]:
            ids.extend(t.nl_end.get(b"", ()))
        return ids

    def rest_ok(self, rest: bytes) -> bool:
        """May the bytes after a ':' (within one token) start this record's value?"""
        ok = self._rest_ok.get(rest)
        if ok is None:
            p, newline, after = rest.partition(_NEWLINE)
            s = p.lstrip(_SPACE)
            if _BREAKS_RE.search(rest):
                ok = False
            elif newline:
                ok = bool(s) and not after.strip(_NEWLINE) and any(self.boundary[i + len(s)] for i in self.starts(s))
            elif s:
                ok = bool(self.starts(s))
            else:
                ok = bool(self.lead_ids())  # only spaces so far: some value must be able to follow
            self._rest_ok[rest] = ok
        return ok

    def colon_masks(self) -> tuple[Any, Any]:
        """Free-attribute tokens holding ':' whose rest may start a value: (non-blank before ':', blank)."""
        if self._colon_masks is None:
            import numpy as np

            nonblank = np.zeros(self.table.size, dtype=bool)
            blank = np.zeros(self.table.size, dtype=bool)
            for i, rest, is_blank in self.table.colon_free:
                if self.rest_ok(rest):
                    (blank if is_blank else nonblank)[i] = True
            self._colon_masks = (nonblank, blank)
        return self._colon_masks


def _free_rest_ok(rest: bytes) -> bool:
    p, newline, after = rest.partition(_NEWLINE)
    if _BREAKS_RE.search(p):
        return False
    return not newline or (bool(p.strip(_SPACE)) and not after.strip(_NEWLINE))


# --- per-row state machines ------------------------------------------------------------------------


class _Row:
    """Common bookkeeping: stop tokens, forced EOS, and where the last complete line ended."""

    def __init__(self, table: TokenTable, stop_ids: frozenset[int]):
        self.table = table
        self.stop_ids = stop_ids
        self.done = False
        self.clean_end = True  # the row stopped at a point where its list is complete
        self.force_eos = False
        self.count = 0  # generated tokens seen (up to the stop token)
        self.last_safe = 0  # generated tokens up to the end of the last complete line
        # After each token: (may the list end here, last_safe). Kept per token because generate may
        # run a step past the output it returns.
        self.history: list[tuple[bool, int]] = []

    def advance(self, token: int) -> None:
        if self.done:
            return
        self.count += 1
        if token in self.stop_ids:
            self.clean_end = self.can_end()
            self.done = True
        else:
            self._advance(token)
        self.history.append((self.clean_end if self.done else self.can_end(), self.last_safe))

    def safe_length(self, length: int) -> int | None:
        """Of `length` generated tokens, how many to keep (None: all): a row cut inside a line loses
        that line."""
        if length <= 0 or not self.history:
            return None
        complete, last_safe = self.history[min(length, len(self.history)) - 1]
        return None if complete else last_safe

    def _advance(self, token: int) -> None:
        raise NotImplementedError

    def can_end(self) -> bool:
        raise NotImplementedError

    def allowed(self) -> tuple[Any, Any] | None:
        """(mask or None, ids): the allowed tokens are mask | ids; None means no constraint."""
        if self.done:
            return None
        if self.force_eos:
            return None, [self.table.eos_id]
        return self._allowed()

    def _allowed(self) -> tuple[Any, Any] | None:
        raise NotImplementedError


class TextRow(_Row):
    """free and extract modes: a byte-level state machine over the current line."""

    def __init__(self, table: TokenTable, spec: ConstraintSpec, stop_ids: frozenset[int]):
        super().__init__(table, stop_ids)
        self.extract = spec.mode == "extract"
        self.text = _Text(table, spec.text or "") if self.extract else None
        self.names = _schema_names(spec.schema)
        self.constrained = self.extract or self.names is not None
        self.state: tuple[int, bytes, bytes, tuple[int, ...]] = (ATTR, b"", b"", ())
        self.line = b""
        self.lines: list[str] = []
        self.seen: set[str] = set()
        self._schema_cache: dict[bytes, list[int]] = {}

    # -- transitions --

    def _attr_prefix_ok(self, attr: bytes) -> bool:
        if self.names is not None:
            return any(name.startswith(attr) for name in self.names)
        return _free_attr_ok(attr) if self.extract else True

    def _attr_complete_ok(self, attr: bytes) -> bool:
        if self.names is not None:
            return attr in self.names
        if self.extract:
            return bool(attr.strip()) and _utf8_complete(attr) and _free_attr_ok(attr)
        return True

    def step(self, state: tuple[int, bytes, bytes, tuple[int, ...]], seg: bytes) -> tuple | None:
        """The state after the bytes `seg` (no newline) are written, or None when that breaks the rules."""
        phase, attr, value, ends = state
        if not seg:
            return state
        if phase == ATTR:
            if b":" in seg:
                pre, _, rest = seg.partition(b":")
                attr += pre
                if not self._attr_complete_ok(attr):
                    return None
                return self.step((LEAD, attr, b"", ()), rest)
            attr += seg
            return (ATTR, attr, b"", ()) if self._attr_prefix_ok(attr) else None
        if phase == LEAD:
            seg = seg.lstrip(_SPACE)
            if not seg:
                return state
            if self.extract:
                assert self.text is not None
                ends = tuple(i + len(seg) for i in self.text.starts(seg))
                if not ends:
                    return None
            return (VALUE, attr, seg, ends)
        if self.extract:
            assert self.text is not None
            data = self.text.data
            ends = tuple(e + len(seg) for e in ends if data.startswith(seg, e))
            if not ends:
                return None
        return (VALUE, attr, value + seg, ends)

    def _line_complete(self, state: tuple) -> bool:
        """May the line end here (a newline or EOS)?"""
        if state[0] != VALUE:
            return False
        if self.extract:
            assert self.text is not None
            return bool(state[3]) and self.text.boundary[state[3][0]]
        return True

    def can_end(self) -> bool:
        if not self.constrained:
            return True
        return (self.state[0] == ATTR and not self.state[1]) or self._line_complete(self.state)

    def token_ok(self, token: int) -> bool:
        """The reference rule for one token (the fast path in `allowed` must agree with it)."""
        if self.done:
            return True
        if self.force_eos:
            return token == self.table.eos_id
        if token == self.table.eos_id:
            return self.can_end()
        data = self.table.token_bytes[token]
        if data is None:
            return not self.constrained
        if not self.constrained:
            return True
        first, newline, after = data.partition(_NEWLINE)
        if _BREAKS_RE.search(data):
            return False
        state = self.step(self.state, first)
        if state is None:
            return False
        return not newline or (self._line_complete(state) and not after.strip(_NEWLINE))

    def _advance(self, token: int) -> None:
        data = self.table.token_bytes[token]
        if data is None:
            return
        pieces = data.split(_NEWLINE)
        for k, piece in enumerate(pieces):
            if k:
                self._end_line()
            self.line += piece
            state = self.step(self.state, piece)
            # A constrained row only takes allowed tokens; if it did not (forced EOS fallback), track
            # the line without rules.
            self.state = state if state is not None else (VALUE, self.state[1], self.state[2] + piece, self.state[3])
        if not self.line:
            self.last_safe = self.count

    def _end_line(self) -> None:
        from .engine import repeats_a_line
        from .parse import clean_tag

        text = self.line.decode("utf-8", "replace")
        self.line = b""
        self.state = (ATTR, b"", b"", ())
        if not text.strip():
            return
        self.lines.append(text)
        key = clean_tag(text).casefold()
        if (key and key in self.seen) or repeats_a_line("\n".join(self.lines) + "\n"):
            self.force_eos = True  # a duplicate tag, or a loop: the list is over
        if key:
            self.seen.add(key)

    # -- the fast path --

    def _schema_ids(self, attr: bytes) -> list[int]:
        ids = self._schema_cache.get(attr)
        if ids is None:
            t = self.table
            found: set[int] = set()
            assert self.names is not None
            for name in self.names:
                if not name.startswith(attr):
                    continue
                rest_of_name = name[len(attr) :]
                for length in range(1, len(rest_of_name) + 1):
                    i = t.plain_by_bytes.get(rest_of_name[:length])
                    if i is not None:
                        found.add(i)
                for i, rest in t.colon.get(rest_of_name, ()):
                    if self.text.rest_ok(rest) if self.text is not None else _free_rest_ok(rest):
                        found.add(i)
            ids = self._schema_cache[attr] = sorted(found)
        return ids

    def _allowed(self) -> tuple[Any, Any] | None:
        eos = self.table.eos_id
        if not self.constrained:
            return None
        t = self.table
        phase, attr, _, ends = self.state
        if phase == ATTR:
            end = [eos] if not attr else []
            if self.text is not None and not self.text.data:
                return None, end  # nothing to extract from
            if self.names is not None:
                return None, self._schema_ids(attr) + end
            if not _utf8_complete(attr):  # the last character is unfinished
                return None, [i for i in t.cont_start if self.token_ok(i)]
            assert self.text is not None
            nonblank, blank = self.text.colon_masks()
            mask = t.mask("attr_plain") | nonblank
            if attr.strip():
                mask |= blank
            mask &= t.mask("attr_chars") <= ATTR_MAX_CHARS - _chars(attr)
            if attr[-1:].isspace():
                mask &= ~t.mask("starts_digit")
            return mask, end
        if self.text is not None:
            if phase == LEAD:
                return None, self.text.lead_ids()
            ids = self.text.value_ids(ends)
            if self._line_complete(self.state):
                ids.append(eos)
            return None, ids
        if phase == LEAD:
            return t.mask("plain") | t.mask("nl_nonblank"), []
        return t.mask("plain") | t.mask("nl"), [eos]


class ClosedRow(_Row):
    """closed mode: a walk down the vocabulary's token trie, one line at a time."""

    def __init__(self, trie: VocabTrie, spec: ConstraintSpec, stop_ids: frozenset[int]):
        super().__init__(trie.table, stop_ids)
        self.trie = trie
        self.live, self.excluded = trie.for_schema(spec.schema)
        self.node = 0
        self.emitted: dict[int, int] = {}  # node -> terminals of emitted entries below it
        self.emitted_children: dict[int, set[int]] = defaultdict(set)
        self.emitted_entries: set[int] = set()

    def _emit(self, entry: int) -> None:
        trie = self.trie
        self.emitted_entries.add(entry)
        starts = [int(trie.line_node[entry])]
        if trie.eos_counted[entry]:
            starts.append(int(trie.eos_node[entry]))
        for node in starts:
            while node > 0:
                self.emitted[node] = self.emitted.get(node, 0) + 1
                parent = int(trie.parent[node])
                self.emitted_children[parent].add(node)
                node = parent

    def _entry_open(self, entry: int) -> bool:
        return entry >= 0 and not self.excluded[entry] and entry not in self.emitted_entries

    def _advance(self, token: int) -> None:
        child = self.trie.child(self.node, token)
        if child < 0:  # off the trie (only after a forced EOS fallback): end the list
            self.force_eos = True
            return
        entry = int(self.trie.line_entry[child])
        if entry >= 0:
            self._emit(entry)
            self.node = 0
            self.last_safe = self.count
        else:
            self.node = child

    def can_end(self) -> bool:
        return self.node == 0 or self._entry_open(int(self.trie.eos_entry[self.node]))

    def _allowed(self) -> tuple[Any, Any] | None:
        import numpy as np

        eos = self.table.eos_id
        trie = self.trie
        kids, tokens = trie.children(self.node)
        open_ = self.live[kids] > 0
        closed_kids = [c for c in self.emitted_children.get(self.node, ()) if self.live[c] - self.emitted[c] <= 0]
        if closed_kids:
            open_ &= ~np.isin(kids, closed_kids)
        ids = tokens[open_].tolist()
        if self.can_end():
            ids.append(eos)
        return None, ids

    def token_ok(self, token: int) -> bool:
        if self.done:
            return True
        if self.force_eos or token == self.table.eos_id:
            return token == self.table.eos_id and (self.force_eos or self.can_end())
        child = self.trie.child(self.node, token)
        return child >= 0 and self.live[child] - self.emitted.get(child, 0) > 0


# --- the vocabulary trie ------------------------------------------------------------------------------


def _encode(tokenizer: Any, texts: list[str], chunk: int = 8192) -> list[list[int]]:
    """Token ids of many texts without special tokens, in chunks (a batch's encodings are large)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    ids: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        if encode is not None:
            ids.extend(e.ids for e in encode(part, add_special_tokens=False))
        else:
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    return ids


class VocabTrie:
    """Every vocabulary entry as a path of token ids, in its canonical tokenization.

    Each entry `tag` has two paths: tokens(tag), after which EOS may follow (the last tag of a list),
    and tokens(tag + "\\n"), which ends its line (usually tokens(tag) + ['\\n'], but a tag ending in
    punctuation such as "(US)" ends in the token ')\\n'). Tokens are those of the tag alone: Qwen's
    pre-tokenizer never joins a newline to the letters after it, so a line tokenizes the same at the
    start of any line. A model may spell a tag in other tokens (greedy decoding may prefer '品'+'牌'
    to '品牌'); the trie allows only the canonical spelling, and greedy decoding follows it.

    Nodes are numbered in depth-first (sorted) order and stored as flat numpy arrays: `parent`, the
    `token` that leads to each node, and a CSR list of children sorted by token, so 100k entries take
    a few tens of MB. `total[node]` counts the entry endings below a node; a row subtracts the entries
    it has written (and those outside its schema), so it never enters a branch with nothing left.
    """

    def __init__(self, table: TokenTable, tokenizer: Any, vocab: Any):
        import numpy as np
        from array import array

        self.table = table
        tags: list[str] = []
        attributes: list[str | None] = []
        for entry in vocab:
            tag = entry.tag.strip()
            if tag and "\n" not in tag and not _BREAKS_RE.search(tag.encode()):
                tags.append(tag)
                attributes.append(_attr_key(entry.attribute))
        token_bytes = table.token_bytes
        newline = table.by_bytes.get(_NEWLINE)
        lined = _encode(tokenizer, [t + "\n" for t in tags])
        # tokens(tag) is tokens(tag + "\n") without its last token when that token is a lone "\n" (BPE
        # never merged it into the tag). Otherwise ("(US)" ends in ')\n') the tag is tokenized alone.
        divergent = [i for i, ids in enumerate(lined) if not ids or ids[-1] != newline]
        plain_of = dict(zip(divergent, _encode(tokenizer, [tags[i] for i in divergent])))
        paths: list[tuple[tuple[int, ...], int, int]] = []
        keep: list[int] = []
        eos_counted: list[bool] = []
        eos_up: dict[int, int] = {}  # entry -> steps up from its line's end to its EOS end
        for i, b in enumerate(lined):
            a = plain_of.get(i)
            a_len = len(b) - 1 if a is None else len(a)
            if a_len < 1 or any(token_bytes[t] is None for t in b):
                continue  # empty, or spelled with added/special tokens: cannot be written
            entry = len(keep)
            keep.append(i)
            paths.append((tuple(b), 1, entry))
            if a is None or b[:a_len] == a:
                eos_counted.append(False)  # the EOS end lies on the line's path
                eos_up[entry] = len(b) - a_len
            else:
                eos_counted.append(True)
                paths.append((tuple(a), 0, entry))
        del lined, plain_of
        paths.sort()
        self.tags = [tags[i] for i in keep]
        n_entries = len(keep)
        parent = array("i", [-1])
        token = array("i", [-1])
        depth = array("i", [0])
        eos_node = array("i", [0]) * n_entries
        line_node = array("i", [0]) * n_entries
        path = [0]
        previous: tuple[int, ...] = ()
        for seq, kind, entry in paths:
            common = 0
            limit = min(len(seq), len(previous))
            while common < limit and seq[common] == previous[common]:
                common += 1
            del path[common + 1 :]
            for t in seq[common:]:
                node = len(parent)
                parent.append(path[-1])
                token.append(t)
                depth.append(len(path))
                path.append(node)
            (line_node if kind else eos_node)[entry] = path[len(seq)]
            previous = seq
        for entry, up in eos_up.items():
            node = line_node[entry]
            for _ in range(up):
                node = parent[node]
            eos_node[entry] = node
        del paths
        self.parent = np.frombuffer(parent, dtype=np.int32).copy()
        self.token = np.frombuffer(token, dtype=np.int32).copy()
        depth_arr = np.frombuffer(depth, dtype=np.int32)
        self.eos_node = np.frombuffer(eos_node, dtype=np.int32).copy()
        self.line_node = np.frombuffer(line_node, dtype=np.int32).copy()
        self.eos_counted = np.array(eos_counted, dtype=bool)
        n_nodes = len(self.parent)
        self.eos_entry = np.full(n_nodes, -1, dtype=np.int32)
        self.eos_entry[self.eos_node] = np.arange(n_entries, dtype=np.int32)
        self.line_entry = np.full(n_nodes, -1, dtype=np.int32)
        self.line_entry[self.line_node] = np.arange(n_entries, dtype=np.int32)
        # Children in CSR form, sorted by token within a parent (nodes were made in sorted order).
        kids = (np.argsort(self.parent[1:], kind="stable") + 1).astype(np.int32)
        self.kids = kids
        self.kid_tokens = self.token[kids]
        self.start = np.searchsorted(self.parent[kids], np.arange(n_nodes + 1)).astype(np.int32)
        # Nodes grouped by depth, deepest first, to sum counts up the tree.
        order = np.argsort(depth_arr, kind="stable")
        bounds = np.searchsorted(depth_arr[order], np.arange(int(depth_arr.max(initial=0)) + 2))
        self._levels = [order[bounds[d] : bounds[d + 1]] for d in range(len(bounds) - 2, 0, -1)]
        names = sorted({a for a in attributes if a is not None})
        self._attribute_ids = {a: k for k, a in enumerate(names)}
        self.entry_attribute = np.array(
            [self._attribute_ids.get(attributes[i], -1) if attributes[i] else -1 for i in keep], dtype=np.int32
        )
        self.total = self._counts(np.ones(n_entries, dtype=bool))
        self._no_exclusion = np.zeros(n_entries, dtype=bool)
        self._schemas: OrderedDict[tuple[str, ...], tuple[Any, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    def nbytes(self) -> int:
        arrays = [self.parent, self.token, self.eos_node, self.line_node, self.eos_counted, self.eos_entry,
                  self.line_entry, self.kids, self.kid_tokens, self.start, self.total, self.entry_attribute]
        return sum(a.nbytes for a in arrays) + sum(level.nbytes for level in self._levels)

    def _counts(self, entries: Any) -> Any:
        """Per node, the entry endings below it, counting only `entries` (a bool mask)."""
        import numpy as np

        ends = np.concatenate([self.line_node[entries], self.eos_node[entries & self.eos_counted]])
        counts = np.bincount(ends, minlength=self.n_nodes).astype(np.int32)
        for level in self._levels:
            np.add.at(counts, self.parent[level], counts[level])
        return counts

    def for_schema(self, schema: Sequence[str] | None) -> tuple[Any, Any]:
        """(live counts per node, excluded entries) for a record's schema (None: every entry)."""
        import numpy as np

        if not schema:
            return self.total, self._no_exclusion
        key = tuple(sorted({k for k in (_attr_key(s) for s in schema) if k}))
        cached = self._schemas.get(key)
        if cached is None:
            allowed = [self._attribute_ids[k] for k in key if k in self._attribute_ids]
            included = np.isin(self.entry_attribute, allowed) & (self.entry_attribute >= 0)
            cached = self._schemas[key] = (self._counts(included), ~included)
            while len(self._schemas) > 64:
                self._schemas.popitem(last=False)
        self._schemas.move_to_end(key)
        return cached

    def children(self, node: int) -> tuple[Any, Any]:
        s, e = self.start[node], self.start[node + 1]
        return self.kids[s:e], self.kid_tokens[s:e]

    def child(self, node: int, token: int) -> int:
        import numpy as np

        s, e = int(self.start[node]), int(self.start[node + 1])
        j = s + int(np.searchsorted(self.kid_tokens[s:e], token))
        return int(self.kids[j]) if j < e and self.kid_tokens[j] == token else -1


# --- the logits processor ---------------------------------------------------------------------------------


def constraint_row(table: TokenTable, tokenizer: Any, spec: ConstraintSpec, stop_ids: Iterable[int] = ()) -> _Row:
    """The decoding state of one constrained output: feed it each generated token (`advance`) and
    ask which tokens it allows next (`allowed`)."""
    stops = frozenset({table.eos_id, *(int(i) for i in stop_ids)})
    if spec.mode == "closed":
        return ClosedRow(table.trie(tokenizer, spec.vocab), spec, stops)
    return TextRow(table, spec, stops)


def allowed_bias(allowed: tuple[Any, Any], width: int, eos_id: int) -> Any:
    """0 where `allowed` (a row's `(mask or None, ids)`) lets a token through and -inf elsewhere,
    over `width` logits; only end-of-text when nothing is allowed (the list ends)."""
    import numpy as np

    mask, ids = allowed
    allow = np.zeros(width, dtype=bool)
    if mask is not None:
        size = min(width, mask.shape[0])
        allow[:size] = mask[:size]
    ids = [i for i in ids if i < width]
    if ids:
        allow[ids] = True
    if not allow.any():
        allow[eos_id] = True
    with np.errstate(divide="ignore"):
        return np.log(allow, dtype=np.float32)


class TagConstraintProcessor:
    """A transformers logits processor (duck-typed, so this module imports torch only when it runs):
    one constraint state per batch row. `constraints[i]` is row i's `ConstraintSpec` (None: no
    constraint). Prompts are left-padded, so every row's generated tokens start at `prompt_length`.

    One processor serves one `generate` call; it follows each row by reading the tokens appended
    since its last call.
    """

    def __init__(
        self,
        tokenizer: Any,
        constraints: Sequence[ConstraintSpec | None],
        prompt_length: int,
        stop_ids: Iterable[int] = (),
    ):
        self.table = token_table(tokenizer)
        self.prompt_length = prompt_length
        self._seen = prompt_length
        self.rows = [None if spec is None else constraint_row(self.table, tokenizer, spec, stop_ids)
                     for spec in constraints]

    def _catch_up(self, new_tokens: Sequence[Sequence[int]], offset: int) -> None:
        for row, tokens in zip(self.rows, new_tokens):
            if row is not None:
                for token in tokens[offset:]:
                    row.advance(int(token))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        length = input_ids.shape[1]
        if length > self._seen:
            self._catch_up(input_ids[:, self._seen : length].tolist(), 0)
            self._seen = length
        allowed = [row.allowed() if row is not None else None for row in self.rows]
        if all(a is None for a in allowed):
            return scores
        out = scores.clone()
        for r, a in enumerate(allowed):
            if a is not None:
                bias = allowed_bias(a, scores.shape[1], self.table.eos_id)
                out[r] += torch.from_numpy(bias).to(device=scores.device, dtype=scores.dtype)
        return out

    def finish(self, new_tokens: Sequence[Sequence[int]]) -> list[int | None]:
        """Follow the last generated tokens; per row, how many generated tokens to keep (None: all).
        A row that `max_new_tokens` cut inside a line keeps only its complete lines."""
        self._catch_up(new_tokens, self._seen - self.prompt_length)
        length = len(new_tokens[0]) if new_tokens else 0
        self._seen = max(self._seen, self.prompt_length + length)
        return [row.safe_length(length) if row is not None else None for row in self.rows]

    def token_ok(self, row: int, token: int) -> bool:
        """The slow reference rule for one token of one row (for tests)."""
        state = self.rows[row]
        return True if state is None else state.token_ok(token)

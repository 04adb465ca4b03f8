"""Per-row state machines: one generated reply followed token by token, and the tokens it may take next.

`constraint_row(table, tokenizer, spec)` makes the row of one `ConstraintSpec`: `TextRow` for free and
extract modes (a byte-level state machine over the current line), `ClosedRow` for closed mode (a walk
down the vocabulary's token trie). Engines feed it each generated token (`advance`), ask what it allows
next (`allowed`, turned into logits by `allowed_bias`), and at the end how much to keep (`safe_length`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..parse import clean_tag
from .grammar import (
    ATTR_MAX_CHARS,
    BREAKS_RE,
    NEWLINE,
    SPACE,
    char_count,
    free_attr_ok,
    repeats_a_line,
    utf8_complete,
)
from .spec import ConstraintSpec
from .tokens import TokenTable
from .trie import VocabTrie

ATTR, LEAD, VALUE = 0, 1, 2  # line phases: attribute, spaces after ':', value


def _schema_names(schema: Iterable[str] | None) -> list[bytes] | None:
    if not schema:
        return None
    names = []
    for name in schema:
        name = name.strip()
        if name and ":" not in name and "\n" not in name and not BREAKS_RE.search(name.encode()):
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
            p, newline, after = rest.partition(NEWLINE)
            s = p.lstrip(SPACE)
            if BREAKS_RE.search(rest):
                ok = False
            elif newline:
                ok = bool(s) and not after.strip(NEWLINE) and any(self.boundary[i + len(s)] for i in self.starts(s))
            elif s:
                ok = bool(self.starts(s))
            else:
                ok = bool(self.lead_ids())  # only spaces so far: some value must be able to follow
            self._rest_ok[rest] = ok
        return ok

    def colon_masks(self) -> tuple[Any, Any]:
        """Free-attribute tokens holding ':' whose rest may start a value: (non-blank before ':', blank)."""
        if self._colon_masks is None:


            nonblank = np.zeros(self.table.size, dtype=bool)
            blank = np.zeros(self.table.size, dtype=bool)
            for i, rest, is_blank in self.table.colon_free:
                if self.rest_ok(rest):
                    (blank if is_blank else nonblank)[i] = True
            self._colon_masks = (nonblank, blank)
        return self._colon_masks


def _free_rest_ok(rest: bytes) -> bool:
    p, newline, after = rest.partition(NEWLINE)
    if BREAKS_RE.search(p):
        return False
    return not newline or (bool(p.strip(SPACE)) and not after.strip(NEWLINE))


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
        return free_attr_ok(attr) if self.extract else True

    def _attr_complete_ok(self, attr: bytes) -> bool:
        if self.names is not None:
            return attr in self.names
        if self.extract:
            return bool(attr.strip()) and utf8_complete(attr) and free_attr_ok(attr)
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
            seg = seg.lstrip(SPACE)
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
        first, newline, after = data.partition(NEWLINE)
        if BREAKS_RE.search(data):
            return False
        state = self.step(self.state, first)
        if state is None:
            return False
        return not newline or (self._line_complete(state) and not after.strip(NEWLINE))

    def _advance(self, token: int) -> None:
        data = self.table.token_bytes[token]
        if data is None:
            return
        pieces = data.split(NEWLINE)
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
            if not utf8_complete(attr):  # the last character is unfinished
                return None, [i for i in t.cont_start if self.token_ok(i)]
            assert self.text is not None
            nonblank, blank = self.text.colon_masks()
            mask = t.mask("attr_plain") | nonblank
            if attr.strip():
                mask |= blank
            mask &= t.mask("attr_chars") <= ATTR_MAX_CHARS - char_count(attr)
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

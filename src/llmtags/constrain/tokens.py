"""The token table: the exact bytes of every token of a byte-level BPE tokenizer, and the lookups the
constraint rows (`rows.py`) derive from them, built once per tokenizer."""

from __future__ import annotations

import weakref
from collections import OrderedDict, defaultdict
from typing import Any

import numpy as np

from .grammar import (
    BREAKS_RE,
    DIGITS,
    NEWLINE,
    SPACE,
    char_count,
    free_attr_ok,
    utf8_complete,
)
from .spec import vocab_fingerprint
from .trie import VocabTrie


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


class TokenTable:
    """The exact bytes of every token id of a byte-level BPE tokenizer, and lookups derived from them.

    Special and added tokens have no bytes (None): a constrained row never writes them, except EOS.
    """

    def __init__(self, tokenizer: Any):
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
        self.tries: OrderedDict[str, VocabTrie] = OrderedDict()
        self._index()

    def _index(self) -> None:
        """The lookups of the constraint rows, from the tokens' bytes."""
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
            starts_digit[i] = first in DIGITS
            attr_chars[i] = char_count(data)
            if first & 0xC0 == 0x80:
                self.cont_start.append(i)
            breaks = BREAKS_RE.search(data) is not None
            if NEWLINE in data:
                p, _, after = data.partition(NEWLINE)
                if not breaks and not after.strip(NEWLINE):
                    nl[i] = True
                    self.nl_end[p].append(i)
                    longest(maxlen_value, p)
                    stripped = p.lstrip(SPACE)
                    if stripped:
                        nl_nonblank[i] = True
                        self.lead_nl[stripped].append(i)
                        longest(maxlen_lead, stripped)
            elif not breaks:
                plain[i] = True
                self.plain_by_bytes[data] = i
                stripped = data.lstrip(SPACE)
                if stripped:
                    self.lead[stripped].append(i)
                    longest(maxlen_lead, stripped)
                else:
                    self.space_ids.append(i)
            if b":" in data:
                pre, _, after = data.partition(b":")
                if NEWLINE not in pre and not BREAKS_RE.search(pre):
                    self.colon[pre].append((i, after))
                    if first & 0xC0 != 0x80 and utf8_complete(pre) and free_attr_ok(pre):
                        self.colon_free.append((i, after, not pre.strip()))
                        attr_chars[i] = char_count(pre)
            elif first & 0xC0 != 0x80 and free_attr_ok(data):
                attr_plain[i] = True
        self.maxlen_value = maxlen_value
        self.maxlen_lead = maxlen_lead
        self._np = {"plain": plain, "nl": nl, "nl_nonblank": nl_nonblank, "attr_plain": attr_plain,
                    "starts_digit": starts_digit, "attr_chars": attr_chars}

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


"""The line format of a reply, written once: the parser (`parse.py`) reads it, and the constraint rules
(`constrain/`) keep a generating model inside it.

A reply is one tag a line, `Attribute:value`. The attribute is what comes before the first colon
(ASCII or full-width) and holds at most `ATTR_MAX_CHARS` characters. Lines end at any of
str.splitlines' breaks. A reply on a single line is read as a list separated by `INLINE_SEPARATORS`
(or by inline numbering, "1. a 2. b"). A line that repeats an earlier one ends the list.
"""

from __future__ import annotations

import codecs
import re
import unicodedata

ATTR_MAX_CHARS = 40
KEY_VALUE_SEPARATORS = ":："
INLINE_SEPARATORS = ",，、;；#|"
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # str.splitlines' breaks

# --- as the parser reads text ----------------------------------------------------------------------------

_SEPARATOR_CLASS = "".join(re.escape(ch) for ch in KEY_VALUE_SEPARATORS)
LINE_RE = re.compile(f"[^{''.join(re.escape(ch) for ch in LINE_BREAKS)}]+")
INLINE_SEPARATOR_RE = re.compile(
    f"[{''.join(re.escape(ch) for ch in INLINE_SEPARATORS)}]+" + r"|\s+(?=\d{1,3}[.)]\s)"
)
KEY_VALUE_RE = re.compile(
    rf"^\s*([^{_SEPARATOR_CLASS}]{{1,{ATTR_MAX_CHARS}}}?)\s*[{_SEPARATOR_CLASS}]\s*(.+?)\s*$"
)


def repeats_a_line(text: str) -> bool:
    """True when the last complete line of `text` already appeared above it: the model is looping.

    Tags come one per line, so a repeated line can only add a duplicate tag (which the parser drops
    anyway) and is the usual start of a loop that would run to `max_new_tokens`.
    """
    lines = [line.strip() for line in text.split("\n")]
    complete = [line for line in lines[:-1] if line]
    return len(complete) >= 2 and complete[-1] in complete[:-1]


# --- the same rules over the UTF-8 bytes a model writes ----------------------------------------------------

NEWLINE = b"\n"
SPACE = b" "
# Line breaks besides '\n': the parser would split a line there.
OTHER_BREAKS = tuple(ch.encode() for ch in LINE_BREAKS if ch != "\n")
# A free attribute (no schema) must not contain what would make the parser read the line differently:
# separators of one-line lists, JSON openers, colons (the attribute ends at the first ':').
ATTR_FORBIDDEN = tuple(ch.encode() for ch in KEY_VALUE_SEPARATORS + INLINE_SEPARATORS + "[{") + (NEWLINE,) + OTHER_BREAKS
ATTR_FORBIDDEN_RE = re.compile(b"|".join(re.escape(f) for f in ATTR_FORBIDDEN))
BREAKS_RE = re.compile(b"|".join(re.escape(f) for f in OTHER_BREAKS))
SPACE_DIGIT_RE = re.compile(rb"\s\d")  # "a 1. b" would be split as inline numbering
CONTINUATION = bytes(range(0x80, 0xC0))
DIGITS = frozenset(b"0123456789")


def char_count(data: bytes) -> int:
    """Characters in UTF-8 bytes (lead bytes; an incomplete last character counts)."""
    return len(data.translate(None, CONTINUATION))


def utf8_prefix_ok(data: bytes) -> bool:
    """Valid UTF-8, except that the last character may be incomplete."""
    try:
        codecs.utf_8_decode(data, "strict", False)
    except UnicodeDecodeError:
        return False
    return True


def utf8_complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def free_attr_ok(attr: bytes) -> bool:
    """A schema-less attribute (possibly unfinished) that the parser reads back as the attribute."""
    return (
        utf8_prefix_ok(attr)
        and not ATTR_FORBIDDEN_RE.search(attr)
        and not SPACE_DIGIT_RE.search(attr)
        and char_count(attr) <= ATTR_MAX_CHARS
    )


def attr_key(attribute: str | None) -> str | None:
    """An attribute name as schemas and vocabularies are compared: NFKC, case-folded, trimmed."""
    return unicodedata.normalize("NFKC", attribute).casefold().strip() if attribute else None

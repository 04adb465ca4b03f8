"""Stage 4: turn the model's free-form reply into a list of `Attribute:value` tags.

Models answer in many shapes even when asked for one tag per line: a JSON list, a comma- or
`、`-separated line, numbered or bulleted lists, quoted items, hashtags. This accepts all of them.
The line format itself (`Attribute:value`, one a line) is defined once, in `constrain/grammar.py`,
which the constrained decoder shares.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .constrain.grammar import INLINE_SEPARATOR_RE, KEY_VALUE_RE, LINE_RE

MAX_TAGS = 64  # a looping model must not flood one record's output
MAX_TAG_CHARS = 100

_NUMBERING = re.compile(r"^\s*(?:[-*•·>]+|\(?\d{1,3}[.)、:：]|\(?[a-zA-Z][.)](?=\s))\s*")
_QUOTES = "\"'`“”‘’「」『』"
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "「": "」", "『": "』"}
# After a digit, a closing quote is the inch or foot mark of a measure (Height:36", Length:5'), not quoting.
_UNIT_MARKS = "\"'”’"
_BRACKETS = {"[": "]", "【": "】", "(": ")", "（": "）", "{": "}"}


def _from_json(text: str) -> list[str] | None:
    """A JSON list of strings, or of {"attribute": ..., "value": ...} objects, or an object of lists."""
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    tags: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, (str, int, float)) and not isinstance(item, bool):
                    tags.append(f"{key}:{item}")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, str):
                tags.append(item)
            elif isinstance(item, dict) and len(item) == 2:
                values = list(item.values())
                if all(isinstance(v, str) for v in values):
                    tags.append(f"{values[0]}:{values[1]}")
            elif isinstance(item, dict) and len(item) == 1:
                key, value = next(iter(item.items()))
                tags.append(f"{key}:{value}")
    else:
        return None
    return tags


def _unquote(text: str) -> str:
    """`text` without the quotes around it: matching pairs, then any left at its start, and those at its
    end except a measure's inch or foot mark (`36"`, `1 11/16"`, `5'`)."""
    text = text.strip()
    while len(text) > 1 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    text = text.lstrip(_QUOTES).strip()
    while text and text[-1] in _QUOTES and not (text[-1] in _UNIT_MARKS and len(text) > 1 and text[-2].isdigit()):
        text = text[:-1].rstrip()
    return text


def clean_tag(raw: str) -> str:
    """Strip numbering, bullets, quotes and spaces; normalise the separator to ':'."""
    tag = _NUMBERING.sub("", raw.strip().lstrip("#"))
    tag = _unquote(tag)
    # A bracket pair around the whole tag is decoration; a bracket inside a value ("9 M (US)") is not.
    while len(tag) > 1 and _BRACKETS.get(tag[0]) == tag[-1]:
        tag = tag[1:-1].strip()
    match = KEY_VALUE_RE.match(tag)
    if match:
        attribute = _unquote(match.group(1))
        value = _unquote(match.group(2))
        if not value:
            return ""
        tag = f"{attribute}:{value}" if attribute else value
    return tag[:MAX_TAG_CHARS]


@dataclass(frozen=True)
class ParsedTag:
    tag: str
    # reply[start:end] is the piece the tag was read from (a line, a list item, or for JSON the value
    # string); None when a JSON value cannot be found verbatim (escapes).
    span: tuple[int, int] | None


def _pieces(text: str) -> list[tuple[str, tuple[int, int] | None]]:
    json_tags = _from_json(text)
    if json_tags is not None:
        located: list[tuple[str, tuple[int, int] | None]] = []
        cursor = 0
        for tag in json_tags:
            value = tag.split(":", 1)[-1]
            at = text.find(value, cursor) if value else -1
            located.append((tag, (at, at + len(value)) if at >= 0 else None))
            cursor = at + len(value) if at >= 0 else cursor
        return located
    lines = [(m.group(), (m.start(), m.end())) for m in LINE_RE.finditer(text) if m.group().strip()]
    # One tag per line is the format the templates ask for; values may then hold commas
    # ("Color:Black, Red" stays one tag). A single line is a separated list.
    if len(lines) > 1:
        return lines  # type: ignore[return-value]
    pieces: list[tuple[str, tuple[int, int] | None]] = []
    start = 0
    for separator in INLINE_SEPARATOR_RE.finditer(text):
        pieces.append((text[start : separator.start()], (start, separator.start())))
        start = separator.end()
    pieces.append((text[start:], (start, len(text))))
    return pieces


def parse_tag_spans(text: str, max_tags: int = MAX_TAGS) -> list[ParsedTag]:
    """Tags in order of first appearance, without duplicates, at most `max_tags`, each with the
    piece of the reply it came from."""
    tags: list[ParsedTag] = []
    seen: set[str] = set()
    for piece, span in _pieces(text):
        tag = clean_tag(piece)
        if not tag or tag.endswith((":", "：")) or tag.casefold() in seen:
            continue
        seen.add(tag.casefold())
        tags.append(ParsedTag(tag, span))
        if len(tags) >= max_tags:
            break
    return tags


def parse_tags(text: str, max_tags: int = MAX_TAGS) -> list[str]:
    """Tags in order of first appearance, without duplicates, at most `max_tags`."""
    return [parsed.tag for parsed in parse_tag_spans(text, max_tags)]

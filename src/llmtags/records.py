"""Stage 1 of the path: read product records from JSONL, CSV, Parquet or stdin, and clean their text.

Every reader yields, in input order, either a `Record` or a `RecordError` naming the record number and
the field at fault, so a caller can report a bad line, skip it, and carry on with the rest.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

# A gold tag is one `Attribute:value` string, or a list of accepted surface forms of ONE tag (any-of).
GoldTag = Union[str, list[str]]

FORMATS = ("jsonl", "csv", "parquet")


@dataclass(frozen=True)
class Fields:
    """Which input fields hold what; all configurable from the CLI."""

    id: str = "id"
    text: str = "text"
    category: str = "category"
    tags: str = "tags"


@dataclass
class Record:
    id: str
    text: str
    category: str | None = None
    lang: str | None = None
    tags: list[GoldTag] | None = None  # gold tags; None when the record is unlabelled
    schema: list[str] | None = None
    number: int = 0  # 1-based position in the source, for messages

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]


@dataclass
class RecordError:
    number: int  # 1-based record number (line number for JSONL)
    field: str | None
    reason: str
    record_id: str | None = None

    def __str__(self) -> str:
        where = f"record {self.number}"
        if self.record_id is not None:
            where += f" (id {self.record_id!r})"
        if self.field:
            where += f", field {self.field!r}"
        return f"{where}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"record": self.number, "id": self.record_id, "field": self.field, "reason": self.reason}


@dataclass
class ReadStats:
    read: int = 0
    errors: int = 0
    duplicates: int = 0
    cleaned: int = 0  # records whose text cleaning changed
    extra: dict[str, int] = field(default_factory=dict)


# --- cleaning -------------------------------------------------------------------------------------

_TAG_RE = re.compile(r"<[^<>]{0,200}>")
# Truncated entities such as "&hellip" at the end of scraped titles, which html.unescape leaves alone
# when no ";" follows and the name is not one of the legacy ones.
_ENTITY_RE = re.compile(r"&(#\d{1,7}|#x[0-9a-fA-F]{1,6}|[A-Za-z]{2,10});?")
_SPACE_RE = re.compile(r"\s+")


def _unescape_entity(match: re.Match[str]) -> str:
    body = match.group(1)
    decoded = html.unescape(f"&{body};")
    return match.group(0) if decoded == f"&{body};" else decoded


def clean_text(text: str) -> str:
    """NFKC, HTML tags and entities removed, control characters dropped, whitespace collapsed.

    NFKC maps full-width letters and digits to ASCII, which the model and the vocabulary both expect.
    Entities are decoded after tags are stripped, so an escaped "&lt;b&gt;" stays visible as text.
    """
    text = _TAG_RE.sub(" ", text)
    text = _ENTITY_RE.sub(_unescape_entity, text)
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" or ch in "\t\n" else " " for ch in text)
    return _SPACE_RE.sub(" ", text).strip()


# --- conversion of one raw row into a Record ------------------------------------------------------


def _as_tags(value: Any) -> list[GoldTag]:
    if isinstance(value, str):
        # CSV cells: tags separated by "|" or ";", or a JSON list.
        value = value.strip()
        if value.startswith("["):
            value = json.loads(value)
        else:
            return [t.strip() for t in re.split(r"[|;]", value) if t.strip()]
    if not isinstance(value, list):
        raise TypeError(f"expected a list of tags, got {type(value).__name__}")
    tags: list[GoldTag] = []
    for item in value:
        if isinstance(item, str):
            tags.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, str) for t in item):
            tags.append(list(item))
        else:
            raise TypeError(f"a tag must be a string or a list of strings, got {item!r:.60}")
    return tags


def row_to_record(row: Any, number: int, fields: Fields = Fields()) -> Record | RecordError:
    """Validate one raw row (a dict from JSON, CSV or Parquet) and build a cleaned Record."""
    if not isinstance(row, dict):
        return RecordError(number, None, f"expected a JSON object, got {type(row).__name__}")
    raw_id = row.get(fields.id)
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        # An unlabelled catalogue may have no ids; the record number is stable within one input.
        if fields.id in row and raw_id is not None:
            return RecordError(number, fields.id, "empty id")
        raw_id = f"#{number}"
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        return RecordError(number, fields.id, f"id must be a string or integer, got {type(raw_id).__name__}")
    record_id = str(raw_id)
    if fields.text not in row or row[fields.text] is None:
        return RecordError(number, fields.text, "missing text field", record_id)
    raw_text = row[fields.text]
    if not isinstance(raw_text, str):
        return RecordError(number, fields.text, f"text must be a string, got {type(raw_text).__name__}", record_id)
    text = clean_text(raw_text)
    if not text:
        return RecordError(number, fields.text, "text is empty after cleaning", record_id)
    category = row.get(fields.category)
    if category is not None and not isinstance(category, str):
        category = str(category)
    tags = None
    if row.get(fields.tags) is not None:
        try:
            tags = _as_tags(row[fields.tags])
        except (TypeError, ValueError) as exc:
            return RecordError(number, fields.tags, str(exc), record_id)
    schema = row.get("schema")
    schema = [str(s) for s in schema] if isinstance(schema, list) else None
    lang = row.get("lang") if isinstance(row.get("lang"), str) else None
    return Record(record_id, text, category or None, lang, tags, schema, number)


# --- readers --------------------------------------------------------------------------------------


def _jsonl_rows(stream: io.BufferedIOBase) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, RecordError(number, None, f"invalid UTF-8 at byte {exc.start}")
            continue
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, RecordError(number, None, f"malformed JSON: {exc.msg} at column {exc.colno}")


def _csv_rows(stream: io.BufferedIOBase) -> Iterator[tuple[int, Any]]:
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
    for number, row in enumerate(csv.DictReader(text), start=1):
        yield number, {k: v for k, v in row.items() if k is not None}


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield number, row


def detect_format(path: str | Path) -> str:
    suffix = Path(str(path)).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"cannot tell the format of {path}: use --format {{{','.join(FORMATS)}}}")


def read_records(
    source: str | Path,
    fmt: str | None = None,
    fields: Fields = Fields(),
    dedupe: bool = True,
    stats: ReadStats | None = None,
) -> Iterator[Record | RecordError]:
    """Yield Records and RecordErrors from a file path, or from stdin when source is "-".

    With `dedupe`, a record whose id and cleaned text both repeat an earlier one is dropped silently
    (counted in `stats.duplicates`); the same id with different text is an error.
    """
    stats = stats if stats is not None else ReadStats()
    fmt = fmt or ("jsonl" if str(source) == "-" else detect_format(source))
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if str(source) == "-":
            raise ValueError("Parquet cannot be read from stdin; give a file path")
        rows: Iterable[tuple[int, Any]] = _parquet_rows(Path(source))
        yield from _validated(rows, fields, dedupe, stats)
        return
    stream = sys.stdin.buffer if str(source) == "-" else open(source, "rb")
    try:
        rows = _jsonl_rows(stream) if fmt == "jsonl" else _csv_rows(stream)
        yield from _validated(rows, fields, dedupe, stats)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _validated(
    rows: Iterable[tuple[int, Any]], fields: Fields, dedupe: bool, stats: ReadStats
) -> Iterator[Record | RecordError]:
    seen: dict[str, str] = {}
    for number, row in rows:
        item = row if isinstance(row, RecordError) else row_to_record(row, number, fields)
        if isinstance(item, Record) and dedupe:
            previous = seen.get(item.id)
            if previous == item.text:
                stats.duplicates += 1
                continue
            if previous is not None:
                item = RecordError(number, fields.id, "duplicate id with different text", item.id)
            else:
                seen[item.id] = item.text
        if isinstance(item, RecordError):
            stats.errors += 1
        else:
            stats.read += 1
        yield item


def load_labelled(path: str | Path, fields: Fields = Fields()) -> list[Record]:
    """All valid records of a labelled file (errors skipped), for demonstrations, vocabularies, eval."""
    return [r for r in read_records(path, fields=fields) if isinstance(r, Record)]


def count_records(source: str | Path, fmt: str | None = None) -> int | None:
    """How many records a file holds, for a progress bar's total; None where it cannot tell cheaply."""
    if str(source) == "-":
        return None
    fmt = fmt or detect_format(source)
    if fmt == "jsonl":
        with open(source, "rb") as f:
            return sum(1 for line in f if line.strip())
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(source).metadata.num_rows
    return None

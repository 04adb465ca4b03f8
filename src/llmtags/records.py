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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

# A gold tag is one `Attribute:value` string, or a list of accepted surface forms of ONE tag (any-of).
GoldTag = Union[str, list[str]]

FORMATS = ("jsonl", "csv", "parquet")

T = TypeVar("T")


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
    # The attributes the ExtractGPT protocol scores for this record (labelled sets only): for scoring,
    # never for prompts, which see `schema`.
    targets: list[str] | None = None

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


def _clean_char(ch: str) -> str:
    category = unicodedata.category(ch)
    if category[0] != "C" or ch in "\t\n":
        return ch
    # Format characters (zero-width space and joiners, bidi controls, soft hyphen, BOM, the invisible
    # "tag" characters) sit inside words: drop them, so "Ni\u200bke" reads "Nike". Other control
    # characters (NUL, ESC, unassigned or private-use code points, lone surrogates) become a space.
    return "" if category == "Cf" else " "


def clean_text(text: str) -> str:
    """NFKC, HTML tags and entities removed, control characters dropped, whitespace collapsed, except the
    first line break: it parts a title from its description (budget.title_of), as records of a title and a
    description are written ("title\ndescription").

    NFKC maps full-width letters and digits to ASCII, which the model and the vocabulary both expect.
    Entities are decoded after tags are stripped, so an escaped "&lt;b&gt;" stays visible as text.
    """
    text = _TAG_RE.sub(" ", text)
    text = _ENTITY_RE.sub(_unescape_entity, text)
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch if ch.isprintable() else _clean_char(ch) for ch in text)
    lines = [_SPACE_RE.sub(" ", part).strip() for part in text.strip().split("\n", 1)]
    return "\n".join(line for line in lines if line)


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


def _decoded(value: Any) -> Any:
    """Bytes (a Parquet binary column) as UTF-8 text; anything else unchanged."""
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def row_to_record(row: Any, number: int, fields: Fields = Fields()) -> Record | RecordError:
    """Validate one raw row (a dict from JSON, CSV or Parquet) and build a cleaned Record."""
    if not isinstance(row, dict):
        kind = {"NoneType": "null", "str": "a string", "list": "an array", "int": "a number", "float": "a number",
                "bool": "a boolean"}.get(type(row).__name__, type(row).__name__)
        return RecordError(number, None, f"expected a JSON object, got {kind}")
    try:
        raw_id = _decoded(row.get(fields.id))
    except UnicodeDecodeError as exc:
        return RecordError(number, fields.id, f"invalid UTF-8 at byte {exc.start}")
    if isinstance(raw_id, float) and raw_id != raw_id:
        raw_id = None  # NaN: how pandas writes a missing value
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        # An unlabelled catalogue may have no ids; the record number is stable within one input.
        if fields.id in row and raw_id is not None:
            return RecordError(number, fields.id, "empty id")
        raw_id = f"#{number}"
    if isinstance(raw_id, float):
        # A whole float is an integer id that went through a float column (1.0 from pandas, Parquet).
        if not raw_id.is_integer():
            return RecordError(number, fields.id, f"id must be a string or integer, got the float {raw_id!r}")
        raw_id = int(raw_id)
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        return RecordError(number, fields.id, f"id must be a string or integer, got {type(raw_id).__name__}")
    record_id = str(raw_id)
    if not record_id.isprintable() and any(unicodedata.category(ch)[0] == "C" for ch in record_id):
        # Ids are keys for joins and resume, never altered: one with NUL, ESC, newlines or zero-width
        # characters is refused rather than silently changed.
        return RecordError(number, fields.id, "id contains control or invisible characters", record_id)
    if fields.text not in row or row[fields.text] is None:
        return RecordError(number, fields.text, "missing text field", record_id)
    try:
        raw_text = _decoded(row[fields.text])
    except UnicodeDecodeError as exc:
        return RecordError(number, fields.text, f"invalid UTF-8 at byte {exc.start}", record_id)
    if not isinstance(raw_text, str):
        return RecordError(number, fields.text, f"text must be a string, got {type(raw_text).__name__}", record_id)
    text = clean_text(raw_text)
    if not text:
        return RecordError(number, fields.text, "text is empty after cleaning", record_id)
    category = row.get(fields.category)
    if isinstance(category, (bytes, bytearray)):
        category = category.decode("utf-8", "replace")
    if category is not None and not isinstance(category, str):
        category = str(category)
    tags = None
    if row.get(fields.tags) is not None:
        try:
            tags = _as_tags(row[fields.tags])
        except (TypeError, ValueError, RecursionError) as exc:
            return RecordError(number, fields.tags, str(exc), record_id)
    schema, targets = (row.get(key) for key in ("schema", "targets"))
    schema = [str(s) for s in schema] if isinstance(schema, list) else None
    targets = [str(s) for s in targets] if isinstance(targets, list) else None
    lang = row.get("lang") if isinstance(row.get("lang"), str) else None
    return Record(record_id, text, category or None, lang, tags, schema, number, targets)


# --- readers --------------------------------------------------------------------------------------


# Bytes that are not UTF-8 survive decoding as lone surrogates (errors="surrogateescape"), so the row
# can still be parsed and the error can name the field (and id) that holds them.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]")
_BOM = b"\xef\xbb\xbf"


@dataclass
class _Undecodable:
    """A row that parsed only once its invalid UTF-8 bytes were escaped: reported, never read."""

    row: Any
    detail: str


def _has_escaped_bytes(value: Any) -> bool:
    if isinstance(value, str):
        return _ESCAPED_BYTES.search(value) is not None
    if isinstance(value, list):
        return any(_has_escaped_bytes(v) for v in value)
    if isinstance(value, dict):
        return any(_has_escaped_bytes(k) or _has_escaped_bytes(v) for k, v in value.items())
    return False


def _undecodable_error(number: int, item: _Undecodable, fields: Fields) -> RecordError:
    field = record_id = None
    if isinstance(item.row, dict):
        for key, value in item.row.items():
            if _has_escaped_bytes(key) or _has_escaped_bytes(value):
                field = None if _has_escaped_bytes(key) else str(key)
                break
        raw_id = item.row.get(fields.id)
        if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and not _has_escaped_bytes(raw_id):
            record_id = str(raw_id)
    return RecordError(number, field, f"invalid UTF-8 {item.detail}", record_id)


def _id_hint(line: str, id_field: str) -> str | None:
    """The id of a line that is not valid JSON, when it can be read off the line, to help find it."""
    match = re.search(rf'"{re.escape(id_field)}"\s*:\s*("(?:[^"\\\n]|\\.){{0,200}}"|-?\d{{1,30}})(?=\s*[,}}])',
                      line)
    if not match:
        return None
    try:
        value = json.loads(match.group(1))
    except ValueError:
        return None
    return str(value) if not _has_escaped_bytes(str(value)) else None


def _jsonl_rows(stream: io.BufferedIOBase, id_field: str = "id") -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(stream, start=1):
        if raw.startswith(_BOM):  # at the start of the file, or of a file concatenated to it
            raw = raw[len(_BOM):]
        detail = None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.decode("utf-8", "surrogateescape")
            detail = f"at byte {exc.start}"
        if not line.strip():
            continue
        try:
            # strict=False: a raw tab or other control character inside a string (pasted from a
            # spreadsheet) is accepted, and cleaning drops it.
            row = json.loads(line, strict=False)
        except json.JSONDecodeError as exc:
            reason = f"invalid UTF-8 {detail}" if detail else f"malformed JSON: {exc.msg} (column {exc.colno})"
            yield number, RecordError(number, None, reason, _id_hint(line, id_field))
            continue
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number; arrays nested 100,000 deep
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
            yield number, RecordError(number, None, f"malformed JSON: {reason}", _id_hint(line, id_field))
            continue
        yield number, _Undecodable(row, detail) if detail else row


def _csv_rows(stream: io.BufferedIOBase) -> Iterator[tuple[int, Any]]:
    # The field size limit (128 kB by default) guards against a runaway quote, but a long description
    # is no runaway: allow 64 MB, so it is read (and later truncated) instead of stopping the run.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    number = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            number += 1
            yield number, RecordError(number, None, f"malformed CSV: {exc}")
            continue
        number += 1
        extra = row.pop(None, None)  # cells beyond the header: an unquoted comma shifted the row
        if extra:
            reason = f"{len(row) + len(extra)} cells where the header has {len(row)}: quote cells holding commas"
            yield number, RecordError(number, None, reason)
            continue
        escaped = next((v for v in row.values() if isinstance(v, str) and _ESCAPED_BYTES.search(v)), None)
        if escaped is not None:
            byte = ord(_ESCAPED_BYTES.search(escaped).group(0)) - 0xDC00
            yield number, _Undecodable(row, f"(byte 0x{byte:02x})")
            continue
        yield number, row


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
        rows = _jsonl_rows(stream, fields.id) if fmt == "jsonl" else _csv_rows(stream)
        yield from _validated(rows, fields, dedupe, stats)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _validated(
    rows: Iterable[tuple[int, Any]], fields: Fields, dedupe: bool, stats: ReadStats
) -> Iterator[Record | RecordError]:
    # id -> digest of the cleaned text: a few dozen bytes per record, not the text itself.
    seen: dict[str, bytes] = {}
    for number, row in rows:
        if isinstance(row, RecordError):
            item: Record | RecordError = row
        elif isinstance(row, _Undecodable):
            item = _undecodable_error(number, row, fields)
        else:
            item = row_to_record(row, number, fields)
        if isinstance(item, Record) and dedupe:
            previous = seen.get(item.id)
            digest = hashlib.blake2b(item.text.encode("utf-8"), digest_size=16).digest()
            if previous == digest:
                stats.duplicates += 1
                continue
            if previous is not None:
                item = RecordError(number, fields.id, "duplicate id with different text", item.id)
            else:
                seen[item.id] = digest
        if isinstance(item, RecordError):
            stats.errors += 1
        else:
            stats.read += 1
        yield item


def interleave(sources: Sequence[Sequence[T]]) -> list[T]:
    """Round-robin over several lists (a, b, a, b, ..., then the rest of the longer), so that a prefix
    of the result samples every source evenly."""
    out: list[T] = []
    for i in range(max((len(s) for s in sources), default=0)):
        out.extend(s[i] for s in sources if i < len(s))
    return out


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

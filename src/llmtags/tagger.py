"""The path of one product, end to end: record → prompt → generation → tags (→ normalised tags).

`tag_records` streams: it takes records in chunks, generates each chunk in length-sorted batches, and
yields results in input order, so a catalogue of any size runs in bounded memory and its output can be
written as it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .parse import parse_tags
from .prompts import Demo, PromptTemplate, render_prompt, template_for
from .records import Record


@dataclass
class TagResult:
    record: Record
    tags: list[str]
    raw: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    details: list[dict[str, Any]] = field(default_factory=list)  # per-tag normalisation, when a vocab is used
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.record.id, "tags": self.tags, "raw": self.raw}
        if self.details:
            out["normalisation"] = self.details
        return out


@dataclass
class TaggingOptions:
    template: str | PromptTemplate = "auto"
    demos: Sequence[Demo] = ()
    max_new_tokens: int = 64
    batch_size: int = 8
    chunk_size: int = 256  # records generated between writes; bounds memory and lost work on a crash
    # Product text beyond this many characters is cut before prompting: titles and the head of a
    # description carry the tags, and a 1 MB description must not blow up the model's context.
    max_text_chars: int = 2000


def build_prompt(record: Record, tokenizer: Any, options: TaggingOptions) -> str:
    if len(record.text) > options.max_text_chars:
        record = replace(record, text=record.text[: options.max_text_chars])
    template = template_for(record, options.template)
    return render_prompt(tokenizer, template.messages(record, options.demos))


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tag_records(
    records: Iterable[Record],
    engine: Any,
    options: TaggingOptions = TaggingOptions(),
    normaliser: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[TagResult]:
    """Tag `records` with `engine` (anything with `.tokenizer` and `.generate(prompts, ...)`)."""
    for chunk in _chunks(records, options.chunk_size):
        prompts = [build_prompt(record, engine.tokenizer, options) for record in chunk]
        generations = engine.generate(
            prompts, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, on_batch=on_batch
        )
        for record, generation in zip(chunk, generations):
            tags = parse_tags(generation.text)
            result = TagResult(record, tags, generation.text, generation.prompt_tokens, generation.new_tokens,
                               truncated=len(record.text) > options.max_text_chars)
            if normaliser is not None:
                normalised = normaliser.normalise(tags)
                result.tags = [n.tag for n in normalised if n.layer != "dropped"]
                result.details = [n.to_json() for n in normalised]
            yield result


@dataclass
class RunSummary:
    read: int = 0
    tagged: int = 0
    errors: int = 0
    duplicates: int = 0
    empty: int = 0  # records for which the model produced no tag
    truncated: int = 0  # records whose text was cut to TaggingOptions.max_text_chars
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def products_per_second(self) -> float:
        return self.tagged / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        rate = f"{self.products_per_second:.2f} products/s, {self.new_tokens / max(self.seconds, 1e-9):.1f} tokens/s"
        return [
            f"tagged {self.tagged} of {self.read} records in {self.seconds:.1f} s ({rate})",
            f"skipped {self.errors} bad records and {self.duplicates} exact duplicates; "
            f"{self.empty} records got no tag; {self.truncated} long texts were truncated",
        ]


def tag_file(
    source: str,
    output: Any,
    engine: Any,
    options: TaggingOptions = TaggingOptions(),
    *,
    fmt: str | None = None,
    fields: Any = None,
    limit: int | None = None,
    normaliser: Any = None,
    errors: Any = None,
    progress: bool = True,
) -> RunSummary:
    """Tag every record of `source` ("-" for stdin), writing one JSON line per record to `output`.

    Bad records go to `errors` (a text stream, one JSON line each) and are skipped; the run goes on.
    """
    import itertools
    import json
    import sys
    import time

    from tqdm import tqdm

    from .records import Fields, ReadStats, RecordError, count_records, read_records

    stats = ReadStats()
    summary = RunSummary()
    errors = errors if errors is not None else sys.stderr

    def valid_records() -> Iterator[Record]:
        for item in read_records(source, fmt, fields or Fields(), stats=stats):
            if isinstance(item, RecordError):
                errors.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
                if errors is not sys.stderr:
                    tqdm.write(f"llmtags: skipped {item}", file=sys.stderr)
                continue
            yield item

    total = count_records(source, fmt) if source != "-" else None
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    records = itertools.islice(valid_records(), limit)
    start = time.perf_counter()
    with tqdm(total=total, unit="product", desc="tagging", disable=not progress, file=sys.stderr) as bar:
        for result in tag_records(records, engine, options, normaliser, on_batch=bar.update):
            output.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
            summary.tagged += 1
            summary.empty += not result.tags
            summary.truncated += result.truncated
            summary.prompt_tokens += result.prompt_tokens
            summary.new_tokens += result.new_tokens
            output.flush()
    summary.seconds = time.perf_counter() - start
    summary.read, summary.errors, summary.duplicates = stats.read, stats.errors, stats.duplicates
    return summary

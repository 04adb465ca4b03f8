"""The path of one product, end to end: record → prompt → generation → tags (→ normalised tags).

`tag_records` streams: it takes records in chunks, generates each chunk in length-sorted batches, and
yields results in input order, so a catalogue of any size runs in bounded memory and its output can be
written as it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .parse import parse_tag_spans
from .prompts import Demo, PromptTemplate, render_prompt, template_for
from .records import Record

if TYPE_CHECKING:
    from .constrain import ConstraintSpec
    from .vocab import Vocabulary


@dataclass
class TagResult:
    record: Record
    tags: list[str]
    raw: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    details: list[dict[str, Any]] = field(default_factory=list)  # per-tag normalisation, when a vocab is used
    truncated: bool = False
    # Parallel to `tags` (grounding.py): the model's confidence, and the [start, end) offsets of the
    # evidence in the record's text (None: inferred, not in the text).
    confidences: list[float | None] = field(default_factory=list)
    evidence: list[tuple[int, int] | None] = field(default_factory=list)
    below_confidence: list[str] = field(default_factory=list)  # tags dropped by min_confidence

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.record.id, "text_hash": self.record.text_hash, "tags": self.tags,
                               "confidence": [None if c is None else round(c, 3) for c in self.confidences],
                               "evidence": [list(span) if span is not None else None for span in self.evidence],
                               "raw": self.raw}
        if self.below_confidence:
            out["below_confidence"] = self.below_confidence
        if self.details:
            out["normalisation"] = self.details
        return out

    def explain(self) -> list[str]:
        from .grounding import explain_lines

        return [f"{self.record.id}:", *explain_lines(self.record.text, self.tags, self.confidences, self.evidence)]


@dataclass
class TaggingOptions:
    template: str | PromptTemplate = "auto"
    demos: Sequence[Demo] = ()
    max_new_tokens: int = 64
    batch_size: int = 8
    # Records generated between two appends to the output: a few batches, so prompts sort by length
    # within a chunk, while a crash loses at most one chunk of work.
    chunk_size: int = 64
    # Product text beyond this many characters is cut before prompting: titles and the head of a
    # description carry the tags, and a 1 MB description must not blow up the model's context.
    max_text_chars: int = 2000
    candidates: Any = None  # a CandidateFinder: vocabulary entries found in the text go into the prompt
    # Constrained decoding (constrain.py): "free" (only the record's schema limits attribute names),
    # "extract" (values are spans of the text) or "closed" (lines are entries of `constrain_vocab`).
    constrain: str = "free"
    constrain_vocab: Vocabulary | None = None  # for "closed"
    min_confidence: float | None = None  # drop tags the model is less sure of (grounding.py)


def build_prompt(record: Record, tokenizer: Any, options: TaggingOptions, training: bool = False) -> str:
    """The exact prompt for `record`. With `training`, candidates that exist only because of this
    record's own gold tags are left out, so training prompts look like test prompts."""
    if len(record.text) > options.max_text_chars:
        record = replace(record, text=record.text[: options.max_text_chars])
    template = template_for(record, options.template)
    candidates = (
        options.candidates.tags(record.text, record.tags or () if training else (), record.schema)
        if options.candidates else ()
    )
    return render_prompt(tokenizer, template.messages(record, options.demos, candidates))


def constraint_for(record: Record, options: TaggingOptions) -> ConstraintSpec | None:
    """The `constrain.ConstraintSpec` of `record` (None when nothing is constrained: free mode and no
    schema), from the text as `build_prompt` cuts it."""
    from .constrain import ConstraintSpec

    if options.constrain == "free" and not record.schema:
        return None
    if options.constrain == "closed" and options.constrain_vocab is None:
        raise ValueError("constrain='closed' needs a vocabulary (TaggingOptions.constrain_vocab)")
    return ConstraintSpec(
        options.constrain,
        text=record.text[: options.max_text_chars] if options.constrain == "extract" else None,
        schema=tuple(record.schema) if record.schema else None,
        vocab=options.constrain_vocab if options.constrain == "closed" else None,
    )


def chunked(records: Iterable[Record], size: int, first: int | None = None) -> Iterator[list[Record]]:
    """Lists of `size` records; the first of `first` records when given, so that the first results
    of a long run come after one batch rather than a whole chunk."""
    chunk: list[Record] = []
    limit = first or size
    for record in records:
        chunk.append(record)
        if len(chunk) == limit:
            yield chunk
            chunk, limit = [], size
    if chunk:
        yield chunk


def tag_chunks(
    records: Iterable[Record],
    engine: Any,
    options: TaggingOptions = TaggingOptions(),
    normaliser: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[list[TagResult]]:
    """Tag `records` with `engine` (anything with `.tokenizer` and `.generate(prompts, ...)`), one
    list of results per chunk of `options.chunk_size` records, in input order."""
    for chunk in chunked(records, options.chunk_size, first=options.batch_size):
        prompts = [build_prompt(record, engine.tokenizer, options) for record in chunk]
        constraints = [constraint_for(record, options) for record in chunk]
        # Engines without constrained decoding still serve unconstrained runs.
        kwargs = {"constraints": constraints} if any(c is not None for c in constraints) else {}
        generations = engine.generate(
            prompts, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, on_batch=on_batch,
            **kwargs,
        )
        yield [to_result(record, generation, options, normaliser) for record, generation in zip(chunk, generations)]


def tag_records(
    records: Iterable[Record],
    engine: Any,
    options: TaggingOptions = TaggingOptions(),
    normaliser: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[TagResult]:
    for chunk in tag_chunks(records, engine, options, normaliser, on_batch):
        yield from chunk


def to_result(record: Record, generation: Any, options: TaggingOptions, normaliser: Any = None) -> TagResult:
    """Parse, normalise and ground one generation."""
    from .grounding import confidences_by_tag, evidence_spans

    parsed = parse_tag_spans(generation.text)
    by_raw = confidences_by_tag(parsed, generation)
    result = TagResult(record, [p.tag for p in parsed], generation.text, generation.prompt_tokens,
                       generation.new_tokens, truncated=len(record.text) > options.max_text_chars)
    sources = [p.tag for p in parsed]
    if normaliser is not None:
        normalised = normaliser.normalise(result.tags)
        kept = [n for n in normalised if n.kept]
        result.tags, sources = [n.tag for n in kept], [n.source for n in kept]
        result.details = [n.to_json() for n in normalised]
    confidences = [by_raw.get(source) for source in sources]
    if options.min_confidence is not None:
        keep = [c is None or c >= options.min_confidence for c in confidences]
        result.below_confidence = [t for t, k in zip(result.tags, keep) if not k]
        result.tags = [t for t, k in zip(result.tags, keep) if k]
        sources = [s for s, k in zip(sources, keep) if k]
        confidences = [c for c, k in zip(confidences, keep) if k]
    result.confidences = confidences
    result.evidence = evidence_spans(record.text, result.tags, sources)
    return result


@dataclass
class RunSummary:
    read: int = 0
    tagged: int = 0
    errors: int = 0
    duplicates: int = 0
    empty: int = 0  # records for which the model produced no tag
    truncated: int = 0  # records whose text was cut to TaggingOptions.max_text_chars
    resumed: int = 0  # records found done in the output of an earlier run, and skipped
    interrupted: bool = False
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def products_per_second(self) -> float:
        return self.tagged / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        rate = f"{self.products_per_second:.2f} products/s, {self.new_tokens / max(self.seconds, 1e-9):.1f} tokens/s"
        lines = [
            f"tagged {self.tagged} of {self.read} records in {self.seconds:.1f} s ({rate})",
            f"skipped {self.errors} bad records and {self.duplicates} exact duplicates; "
            f"{self.empty} records got no tag; {self.truncated} long texts were truncated",
        ]
        if self.resumed:
            lines.append(f"resumed: {self.resumed} records were already done")
        if self.interrupted:
            lines.append("interrupted: the output holds whole records only; run again with --resume to finish")
        return lines


def _whole_lines(path: str | Path) -> bytes:
    """The bytes of a JSONL file up to its last newline, after cutting off (in the file too) a partial
    last line left by a run killed mid-write; b"" when there is no file."""
    path = Path(path)
    if not path.is_file():
        return b""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    return data


class SettingsMismatch(ValueError):
    """A resumed run would append tags made with other settings to an output."""


SETTINGS_SUFFIX = ".settings.json"


def check_run_settings(output: str | Path, settings: dict[str, Any], resume: bool) -> Path:
    """Record the settings of the run that writes `output` beside it (`OUTPUT.settings.json`); with
    `resume`, first refuse settings that differ from those recorded, because appending tags made by
    another model, adapter or prompt would mix two runs in one file without a trace. An output from
    before settings were recorded is resumed as it is. Returns the settings file."""
    import json
    import os

    path = Path(str(output) + SETTINGS_SUFFIX)
    current = json.loads(json.dumps(settings, ensure_ascii=False, sort_keys=True))
    if resume and path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SettingsMismatch(f"cannot resume {output}: its settings file {path} is unreadable ({exc}); "
                                   "delete the output and its settings file to start over") from exc
        if not isinstance(earlier, dict):
            raise SettingsMismatch(f"cannot resume {output}: its settings file {path} does not hold an object")
        changed = [f"{key}: {earlier.get(key)!r} then, {current.get(key)!r} now"
                   for key in sorted(earlier.keys() | current.keys()) if earlier.get(key) != current.get(key)]
        if changed:
            raise SettingsMismatch(
                f"cannot resume {output}: it was written with other settings ({'; '.join(changed)}); "
                "run with the earlier settings, write to another output, or delete it (and its .parts folder, if any) "
                "to start over")
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(current, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def completed_records(path: str | Path) -> set[tuple[str, str]]:
    """(id, text_hash) of every complete line of an earlier output; a torn last line is cut off."""
    import json

    done = set()
    for line in _whole_lines(path).splitlines():
        row = json.loads(line)
        done.add((str(row["id"]), row.get("text_hash", "")))
    return done


def _append(stream: Any, lines: list[str], sync: bool) -> None:
    """One write per chunk, flushed (and with `sync`, on disk) before the next chunk starts."""
    import os

    stream.write("".join(lines))
    stream.flush()
    if sync:
        os.fsync(stream.fileno())


def tag_file(
    source: str,
    output: str | None,
    tag: Callable[[Iterable[Record], Callable[[int], None]], Iterator[list[TagResult]]],
    *,
    fmt: str | None = None,
    fields: Any = None,
    limit: int | None = None,
    errors: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Tag every record of `source` ("-" for stdin) into the JSONL file `output` (None or "-": stdout).

    `tag(records, on_batch)` yields lists of results, e.g. `partial(tag_chunks, engine=..., options=...)`.
    Each list is appended in one write and synced, so a killed run leaves whole lines only. With
    `resume`, records already in `output` (same id and text hash) are skipped and the rest appended:
    the file then equals that of an uninterrupted run. Bad records are appended to `errors` (JSONL;
    default stderr) and skipped. Ctrl-C stops after the chunk in flight is dropped, with a summary.
    """
    import itertools
    import json
    import sys
    import time

    from tqdm import tqdm

    from .records import Fields, ReadStats, RecordError, count_records, read_records

    to_stdout = output in (None, "-")
    if resume and to_stdout:
        raise ValueError("--resume needs an output file (-o FILE)")
    done = completed_records(output) if resume else set()
    # The errors file is written as bad records are read, so a killed run can leave half a line there too.
    reported = set(_whole_lines(errors).decode("utf-8").splitlines()) if resume and errors else set()
    stats = ReadStats()
    summary = RunSummary()
    if not to_stdout:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    out = sys.stdout if to_stdout else open(output, "a" if resume else "w", encoding="utf-8")
    err = open(errors, "a", encoding="utf-8") if errors else sys.stderr

    def valid_records() -> Iterator[Record]:
        for item in read_records(source, fmt, fields or Fields(), stats=stats):
            if isinstance(item, RecordError):
                line = json.dumps(item.to_json(), ensure_ascii=False)
                if line not in reported:
                    err.write(line + "\n")
                    if errors:
                        tqdm.write(f"llmtags: skipped {item}", file=sys.stderr)
                continue
            yield item

    total = count_records(source, fmt) if source != "-" else None
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    records = itertools.islice(valid_records(), limit)

    def pending() -> Iterator[Record]:
        for record in records:
            if (record.id, record.text_hash) in done:
                summary.resumed += 1
                bar.update(1)
            else:
                yield record

    start = time.perf_counter()
    try:
        with tqdm(total=total, unit="product", desc="tagging", disable=not progress, file=sys.stderr) as bar:
            for chunk in tag(pending(), bar.update):
                _append(out, [json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in chunk], sync=not to_stdout)
                for result in chunk:
                    summary.tagged += 1
                    summary.empty += not result.tags
                    summary.truncated += result.truncated
                    summary.prompt_tokens += result.prompt_tokens
                    summary.new_tokens += result.new_tokens
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if not to_stdout:
            out.close()
        if errors:
            err.close()
    summary.seconds = time.perf_counter() - start
    summary.read, summary.errors, summary.duplicates = stats.read, stats.errors, stats.duplicates
    return summary

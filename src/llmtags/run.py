"""A whole run of `generate`: a file of records in, a JSONL file of tags out, resumable.

`tag_file` streams records through a `tag(records, on_batch)` callable (`make_tagger` builds the one
a run plan asks for: a plain engine, or adapters routed per record), appends each chunk of results in
one synced write, and reports bad records without stopping. `run_settings` and `check_run_settings`
keep the settings that decide the tags beside the output, so `--resume` never mixes two models.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .adapters.routing import adapter_tagger
from .atomic import write_text
from .engines.llamacpp import run_as
from .engines.select import load_engine, pick_engine
from .options import Settings
from .plan import RunPlan, plan_run
from .records import Fields, ReadStats, Record, RecordError, count_records, read_records
from .tagger import TagResult, tag_chunks

Tagger = Callable[[Iterable[Record], Callable[[int], None]], Iterator[list[TagResult]]]


@dataclass
class RunSummary:
    read: int = 0
    tagged: int = 0
    errors: int = 0
    duplicates: int = 0
    empty: int = 0  # records for which the model produced no tag
    truncated: int = 0  # records whose text was cut to TaggingOptions.max_text_chars
    resumed: int = 0  # records found done in the output of an earlier run, and skipped
    cascaded: int = 0  # records the span proposer tagged alone (--cascade), without generation
    cut: int = 0  # answers that used all of --max-new-tokens
    filled: int = 0  # tags taken from the proposer's spans (--fill, --proposer-decides)
    unconfirmed: int = 0  # the model's unsure tags the proposer did not find (--confirm-below)
    interrupted: bool = False
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # lines that were not tags, by reason

    def add(self, result: TagResult) -> None:
        for reason, tags in result.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + len(tags)
        self.tagged += 1
        self.empty += not result.tags
        self.cascaded += result.by == "proposer"
        self.cut += result.cut
        self.filled += len(result.filled)
        self.unconfirmed += len(result.unconfirmed)
        self.truncated += result.truncated
        self.prompt_tokens += result.prompt_tokens
        self.new_tokens += result.new_tokens

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
        if self.dropped:
            lines.append("dropped lines that are not tags: " + ", ".join(
                f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(self.dropped.items())))
        if self.cut:
            lines.append(f"{self.cut} answers used all of --max-new-tokens and may have lost tags after it: raise it "
                         "for products with many tags")
        if self.cascaded:
            lines.append(f"cascade: the span proposer alone tagged {self.cascaded} of {self.tagged} records "
                         f"({self.cascaded / self.tagged:.0%}); the model generated the rest")
        if self.filled or self.unconfirmed:
            lines.append(f"fusion: {self.filled} tags taken from the span proposer's spans (--fill, --proposer-decides), "
                         f"{self.unconfirmed} unsure tags of the model dropped that it did not find (--confirm-below)")
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
RUNS_KEY = "runs"  # in the settings file: what each start of the run used of RUN_ONLY_SETTINGS, and when


def check_run_settings(output: str | Path, settings: dict[str, Any], resume: bool,
                       run_only: dict[str, Any] | None = None) -> Path:
    """Record the settings of the run that writes `output` beside it (`OUTPUT.settings.json`); with
    `resume`, first refuse settings that differ from those recorded, because appending tags made by
    another model, adapter or prompt would mix two runs in one file without a trace. An output from
    before settings were recorded is resumed as it is. Returns the settings file.

    `run_only` (`run_only_record`: the engine, weights, dtype, ... a resume may change) is appended to the
    file's "runs", one entry per start, so an output written partly on Q8_0 and partly on Q4_K_M weights
    says so."""
    path = Path(str(output) + SETTINGS_SUFFIX)
    current = json.loads(json.dumps(settings, ensure_ascii=False, sort_keys=True))
    runs = [json.loads(json.dumps(run_only, ensure_ascii=False, sort_keys=True))] if run_only else []
    if resume and path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SettingsMismatch(f"cannot resume {output}: its settings file {path} is unreadable ({exc}); "
                                   "delete the output and its settings file to start over") from exc
        if not isinstance(earlier, dict):
            raise SettingsMismatch(f"cannot resume {output}: its settings file {path} does not hold an object")
        # An option added since that run (absent from its file) and left at its default now changes nothing.
        defaults = dataclasses.asdict(Settings())
        earlier_runs = earlier.pop(RUNS_KEY, [])
        changed = [f"{key}: {earlier.get(key)!r} then, {current.get(key)!r} now"
                   for key in sorted(earlier.keys() | current.keys()) if earlier.get(key) != current.get(key)
                   and not (key not in earlier and _left_at_default(current.get(key), defaults.get(key)))]
        if changed:
            raise SettingsMismatch(
                f"cannot resume {output}: it was written with other settings ({'; '.join(changed)}); "
                "run with the earlier settings, write to another output, or delete it (and its .parts folder, if any) "
                "to start over")
        if not runs:
            return path
        if not isinstance(earlier_runs, list):
            print(f"llmtags: warning: {path}: \"{RUNS_KEY}\" is not a list; the history of this output starts anew",
                  file=sys.stderr)
            earlier_runs = []
        current, runs = earlier, earlier_runs + runs
    # `-o new/dir/out.jsonl`: write_text makes the output's folder
    return write_text(path, json.dumps({**current, **({RUNS_KEY: runs} if runs else {})}, ensure_ascii=False,
                                       indent=1, sort_keys=True) + "\n")


def _left_at_default(value: Any, default: Any) -> bool:
    """A setting an earlier run's file lacks (it did not exist then) changes nothing when left unset, off or
    at its default; compared by type too, since 0.0 == False (an --adapter-scale of 0 is not "off")."""
    return value is None or value is False or (type(value) is type(default) and value == default)


def completed_records(path: str | Path) -> set[tuple[str, str]]:
    """(id, text_hash) of every complete line of an earlier output; a torn last line is cut off."""
    done = set()
    for line in _whole_lines(path).splitlines():
        row = json.loads(line)
        done.add((str(row["id"]), row.get("text_hash", "")))
    return done


def _append(stream: Any, lines: list[str], sync: bool) -> None:
    """One write per chunk, flushed (and with `sync`, on disk) before the next chunk starts."""
    stream.write("".join(lines))
    stream.flush()
    if sync:
        os.fsync(stream.fileno())


def tag_file(
    source: str,
    output: str | None,
    tag: Tagger,
    *,
    fmt: str | None = None,
    fields: Any = None,
    limit: int | None = None,
    errors: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Tag every record of `source` ("-" for stdin) into the JSONL file `output` (None or "-": stdout).

    `tag(records, on_batch)` yields lists of results (see `make_tagger`).
    Each list is appended in one write and synced, so a killed run leaves whole lines only. With
    `resume`, records already in `output` (same id and text hash) are skipped and the rest appended:
    the file then equals that of an uninterrupted run. Bad records are appended to `errors` (JSONL;
    default stderr) and skipped. Ctrl-C stops after the chunk in flight is dropped, with a summary.
    """
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

    total = count_records(source, fmt) if source != "-" else None
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    records = itertools.islice(_valid_records(source, fmt, fields or Fields(), stats, err, reported, bool(errors)), limit)

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
                    summary.add(result)
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


def _valid_records(source: str, fmt: str | None, fields: Fields, stats: ReadStats, err: Any, reported: set[str],
                   announce: bool) -> Iterator[Record]:
    """The valid records of `source`; each bad one is written to `err` as a JSON line (unless an earlier
    run already reported it: `reported`) and, with `announce`, noted on stderr."""
    for item in read_records(source, fmt, fields, stats=stats):
        if isinstance(item, RecordError):
            line = json.dumps(item.to_json(), ensure_ascii=False)
            if line not in reported:
                err.write(line + "\n")
                if announce:
                    tqdm.write(f"llmtags: skipped {item}", file=sys.stderr)
            continue
        yield item


# Settings that change how fast or where a run goes, not which tags it writes: a resumed run may differ here
# (the engine, dtype and weights change a few tags within the noise of arithmetic: eval/bench_weights_*.md).
RUN_ONLY_SETTINGS = ("device", "dtype", "engine", "weights", "batch_size", "chunk_size")


def run_settings(plan: RunPlan, fields: Fields = Fields(), fmt: str | None = None) -> dict[str, Any]:
    """What decides the tags of a `generate` run: every setting of the plan but the run-only ones, the
    input's format and fields, and the content hashes of the files they name and of the adapters
    (`RunPlan.content_hashes`), so a retrained adapter counts as a change."""
    values = {k: v for k, v in dataclasses.asdict(plan.settings).items() if k not in RUN_ONLY_SETTINGS}
    if values.get("adapter_scale") == 1.0:  # as trained, given or not: the same tags
        values["adapter_scale"] = None
    values.update(format=fmt, id_field=fields.id, text_field=fields.text, category_field=fields.category,
                  tags_field=fields.tags)
    values.update(plan.content_hashes())
    return dict(sorted(values.items()))


def run_only_record(plan: RunPlan) -> dict[str, Any]:
    """When this start of a run began and what it runs on (RUN_ONLY_SETTINGS, the engine as picked here: Ray
    workers pick their own): kept in the settings file's "runs", not compared on resume."""
    settings = plan.settings
    engine = pick_engine(settings.engine, plan.base_model, settings.device, settings.dtype)
    record = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "engine": engine, "device": settings.device, "batch_size": settings.batch_size,
              "chunk_size": settings.chunk_size}
    # The weights llama.cpp runs (a .gguf base that is not embedded runs as it is, whatever --weights says).
    record.update({"weights": run_as(plan.base_model, settings.weights)} if engine == "llama.cpp"
                  else {"dtype": settings.dtype})
    return record


def make_tagger(plan: RunPlan) -> Tagger:
    """The `tag(records, on_batch)` callable that `tag_file` takes: the engine the plan names, with its
    adapter or adapter map (each record routed to its own), loaded once; none for --proposer-alone, whose
    records all go to the span proposer."""
    if plan.options.proposer_alone:
        return lambda records, on_batch: tag_chunks(records, None, plan.options, plan.normaliser, on_batch)
    if plan.settings.wants_adapters:
        return adapter_tagger(plan)
    settings = plan.settings
    engine = load_engine(settings.engine, plan.base_model, device=settings.device, dtype=settings.dtype,
                         weights=settings.weights)
    return lambda records, on_batch: tag_chunks(records, engine, plan.options, plan.normaliser, on_batch)


def planned_tagger(settings: Settings) -> Tagger:
    """`make_tagger` of the plan of `settings`: what a Ray worker builds from the plain settings it is
    sent (loaded options need not pickle), loading its own model replica."""
    return make_tagger(plan_run(settings))


def prepare_generate(settings: Settings, output: str | None, fields: Fields = Fields(), fmt: str | None = None,
                     compare: bool = False) -> RunPlan:
    """The start of every `generate` run: the run planned (`plan.plan_run`: the adapter's defaults filled
    in, the tagging options and normaliser built), and the settings file written beside `output` (with
    `compare`, first checked against the one an earlier run left there)."""
    plan = plan_run(settings)
    if output not in (None, "-"):
        check_run_settings(output, run_settings(plan, fields, fmt), compare, run_only_record(plan))
    return plan


def generate_file(source: str, output: str | None, settings: Settings, *, fields: Fields = Fields(),
                  fmt: str | None = None, limit: int | None = None, errors: str | None = None, resume: bool = False,
                  progress: bool = True, explain: bool = False) -> RunSummary:
    """`llmtags generate` on this machine: tag every record of `source` into `output` (see `tag_file`)
    with what `settings` name; with `explain`, each result is also shown on stderr."""
    tag = make_tagger(prepare_generate(settings, output, fields, fmt, compare=resume))
    return tag_file(source, output, explaining(tag) if explain else tag, fmt=fmt, fields=fields, limit=limit,
                    errors=errors, resume=resume, progress=progress)


def explaining(tag: Tagger) -> Tagger:
    """Wrap a `tag(records, on_batch)` callable so each result is also shown, highlighted, on stderr."""

    def explained(records: Any, on_batch: Any) -> Any:
        for chunk in tag(records, on_batch):
            for result in chunk:
                tqdm.write("\n".join(result.explain()), file=sys.stderr)
            yield chunk

    return explained

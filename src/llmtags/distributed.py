"""Batch tagging on a Ray cluster: `llmtags generate INPUT -o OUT --workers N [--ray-address ADDR]`.

The driver reads and cleans the input (bad records are reported here, as in a local run), cuts the
valid records into shards of `shard_size`, and hands shards to N Ray actors. Each actor loads one
model replica (with its adapters) once, tags whole shards with the same `tag(records, on_batch)`
callable a local run uses, and returns JSON lines; the driver writes each shard to
`OUT.parts/part-NNNNN.jsonl` (temporary name, then rename) and, at the end, joins the parts in input
order into OUT.

A re-run skips every shard whose part file exists, so a killed run, or one that lost a worker,
continues where it stopped. `OUT.parts/manifest.json` records the input's hash and the shard size,
and a re-run over different input or shards is refused rather than mixed.

On one machine Ray starts a local cluster; on a cluster, start Ray there (`ray start --head`, then
`ray start --address HEAD:6379` on each node) and pass `--ray-address auto` (or set RAY_ADDRESS).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_text
from .models import sha256_file
from .records import Fields, ReadStats, Record, RecordError, read_records
from .tagger import chunked

MANIFEST = "manifest.json"


@dataclass
class DistributedSummary:
    shards: int = 0
    skipped_shards: int = 0  # done by an earlier run
    tagged: int = 0  # records tagged by this run
    read: int = 0
    errors: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.tagged / self.seconds if self.seconds else 0.0
        return [f"tagged {self.tagged} records in {self.shards - self.skipped_shards} shards in {self.seconds:.1f} s "
                f"({rate:.2f} products/s); {self.skipped_shards} of {self.shards} shards were already done",
                f"read {self.read} records; skipped {self.errors} bad records"]


def parts_dir(output: str | Path) -> Path:
    return Path(f"{output}.parts")


def part_path(directory: Path, index: int) -> Path:
    return directory / f"part-{index:05d}.jsonl"


def _check_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    path = directory / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != manifest:
            raise ValueError(f"{directory} holds shards of another run ({found}); remove it or choose another output")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(manifest, indent=1), durable=True)


def _worker_class(cpus_per_worker: int) -> Any:
    import ray

    @ray.remote(num_cpus=cpus_per_worker)
    class TaggingWorker:
        """One model replica; `make_tag` runs here, so the model is loaded once per worker."""

        def __init__(self, make_tag: Callable[[], Any], threads: int) -> None:
            import torch

            torch.set_num_threads(threads)
            os.environ["LLMTAGS_THREADS"] = str(threads)  # the llama.cpp engine's threads
            self.tag = make_tag()

        def run(self, index: int, records: list[Record]) -> tuple[int, list[str]]:
            lines = [json.dumps(result.to_json(), ensure_ascii=False) + "\n"
                     for chunk in self.tag(records, lambda n: None) for result in chunk]
            return index, lines

    return TaggingWorker


def tag_file_distributed(
    source: str,
    output: str,
    make_tag: Callable[[], Any],
    *,
    workers: int = 2,
    cpus_per_worker: int = 1,
    shard_size: int = 256,
    fmt: str | None = None,
    fields: Fields | None = None,
    limit: int | None = None,
    errors: str | None = None,
    address: str | None = None,
    progress: bool = True,
) -> DistributedSummary:
    """Tag `source` into `output` with `workers` Ray actors, each built by `make_tag()` (a picklable
    function returning a `tag(records, on_batch)` callable, as `run.tag_file` takes: `generate` sends
    `partial(run.planned_tagger, settings)`, so each worker plans the run from plain settings)."""
    import itertools

    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    if source == "-":
        raise ValueError("--workers reads the input twice (hash, then records): give a file, not stdin")
    started = time.perf_counter()
    summary = DistributedSummary()
    stats = ReadStats()
    bad: list[str] = []
    valid: list[Record] = []
    for item in itertools.islice(_valid_or_errors(source, fmt, fields, stats, bad), limit):
        valid.append(item)
    summary.read, summary.errors = stats.read, stats.errors
    if errors:
        write_text(Path(errors), "".join(bad), durable=True)
    else:
        for line in bad:
            print(f"llmtags: skipped {line.strip()}", file=sys.stderr)

    directory = parts_dir(output)
    _check_manifest(directory, {"source_sha256": sha256_file(source), "shard_size": shard_size, "limit": limit,
                                "records": len(valid)})
    all_shards = list(chunked(valid, shard_size))
    summary.shards = len(all_shards)
    todo = [(i, shard) for i, shard in enumerate(all_shards) if not part_path(directory, i).is_file()]
    summary.skipped_shards = summary.shards - len(todo)

    if todo:
        started_ray = not ray.is_initialized()
        if started_ray:
            local = address is None and not os.environ.get("RAY_ADDRESS")
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     **({"num_cpus": workers * cpus_per_worker} if local else {}))
        try:
            worker = _worker_class(cpus_per_worker)
            pool = ActorPool([worker.remote(make_tag, cpus_per_worker) for _ in range(min(workers, len(todo)))])
            total = sum(len(s) for _, s in todo)
            with tqdm(total=total, unit="product", desc="tagging", disable=not progress, file=sys.stderr) as bar:
                for index, lines in pool.map_unordered(lambda a, job: a.run.remote(*job), todo):
                    write_text(part_path(directory, index), "".join(lines), durable=True)
                    summary.tagged += len(lines)
                    bar.update(len(lines))
        finally:
            if started_ray:
                ray.shutdown()

    write_text(Path(output), "".join(part_path(directory, i).read_text(encoding="utf-8")
                                        for i in range(summary.shards)), durable=True)
    summary.seconds = time.perf_counter() - started
    return summary


def _valid_or_errors(source: str, fmt: str | None, fields: Fields | None, stats: ReadStats,
                     bad: list[str]) -> Iterator[Record]:
    for item in read_records(source, fmt, fields or Fields(), stats=stats):
        if isinstance(item, RecordError):
            bad.append(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
        else:
            yield item

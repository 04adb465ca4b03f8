"""`llmtags generate`: tag the products of a file (`run.generate_file`), on this machine or a Ray cluster."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Any

from ..distributed import tag_file_distributed
from ..run import generate_file, planned_tagger, prepare_generate
from .common import (
    CliError,
    add_adapter_options,
    add_generation,
    add_input,
    add_model,
    add_prompt,
    add_vocab,
    fields_from,
    settings_from,
)


def add_parser(commands: Any) -> dict[str, argparse.ArgumentParser]:
    p = commands.add_parser("generate", help="tag the products of a file")
    add_input(p)
    p.add_argument("-o", "--output", help="output JSONL (default stdout)")
    p.add_argument("--errors", help="append bad-record reports here as JSONL (default stderr)")
    p.add_argument("--resume", action="store_true",
                   help="skip records already in the output (same id and text) and append the rest")
    add_model(p)
    add_prompt(p)
    add_generation(p)
    add_vocab(p)
    add_adapter_options(p)
    p.add_argument("--workers", type=int, metavar="N",
                   help="tag on a Ray cluster with N model replicas (a local one unless --ray-address); "
                   "shards go to OUT.parts/, and a re-run skips the shards already done")
    p.add_argument("--ray-address", help="Ray cluster to join (e.g. auto, or HEAD:6379; default: $RAY_ADDRESS, "
                   "else a local cluster)")
    p.add_argument("--shard-size", type=int, default=256, help="records per Ray task (default 256)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPU threads per Ray worker (default 1)")
    p.add_argument("--explain", action="store_true",
                   help="also show each product on stderr with its tags' evidence [bracketed] and confidences")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)
    return {"generate": p}


def cmd_generate(args: argparse.Namespace) -> int:
    if args.workers:
        return _generate_distributed(args)
    summary = generate_file(args.input, args.output, settings_from(args), fields=fields_from(args), fmt=args.format,
                            limit=args.limit, errors=args.errors, resume=args.resume, progress=not args.quiet,
                            explain=args.explain)
    for line in summary.lines():
        print(f"llmtags: {line}", file=sys.stderr)
    return 130 if summary.interrupted else 0


def _generate_distributed(args: argparse.Namespace) -> int:
    if args.output in (None, "-"):
        raise CliError("--workers writes shards next to the output: give -o FILE")
    if args.explain:
        raise CliError("--explain shows results as they come: use it without --workers")
    settings = settings_from(args)
    # Ray runs always reuse finished shards, so they always compare settings with the earlier run's. The plan
    # is made here too, so bad settings or adapters fail before a cluster starts.
    prepare_generate(settings, args.output, fields_from(args), args.format, compare=True)
    # Each Ray worker plans the run again from the plain settings and loads its own model replica.
    summary = tag_file_distributed(
        args.input, args.output, partial(planned_tagger, settings), workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, shard_size=args.shard_size, fmt=args.format, fields=fields_from(args),
        limit=args.limit, errors=args.errors, address=args.ray_address, progress=not args.quiet,
    )
    for line in summary.lines():
        print(f"llmtags: {line}", file=sys.stderr)
    return 0

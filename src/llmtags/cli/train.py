"""`llmtags train`: fine-tune a LoRA adapter on labelled records (`train.recipe.train`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..adapters.registry import adapters_root, read_metadata, resolve_adapter, validate_adapter_name
from ..engines.base import ENGINE_CHOICES
from ..records import Fields, Record, RecordError, interleave, read_records
from ..train.config import TrainConfig, TrainError, warm_start_defaults
from ..train.recipe import data_description, train
from .common import add_fields, add_format, add_root, command_line, fields_from

# TrainConfig fields settable by a flag (dest = field name); every default is None so that unset
# flags keep the values of --train-config (or TrainConfig's defaults).
_HYPERPARAMETER_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--rank", {"type": int, "help": "LoRA rank (default 16)"}),
    ("--alpha", {"type": int, "help": "LoRA alpha (default 32)"}),
    ("--dropout", {"type": float, "help": "LoRA dropout (default 0.05)"}),
    ("--target-modules", {"help": "comma-separated module names (default q,k,v,o,gate,up,down _proj)"}),
    ("--layers", {"help": "layers that get adapters: N (the top N; default 8, or a warm start's own), 'all', or indices "
                 "'20,21-23'"}),
    ("--lr", {"type": float, "help": "learning rate (default 2e-4)"}),
    ("--schedule", {"help": "learning-rate schedule (default cosine; linear, constant_with_warmup, ...)"}),
    ("--warmup-ratio", {"type": float, "help": "share of steps spent warming up (default 0.03)"}),
    ("--epochs", {"type": float, "help": "epochs (default 2)"}),
    ("--max-steps", {"type": int, "help": "optimizer steps; overrides --epochs"}),
    ("--max-length", {"type": int, "help": "tokens per example, prompt + answer (default 160)"}),
    ("--batch-size", {"type": int, "help": "examples per micro-batch (default 4)"}),
    ("--grad-accum", {"type": int, "help": "micro-batches per optimizer step (default 4)"}),
    ("--seed", {"type": int}),
    ("--eval-every", {"type": int, "help": "steps between dev evaluations by generation (default 50; 0: at the end)"}),
    ("--eval-limit", {"type": int, "help": "dev records generated per evaluation (default 100)"}),
    ("--eval-batch-size", {"type": int}),
    ("--eval-engine", {"choices": ENGINE_CHOICES, "help": "the engine dev evaluations "
                       "generate with (auto: llama.cpp for a GGUF base on CPU when installed, as generate picks; "
                       "it measures the adapter on the weights it will tag with)"}),
    ("--max-new-tokens", {"type": int, "help": "generation limit during evaluation (default 64)"}),
    ("--save-every", {"type": int, "help": "steps between checkpoints (default: --eval-every)"}),
    ("--save-total-limit", {"type": int, "help": "checkpoints kept (default 2)"}),
    ("--log-every", {"type": int}),
    ("--dtype", {"choices": ["auto", "float32", "bfloat16"], "help": "auto: bf16 on CUDA, bf16 autocast over fp32 weights "
                 "on a CPU with AVX512-BF16 or AMX, else fp32 (bf16 without them is far slower: train warns)"}),
    ("--qlora", {"choices": ["auto", "true", "false"], "help": "4-bit base model (auto: on CUDA only)"}),
    ("--fast", {"choices": ["auto", "true", "false"], "help": "the fast CPU trainer: frozen layers computed once, "
                "logits only where there is loss (auto: on CPU without QLoRA; false: trl's SFTTrainer)"}),
    ("--device", {"help": "auto, cpu, cuda, cuda:1, ..."}),
    ("--base-model", {"help": "base model spec (default: $LLMTAGS_BASE_MODEL, else 'embedded')"}),
    ("--template", {"help": "auto (default), zh, en, few_shot, or a .j2 file"}),
    ("--init-adapter", {"metavar": "ADAPTER", "help": "warm start: continue training this adapter's weights "
                        "(its rank, alpha, modules and layers replace the flags, but --layers naming its layers and more "
                        "widens it, the new layers starting at zero; base and templates must match). Its prompt "
                        "carries over where no flag sets it: base, template, prompt budget, --max-length, proposer "
                        "features, its candidates and K neighbours, drawn from the training files, and its batch (--batch-size and "
                        "--grad-accum, unless one is set)"}),
    ("--candidates", {"metavar": "VOCAB", "help": "offer vocabulary entries found in the text in the prompt, "
                      "as generate --candidates (a vocabulary, or a labelled file whose tags are collected)"}),
    ("--demos", {"metavar": "LABELLED", "help": "with --retrieve K: each example shows its K most similar records "
                 "of these labelled files (comma-joined; usually the training files), never itself; the adapter "
                 "ships the pool, and generate --adapter uses it"}),
    ("--retrieve", {"type": int, "metavar": "K", "help": "demonstrations retrieved per example (default 0: none)"}),
    ("--span-proposer", {"choices": ["auto", "true", "false"], "help": "train the span proposer (a CRF) on the "
                          "training records, show its spans in every prompt (k-fold cross-fitted in training) and ship "
                          "it (auto, the default: when the template renders `proposals`, as tuned does)"}),
    ("--proposer-folds", {"type": int, "metavar": "K", "help": "folds of the proposer's cross-fitting (default 5)"}),
    ("--proposer-iterations", {"type": int, "metavar": "N", "help": "the proposer's training iterations (default 80)"}),
    ("--proposer-features", {"type": int, "metavar": "V", "help": "the proposer's feature set (default 2: trigrams, "
                             "category, gazetteer; 1: as before 2026-12-06, for a run started with it)"}),
    ("--demo-text", {"choices": ["full", "title"], "help": "retrieved neighbours shown whole or by their title "
                     "(default full); the adapter records it and generate prompts the same way"}),
    ("--text-budget", {"type": int, "metavar": "CHARS", "help": "show a text longer than CHARS as its title plus the "
                       "windows around its proposals and candidates (default, or 0: whole texts); recorded as "
                       "--demo-text is"}),
    ("--rename", {"type": float, "metavar": "P", "help": "share of examples whose attribute names are renamed "
                  "consistently in demonstrations, schema and answer, so the adapter follows a catalogue's names "
                  "(default 0)"}),
]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_parser(commands: Any) -> dict[str, argparse.ArgumentParser]:
    p = commands.add_parser("train", help="fine-tune a LoRA adapter on labelled records")
    p.add_argument("train", nargs="+", help="labelled training records (JSONL, CSV or Parquet); several files "
                   "are interleaved record by record, so --limit and every batch draw from all of them")
    p.add_argument("--dev", nargs="+", help="labelled dev records (one file or several, interleaved like the "
                   "training files): evaluated by generation, the best adapter is kept")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--name", help="save as this adapter in the registry (ADAPTERS_ROOT/NAME)")
    where.add_argument("--out", help="save the adapter in this directory instead")
    add_root(p)
    p.add_argument("--train-config", help="TOML file of TrainConfig values (a [train] table, or top-level keys)")
    for flag, kwargs in _HYPERPARAMETER_FLAGS:
        p.add_argument(flag, dest=_dest(flag), default=None, **kwargs)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter or unfinished run")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N valid records (with --init-adapter: "
                   "the ones it already saw)")
    p.add_argument("--limit", type=int, help="train on the first N valid records only (after --skip)")
    p.add_argument("--licence", "--license", dest="licence", help="licence of the training data, for the metadata")
    p.add_argument("--vocab", help="normalisation vocabulary the adapter goes with (recorded in the metadata)")
    add_format(p)
    add_fields(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return {"train": p}


def read_labelled(path: str, fmt: str | None, fields: Fields, what: str) -> list[Record]:
    """The valid records of `path`, with a line on stderr for each bad one and a count at the end."""
    records, errors = [], 0
    for item in read_records(path, fmt, fields):
        if isinstance(item, RecordError):
            errors += 1
            print(f"llmtags: {what}: skipped {item}", file=sys.stderr)
        elif isinstance(item, Record):
            records.append(item)
    unlabelled = sum(r.tags is None for r in records)
    print(f"llmtags: {what}: {len(records) - unlabelled} labelled records from {path}"
          f" ({errors} bad, {unlabelled} without tags)", file=sys.stderr)
    return records


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--train-config FILE, then every flag that was given."""
    config = TrainConfig.from_toml(args.train_config) if getattr(args, "train_config", None) else TrainConfig()
    overrides = {_dest(flag): getattr(args, _dest(flag), None) for flag, _ in _HYPERPARAMETER_FLAGS}
    return config.merged(**overrides)


def given_settings(args: argparse.Namespace) -> set[str]:
    """The TrainConfig fields this command sets: by a flag or in --train-config."""
    given = {_dest(flag) for flag, _ in _HYPERPARAMETER_FLAGS if getattr(args, _dest(flag), None) is not None}
    if getattr(args, "train_config", None):
        given |= {key.replace("-", "_") for key in TrainConfig.toml_table(args.train_config)}
    return given


def train_out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    return adapters_root(args.adapters_root) / validate_adapter_name(args.name)


def cmd_train(args: argparse.Namespace) -> int:
    config = train_config_from_args(args)
    out = train_out_dir(args)
    if args.skip < 0:
        raise TrainError(f"--skip must not be negative, not {args.skip}")
    fields = fields_from(args)
    train_records = interleave([read_labelled(path, args.format, fields, "train") for path in args.train])[args.skip:]
    if args.limit is not None:
        train_records = train_records[: args.limit]
    if config.init_adapter:
        name, init = config.init_adapter, resolve_adapter(config.init_adapter, args.adapters_root)
        config, inherited = warm_start_defaults(config.merged(init_adapter=str(init)), given_settings(args),
                                                read_metadata(init), ",".join(args.train))
        if inherited:
            print(f"llmtags: --init-adapter {name}: its prompt where no flag sets it: "
                  + ", ".join(inherited), file=sys.stderr)
    dev_records = interleave([read_labelled(path, args.format, fields, "dev") for path in args.dev or []])
    one_or_all = lambda paths: paths[0] if paths and len(paths) == 1 else paths  # noqa: E731
    data = data_description(train_records, dev_records, one_or_all(args.train), one_or_all(args.dev), args.licence)
    result = train(train_records, dev_records, config, out, command_line(args), data=data, vocab=args.vocab,
                   resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    for line in result.summary_lines():
        print(f"llmtags: {line}", file=sys.stderr)
    return 0

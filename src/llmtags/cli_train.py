"""Command-line wiring of training and adapters, kept apart from `cli.py`, which calls into it:

- `add_train_commands(subparsers)` adds `llmtags train`, `llmtags adapters list|show` and `llmtags merge`,
  and returns their leaf parsers (for `--config` defaults, like `cli.build_parser`'s `leaves`);
- `add_adapter_options(parser)` adds `--adapter NAME`, `--adapter-map FILE`, `--adapters-root DIR` and
  `--force-adapter` to `llmtags generate` (or any command that generates);
- `wants_adapters(args)` and `adapter_tagger(args, options, normaliser)` run `generate` with them: the
  latter returns the `tag(records, on_batch)` callable that `tagger.tag_file` takes.

Each command function takes the parsed `argparse.Namespace` and returns an exit status; errors are
raised as `ValueError` subclasses (`TrainError`, `AdapterError`), which `cli.main` reports with exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

# TrainConfig fields settable by a flag (dest = field name); every default is None so that unset
# flags keep the values of --train-config (or TrainConfig's defaults).
_HYPERPARAMETER_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--rank", {"type": int, "help": "LoRA rank (default 16)"}),
    ("--alpha", {"type": int, "help": "LoRA alpha (default 32)"}),
    ("--dropout", {"type": float, "help": "LoRA dropout (default 0.05)"}),
    ("--target-modules", {"help": "comma-separated module names (default q,k,v,o,gate,up,down _proj)"}),
    ("--layers", {"help": "layers that get adapters: N (the top N, default 8), 'all', or indices '20,21-23'"}),
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
    ("--max-new-tokens", {"type": int, "help": "generation limit during evaluation (default 64)"}),
    ("--save-every", {"type": int, "help": "steps between checkpoints (default: --eval-every)"}),
    ("--save-total-limit", {"type": int, "help": "checkpoints kept (default 2)"}),
    ("--log-every", {"type": int}),
    ("--dtype", {"choices": ["auto", "float32", "bfloat16"], "help": "auto: fp32 on CPU, bf16 on CUDA"}),
    ("--qlora", {"choices": ["auto", "true", "false"], "help": "4-bit base model (auto: on CUDA only)"}),
    ("--device", {"help": "auto, cpu, cuda, cuda:1, ..."}),
    ("--base-model", {"help": "base model spec (default: $LLMTAGS_BASE_MODEL, else 'embedded')"}),
    ("--template", {"help": "auto (default), zh, en, few_shot, or a .j2 file"}),
    ("--init-adapter", {"metavar": "ADAPTER", "help": "warm start: continue training this adapter's weights "
                        "(its rank, alpha, modules and layers replace the flags; base and templates must match)"}),
    ("--candidates", {"metavar": "VOCAB", "help": "offer vocabulary entries found in the text in the prompt, "
                      "as generate --candidates (a vocabulary, or a labelled file whose tags are collected)"}),
]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_record_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["jsonl", "csv", "parquet"], help="input format (default: from the suffix)")
    p.add_argument("--id-field", default="id")
    p.add_argument("--text-field", default="text")
    p.add_argument("--category-field", default="category")
    p.add_argument("--tags-field", default="tags")


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters-root", help="adapter registry directory (default: $LLMTAGS_ADAPTERS, else ./adapters)")


def add_train_commands(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    """Add `train`, `adapters list`, `adapters show` and `merge`; return {leaf name: parser}."""
    leaves: dict[str, argparse.ArgumentParser] = {}

    p = subparsers.add_parser("train", help="fine-tune a LoRA adapter on labelled records")
    p.add_argument("train", nargs="+", help="labelled training records (JSONL, CSV or Parquet); several files "
                   "are interleaved record by record, so --limit and every batch draw from all of them")
    p.add_argument("--dev", nargs="+", help="labelled dev records (one file or several, interleaved like the "
                   "training files): evaluated by generation, the best adapter is kept")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--name", help="save as this adapter in the registry (ADAPTERS_ROOT/NAME)")
    where.add_argument("--out", help="save the adapter in this directory instead")
    _add_root(p)
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
    _add_record_fields(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    leaves["train"] = p

    adapters = subparsers.add_parser("adapters", help="the adapter registry").add_subparsers(
        dest="adapters_command", required=True
    )
    p = adapters.add_parser("list", help="list the adapters in the registry")
    _add_root(p)
    p.add_argument("--json", action="store_true", help="one JSON object per adapter")
    p.set_defaults(func=cmd_adapters_list)
    leaves["adapters list"] = p
    p = adapters.add_parser("show", help="print an adapter's metadata (llmtags.json) as JSON")
    p.add_argument("adapter", help="adapter name or directory")
    _add_root(p)
    p.set_defaults(func=cmd_adapters_show)
    leaves["adapters show"] = p

    p = subparsers.add_parser("merge", help="fold an adapter into its base model: a standalone model directory")
    p.add_argument("adapter", help="adapter name or directory")
    p.add_argument("-o", "--output", required=True, help="directory for the merged model (must be new or empty)")
    p.add_argument("--base-model", help="default: the base model recorded in the adapter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-in-4bit", action="store_true", help="merge into a 4-bit base (lossy; warns)")
    p.add_argument("--force", action="store_true", help="merge even when the base model differs")
    _add_root(p)
    p.set_defaults(func=cmd_merge)
    leaves["merge"] = p
    return leaves


def add_adapter_options(p: argparse.ArgumentParser) -> None:
    """`--adapter NAME` | `--adapter-map FILE`, for `llmtags generate` (and eval)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--adapter", help="LoRA adapter (registry name or directory) for every record")
    group.add_argument("--adapter-map", help="TOML category→adapter map: [categories] \"美妆\" = \"NAME\", "
                       "optional default = \"NAME\"; other records use the base model")
    if not any(a.dest == "adapters_root" for a in p._actions):
        _add_root(p)
    p.add_argument("--force-adapter", action="store_true",
                   help="use adapters trained for another base model or prompt template (warns)")


# --- commands -------------------------------------------------------------------------------------------


def _command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "argv", None)
    return shlex.join(["llmtags", *(argv if argv is not None else sys.argv[1:])])


def _read_labelled(path: str, args: argparse.Namespace, what: str) -> list[Any]:
    from .records import Fields, Record, RecordError, read_records

    fields = Fields(args.id_field, args.text_field, args.category_field, args.tags_field)
    records, errors = [], 0
    for item in read_records(path, args.format, fields):
        if isinstance(item, RecordError):
            errors += 1
            print(f"llmtags: {what}: skipped {item}", file=sys.stderr)
        elif isinstance(item, Record):
            records.append(item)
    unlabelled = sum(r.tags is None for r in records)
    print(f"llmtags: {what}: {len(records) - unlabelled} labelled records from {path}"
          f" ({errors} bad, {unlabelled} without tags)", file=sys.stderr)
    return records


def train_config_from_args(args: argparse.Namespace) -> Any:
    """--train-config FILE, then every flag that was given."""
    from .train import TrainConfig

    config = TrainConfig.from_toml(args.train_config) if getattr(args, "train_config", None) else TrainConfig()
    overrides = {_dest(flag): getattr(args, _dest(flag), None) for flag, _ in _HYPERPARAMETER_FLAGS}
    if isinstance(overrides.get("qlora"), str) and overrides["qlora"] != "auto":
        overrides["qlora"] = overrides["qlora"].lower() == "true"
    return config.merged(**overrides)


def train_out_dir(args: argparse.Namespace) -> Path:
    from .adapters import adapters_root, validate_adapter_name

    if args.out:
        return Path(args.out)
    return adapters_root(args.adapters_root) / validate_adapter_name(args.name)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainError, data_description, train

    config = train_config_from_args(args)
    out = train_out_dir(args)
    from .records import interleave

    if args.skip < 0:
        raise TrainError(f"--skip must not be negative, not {args.skip}")
    train_records = interleave([_read_labelled(path, args, "train") for path in args.train])[args.skip:]
    if args.limit is not None:
        train_records = train_records[: args.limit]
    if config.init_adapter:
        from .adapters import resolve_adapter

        config = config.merged(init_adapter=str(resolve_adapter(config.init_adapter, args.adapters_root)))
    dev_records = interleave([_read_labelled(path, args, "dev") for path in args.dev or []])
    one_or_all = lambda paths: paths[0] if paths and len(paths) == 1 else paths  # noqa: E731
    data = data_description(train_records, dev_records, one_or_all(args.train), one_or_all(args.dev), args.licence)
    result = train(train_records, dev_records, config, out, _command_line(args), data=data, vocab=args.vocab,
                   resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    for line in result.summary_lines():
        print(f"llmtags: {line}", file=sys.stderr)
    return 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from .adapters import adapters_root, list_adapters

    infos = list_adapters(args.adapters_root)
    if args.json:
        for info in infos:
            print(json.dumps({**info.summary(), "path": str(info.path)}, ensure_ascii=False))
        return 0
    if not infos:
        print(f"llmtags: no adapters in {adapters_root(args.adapters_root)}", file=sys.stderr)
        return 0
    rows = [["name", "base model", "template", "train records", "dev F1", "created"]]
    for info in infos:
        s = info.summary()
        f1 = f"{s['dev_f1']:.3f}" if isinstance(s["dev_f1"], (int, float)) else "-"
        rows.append([s["name"], str(s["base"]), str(s["template"]), str(s["train_records"] or "-"), f1,
                     str(s["created"] or "-")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_adapters_show(args: argparse.Namespace) -> int:
    from .adapters import show_adapter

    print(json.dumps(show_adapter(args.adapter, args.adapters_root), ensure_ascii=False, indent=2))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .adapters import merge_adapter

    out = merge_adapter(args.base_model, args.adapter, args.output, device=args.device, dtype=args.dtype,
                        load_in_4bit=args.load_in_4bit, force=args.force, root=args.adapters_root)
    print(f"llmtags: merged model in {out} (use it with --base-model {out})", file=sys.stderr)
    return 0


# --- generate with adapters ------------------------------------------------------------------------------


def wants_adapters(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "adapter", None) or getattr(args, "adapter_map", None))


def load_adapter_set(args: argparse.Namespace, template: Any, templates: dict[str, Any] | None = None,
                     adapter_map: Any = None) -> tuple[Any, Any]:
    """The base model with the adapter(s) named by --adapter / --adapter-map attached and checked
    (each against `templates[name]` when given, else `template`).

    Without --base-model (and $LLMTAGS_BASE_MODEL), the base is the one the (first) adapter records.
    `adapter_map`: the --adapter-map already read, if any. Returns (AdapterSet, AdapterMap or None).
    """
    from .adapters import AdapterSet, LlamaCppAdapterSet, read_metadata, resolve_adapter
    from .engine import pick_engine

    root = getattr(args, "adapters_root", None)
    adapter_map = adapter_map if adapter_map is not None else _adapter_map(args)
    names = adapter_map.adapter_names if adapter_map is not None else [args.adapter]
    base = getattr(args, "base_model", None) or os.environ.get("LLMTAGS_BASE_MODEL")
    if base is None and names:
        base = read_metadata(resolve_adapter(names[0], root)).get("base_model", {}).get("spec")
    device, dtype = getattr(args, "device", "auto"), getattr(args, "dtype", "auto")
    if pick_engine(getattr(args, "engine", "transformers"), base, device, dtype) == "llama.cpp":
        adapter_set = LlamaCppAdapterSet.load(base)
    else:
        adapter_set = AdapterSet.load(base, device=device, dtype=dtype)
    for name in names:
        adapter_set.add(name, template=(templates or {}).get(name, template),
                        force=getattr(args, "force_adapter", False), root=root)
    return adapter_set, adapter_map


def _adapter_map(args: argparse.Namespace) -> Any:
    from .adapters import load_adapter_map

    return load_adapter_map(args.adapter_map) if getattr(args, "adapter_map", None) else None


def adapter_tagger(args: argparse.Namespace, options: Any, normaliser: Any = None) -> Any:
    """The `tag(records, on_batch)` callable that `tagger.tag_file` takes, tagging with --adapter or
    --adapter-map: each chunk's records are grouped by adapter, one base model serves them all.
    With a map, each adapter gets its own template and candidates unless --template / --candidates
    were given (with one --adapter, `apply_adapter_defaults` has already put them into `options`)."""
    from .adapters import tag_chunks_routed

    adapter_map = _adapter_map(args)
    per_adapter = ({name: adapter_options(name, args, options) for name in adapter_map.adapter_names}
                   if adapter_map is not None else {})
    adapter_set, adapter_map = load_adapter_set(
        args, options.template, {name: o.template for name, o in per_adapter.items()}, adapter_map)
    adapter = None if adapter_map is not None else adapter_set.names[0]

    def tag(records: Any, on_batch: Any) -> Any:
        return tag_chunks_routed(records, adapter_set, options, adapter=adapter, adapter_map=adapter_map,
                                 normaliser=normaliser, on_batch=on_batch, options_by_adapter=per_adapter)

    return tag


def adapter_prompt_defaults(name: str, args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(template spec, candidates source) that adapter `name` was trained with, for the options the
    user left unset. A candidates source absent here is dropped with a warning (the adapter still
    works, with lower recall), so `generate` runs on a machine without the training data."""
    from .adapters import read_metadata, resolve_adapter
    from .candidates import candidate_sources

    meta = read_metadata(resolve_adapter(name, getattr(args, "adapters_root", None)))
    template = None
    if getattr(args, "template", "auto") == "auto":
        template = (meta.get("template") or {}).get("spec")
    source = ((meta.get("vocabulary") or {}).get("candidates") or {}).get("path")
    if not source or getattr(args, "candidates", None) or getattr(args, "no_candidates", False):
        return template, None
    missing = [path for path in candidate_sources(source) if not Path(path).is_file()]
    if missing:
        print(f"llmtags: warning: adapter {name} was trained with vocabulary candidates from {source}, but "
              f"{', '.join(missing)} is absent here: tagging without candidates, which lowers recall; "
              "give --candidates VOCAB (that file, or a vocabulary built from it)", file=sys.stderr)
        return template, None
    print(f"llmtags: adapter {name}: candidates from {source}", file=sys.stderr)
    return template, source


def adapter_options(name: str, args: argparse.Namespace, options: Any) -> Any:
    """`options` with adapter `name`'s own template and candidates filled in (see adapter_prompt_defaults)."""
    import dataclasses

    from .candidates import CandidateFinder, load_candidate_vocabulary
    from .prompts import load_template

    template, source = adapter_prompt_defaults(name, args)
    changes: dict[str, Any] = {}
    if template:
        changes["template"] = template if template == "auto" else load_template(template)
    if source:
        changes["candidates"] = CandidateFinder(load_candidate_vocabulary(source))
    return dataclasses.replace(options, **changes)


def apply_adapter_defaults(args: argparse.Namespace) -> None:
    """With one --adapter, unset prompt options default to what the adapter was trained with: its
    template (instead of 'auto') and its candidate vocabulary, so `generate --adapter NAME` just works."""
    if not getattr(args, "adapter", None):
        return
    template, source = adapter_prompt_defaults(args.adapter, args)
    if template:
        args.template = template
    if source:
        args.candidates = source

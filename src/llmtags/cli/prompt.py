"""`llmtags prompt render` (exactly what the model sees for one record) and `llmtags prompt compare`
(templates run on the same labelled records, compared)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..evaluate import compare_templates, labelled_records, plan_engine
from ..models import load_tokenizer_only
from ..pages import compare_page, run_meta, write_page
from ..plan import plan_run
from ..prompts import load_template, template_for
from ..records import Record, RecordError, clean_text, read_records
from ..tagger import build_prompt, prompt_parts, render_parts
from .common import (
    CliError,
    add_adapter_options,
    add_fields,
    add_generation,
    add_input,
    add_model,
    add_prompt,
    add_vocab,
    command_line,
    fields_from,
    settings_from,
)


def add_parser(commands: Any) -> dict[str, argparse.ArgumentParser]:
    prompt = commands.add_parser("prompt", help="prompt templates").add_subparsers(dest="prompt_command", required=True)
    p = prompt.add_parser("render", help="show exactly what the model sees for one record")
    add_input(p, optional=True)
    p.add_argument("--id", help="the record's id (default: the first record)")
    p.add_argument("--index", type=int, default=0, help="the record's position among valid records")
    p.add_argument("--text", help="render this product text instead of reading a file")
    p.add_argument("--base-model")
    add_prompt(p)
    add_adapter_options(p, adapter_map=False, generating=False)
    p.set_defaults(func=cmd_prompt_render)
    render = p

    p = prompt.add_parser("compare", help="run templates on the same labelled records and compare them")
    p.add_argument("templates", nargs="+", help="template names (zh, en, few_shot) or .j2 files")
    p.add_argument("--data", required=True, help="labelled JSONL (e.g. a dev split)")
    add_fields(p)
    add_model(p)
    add_prompt(p, template=False)
    add_generation(p)
    add_vocab(p)
    add_adapter_options(p, adapter_map=False)
    p.add_argument("--show", type=int, default=10, help="how many disagreeing records to print")
    p.add_argument("--report", help="write the comparison as JSON here")
    p.add_argument("--markdown", help="write the tables as Markdown here")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page here: F1 and ΔF1 per variant, "
                   "every record side by side with its prompts, filterable")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_prompt_compare, template="auto")
    return {"prompt render": render, "prompt compare": p}


def _record_to_render(args: argparse.Namespace) -> Record:
    if args.text is not None:
        return Record("cli", clean_text(args.text))
    if args.input is None:
        raise CliError("give an input file or --text")
    for n, item in enumerate(read_records(args.input, args.format, fields_from(args))):
        if isinstance(item, RecordError):
            continue
        if (args.id is not None and item.id == args.id) or (args.id is None and n == args.index):
            return item
    raise CliError(f"no valid record with {'id ' + repr(args.id) if args.id else 'index ' + str(args.index)}")


def cmd_prompt_render(args: argparse.Namespace) -> int:
    record = _record_to_render(args)
    # Planned as `generate` plans: an --adapter brings its template, candidates, pool and proposer.
    plan = plan_run(settings_from(args))
    options = plan.options
    tokenizer = load_tokenizer_only(plan.base_model)
    parts = prompt_parts(record, options)
    prompt = render_parts(parts, tokenizer, options)
    template = template_for(parts.record, options.template)
    confidence = f", proposer confidence {parts.confidence:.3f}" if parts.confidence is not None else ""
    print(f"# record {record.id}, template {template.name} (sha256 {template.sha256[:12]}), "
          f"{len(tokenizer(prompt, add_special_tokens=False)['input_ids'])} tokens{confidence}", file=sys.stderr)
    sys.stdout.write(prompt)
    if record.tags:
        print(f"# training target:\n{template.answer(record.tags)}", file=sys.stderr)
    return 0


def cmd_prompt_compare(args: argparse.Namespace) -> int:
    if len(args.templates) < 2:
        raise CliError("give at least two templates to compare")
    templates = [load_template(t) for t in args.templates]
    records = labelled_records(args.data, args.limit, fields_from(args))
    # Planned as `generate` plans (an --adapter brings its candidates, pool and proposer); every variant
    # is checked against the adapter, which refuses templates it was not trained with unless --force-adapter.
    plan = plan_run(settings_from(args), templates)
    options = plan.options
    engine = plan_engine(plan, templates)
    comparison = compare_templates(records, templates, engine, options, plan.normaliser, progress=not args.quiet)
    markdown = comparison.to_markdown(disagreements=args.show)
    if args.report:
        Path(args.report).write_text(json.dumps(comparison.to_json(), ensure_ascii=False, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    if args.html:
        prompts = [[build_prompt(r, engine.tokenizer, replace(options, template=t)) for r in records] for t in templates]
        write_page(args.html, compare_page(comparison, records, prompts, meta=run_meta(command_line(args), args.data)))
    print(f"llmtags: {engine.misses} generations, the rest from the cache", file=sys.stderr)
    return 0

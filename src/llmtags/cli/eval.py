"""`llmtags eval`: score predictions against gold tags, or generate with the model and score."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..adapters.registry import set_metadata_entry
from ..calibrate import read_scored_predictions
from ..candidates import labelled_sources
from ..evaluate import (
    PEER_NAME,
    add_candidate_recall,
    generate_and_score,
    headline_metrics,
    labelled_records,
    plan_engine,
    score_files,
)
from ..options import normaliser_for
from ..pages import eval_page, run_meta, write_page
from ..plan import plan_run
from ..proposer import SpanProposer
from ..records import load_labelled
from ..report import PROTOCOLS
from .common import (
    CliError,
    add_adapter_options,
    add_fields,
    add_format,
    add_generation,
    add_model,
    add_prompt,
    add_vocab,
    command_line,
    fields_from,
    open_output,
    settings_from,
)


def sample_texts(plan: Any) -> set[str] | None:
    """The texts of the labelled sample a run's pool, candidates or proposer come from (None: no sample).
    With --demos SAMPLE --retrieve 0 there is no pool, but the sample may still supply either of the others."""
    if plan.options.pool is not None:
        return {r.text for r in plan.options.pool.records}
    return {r.text for r in labelled_sources(plan.sample)} if plan.sample else None


def warn_overlap(records: list[Any], texts: set[str] | None, source: str | None) -> None:
    """Scores on records the labelled sample holds (the --demos sample, or an adapter's own pool) are
    optimistic: the candidates or span proposer drawn from it saw their gold tags (retrieval already never
    shows a record its own text). `texts`: the sample's (`sample_texts`)."""
    if not texts or not source:
        return
    inside = [r.id for r in records if r.text in texts]
    if inside:
        print(f"llmtags: warning: {len(inside)} of the {len(records)} records scored are in the labelled sample "
              f"{source} (e.g. {', '.join(map(str, inside[:3]))}) that this run's neighbours, candidates or span "
              "proposer come from: they saw these tags, so the scores are optimistic; score on records outside it",
              file=sys.stderr)


def add_parser(commands: Any) -> dict[str, argparse.ArgumentParser]:
    p = commands.add_parser("eval", help="score predictions against gold tags, or generate and score")
    p.add_argument("--gold", help="labelled JSONL")
    p.add_argument("--pred", help="predictions from llmtags generate")
    p.add_argument("--data", help="labelled file: generate with the model, then score")
    add_format(p)
    add_fields(p)
    add_model(p)
    add_prompt(p)
    add_generation(p)
    add_vocab(p)
    p.add_argument("--protocol", choices=PROTOCOLS, default="strict",
                   help="strict (default): every predicted tag counts; extractgpt: also score each record's target "
                   "attributes (its `targets`, else `schema`), one predicted value each, as ExtractGPT does")
    p.add_argument("--errors", dest="errors_k", type=int, default=0, metavar="K", help="list the K worst records")
    p.add_argument("--report", help="write the full report as JSON here")
    p.add_argument("--markdown", help="write the tables as Markdown here")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page here: headline figures, F1 per "
                   "attribute, reliability of the confidences, the worst records")
    p.add_argument("--save-predictions", help="with --data: write the generated predictions here")
    p.add_argument("--record-to-adapter", metavar="NAME",
                   help="store these figures as adapter NAME's test metrics in its llmtags.json")
    add_adapter_options(p, adapter_map=False)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)
    return {"eval": p}


def cmd_eval(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    confidences: list[list[float | None]] = []
    if args.pred:
        if not args.gold:
            raise CliError("--pred needs --gold")
        if settings.adapter:
            raise CliError("--adapter tags with the adapter: use it with --data FILE, not --pred")
        report = score_files(args.gold, args.pred, normaliser_for(settings), protocol=args.protocol, limit=args.limit)
        if args.html:  # the reliability diagram needs the confidences the predictions carry
            scored = read_scored_predictions(args.pred)
            confidences = [scored.get(record_id, ([], []))[1] for record_id in report.ids]
    elif args.data:
        records = labelled_records(args.data, args.limit, fields_from(args))
        # Planned as `generate` plans: with --adapter, its template, candidates, pool and proposer.
        plan = plan_run(settings)
        settings = plan.settings
        warn_overlap(records, sample_texts(plan), plan.sample)
        report, results = generate_and_score(records, plan_engine(plan), plan.options, plan.normaliser, args.data,
                                             progress=not args.quiet, protocol=args.protocol)
        confidences = [r.confidences for r in results]
        if args.save_predictions:
            with open_output(args.save_predictions) as out:
                for result in results:
                    out.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    else:
        raise CliError("give --gold FILE --pred FILE, or --data FILE to generate and score")
    gold = records if args.data else [r for r in load_labelled(args.gold) if r.tags is not None][: args.limit]
    if settings.candidates:
        add_candidate_recall(report, gold, settings.candidates)
    proposer = plan.options.proposer if args.data else (
        SpanProposer(settings.proposer) if settings.proposer and not settings.no_proposer else None)
    if proposer is not None:  # the classical peer, on the same records: the CRF alone
        report.add_peer(PEER_NAME, [[p.tag for p in proposer.propose(record)] for record in gold])
    write_report(report, args)
    if args.html:
        write_page(args.html, eval_page(report, meta=run_meta(command_line(args), args.data or args.gold),
                                        confidences=confidences, worst=max(args.errors_k, 50)))
    if args.record_to_adapter:
        set_metadata_entry(args.record_to_adapter, ("metrics", "test"),
                           headline_metrics(report, args.gold or args.data, args.markdown), settings.adapters_root)
    return 0


def write_report(report: Any, args: argparse.Namespace) -> None:
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report.to_json(worst=args.errors_k or 20), ensure_ascii=False, indent=1))
    markdown = report.to_markdown(worst=args.errors_k or 0)
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n", encoding="utf-8")
    print(markdown)

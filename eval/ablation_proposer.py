"""What the span proposer adds: the CRF alone against an adapter without candidates, with the dictionary's
candidates, with the CRF's proposals and with both, on the same records of one set.

    .venv/bin/python eval/ablation_proposer.py --set zh-taobao-ner --adapter zh-taobao [--split test] [--limit 200]

An adapter without a candidate vocabulary is offered the set's train values in the variants with candidates.
The CRF is the adapter's own proposer (`proposer.crfsuite`, trained on the set's train split), or, for an
adapter without one, `--proposer MODEL`. Every adapter variant is one `llmtags generate` run (the function
the CLI calls) with --resume under `--work`, so a killed run continues; products/s is the run's own
tagging rate (model loading excluded), measured when its predictions were made and kept beside them.
Per attribute, the table shows where the best variant adds to the CRF and where it loses.
Writes eval/ablation_proposer_SET_SPLIT.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from common import (REPO, ablation_parser, generated, meta_lines, predictions_file, run_meta, split_paths,
                    with_candidates, write_result)

from llmtags.adapters.pack import PROPOSER_FILE
from llmtags.adapters.registry import resolve_adapter
from llmtags.baselines import DictionaryTagger
from llmtags.metrics import paired_bootstrap
from llmtags.models import cache_root
from llmtags.proposer import SpanProposer
from llmtags.records import Record, load_labelled
from llmtags.report import EvalReport

# name -> changes to `llmtags generate --adapter`'s settings (the adapter's own are the defaults), each with
# --no-fill: what the proposer adds to the prompt, not to the answer (fusion: eval/fill.py)
VARIANTS = {
    "adapter, nothing proposed": {"no_candidates": True, "no_proposer": True},
    "adapter + dictionary candidates": {"no_proposer": True},
    "adapter + CRF proposals": {"no_candidates": True},
    "adapter + both": {},
}


def row(name: str, records: list[Record], preds: list[list[str]], n_boot: int, rate: float | None,
        protocol: str) -> tuple[dict[str, Any], EvalReport]:
    report = EvalReport.from_records(records, preds, name=name, n_boot=n_boot, protocol=protocol)
    typed = report.scores("raw", "typed")
    entry = {"variant": name, "precision": typed.micro.precision, "recall": typed.micro.recall, "f1": typed.micro.f1,
             "f1_ci95": list(report.ci95("raw", "typed")), "products_per_s": rate}
    if protocol == "extractgpt":
        entry["extractgpt_f1"] = report.scores("raw", "extractgpt").micro.f1
    return entry, report


def per_attribute(crf: EvalReport, model: EvalReport) -> list[dict[str, Any]]:
    a, b = crf.scores("raw", "typed").per_attribute, model.scores("raw", "typed").per_attribute
    rows = []
    for name in sorted(set(a) | set(b), key=lambda n: -(a.get(n) or b.get(n)).support):
        ca, cb = a.get(name), b.get(name)
        rows.append({"attribute": name, "support": (ca or cb).support, "crf_f1": ca.f1 if ca else 0.0,
                     "model_f1": cb.f1 if cb else 0.0, "delta": (cb.f1 if cb else 0.0) - (ca.f1 if ca else 0.0),
                     "crf_fp": ca.fp if ca else 0, "model_fp": cb.fp if cb else 0,
                     "crf_fn": ca.fn if ca else 0, "model_fn": cb.fn if cb else 0})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    paths = split_paths(args.data, args.set, "train", args.split)
    if paths is None:
        sys.exit(0)
    train_path, data_path = paths
    records = [r for r in load_labelled(data_path) if r.tags is not None][: args.limit]
    adapter_dir = resolve_adapter(args.adapter)
    proposer_path = args.proposer or adapter_dir / PROPOSER_FILE
    if not Path(proposer_path).is_file():
        sys.exit(f"adapter {args.adapter} ships no {PROPOSER_FILE}: give --proposer MODEL")
    proposer = SpanProposer(proposer_path)
    work = args.work or cache_root() / "eval" / args.set
    rows, reports = [], {}

    started = time.perf_counter()
    crf_tags = [[p.tag for p in proposer.propose(r)] for r in records]
    crf_rate = len(records) / (time.perf_counter() - started)
    entry, reports["CRF alone"] = row("CRF alone (the adapter's proposer)", records, crf_tags, args.n_boot, crf_rate,
                                      args.protocol)
    rows.append(entry)
    started = time.perf_counter()
    lookups = DictionaryTagger.from_records(load_labelled(train_path)).tag_many([r.text for r in records])
    entry, _ = row("dictionary (train values in the text)", records, lookups, args.n_boot,
                   len(records) / (time.perf_counter() - started), args.protocol)
    rows.append(entry)
    preds_by_variant = {}
    chosen = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    for name, changes in ((n, VARIANTS[n]) for n in chosen):
        changes = {"no_fill": True, **changes, **({"proposer": str(args.proposer)} if args.proposer and "no_proposer" not in changes
                                 else {})}
        changes = with_candidates(changes, args.adapter, train_path)
        file = predictions_file(work, args.split, f"proposer-{name}", args.adapter)
        found, rate = generated(data_path, file, args.adapter, changes, args.limit)
        preds = [found.get(r.id, ([], []))[0] for r in records]
        preds_by_variant[name] = preds
        entry, reports[name] = row(name, records, preds, args.n_boot, rate, args.protocol)
        rows.append(entry)
        print(f"{name}: F1 {entry['f1']:.3f}", file=sys.stderr)
    best = max(chosen, key=lambda n: reports[n].scores("raw", "typed").micro.f1)
    delta = paired_bootstrap([r.tags for r in records], crf_tags, preds_by_variant[best], n=args.n_boot)
    return {"set": args.set, "split": args.split, "adapter": args.adapter, "proposer": str(proposer_path),
            "records": len(records), "rows": rows, "best": best, "best_vs_crf": delta.to_json(),
            "per_attribute": per_attribute(reports["CRF alone"], reports[best]), "meta": run_meta()}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# The span proposer, piece by piece: {result['set']} {result['split']} ({result['adapter']} adapter)", "",
             *meta_lines(result["meta"]),
             f"- records: the first {result['records']} {result['split']} records; strict typed micro P/R/F1, "
             "95% interval by bootstrap over records",
             "- products/s: the tagging rate of the run that made the predictions (model loading excluded), "
             "llama.cpp engine; no other job on the machine",
             "- every adapter variant runs with --no-fill: its answers as written, what the proposals add to the prompt "
             "(what the fusion then adds to the answer: eval/fill.py)", "",
             "| variant | P | R | F1 | 95% CI | products/s |" + (" ExtractGPT F1 |" if "extractgpt_f1" in
                                                               result["rows"][0] else ""),
             "|---|---:|---:|---:|---|---:|" + ("---:|" if "extractgpt_f1" in result["rows"][0] else "")]
    for r in result["rows"]:
        rate = f"{r['products_per_s']:.2f}" if r["products_per_s"] else "–"
        extra = f" {r['extractgpt_f1']:.3f} |" if "extractgpt_f1" in r else ""
        lines.append(f"| {r['variant']} | {r['precision']:.3f} | {r['recall']:.3f} | **{r['f1']:.3f}** | "
                     f"{r['f1_ci95'][0]:.3f}–{r['f1_ci95'][1]:.3f} | {rate} |{extra}")
    d = result["best_vs_crf"]
    lines += ["", f"Best variant, {result['best']}, against the CRF alone: ΔF1 {d['delta_f1']:+.3f} "
              f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (paired bootstrap), "
              f"{'significant' if d['significant'] else 'not significant'} at 5%.", "",
              f"## Per attribute: {result['best']} against the CRF alone", "",
              "| attribute | support | CRF F1 | model F1 | Δ | CRF fp / fn | model fp / fn |",
              "|---|---:|---:|---:|---:|---|---|"]
    for a in result["per_attribute"]:
        lines.append(f"| {a['attribute']} | {a['support']} | {a['crf_f1']:.3f} | {a['model_f1']:.3f} | "
                     f"{a['delta']:+.3f} | {a['crf_fp']} / {a['crf_fn']} | {a['model_fp']} / {a['model_fn']} |")
    return "\n".join(lines)


def main() -> None:
    parser = ablation_parser(__doc__)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--proposer", type=Path, help="a proposer model, for an adapter that ships none")
    parser.add_argument("--protocol", choices=["strict", "extractgpt"], default="strict")
    parser.add_argument("--variants", help="comma-joined names of the adapter variants to run (default: all)")
    args = parser.parse_args()
    result = run(args)
    write_result(args.out or REPO / "eval" / f"ablation_proposer_{args.set.replace('-', '_')}_{args.split}", result,
                 markdown(result))


if __name__ == "__main__":
    main()

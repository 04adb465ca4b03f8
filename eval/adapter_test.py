"""A shipped adapter on the test split of a benchmark set, beside the dictionary baseline and its CRF peer
(the adapter's span proposer alone) on the same records.

    .venv/bin/python eval/adapter_test.py --adapter zh-taobao --set zh-taobao-ner [--limit N]
    .venv/bin/python eval/adapter_test.py --adapter en-products --set en-oa-mine --set en-ae-110k --set en-wdc-pave

For each set: `llmtags generate TEST --adapter NAME` (resumable; predictions under <llmtags cache>/eval/
SET/), then the same scoring as `llmtags eval --gold TEST --pred PRED` (typed and value-only micro
P/R/F1 with bootstrap intervals, per attribute), candidate recall, and the dictionary baseline and the
CRF peer on the same records. Writes eval/adapter_NAME_test.{json,md}; with --record, stores the figures as the
adapter's test metrics in its llmtags.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import (DATASETS, REPO, generate_predictions, meta_lines, predictions_file, run_meta, split_paths,
                    write_outputs)

from llmtags.baselines import DictionaryTagger
from llmtags.candidates import candidate_finder, candidate_recall
from llmtags.evaluate import read_predictions, score_predictions
from llmtags.models import cache_root
from llmtags.options import Settings
from llmtags.plan import adapter_defaults, resolved_adapter
from llmtags.proposer import SpanProposer
from llmtags.records import load_labelled
from llmtags.report import EvalReport


def _figures(report: EvalReport) -> dict[str, Any]:
    typed = report.scores("raw", "typed").micro
    figures = {"precision": typed.precision, "recall": typed.recall, "f1": typed.f1,
               "f1_ci95": list(report.ci95("raw", "typed")), "value_f1": report.scores("raw", "values").micro.f1}
    if "extractgpt" in report.views["raw"]:
        protocol = report.scores("raw", "extractgpt").micro
        figures["extractgpt"] = {"precision": protocol.precision, "recall": protocol.recall, "f1": protocol.f1,
                                 "f1_ci95": list(report.ci95("raw", "extractgpt"))}
    return figures


def evaluate_set(name: str, adapter: str, data: Path, limit: int | None) -> dict[str, Any] | None:
    paths = split_paths(data, name, "train", "test")
    if paths is None:
        return None
    train_path, test_path = paths
    labelled = [r for r in load_labelled(test_path) if r.tags is not None]
    test = labelled[:limit]
    pred_path = predictions_file(cache_root() / "eval" / name, "test", "adapter + candidates", adapter)
    seconds = generate_predictions(test_path, pred_path, adapter, {}, limit)
    predictions = read_predictions(pred_path)
    # The ExtractGPT protocol where the set names each record's target attributes (en-oa-mine, en-ae-110k).
    protocol = "extractgpt" if any(r.targets for r in test) else "strict"
    report = score_predictions(test, [predictions.get(r.id, []) for r in test], name=f"{adapter} on {name} test",
                               protocol=protocol)
    dictionary = DictionaryTagger.from_records(load_labelled(train_path))
    baseline = EvalReport.from_records(test, dictionary.tag_many([r.text for r in test]), protocol=protocol)
    # Candidate recall of what the prompts offer: the adapter's own candidates (else the set's train values).
    defaults = adapter_defaults(resolved_adapter(adapter), Settings())
    finder = candidate_finder(defaults.candidates or str(train_path))
    # The CRF peer: the adapter's span proposer alone, as `llmtags eval` shows it.
    crf = (EvalReport.from_records(test, [[p.tag for p in SpanProposer(defaults.proposer).propose(r)] for r in test],
                                   protocol=protocol) if defaults.proposer else None)
    report.candidate_recall = candidate_recall([r.tags for r in test],
                                               [finder.tags(r.text, attributes=r.schema) for r in test])
    return {"set": name, "records": len(test), "of": len(labelled),
            "adapter": _figures(report), "dictionary": _figures(baseline), "crf": _figures(crf) if crf else None,
            "candidate_recall": report.candidate_recall,
            "generation_seconds": round(seconds, 1), "report": report}


def markdown(adapter: str, results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Adapter `{adapter}` on test splits", "", *meta_lines(meta),
             "- scoring: strict typed micro P/R/F1 over `Attribute:value` tags (every predicted tag counts), 95% CI "
             "by percentile bootstrap over records; the dictionary baseline (train values found in the text) and the "
             "CRF peer (the adapter's span proposer alone) on the same records; where the set has `targets`, also the ExtractGPT protocol (`llmtags eval --protocol "
             "extractgpt`)",
             "- data: ../shared/datasets as of its 2026-12-01 change (category-level `schema`)", "",
             "| set | records | adapter P | adapter R | adapter F1 | 95% CI | value F1 | CRF peer F1 | dictionary F1 | "
             "Δ F1 (dictionary) | candidate recall | ExtractGPT protocol F1 (dictionary) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        a, d = r["adapter"], r["dictionary"]
        protocol = (f"{a['extractgpt']['f1']:.3f} [{a['extractgpt']['f1_ci95'][0]:.3f}–"
                    f"{a['extractgpt']['f1_ci95'][1]:.3f}] ({d['extractgpt']['f1']:.3f})" if "extractgpt" in a else "–")
        crf = f"{r['crf']['f1']:.3f}" if r.get("crf") else "–"
        lines.append(f"| {r['set']} | {r['records']} of {r['of']} | {a['precision']:.3f} | {a['recall']:.3f} | "
                     f"**{a['f1']:.3f}** | {a['f1_ci95'][0]:.3f}–{a['f1_ci95'][1]:.3f} | {a['value_f1']:.3f} | {crf} | "
                     f"{d['f1']:.3f} | {a['f1'] - d['f1']:+.3f} | {r['candidate_recall']:.3f} | {protocol} |")
    for r in results:
        lines += ["", r["report"].to_markdown(categories=False, worst=10)]
    return "\n".join(lines)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--set", action="append", required=True, dest="sets")
    parser.add_argument("--data", type=Path, default=DATASETS)
    parser.add_argument("--limit", type=int, help="only the first N test records of each set")
    parser.add_argument("--record", action="store_true", help="store the figures in the adapter's llmtags.json")
    args = parser.parse_args()
    results = [r for r in (evaluate_set(s, args.adapter, args.data, args.limit) for s in args.sets) if r]
    if not results:
        sys.exit(0)
    meta = run_meta()
    out = REPO / "eval" / f"adapter_{args.adapter.replace('-', '_')}_test"
    write_outputs(out, {"adapter": args.adapter, "sets": [{k: v for k, v in r.items() if k != "report"}
                                                          for r in results],
                        "reports": {r["set"]: r["report"].to_json(worst=10) for r in results}, "meta": meta},
                  markdown(args.adapter, results, meta))
    if args.record:
        from llmtags.adapters.registry import set_metadata_entry

        test = {r["set"]: {"records": r["records"], "of": r["of"], **{k: _rounded(v) for k, v in r["adapter"].items()},
                           "candidate_recall": round(r["candidate_recall"], 4),
                           "dictionary_f1": round(r["dictionary"]["f1"], 4)} for r in results}
        set_metadata_entry(args.adapter, ("metrics", "test"), {**test, "report": str(out.with_suffix(".md").name)})


if __name__ == "__main__":
    main()

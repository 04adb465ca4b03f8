"""Grounded tagging, piece by piece: what candidates, constrained decoding and a confidence threshold
each add to a shipped adapter, on the first N test records of a set, beside the dictionary baseline.

    .venv/bin/python eval/ablation.py --set zh-taobao-ner --adapter zh-taobao [--limit 100] [--dev-limit 100]

An adapter trained without candidates (zh-taobao since 2026-12-07) is offered the set's train values in the
variants with candidates: they then measure what candidates it was never trained to read add.

Every variant is one `llmtags generate` run (the same function the CLI calls), written under
`--work` (default <llmtags cache>/eval/SET/) with --resume, so a killed run continues and a re-run costs
nothing. Thresholds are chosen on dev (the F1-best threshold of `llmtags calibrate`), then applied to
test. Writes eval/ablation_SET.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import (REPO, ablation_parser, generate_predictions, meta_lines, predictions_file, run_meta, split_paths,
                    with_candidates, write_result)

from llmtags.baselines import DictionaryTagger
from llmtags.calibrate import calibrate, read_scored_predictions
from llmtags.candidates import candidate_finder, candidate_recall
from llmtags.models import cache_root
from llmtags.records import Record, load_labelled
from llmtags.report import EvalReport

# name -> changes to `llmtags generate`'s settings (the adapter's template and candidates are the defaults)
GENERATED = {
    "adapter, no candidates": {"no_candidates": True},
    "adapter + candidates": {},
    "adapter + candidates + extract": {"constrain": "extract"},
}
THRESHOLDED = ("adapter + candidates", "adapter + candidates + extract")


def _generate(data: Path, out: Path, adapter: str, changes: dict[str, Any], limit: int | None) -> tuple[dict, float]:
    seconds = generate_predictions(data, out, adapter, changes, limit)
    return read_scored_predictions(out), seconds


def _report(name: str, records: list[Record], preds: list[list[str]], n_boot: int) -> EvalReport:
    return EvalReport.from_records(records, preds, name=name, n_boot=n_boot)


def run(args: argparse.Namespace) -> dict[str, Any]:
    paths = split_paths(args.data, args.set, "train", "dev", "test")
    if paths is None:
        sys.exit(0)
    train_path, dev_path, test_path = paths
    train = load_labelled(train_path)
    test = [r for r in load_labelled(test_path) if r.tags is not None][: args.limit]
    dev = [r for r in load_labelled(dev_path) if r.tags is not None][: args.dev_limit]
    work = args.work or cache_root() / "eval" / args.set
    rows: list[dict[str, Any]] = []

    def add(name: str, preds: list[list[str]], **extra: Any) -> None:
        report = _report(name, test, preds, args.n_boot)
        typed = report.scores("raw", "typed").micro
        rows.append({"variant": name, "precision": typed.precision, "recall": typed.recall, "f1": typed.f1,
                     "f1_ci95": report.ci95("raw", "typed"), "value_f1": report.scores("raw", "values").micro.f1,
                     **extra})

    dictionary_tags = DictionaryTagger.from_records(train).tag_many([r.text for r in test])
    add("dictionary (train values in the text)", dictionary_tags)

    generated: dict[str, dict[str, tuple[list[str], list[float | None]]]] = {}
    changes_of = {name: with_candidates(changes, args.adapter, train_path) for name, changes in GENERATED.items()}

    def variant_file(split: str, name: str) -> Path:
        # The adapter's default variant shares its predictions with eval/adapter_test.py; offered candidates
        # the adapter does not bring make another run, kept apart.
        offered = changes_of[name] != GENERATED[name]
        return predictions_file(work, split, name + (" (train values offered)" if offered else ""), args.adapter)

    for name in GENERATED:
        file = variant_file("test", name)
        found, seconds = _generate(test_path, file, args.adapter, changes_of[name], args.limit)
        generated[name] = found
        preds = [found.get(r.id, ([], []))[0] for r in test]
        add(name, preds, seconds=round(seconds, 1))

    calibrations: dict[str, Any] = {}
    for name in THRESHOLDED:
        dev_file = variant_file("dev", name)
        dev_found, _ = _generate(dev_path, dev_file, args.adapter, changes_of[name], args.dev_limit)
        dev_rows = [dev_found.get(r.id, ([], [])) for r in dev]
        calibration = calibrate([r.tags or [] for r in dev], [t for t, _ in dev_rows], [c for _, c in dev_rows],
                                target_precision=args.target_precision)
        threshold = calibration.best_f1.threshold
        calibrations[name] = {"ece": calibration.ece, "dev_best_f1": vars(calibration.best_f1),
                              "dev_unfiltered": vars(calibration.unfiltered), "bins": [vars(b) for b in calibration.bins]}
        test_rows = [generated[name].get(r.id, ([], [])) for r in test]
        preds = [[t for t, c in zip(tags, conf) if c is None or c >= threshold] for tags, conf in test_rows]
        add(f"{name} + confidence ≥ {threshold:.3f} (dev best F1)", preds, threshold=threshold)
        test_calibration = calibrate([r.tags or [] for r in test], [t for t, _ in test_rows],
                                     [c for _, c in test_rows])
        calibrations[name]["test_ece"] = test_calibration.ece

    # An ensemble that needs no extra generation: the dictionary's tags added where the model is silent
    # on that attribute.
    best = generated["adapter + candidates"]
    union = []
    for record, dict_tags in zip(test, dictionary_tags):
        model_tags = best.get(record.id, ([], []))[0]
        attributes = {t.split(":", 1)[0] for t in model_tags}
        union.append(model_tags + [t for t in dict_tags if t.split(":", 1)[0] not in attributes])
    add("adapter + candidates, dictionary fills missing attributes", union)

    finder = candidate_finder(str(train_path))
    recall = candidate_recall([r.tags for r in test], [finder.tags(r.text, attributes=r.schema) for r in test])
    return {"set": args.set, "adapter": args.adapter, "records": len(test), "dev_records": len(dev),
            "candidate_recall": recall, "rows": rows, "calibration": calibrations, "meta": run_meta()}


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# Ablation: grounded tagging on {result['set']} ({result['adapter']} adapter)", "",
             *meta_lines(meta),
             f"- records: the first {result['records']} test records; thresholds chosen on the first "
             f"{result['dev_records']} dev records",
             "- scoring: typed micro P/R/F1, 95% CI by percentile bootstrap over records",
             f"- candidate recall (gold tags among the train-vocabulary candidates): "
             f"{result['candidate_recall']:.3f}", "",
             "| variant | P | R | F1 | F1 95% CI | value F1 | generation s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        low, high = row["f1_ci95"]
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else "–"
        lines.append(f"| {row['variant']} | {row['precision']:.3f} | {row['recall']:.3f} | **{row['f1']:.3f}** | "
                     f"{low:.3f}–{high:.3f} | {row['value_f1']:.3f} | {seconds} |")
    lines += ["", "Calibration of tag confidences (expected calibration error, 10 bins):", "",
              "| variant | dev ECE | test ECE | dev F1 unfiltered → at threshold |", "|---|---:|---:|---|"]
    for name, c in result["calibration"].items():
        lines.append(f"| {name} | {c['ece']:.3f} | {c['test_ece']:.3f} | {c['dev_unfiltered']['f1']:.3f} → "
                     f"{c['dev_best_f1']['f1']:.3f} (≥ {c['dev_best_f1']['threshold']:.3f}) |")
    lines += ["", "Generation seconds are wall time of the `llmtags generate` run on this machine, while other",
              "jobs shared its 2 cores; a few seconds means the predictions were already complete from an earlier",
              "(resumed) run, here the test evaluation of the adapter (`eval/adapter_*_test.md`)."]
    return "\n".join(lines)


def main() -> None:
    parser = ablation_parser(__doc__)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--dev-limit", type=int, default=100)
    parser.add_argument("--target-precision", type=float, default=0.9)
    args = parser.parse_args()
    result = run(args)
    write_result(args.out or REPO / "eval" / f"ablation_{args.set.replace('-', '_')}", result, markdown(result))


if __name__ == "__main__":
    main()

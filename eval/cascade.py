"""The cascade (`--cascade P`): what each threshold skips, costs in F1 and gains in products/s.

    .venv/bin/python eval/cascade.py --set zh-taobao-ner --adapter zh-taobao [--thresholds 0.9,0.7,0.5]
    .venv/bin/python eval/cascade.py --set en-wdc-pave --adapter en-products --demos ../shared/datasets/en-wdc-pave/train.jsonl

Every threshold is one real `llmtags generate --adapter ADAPTER --cascade P` run over the first --limit
test records with the adapter's defaults (its fusion included; kept under --work and resumed, like
eval/ablation_proposer.py), so its products/s is that run's own tagging rate, model loading excluded; the
first row is the run without the cascade. The proposer's confidence in a record is its CRF's probability
of its whole labelling, calibrated on the out-of-fold records of its training data (proposer.py) where
the proposer has a calibration; the calibration table checks it on these test records: of the records in
each confidence band, the share whose CRF tags are exactly their gold tags, and the mean gap (ECE) of the
raw and the calibrated confidence. Writes eval/cascade_SET.json and .md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common import (REPO, generated, meta_lines, predictions_file, run_meta, run_parser, run_settings, settings_label,
                    split_paths, write_result)

from llmtags.isotonic import mean_gap
from llmtags.metrics import match_record, paired_bootstrap
from llmtags.options import Settings
from llmtags.plan import plan_run
from llmtags.records import Record, load_labelled
from llmtags.report import EvalReport
from llmtags.tagger import prompt_parts

BANDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.01)


def skipped_ids(path: Path) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {str(row["id"]) for row in map(json.loads, f) if row.get("by") == "proposer"}


def exactly_right(record: Record, part: Any) -> bool:
    counts = match_record(record.tags, [p.tag for p in part.proposals])
    return counts.fp == 0 and counts.fn == 0


def calibration(records: list[Record], parts: list[Any]) -> list[dict[str, Any]]:
    """Per confidence band: how many records, their mean confidence, and the share the CRF gets exactly right."""
    rows = []
    for low, high in zip(BANDS, BANDS[1:]):
        inside = [(r, p) for r, p in zip(records, parts) if p.confidence is not None and low <= p.confidence < high]
        exact = [exactly_right(record, part) for record, part in inside]
        rows.append({"band": [low, min(high, 1.0)], "records": len(inside),
                     "mean_confidence": sum(p.confidence for _, p in inside) / len(inside) if inside else None,
                     "exactly_right": sum(exact) / len(exact) if exact else None})
    return rows


def calibration_gaps(records: list[Record], parts: list[Any], proposer: Any) -> dict[str, Any]:
    """The ECE of the confidence the cascade reads and of the CRF's raw probability, on the same records."""
    scored = [(r, p) for r, p in zip(records, parts) if p.confidence is not None]
    exact = [exactly_right(r, p) for r, p in scored]
    raw = [proposer.read(p.record, raw=True)[1] for _, p in scored]
    return {"calibrated": proposer.calibration is not None, "records": len(scored),
            "ece": mean_gap([(p.confidence, ok) for (_, p), ok in zip(scored, exact)]),
            "raw_ece": mean_gap(list(zip(raw, exact)))}


def run(args: Any) -> dict[str, Any]:
    paths = split_paths(args.data, args.set, args.split)
    if paths is None:
        sys.exit(0)
    data_path = paths[0]
    records = [r for r in load_labelled(data_path) if r.tags is not None][: args.limit]
    base = run_settings(args)  # the adapter's defaults, as a user runs it (--option no_fill=true: as written)
    thresholds = [None, *(float(t) for t in args.thresholds.split(","))]
    # Planned as a cascade run plans (the first P stands for any): a sample's proposer is then the
    # calibrated one the runs read.
    plan = plan_run(Settings(adapter=args.adapter, **base, cascade=thresholds[1]))
    if plan.options.proposer is None:
        sys.exit(f"adapter {args.adapter} brings no span proposer: the cascade needs one")
    parts = [prompt_parts(r, plan.options) for r in records]
    work = args.work or REPO.parent / "runs" / "eval" / args.set
    label = settings_label(base)
    rows, full_preds = [], None
    for threshold in thresholds:
        changes = {**base, **({"cascade": threshold} if threshold is not None else {})}
        file = predictions_file(work, args.split, f"cascade-{threshold}-{label}", args.adapter)
        found, rate = generated(data_path, file, args.adapter, changes, args.limit)
        preds = [found.get(r.id, ([], []))[0] for r in records]
        report = EvalReport.from_records(records, preds, name=str(threshold), n_boot=args.n_boot)
        typed = report.scores("raw", "typed").micro
        skipped = skipped_ids(file)
        entry = {"threshold": threshold, "skipped": len(skipped) / len(records), "precision": typed.precision,
                 "recall": typed.recall, "f1": typed.f1, "f1_ci95": list(report.ci95("raw", "typed")),
                 "products_per_s": rate}
        if full_preds is None:
            full_preds = preds
        else:
            entry["vs_no_cascade"] = paired_bootstrap([r.tags for r in records], full_preds, preds,
                                                      n=args.n_boot).to_json()
        rows.append(entry)
        print(f"cascade {threshold}: skipped {entry['skipped']:.0%}, F1 {typed.f1:.3f}, {rate} products/s",
              file=sys.stderr)
    crf = [[p.tag for p in part.proposals] for part in parts]
    crf_report = EvalReport.from_records(records, crf, name="CRF", n_boot=args.n_boot).scores("raw", "typed").micro
    return {"set": args.set, "split": args.split, "adapter": args.adapter, "demos": str(args.demos or ""),
            "settings": {k: v for k, v in base.items() if k != "demos"},
            "records": len(records), "rows": rows, "crf_f1": crf_report.f1, "calibration": calibration(records, parts),
            "calibration_gaps": calibration_gaps(records, parts, plan.options.proposer),
            "meta": run_meta()}


def markdown(result: dict[str, Any]) -> str:
    sample = f", sample {result['demos']}" if result["demos"] else ""
    sample += "".join(f", {k}={v}" for k, v in result.get("settings", {}).items())
    lines = [f"# The cascade on {result['set']} {result['split']} ({result['adapter']} adapter{sample})", "",
             *meta_lines(result["meta"]),
             f"- records: the first {result['records']} {result['split']} records; strict typed micro P/R/F1, 95% "
             "interval by bootstrap over records; ΔF1 against the run without the cascade by paired bootstrap",
             "- products/s: each row is its own `generate --cascade P` run's tagging rate (model loading excluded), "
             "llama.cpp engine, 2 threads; no other job on the machine",
             f"- the CRF alone (every record skipped): F1 {result['crf_f1']:.3f}", "",
             "| --cascade P | skipped | P | R | F1 | 95% CI | ΔF1 | products/s |", "|---|---:|---:|---:|---:|---|---|---:|"]
    for r in result["rows"]:
        d = r.get("vs_no_cascade")
        delta = f"{d['delta_f1']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "–"
        rate = f"{r['products_per_s']:.2f}" if r["products_per_s"] else "–"
        lines.append(f"| {r['threshold'] if r['threshold'] is not None else 'off'} | {r['skipped']:.0%} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | **{r['f1']:.3f}** | {r['f1_ci95'][0]:.3f}–"
                     f"{r['f1_ci95'][1]:.3f} | {delta} | {rate} |")
    gaps = result.get("calibration_gaps")
    what = ("its CRF's probability of the whole labelling, calibrated on the out-of-fold records of the proposer's "
            "training data" if gaps and gaps["calibrated"] else "its CRF's probability of the whole labelling, "
            "uncalibrated")
    lines += ["", "## Is the confidence calibrated?", "",
              f"The proposer's confidence in a record ({what}), against the share of the records in that band whose "
              "CRF tags are exactly their gold tags.", ""]
    if gaps:
        lines += [f"Mean gap between confidence and that share (ECE, 10 bins, {gaps['records']} records): "
                  f"**{gaps['ece']:.3f}** for the confidence the cascade reads, {gaps['raw_ece']:.3f} for the raw "
                  "probability.", ""]
    lines += [
              "| confidence | records | mean confidence | exactly right |", "|---|---:|---:|---:|"]
    for c in result["calibration"]:
        mean = f"{c['mean_confidence']:.3f}" if c["mean_confidence"] is not None else "–"
        right = f"{c['exactly_right']:.3f}" if c["exactly_right"] is not None else "–"
        lines.append(f"| {c['band'][0]:.2f}–{c['band'][1]:.2f} | {c['records']} | {mean} | {right} |")
    return "\n".join(lines)


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--split", default="test")
    parser.add_argument("--thresholds", default="0.9,0.8,0.7,0.5,0.3")
    args = parser.parse_args()
    result = run(args)
    write_result(args.out or REPO / "eval" / f"cascade_{args.set.replace('-', '_')}", result, markdown(result))


if __name__ == "__main__":
    main()

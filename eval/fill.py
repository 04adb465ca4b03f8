"""Fusion (`--fill P`, `--proposer-decides ATTRS`) and the cascade (`--cascade C`): the F1 of each, from
one plain run per split.

    .venv/bin/python eval/fill.py --set zh-taobao-ner --adapter zh-taobao
    .venv/bin/python eval/fill.py --set en-oa-mine,en-ae-110k --adapter en-products
    .venv/bin/python eval/fill.py --set en-wdc-pave --adapter en-products --demos SAMPLE --data DIR

One real `llmtags generate --adapter ADAPTER --no-fill` run per set and split (the first --limit records,
kept under --work/SET and resumed; a split the set lacks is skipped) gives the model's answers. The options
only change what happens around generation, so each setting is computed from that run with the
tagger's own functions: `--fill P` adds the proposals of marginal >= P that no tag of the answer covers,
`--proposer-decides` gives the CRF's spans the listed attributes (`proposer.fuse`), `--confirm-below C`
drops the answer's tags of confidence under C that the CRF did not find (`proposer.confirmed`), and `--cascade C`
replaces the answer by the proposer's spans where its confidence is >= C. Speed is measured by real
runs (eval/cascade.py).

The fusion to ship is chosen on the first split (dev, all the sets' records together: one adapter, one
default) and reported on every split of every set: for each P and C of --confirms (each also off), the
attributes to give to the CRF are picked greedily, most supported first, where the switch raises micro F1
on the first split (attributes with at least --min-support gold tags there); the best (P, C, attributes)
is applied unchanged to the later splits. Writes eval/fill_SET.json and .md. With --record-to-adapter, the chosen fusion becomes
the adapter's default (as `llmtags adapters pack ADAPTER --fill P --proposer-decides ATTRS --confirm-below C`
records it, with "off" and "none" recorded too) and its scores on the last split go to the adapter's llmtags.json,
metrics.test, one entry per set.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (REPO, generated, meta_lines, predictions_file, run_meta, run_parser, run_settings, settings_label,
                    split_paths, write_result)

from llmtags.adapters.pack import record_fusion
from llmtags.adapters.registry import AdapterError, read_metadata, resolve_adapter, set_metadata_entry
from llmtags.hygiene import clean_tags
from llmtags.metrics import canonical, gold_forms, match_record_extractgpt, paired_bootstrap, score, score_counts
from llmtags.options import Settings, TaggingOptions
from llmtags.plan import plan_run
from llmtags.proposer import confirmed, fuse
from llmtags.records import Record, load_labelled
from llmtags.tagger import PromptParts, prompt_parts


@dataclass
class SplitRun:
    """The plain run over one split of one set: its records, the model's answers and their confidences,
    the prompt parts (with the proposer's spans) and the run's products/s."""

    set: str
    split: str
    records: list[Record]
    answers: list[list[str]]
    confidences: list[list[float | None]]
    parts: list[PromptParts]
    rate: float | None

    @property
    def gold(self) -> list[Any]:
        return [r.tags for r in self.records]

    @property
    def crf(self) -> list[list[str]]:
        return [[p.tag for p in part.proposals] for part in self.parts]

    def fused(self, fill: float | None, cascade: float | None = None, decides: frozenset[str] = frozenset(),
              confirm_below: float | None = None) -> list[list[str]]:
        return [fused(a, c, p, fill, cascade, decides, confirm_below)
                for a, c, p in zip(self.answers, self.confidences, self.parts)]


def fused(answer: list[str], confidences: list[float | None], parts: PromptParts, fill: float | None,
          cascade: float | None, decides: frozenset[str] = frozenset(), confirm_below: float | None = None) -> list[str]:
    """What `generate --fill fill --cascade cascade --proposer-decides decides --confirm-below confirm_below`
    writes for one record whose plain answer is `answer`, with the model's `confidences` (no --vocab: tags
    are not normalised)."""
    schema = parts.record.schema
    if parts.cascaded(TaggingOptions(cascade=cascade)):
        return clean_tags([p.tag for p in parts.proposals], schema)[0]
    sure = confirmed(answer, confidences, parts.proposals, confirm_below, parts.known)
    kept, taken = fuse(sure, parts.proposals, fill, decides, known=parts.known)
    return kept + clean_tags([p.tag for p in taken], schema)[0]


def split_run(args: Any, set_name: str, split: str) -> SplitRun | None:
    paths = split_paths(args.data, set_name, split)
    if paths is None:
        return None
    records = [r for r in load_labelled(paths[0]) if r.tags is not None][: args.limit]
    if not records:
        return None
    base = {**run_settings(args), "no_fill": True}  # the answers as the model wrote them: fusion is computed here
    # Planned as a cascade run plans where cascades are scored: a sample's proposer is then the calibrated
    # one `generate --cascade` reads (the first P stands for any).
    first = [float(c) for c in args.cascades.split(",") if c.strip()][:1]
    plan = plan_run(Settings(adapter=args.adapter, **base, **({"cascade": first[0]} if first else {})))
    if plan.options.proposer is None:
        sys.exit(f"adapter {args.adapter} brings no span proposer: --fill and --cascade need one")
    parts = [prompt_parts(r, plan.options) for r in records]
    # One folder per set: the predictions file is named by split and settings, which several sets share.
    work = (args.work or REPO.parent / "runs" / "eval") / set_name
    # A scale the adapter records for another catalogue's sample changes the answers without changing its weights.
    label = settings_label({**base, **({"adapter_scale": plan.options.adapter_scale}
                                       if plan.options.adapter_scale != 1.0 else {})})
    found, rate = generated(paths[0], predictions_file(work, split, f"cascade-None-{label}", args.adapter),
                            args.adapter, base, args.limit)
    answers = [found.get(r.id, ([], [])) for r in records]
    return SplitRun(set_name, split, records, [a[0] for a in answers], [a[1] for a in answers], parts, rate)


def joined(runs: list[SplitRun]) -> SplitRun:
    """Several sets' runs of one split as one."""
    return SplitRun("+".join(r.set for r in runs), runs[0].split, [x for r in runs for x in r.records],
                    [x for r in runs for x in r.answers], [x for r in runs for x in r.confidences],
                    [x for r in runs for x in r.parts], None)


def span_uptake(run: SplitRun, bands: tuple[float, ...] = (0.9, 0.5, 0.0)) -> list[dict[str, Any]]:
    """How the answers as written treat the proposer's spans, by marginal band: how many spans, the share
    right (a gold tag, compared as the evaluator compares), and the share of the right and of the wrong ones
    the answer repeats. An adapter that reads proposals keeps most right sure spans; one that does not
    transfer to a catalogue ignores them (en-products on en-wdc-pave: 0.31 of them, against 0.91 on en-oa-mine)."""
    rows, upper = [], 1.01
    for lower in bands:
        spans = right = kept_right = kept_wrong = 0
        for record, answer, part in zip(run.records, run.answers, run.parts):
            gold = {canonical(form) for tag in record.tags or [] for form in gold_forms(tag)}
            written = {canonical(tag) for tag in answer}
            for proposal in part.proposals:
                if lower <= proposal.p < upper:
                    spans += 1
                    is_right = canonical(proposal.tag) in gold
                    right += is_right
                    kept_right += is_right and canonical(proposal.tag) in written
                    kept_wrong += not is_right and canonical(proposal.tag) in written
        rows.append({"marginal": [lower, min(upper, 1.0)], "spans": spans, "right": right / spans if spans else None,
                     "kept_if_right": kept_right / right if right else None,
                     "kept_if_wrong": kept_wrong / (spans - right) if spans > right else None})
        upper = lower
    return rows


LONG_TEXT = 400  # characters: a title alone is shorter; a title with a description (en-wdc-pave) mostly longer


def by_length(run: SplitRun) -> list[dict[str, Any]]:
    """F1 of the answers as written and of the CRF alone, on the texts up to `LONG_TEXT` characters and on
    the longer ones: whether the adapter loses its way in long texts (trained on titles, it does)."""
    rows, crf = [], run.crf
    for name, long in (("short", False), ("long", True)):
        chosen = [i for i, record in enumerate(run.records) if (len(record.text) > LONG_TEXT) == long]
        if chosen:
            gold = [run.records[i].tags for i in chosen]
            rows.append({"texts": name, "records": len(chosen),
                         "as_written_f1": score(gold, [run.answers[i] for i in chosen]).micro.f1,
                         "crf_f1": score(gold, [crf[i] for i in chosen]).micro.f1})
    return rows


def grid(run: SplitRun, fills: list[float | None], cascades: list[float | None], n_boot: int) -> dict[str, Any]:
    gold, cells = run.gold, []
    for fill in fills:
        for cascade in cascades:
            preds = run.fused(fill, cascade)
            micro = score(gold, preds).micro
            cell = {"fill": fill, "cascade": cascade, "precision": micro.precision, "recall": micro.recall,
                    "f1": micro.f1,
                    "skipped": sum(p.cascaded(TaggingOptions(cascade=cascade)) for p in run.parts) / len(run.parts)}
            if fill is not None or cascade is not None:
                cell["vs_plain"] = paired_bootstrap(gold, run.answers, preds, n=n_boot).to_json()
            cells.append(cell)
    print(f"{run.set} {run.split}: plain F1 {cells[0]['f1']:.3f}, best {max(c['f1'] for c in cells):.3f}",
          file=sys.stderr)
    return {"set": run.set, "split": run.split, "records": len(gold), "plain_products_per_s": run.rate,
            "crf_f1": score(gold, run.crf).micro.f1, "cells": cells, "span_uptake": span_uptake(run),
            "by_length": by_length(run)}


def choose_decides(run: SplitRun, fill: float | None, min_support: int,
                   confirm_below: float | None = None) -> tuple[frozenset[str], float]:
    """The attributes whose tags the CRF's spans should decide at `fill` (and `confirm_below`), greedily
    (most supported first, kept where the switch raises micro F1 on `run`), and the F1 they reach."""
    support = score(run.gold, run.answers).per_attribute
    order = sorted((a for a, row in support.items() if row.support >= min_support), key=lambda a: -support[a].support)
    chosen: frozenset[str] = frozenset()
    best = score(run.gold, run.fused(fill, None, chosen, confirm_below)).micro.f1
    for attribute in order:
        trial = score(run.gold, run.fused(fill, None, chosen | {attribute}, confirm_below)).micro.f1
        if trial > best:
            chosen, best = chosen | {attribute}, trial
    return chosen, best


def scored(run: SplitRun, fill: float | None, decides: frozenset[str], confirm_below: float | None,
           n_boot: int) -> dict[str, Any]:
    """The chosen fusion on one run: P/R/F1, against the plain answers and the CRF alone, per attribute."""
    gold, preds, crf = run.gold, run.fused(fill, None, decides, confirm_below), run.crf
    micro = score(gold, preds).micro
    row: dict[str, Any] = {"set": run.set, "split": run.split, "precision": micro.precision, "recall": micro.recall,
                           "f1": micro.f1, "plain_f1": score(gold, run.answers).micro.f1,
                           "crf_f1": score(gold, crf).micro.f1,
                           "vs_plain": paired_bootstrap(gold, run.answers, preds, n=n_boot).to_json(),
                           "vs_crf": paired_bootstrap(gold, crf, preds, n=n_boot).to_json()}
    if all(r.targets for r in run.records):  # the ExtractGPT protocol, for the sets that define targets
        row["extractgpt_f1"] = {name: score_counts([match_record_extractgpt(g, p, r.targets) for g, p, r
                                                    in zip(gold, tags, run.records)], True).micro.f1
                                for name, tags in (("plain", run.answers), ("chosen", preds), ("crf", crf))}
    mine, theirs = score(gold, preds).per_attribute, score(gold, crf).per_attribute
    row["per_attribute"] = {name: {"support": r.support, "f1": r.f1, "crf_f1": theirs[name].f1 if name in theirs else 0.0}
                            for name, r in sorted(mine.items(), key=lambda item: -item[1].support) if r.support}
    return row


def chosen_fusion(runs: list[SplitRun], choose_on: str, fills: list[float | None], confirms: list[float | None],
                  min_support: int, n_boot: int) -> dict[str, Any]:
    """The (fill, confirm_below, decides) with the best F1 on split `choose_on` (all sets together), scored
    on every run; `tried` keeps each (fill, confirm_below)'s best F1 there."""
    first = joined([r for r in runs if r.split == choose_on])
    tried = [(f, c, *choose_decides(first, f, min_support, c)) for f in fills for c in confirms]
    fill, confirm_below, decides, _ = max(tried, key=lambda found: found[3])
    return {"chosen_on": first.split, "fill": fill, "confirm_below": confirm_below, "decides": sorted(decides),
            "min_support": min_support, "tried": [{"fill": f, "confirm_below": c, "decides": sorted(d), "f1": f1}
                                                  for f, c, d, f1 in tried],
            "runs": [scored(run, fill, decides, confirm_below, n_boot) for run in runs]}


def adapter_default(args: Any, runs: list[SplitRun], cascades: list[float | None]) -> dict[str, Any]:
    """What `generate --adapter ADAPTER [--cascade C]` (with --demos and --option) does by default, as the
    adapter now records it, scored on every run: the figure a user gets without choosing anything."""
    options = plan_run(Settings(adapter=args.adapter, **run_settings(args))).options
    return {"fill": options.fill, "confirm_below": options.confirm_below, "decides": sorted(options.proposer_decides),
            "runs": [{"set": run.set, "split": run.split, "cascade": cascade,
                      "f1": score(run.gold, run.fused(options.fill, cascade, options.proposer_decides,
                                                      options.confirm_below)).micro.f1}
                     for run in runs for cascade in cascades]}


def run(args: Any) -> dict[str, Any]:
    fills = [None, *(float(t) for t in args.fills.split(","))]
    confirms = [None, *(float(t) for t in args.confirms.split(",") if t)]
    cascades = [None, *(float(t) for t in args.cascades.split(","))]
    splits = args.splits.split(",")
    refused = {"min_confidence", "vocab", "constrain"} & set(run_settings(args))
    if refused:  # they change the answers before fusion: the cells would not be what generate writes
        sys.exit(f"--option {', '.join(sorted(refused))}: not with eval/fill.py, whose cells are the plain answers fused")
    runs = [found for set_name in args.set.split(",") for split in splits
            if (found := split_run(args, set_name, split))]
    lacking = sorted(set(args.set.split(",")) - {r.set for r in runs if r.split == splits[0]})
    if lacking:
        sys.exit(f"{', '.join(lacking)}: no {splits[0]} split (or no labelled records in it) to choose the fusion on")
    return {"set": args.set, "adapter": args.adapter, "demos": str(args.demos or ""),
            "settings": {k: v for k, v in run_settings(args).items() if k != "demos"}, "fills": fills, "cascades": cascades,
            "splits": [grid(r, fills, cascades, args.n_boot) for r in runs],
            "chosen": chosen_fusion(runs, splits[0], fills, confirms, args.min_support, args.n_boot),
            "adapter_default": adapter_default(args, runs, cascades), "meta": run_meta()}


def _share(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def interval(d: dict[str, Any]) -> str:
    return f"{d['delta_f1']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def markdown(result: dict[str, Any]) -> str:
    sample = f", sample {result['demos']}" if result["demos"] else ""
    sample += "".join(f", {k}={v}" for k, v in result["settings"].items())
    lines = [f"# Fusion and the cascade on {result['set']} ({result['adapter']} adapter{sample})", "",
             *meta_lines(result["meta"]),
             "- each cell: strict typed micro F1 of `generate --fill P --cascade C`, computed from one plain run's "
             "answers with the tagger's own functions (the options act around generation only); in brackets the "
             "ΔF1 against the plain run by paired bootstrap, 95% interval; skipped: records the cascade takes", ""]
    for split in result["splits"]:
        rate = f"{split['plain_products_per_s']:.2f}" if split["plain_products_per_s"] else "–"
        lines += [f"## {split['set']} {split['split']}: the first {split['records']} records (plain run {rate} "
                  f"products/s; CRF alone F1 {split['crf_f1']:.3f})", "",
                  "| --fill P \\ --cascade C | " + " | ".join("off" if c is None else str(c) for c in result["cascades"])
                  + " |", "|---|" + "---:|" * len(result["cascades"])]
        for fill in result["fills"]:
            text = [f"{c['f1']:.3f}" + (f" ({interval(c['vs_plain'])})" if "vs_plain" in c else "")
                    + (f", {c['skipped']:.0%} skipped" if c["cascade"] else "")
                    for c in split["cells"] if c["fill"] == fill]
            lines.append(f"| {'off' if fill is None else fill} | " + " | ".join(text) + " |")
        lines += ["", "The answers as written and the proposer's spans: " + "; ".join(
            f"marginal {u['marginal'][0]}–{u['marginal'][1]}: {u['spans']} spans, {_share(u['right'])} right, "
            f"{_share(u['kept_if_right'])} of the right and {_share(u['kept_if_wrong'])} of the wrong repeated"
            for u in split.get("span_uptake", [])) + "."]
        lengths = split.get("by_length", [])
        if len(lengths) > 1:
            lines.append(f"By text length (over {LONG_TEXT} characters is long): " + "; ".join(
                f"{row['records']} {row['texts']}: {row['as_written_f1']:.3f} as written, CRF alone {row['crf_f1']:.3f}"
                for row in lengths) + ".")
        lines.append("")
    default = result.get("adapter_default")
    if default:
        lines += [f"## The adapter's default when this ran: --fill {default['fill'] or 'off'}, --confirm-below "
                  f"{default['confirm_below'] or 'off'}, --proposer-decides {len(default['decides'])} attributes", "",
                  "; ".join(f"{r['set']} {r['split']}" + (f" --cascade {r['cascade']}" if r.get("cascade") else "")
                            + f": {r['f1']:.3f}" for r in default["runs"]), ""]
    chosen = result["chosen"]
    decides = ", ".join(f"`{a}`" for a in chosen["decides"]) or "none"
    fair = all(r["split"] == chosen["chosen_on"] for r in chosen["runs"])
    lines += [f"## The fusion chosen on {chosen['chosen_on']}: --fill {chosen['fill'] or 'off'}, "
              f"--confirm-below {chosen.get('confirm_below') or 'off'}, --proposer-decides {decides}", "",
              "Tried there, each with its attributes chosen: " + ", ".join(
                  f"fill {t['fill'] or 'off'} / confirm {t['confirm_below'] or 'off'}: {t['f1']:.3f}"
                  for t in chosen.get("tried", [])) + ".", "",
              f"Attributes with at least {chosen['min_support']} gold tags there were tried. ΔF1 by paired bootstrap, "
              "95% interval" + (" (only the split it was chosen on: not a fair test)" if fair else "") + ".", "",
              "| set | split | P | R | F1 | plain | CRF alone | vs plain | vs CRF alone | ExtractGPT: chosen / plain / CRF |",
              "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for row in chosen["runs"]:
        e = row.get("extractgpt_f1")
        protocol = f"{e['chosen']:.3f} / {e['plain']:.3f} / {e['crf']:.3f}" if e else "–"
        lines.append(f"| {row['set']} | {row['split']} | {row['precision']:.3f} | {row['recall']:.3f} | "
                     f"**{row['f1']:.3f}** | {row['plain_f1']:.3f} | {row['crf_f1']:.3f} | {interval(row['vs_plain'])} | "
                     f"{interval(row['vs_crf'])} | {protocol} |")
    for row in chosen["runs"]:
        if row["split"] == chosen["chosen_on"] and not fair:
            continue
        lines += ["", f"Per attribute, {row['set']} {row['split']}: the chosen fusion against the CRF alone (strict F1):",
                  "", "| attribute | support | chosen | CRF alone | Δ |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['support']} | {r['f1']:.3f} | {r['crf_f1']:.3f} | {r['f1'] - r['crf_f1']:+.3f} |"
                  for name, r in row["per_attribute"].items()]
    return "\n".join(lines + [""])


def record_to_adapter(result: dict[str, Any], splits: list[str], source: str) -> None:
    """Make the chosen fusion the adapter's default (both parts: a fill or none, the attributes or none) and
    store its scores on the last of `splits` (the held-out test records) in its llmtags.json, metrics.test,
    one entry per set beside those other sets recorded there."""
    adapter, chosen = result["adapter"], result["chosen"]
    path = resolve_adapter(adapter)
    try:
        record_fusion(path, chosen["fill"], chosen["decides"], chosen["confirm_below"])
    except AdapterError as exc:
        sys.exit(f"--record-to-adapter: {exc}")
    print(f"{adapter}: --fill {chosen['fill'] or 'off'}, --proposer-decides {', '.join(chosen['decides']) or 'none'}, "
          f"--confirm-below {chosen['confirm_below'] or 'off'} by default", file=sys.stderr)
    last = splits[-1]
    rows = [row for row in chosen["runs"] if row["split"] == last and last != chosen["chosen_on"]]
    if not rows:
        print(f"no {last} records apart from the {chosen['chosen_on']} records the fusion was chosen on: "
              "metrics.test left as it is", file=sys.stderr)
        return
    runs = {(s["set"], s["split"]): s for s in result["splits"]}
    tests = (read_metadata(path).get("metrics") or {}).get("test") or {}
    if "f1" in tests:  # `llmtags eval --record-to-adapter` wrote one set's scores flat: keep them under its set
        data = Path(str(tests.get("set") or "eval"))
        tests = {data.parent.name if data.stem in ("dev", "test", "train") and data.parent.name else data.stem: tests}
    for row in rows:
        run_of = runs[(row["set"], last)]
        tests[row["set"]] = {
            "records": run_of["records"], "plain_products_per_s": run_of["plain_products_per_s"],
            "precision": row["precision"], "recall": row["recall"], "f1": row["f1"],
            "f1_vs_crf_ci95": row["vs_crf"]["ci95"],
            **({"extractgpt_f1": row["extractgpt_f1"]["chosen"]} if row.get("extractgpt_f1") else {}),
            "plain_f1": row["plain_f1"], "crf_peer_f1": row["crf_f1"], "fill": chosen["fill"],
            "proposer_decides": chosen["decides"], "confirm_below": chosen["confirm_below"], "source": source}
    set_metadata_entry(path, ("metrics", "test"), tests)


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--splits", default="dev,test")
    parser.add_argument("--fills", default="0.9,0.8,0.7,0.5,0.3")
    parser.add_argument("--cascades", default="0.5,0.3,0.1")
    parser.add_argument("--confirms", default="0.5,0.4,0.3,0.2", help="the --confirm-below C to try (with off)")
    parser.add_argument("--min-support", type=int, default=10, help="gold tags an attribute needs on the first split "
                        "to be tried for --proposer-decides")
    parser.add_argument("--record-to-adapter", action="store_true", help="make the chosen fusion the adapter's "
                        "default and record its scores on the last split in the adapter's llmtags.json")
    args = parser.parse_args()
    if args.record_to_adapter and (args.demos or args.option):
        # A fusion chosen on another catalogue's sample, or with other settings, is not this adapter's default.
        sys.exit("--record-to-adapter: not with --demos or --option (the adapter's own catalogue and settings only)")
    result = run(args)
    out = args.out or REPO / "eval" / f"fill_{args.set.replace('-', '_').replace(',', '_')}"
    write_result(out, result, markdown(result))
    if args.record_to_adapter:
        written = Path(out).with_suffix(".json").resolve()
        record_to_adapter(result, args.splits.split(","),
                          str(written.relative_to(REPO) if written.is_relative_to(REPO) else written))


if __name__ == "__main__":
    main()

"""Fusion (`--fill P`) and the cascade (`--cascade C`) together: the F1 of each pair, from one plain run.

    .venv/bin/python eval/fill.py --set zh-taobao-ner --adapter zh-taobao
    .venv/bin/python eval/fill.py --set en-wdc-pave --adapter en-products --demos ../shared/datasets/en-wdc-pave/train.jsonl

One real `llmtags generate --adapter ADAPTER --no-fill` run per split (a split the set lacks is skipped) (first --limit records, kept under --work and
resumed) gives the model's answers. Both options only change what happens around generation, so each
(P, C) cell is computed from that run with the tagger's own functions: `--fill P` adds the proposals of
marginal >= P that no tag of the answer covers (`proposer.unanswered`), and `--cascade C` replaces the
answer by the proposer's spans where its confidence is >= C. Choose on dev, report on test; speed is
measured by real runs (eval/cascade.py).

The fusion to ship is chosen on the first split (dev) and reported on the others (test): for each P
(and off), the attributes `--proposer-decides` gives to the CRF are picked greedily, most supported
first, where the switch raises that split's micro F1 (attributes with at least --min-support gold tags);
the best (P, attributes) is applied unchanged to the later splits. Writes eval/fill_SET.json and .md.
"""

from __future__ import annotations

import sys
from typing import Any

from common import (REPO, generated, meta_lines, predictions_file, run_meta, run_parser, run_settings, settings_label,
                    split_paths, write_result)

from llmtags.hygiene import clean_tags
from llmtags.metrics import paired_bootstrap, score
from llmtags.options import Settings, TaggingOptions
from llmtags.plan import plan_run
from llmtags.proposer import fuse
from llmtags.records import load_labelled
from llmtags.tagger import prompt_parts


def fused(answer: list[str], parts: Any, fill: float | None, cascade: float | None,
          decides: frozenset[str] = frozenset()) -> list[str]:
    """What `generate --fill fill --cascade cascade --proposer-decides decides` writes for one record whose
    plain answer is `answer` (no --vocab: tags are not normalised)."""
    schema = parts.record.schema
    if parts.cascaded(TaggingOptions(cascade=cascade)):
        return clean_tags([p.tag for p in parts.proposals], schema)[0]
    kept, taken = fuse(answer, parts.proposals, fill, decides)
    return kept + clean_tags([p.tag for p in taken], schema)[0]


def f1_of(gold: list[Any], answers: list[list[str]], parts: list[Any], fill: float | None,
          decides: frozenset[str]) -> float:
    return score(gold, [fused(a, p, fill, None, decides) for a, p in zip(answers, parts)]).micro.f1


def choose_decides(gold: list[Any], answers: list[list[str]], parts: list[Any], fill: float | None,
                   min_support: int) -> tuple[frozenset[str], float]:
    """The attributes whose tags the CRF's spans should decide at `fill`, greedily (most supported first,
    kept where the switch raises micro F1 on these records), and the F1 they reach."""
    support = score(gold, answers).per_attribute
    order = sorted((a for a, row in support.items() if row.support >= min_support), key=lambda a: -support[a].support)
    chosen: frozenset[str] = frozenset()
    best = f1_of(gold, answers, parts, fill, chosen)
    for attribute in order:
        trial = f1_of(gold, answers, parts, fill, chosen | {attribute})
        if trial > best:
            chosen, best = chosen | {attribute}, trial
    return chosen, best


def split_run(args: Any, split: str) -> tuple[list[Any], list[list[str]], list[Any], float | None] | None:
    """(gold, the plain run's answers, the prompt parts, its products/s) on the first --limit records of `split`."""
    paths = split_paths(args.data, args.set, split)
    if paths is None:
        return None
    records = [r for r in load_labelled(paths[0]) if r.tags is not None][: args.limit]
    base = {**run_settings(args), "no_fill": True}  # the answers as the model wrote them: fusion is computed here
    plan = plan_run(Settings(adapter=args.adapter, **base))
    if plan.options.proposer is None:
        sys.exit(f"adapter {args.adapter} brings no span proposer: --fill and --cascade need one")
    parts = [prompt_parts(r, plan.options) for r in records]
    work = args.work or REPO.parent / "runs" / "eval" / args.set
    found, rate = generated(paths[0], predictions_file(work, split, f"cascade-None-{settings_label(base)}", args.adapter),
                            args.adapter, base, args.limit)
    return [r.tags for r in records], [found.get(r.id, ([], []))[0] for r in records], parts, rate


def grid(split: str, run: tuple, fills: list[float | None], cascades: list[float | None], n_boot: int) -> dict[str, Any]:
    gold, answers, parts, rate = run
    cells = []
    for fill in fills:
        for cascade in cascades:
            preds = [fused(a, p, fill, cascade) for a, p in zip(answers, parts)]
            micro = score(gold, preds).micro
            cell = {"fill": fill, "cascade": cascade, "precision": micro.precision, "recall": micro.recall,
                    "f1": micro.f1,
                    "skipped": sum(p.cascaded(TaggingOptions(cascade=cascade)) for p in parts) / len(parts)}
            if fill is not None or cascade is not None:
                cell["vs_plain"] = paired_bootstrap(gold, answers, preds, n=n_boot).to_json()
            cells.append(cell)
    crf = score(gold, [[p.tag for p in part.proposals] for part in parts]).micro
    print(f"{split}: plain F1 {cells[0]['f1']:.3f}, best {max(c['f1'] for c in cells):.3f}", file=sys.stderr)
    return {"split": split, "records": len(gold), "plain_products_per_s": rate, "crf_f1": crf.f1, "cells": cells}


def chosen_fusion(runs: dict[str, tuple], fills: list[float | None], min_support: int, n_boot: int) -> dict[str, Any]:
    """The (fill, decides) with the best F1 on the first split, and what it scores on each split."""
    first = next(iter(runs))
    gold, answers, parts, _ = runs[first]
    fill, decides, _ = max(((f, *choose_decides(gold, answers, parts, f, min_support)) for f in fills),
                           key=lambda found: found[2])
    scored = []
    for split, (gold, answers, parts, _) in runs.items():
        preds = [fused(a, p, fill, None, decides) for a, p in zip(answers, parts)]
        crf = [[p.tag for p in part.proposals] for part in parts]
        micro = score(gold, preds).micro
        scored.append({"split": split, "precision": micro.precision, "recall": micro.recall, "f1": micro.f1,
                       "vs_plain": paired_bootstrap(gold, answers, preds, n=n_boot).to_json(),
                       "vs_crf": paired_bootstrap(gold, crf, preds, n=n_boot).to_json()})
    return {"chosen_on": first, "fill": fill, "decides": sorted(decides), "min_support": min_support,
            "splits": scored}


def run(args: Any) -> dict[str, Any]:
    fills = [None, *(float(t) for t in args.fills.split(","))]
    cascades = [None, *(float(t) for t in args.cascades.split(","))]
    runs = {split: found for split in args.splits.split(",") if (found := split_run(args, split))}
    return {"set": args.set, "adapter": args.adapter, "demos": str(args.demos or ""),
            "settings": {k: v for k, v in run_settings(args).items() if k != "demos"}, "fills": fills, "cascades": cascades,
            "splits": [grid(split, found, fills, cascades, args.n_boot) for split, found in runs.items()],
            "chosen": chosen_fusion(runs, fills, args.min_support, args.n_boot), "meta": run_meta()}


def markdown(result: dict[str, Any]) -> str:
    sample = f", sample {result['demos']}" if result["demos"] else ""
    sample += "".join(f", {k}={v}" for k, v in result["settings"].items())
    lines = [f"# Fusion (--fill) and the cascade on {result['set']} ({result['adapter']} adapter{sample})", "",
             *meta_lines(result["meta"]),
             "- each cell: strict typed micro F1 of `generate --fill P --cascade C`, computed from one plain run's "
             "answers with the tagger's own functions (the options act around generation only); in brackets the "
             "ΔF1 against the plain run by paired bootstrap, 95% interval; skipped: records the cascade takes", ""]
    for split in result["splits"]:
        rate = f"{split['plain_products_per_s']:.2f}" if split["plain_products_per_s"] else "–"
        lines += [f"## {split['split']}: the first {split['records']} records (plain run {rate} products/s; "
                  f"CRF alone F1 {split['crf_f1']:.3f})", "",
                  "| --fill P \\ --cascade C | " + " | ".join("off" if c is None else str(c) for c in result["cascades"])
                  + " |", "|---|" + "---:|" * len(result["cascades"])]
        for fill in result["fills"]:
            row = [c for c in split["cells"] if c["fill"] == fill]
            text = []
            for c in row:
                d = c.get("vs_plain")
                delta = f" ({d['delta_f1']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}])" if d else ""
                text.append(f"{c['f1']:.3f}{delta}" + (f", {c['skipped']:.0%} skipped" if c["cascade"] else ""))
            lines.append(f"| {'off' if fill is None else fill} | " + " | ".join(text) + " |")
        lines.append("")
    chosen = result["chosen"]
    decides = ", ".join(f"`{a}`" for a in chosen["decides"]) or "none"
    lines += [f"## The fusion chosen on {chosen['chosen_on']}: --fill {chosen['fill'] or 'off'}, "
              f"--proposer-decides {decides}", "",
              f"Attributes with at least {chosen['min_support']} gold tags there were tried. ΔF1 by paired bootstrap, "
              "95% interval" + (" (the split it was chosen on is not a fair test)" if len(chosen["splits"]) == 1 else ""),
              "", "| split | P | R | F1 | vs plain | vs CRF alone |", "|---|---:|---:|---:|---|---|"]
    for row in chosen["splits"]:
        vs = [f"{d['delta_f1']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" for d in (row["vs_plain"], row["vs_crf"])]
        lines.append(f"| {row['split']} | {row['precision']:.3f} | {row['recall']:.3f} | **{row['f1']:.3f}** | "
                     f"{vs[0]} | {vs[1]} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--splits", default="dev,test")
    parser.add_argument("--fills", default="0.9,0.8,0.7,0.5,0.3")
    parser.add_argument("--cascades", default="0.5,0.3,0.1")
    parser.add_argument("--min-support", type=int, default=10, help="gold tags an attribute needs on the first split "
                        "to be tried for --proposer-decides")
    args = parser.parse_args()
    result = run(args)
    write_result(args.out or REPO / "eval" / f"fill_{args.set.replace('-', '_')}", result, markdown(result))


if __name__ == "__main__":
    main()

"""The prompt budget for products with descriptions (budget.py): F1 and products/s of each choice.

    .venv/bin/python eval/long_text.py [--set en-wdc-pave] [--adapter en-products] [--limit 100]

Workflow (a) on a new catalogue: `generate --adapter ADAPTER --demos SAMPLE --no-fill` (the set's train split as
the sample: neighbours, candidates and span proposer), each variant one real run over the first --limit
test records (kept under --work and resumed), its products/s that run's own tagging rate, model loading
excluded. eval/fill.py --option KEY=VALUE adds --fill and --cascade to the same runs. Writes
eval/long_text_SET.json and .md.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from common import (REPO, ablation_parser, generated, meta_lines, predictions_file, run_meta, settings_label,
                    split_paths, write_result)

from llmtags.records import load_labelled
from llmtags.report import EvalReport

VARIANTS = {
    "whole texts (neighbours up to 300 characters)": {},
    "neighbours by title": {"demo_text": "title"},
    "neighbours by title, text cut to 400 characters of title + windows": {"demo_text": "title", "text_budget": 400},
    "neighbours by title, text cut to 400, up to 128 new tokens": {"demo_text": "title", "text_budget": 400,
                                                                   "max_new_tokens": 128},
}


def run(args: Any) -> dict[str, Any]:
    paths = split_paths(args.data, args.set, "train", "test")
    if paths is None:
        sys.exit(0)
    sample, test = paths
    records = [r for r in load_labelled(test) if r.tags is not None][: args.limit]
    work = args.work or REPO.parent / "runs" / "eval" / args.set
    rows = []
    chosen = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    for name, changes in ((n, VARIANTS[n]) for n in chosen):
        settings = {"demos": str(sample.resolve()), "no_fill": True, **changes}
        # The file eval/cascade.py and eval/fill.py read for the same settings (--option KEY=VALUE).
        file = predictions_file(work, "test", f"cascade-None-{settings_label(settings)}", args.adapter)
        found, rate = generated(test, file, args.adapter, settings, args.limit)
        preds = [found.get(r.id, ([], []))[0] for r in records]
        report = EvalReport.from_records(records, preds, name=name, n_boot=args.n_boot)
        micro = report.scores("raw", "typed").micro
        rate_info = json.loads(file.with_suffix(".rate.json").read_text()) if file.with_suffix(".rate.json").is_file() else {}
        rows.append({"variant": name, "settings": changes, "precision": micro.precision, "recall": micro.recall,
                     "f1": micro.f1, "f1_ci95": list(report.ci95("raw", "typed")), "products_per_s": rate,
                     "prompt_tokens": rate_info.get("prompt_tokens", 0) / max(rate_info.get("records", 1), 1),
                     "new_tokens": rate_info.get("new_tokens", 0) / max(rate_info.get("records", 1), 1),
                     "cut": rate_info.get("cut")})
        print(f"{name}: F1 {micro.f1:.3f}, {rate} products/s", file=sys.stderr)
    return {"set": args.set, "adapter": args.adapter, "sample": str(sample), "records": len(records), "rows": rows,
            "meta": run_meta()}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Long texts: the prompt budget on {result['set']} ({result['adapter']}, workflow (a))", "",
             *meta_lines(result["meta"]),
             f"- records: the first {result['records']} test records; the sample: `{result['sample']}` (neighbours, "
             "candidates, span proposer); strict typed micro P/R/F1, 95% interval by bootstrap over records",
             "- products/s: each variant's own `generate` run (model loading excluded), llama.cpp, 2 threads; "
             "tokens: means per product", "",
             "| variant | P | R | F1 | 95% CI | prompt tokens | new tokens | answers cut | products/s |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rate = f"{r['products_per_s']:.2f}" if r["products_per_s"] else "–"
        lines.append(f"| {r['variant']} | {r['precision']:.3f} | {r['recall']:.3f} | **{r['f1']:.3f}** | "
                     f"{r['f1_ci95'][0]:.3f}–{r['f1_ci95'][1]:.3f} | {r['prompt_tokens']:.0f} | {r['new_tokens']:.1f} | "
                     f"{r['cut'] if r['cut'] is not None else '–'} | {rate} |")
    return "\n".join(lines)


def main() -> None:
    parser = ablation_parser(__doc__, "en-wdc-pave", "en-products")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--variants", help=f"comma-joined names of the variants to run (default all: {list(VARIANTS)})")
    args = parser.parse_args()
    result = run(args)
    write_result(args.out or REPO / "eval" / f"long_text_{args.set.replace('-', '_')}", result, markdown(result))


if __name__ == "__main__":
    main()

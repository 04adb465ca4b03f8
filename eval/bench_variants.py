"""Speed and F1 of `generate` variants (adapters, settings) on the same records, in alternating runs.

    .venv/bin/python eval/bench_variants.py --set zh-taobao-ner --limit 120 --out eval/bench_variants_zh_taobao_ner \
        --variant "candidates + spans (the zh-taobao of 2026-12-03)" OLD_ADAPTER_DIR \
        --variant "spans only" zh-taobao
    .venv/bin/python eval/bench_variants.py --set en-oa-mine --variant default en-products \
        --variant "no candidates" en-products no_candidates=true

Each --variant is NAME ADAPTER [KEY=VALUE ...]: a name for the table, an adapter (a registry name or a folder;
`none`: the base model alone) and `generate` settings over the adapter's defaults (`Settings` fields, as
--option takes them, e.g. no_candidates=true, fill=0.5). Every round runs each variant fresh over the first
--limit records of the set's split, the order turned round by round (eval/alternating.py: this machine's
speed drifts). Reported: products/s of each run (model loading excluded), the speed-up against the first
variant (median of the rounds' ratios), strict F1 with its 95% interval and the change in F1 by paired
bootstrap. Writes --out (.json and .md).
"""

from __future__ import annotations

from typing import Any

from alternating import Variant, alternate, table
from common import REPO, meta_lines, run_meta, run_parser, run_settings, setting, split_paths, write_result

from llmtags.records import load_labelled


def variant_of(words: list[str], shared: dict[str, Any]) -> Variant:
    """NAME ADAPTER [KEY=VALUE ...] → a Variant (its settings over the `shared` ones of --option/--demos)."""
    if len(words) < 2:
        raise SystemExit(f"--variant {' '.join(words)}: give NAME ADAPTER [KEY=VALUE ...]")
    name, adapter, *options = words
    return Variant(name, None if adapter == "none" else adapter, {**shared, **dict(map(setting, options))})


def run(args: Any) -> dict[str, Any]:
    paths = split_paths(args.data, args.set, args.split)
    if paths is None:
        raise SystemExit(f"no {args.split} split of {args.set} under {args.data}")
    records = [r for r in load_labelled(paths[0]) if r.tags is not None][: args.limit]
    variants = [variant_of(words, run_settings(args)) for words in args.variant]
    if len(variants) < 2:
        raise SystemExit("give at least two --variant")
    work = args.work or REPO.parent / "runs" / "bench_variants" / args.set
    return {**run_meta(), "set": args.set, "split": args.split,
            **alternate(paths[0], records, variants, args.rounds, work / args.split, args.n_boot)}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# generate variants: {result['set']} {result['split']}", "", *meta_lines(result),
             f"- records: the first {result['records']} {result['split']} records; strict typed micro P/R/F1",
             "- variants: " + "; ".join(f"{row['variant']}: adapter {row['adapter'] or 'none'}"
                                        + (f", {row['settings']}" if row["settings"] else "")
                                        for row in result["rows"]),
             *table(result, "variant")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = run_parser(__doc__, adapter_option=False)  # each --variant names its adapter
    parser.add_argument("--split", default="test")
    parser.add_argument("--variant", action="append", nargs="+", required=True, metavar="NAME ADAPTER [KEY=VALUE]")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, in turned order")
    args = parser.parse_args()
    result = run(args)
    write_result(args.out or REPO / "eval" / f"bench_variants_{args.set.replace('-', '_')}", result, markdown(result))


if __name__ == "__main__":
    main()

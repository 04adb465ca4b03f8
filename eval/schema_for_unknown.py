"""The schema of a product whose category the adapter's data does not know: which neighbours may lend
their attributes (`retrieve.LEND_SIMILARITY`).

    .venv/bin/python eval/schema_for_unknown.py [--pool adapters/en-products/pool.jsonl]

A record without schema or known category is prompted with the pool's catalogue-wide core plus the
attributes of its nearest neighbours that are at least τ similar to it; the model's tags outside that
schema are dropped. Each labelled dev record of en-oa-mine and en-ae-110k is looked at twice, its
category hidden:
- **known**: the pool holds its category: lent attributes should come, and be its category's;
- **unknown**: its category is taken out of the pool, as for a product of a category the adapter
  never saw: what neighbours lend now is mostly another category's (`Flavor` on jeans).
Per τ: the share of the schema that belongs to the record's own category (precision), and the share
of its gold tags whose attribute the schema names (the recall a tagger can reach).
Writes eval/schema_for_unknown.json and .md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import DATASETS, REPO, meta_lines, run_meta, write_result

from llmtags.records import Record, load_labelled
from llmtags.retrieve import LEND_SIMILARITY, DemoPool, attribute_of

THRESHOLDS = (0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 1.01)


def measure(pool: DemoPool, record: Record, own: list[str], tau: float) -> tuple[float, float, int]:
    schema = pool.schema_for(Record(record.id, record.text), lend_similarity=tau) or []
    own_set = {a.casefold() for a in own}
    precision = sum(a.casefold() in own_set for a in schema) / len(schema) if schema else 0.0
    gold = [a for a in map(attribute_of, record.tags or ()) if a]
    named = {a.casefold() for a in schema}
    coverage = sum(a.casefold() in named for a in gold) / len(gold) if gold else 1.0
    return precision, coverage, len(schema)


def run(args: argparse.Namespace) -> dict[str, Any]:
    pool_records = load_labelled(args.pool)
    full = DemoPool(pool_records)
    schemas = full._category_schema  # each category's attribute list, as the pool gives it
    dev = [r for name in ("en-oa-mine", "en-ae-110k") for r in load_labelled(args.data / name / "dev.jsonl")
           if r.tags and r.category and r.category.casefold() in schemas][: args.limit]
    without = {c: DemoPool([r for r in pool_records if (r.category or "").casefold() != c]) for c in schemas}
    rows = []
    for tau in THRESHOLDS:
        for case in ("known", "unknown"):
            found = [measure(full if case == "known" else without[r.category.casefold()], r,
                             schemas[r.category.casefold()], tau) for r in dev]
            rows.append({"tau": tau, "case": case, "precision": sum(f[0] for f in found) / len(found),
                         "coverage": sum(f[1] for f in found) / len(found),
                         "size": sum(f[2] for f in found) / len(found)})
    examples = [r for r in load_labelled(REPO / "examples" / "products.jsonl")
                if r.id.startswith("en-")]
    shown = {r.id: {"text": r.text, "category": r.category, "neighbours": [
        {"category": n.category, "similarity": round(s, 3)} for n, s in full.neighbours(Record(r.id, r.text), 3)],
        "schema": full.schema_for(Record(r.id, r.text, category=r.category))} for r in examples}
    return {"pool": str(args.pool), "records": len(dev), "core": full.core_schema, "chosen": LEND_SIMILARITY,
            "rows": rows, "examples": shown, "meta": run_meta()}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# The schema of a product of unknown category: which neighbours lend attributes", "",
             *meta_lines(result["meta"]),
             f"- pool: `{result['pool']}`; records: {result['records']} en-oa-mine + en-ae-110k dev records, "
             "category hidden; **known**: the pool holds their category; **unknown**: it is taken out of the pool",
             f"- the catalogue-wide core (attributes of ≥ 40% of the pool's categories): {', '.join(result['core'])}",
             "- precision: share of the schema's attributes that are the record's own category's; coverage: share "
             "of its gold tags whose attribute the schema names (what a tagger can still reach); size: attributes",
             f"- chosen: τ = {result['chosen']} (`retrieve.LEND_SIMILARITY`); τ > 1: the core alone", "",
             "| τ | known: precision | coverage | size | unknown: precision | coverage | size |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["tau"], r["case"]): r for r in result["rows"]}
    for tau in THRESHOLDS:
        k, u = by[(tau, "known")], by[(tau, "unknown")]
        lines.append(f"| {tau} | {k['precision']:.3f} | {k['coverage']:.3f} | {k['size']:.1f} | {u['precision']:.3f} | "
                     f"{u['coverage']:.3f} | {u['size']:.1f} |")
    lines += ["", "## The README's example products (categories the pool does not hold)", "",
              "| product | category | 3 nearest (category, similarity) | schema |", "|---|---|---|---|"]
    for pid, e in result["examples"].items():
        near = ", ".join(f"{n['category']} {n['similarity']:.2f}" for n in e["neighbours"])
        lines.append(f"| {pid} {e['text'][:40]} | {e['category']} | {near} | {', '.join(e['schema'] or [])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, default=REPO / "adapters" / "en-products" / "pool.jsonl")
    parser.add_argument("--data", type=Path, default=DATASETS)
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "schema_for_unknown")
    args = parser.parse_args()
    result = run(args)
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()

"""Retrieval-augmented tagging (issue #14), measured: each check runs `llmtags generate --adapter` in a few
variants on the same records and scores them strictly (and in the ExtractGPT protocol where the set has
`targets`).

    .venv/bin/python eval/retrieval.py ablation --set zh-taobao-ner --adapter zh-taobao --adapter zh-rag --limit 100
    .venv/bin/python eval/retrieval.py new-catalogue --adapter en-products --limit 200
    .venv/bin/python eval/retrieval.py renamed --adapter zh-taobao --limit 100
    .venv/bin/python eval/retrieval.py speed --adapter zh-taobao --limit 200

- ablation: K in {0, 2, 4, 8} demonstrations retrieved from the set's train split, on the first N dev
  records (test where the set has no dev), for each adapter (one trained without retrieval, one with).
- new-catalogue: en-wdc-pave test, which the adapter never saw: as shipped without retrieval, and with
  en-wdc-pave train as its demo pool (candidates from it too, as `generate --demos` does); beside the
  dictionary baseline built from the same train split. No training on en-wdc-pave.
- renamed: zh-taobao-ner dev and train with 产品词 → 产品, 品牌 → 牌子, 型号 → 款号 (files written under
  the llmtags cache), the renamed train as pool; beside the original dev with the original pool.
- speed: products/s without and with retrieval on the same records, one after the other.

Predictions are kept (and resumed) under <llmtags cache>/eval/; results go to eval/retrieval_MODE.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import (
    DATASETS,
    REPO,
    generate_predictions,
    meta_lines,
    predictions_file,
    run_meta,
    write_outputs,
)

from llmtags.baselines import DictionaryTagger
from llmtags.evaluate import read_predictions
from llmtags.models import cache_root
from llmtags.records import load_labelled
from llmtags.report import EvalReport
from llmtags.train.rename import rename_tag

KS = (0, 2, 4, 8)
RENAMES = {"产品词": "产品", "品牌": "牌子", "型号": "款号"}
WORK = cache_root() / "eval" / "retrieval"


def split(name: str, *choices: str) -> Path:
    """The first of `choices` that the set has (e.g. dev, else test)."""
    for choice in choices:
        path = DATASETS / name / f"{choice}.jsonl"
        if path.is_file():
            return path
    sys.exit(f"skipped: {name} has none of {', '.join(choices)} under {DATASETS}")


def figures(report: EvalReport) -> dict[str, Any]:
    typed = report.scores("raw", "typed").micro
    out = {"precision": round(typed.precision, 4), "recall": round(typed.recall, 4), "f1": round(typed.f1, 4),
           "f1_ci95": [round(x, 4) for x in report.ci95("raw", "typed")]}
    if "extractgpt" in report.views["raw"]:
        out["extractgpt_f1"] = round(report.scores("raw", "extractgpt").micro.f1, 4)
    return out


def variant(name: str, data: Path, adapter: str, changes: dict[str, Any], limit: int) -> dict[str, Any]:
    """Generate (resumably) and score one variant on the first `limit` labelled records of `data`."""
    records = [r for r in load_labelled(data) if r.tags is not None][:limit]
    out = predictions_file(WORK / data.parent.name, data.stem, name, adapter)
    seconds = generate_predictions(data, out, adapter, changes, limit)
    predictions = read_predictions(out)
    protocol = "extractgpt" if any(r.targets for r in records) else "strict"
    report = EvalReport.from_records(records, [predictions.get(r.id, []) for r in records], protocol=protocol)
    dropped: dict[str, int] = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        for reason, tags in json.loads(line).get("dropped", {}).items():
            dropped[reason] = dropped.get(reason, 0) + len(tags)
    print(f"{name}: F1 {report.scores('raw', 'typed').micro.f1:.3f}", file=sys.stderr)
    return {"variant": name, "adapter": adapter, "settings": changes, "records": len(records), **figures(report),
            "seconds": round(seconds, 1), "dropped": dropped, "report": report}


def dictionary(train: Path, data: Path, limit: int) -> dict[str, Any]:
    records = [r for r in load_labelled(data) if r.tags is not None][:limit]
    tagger = DictionaryTagger.from_records(load_labelled(train))
    report = EvalReport.from_records(records, tagger.tag_many([r.text for r in records]))
    return {"variant": f"dictionary from {train.parent.name}/{train.name}", "adapter": None, "records": len(records),
            **figures(report), "report": report}


def renamed_copy(path: Path) -> Path:
    """`path` with its attributes renamed by RENAMES in its tags (zh-taobao-ner has no schema or category),
    under the cache."""
    out = WORK / "renamed" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for record in load_labelled(path):
        tags = [[rename_tag(t, RENAMES) for t in tag] if isinstance(tag, list) else rename_tag(tag, RENAMES)
                for tag in record.tags or []]
        rows.append({"id": record.id, "text": record.text, "lang": record.lang, "tags": tags})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


def ablation(args: argparse.Namespace) -> list[dict[str, Any]]:
    data, pool = split(args.set, "dev", "test"), args.pool or str(split(args.set, "train"))
    return [variant(f"K={k}", data, adapter, {"demos": pool, "retrieve": k} if k else {"retrieve": 0},
                    args.limit) for adapter in args.adapters for k in KS]


def new_catalogue(args: argparse.Namespace) -> list[dict[str, Any]]:
    test, train = split("en-wdc-pave", "test"), split("en-wdc-pave", "train")
    adapter = args.adapters[0]
    return [dictionary(train, test, args.limit),
            variant("shipped, no retrieval", test, adapter, {"retrieve": 0}, args.limit),
            variant("wdc train as demo pool (and candidates)", test, adapter, {"demos": str(train)}, args.limit)]


def renamed(args: argparse.Namespace) -> list[dict[str, Any]]:
    dev, train = split("zh-taobao-ner", "dev"), split("zh-taobao-ner", "train")
    renamed_dev, renamed_train = renamed_copy(dev), renamed_copy(train)
    k = {"retrieve": args.k} if args.k else {}
    rows = []
    for adapter in args.adapters:
        rows += [variant("original dev, original pool", dev, adapter, {"demos": str(train), **k}, args.limit),
                 variant("renamed dev, renamed pool", renamed_dev, adapter, {"demos": str(renamed_train), **k},
                         args.limit)]
    return rows


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    test = split("zh-taobao-ner", "test")
    adapter = args.adapters[0]
    rows = [variant("speed: no retrieval", test, adapter, {"retrieve": 0}, args.limit),
            variant("speed: retrieval", test, adapter, {}, args.limit)]
    for row in rows:
        row["products_per_second"] = round(row["records"] / row["seconds"], 3) if row["seconds"] else None
    return rows


MODES = {"ablation": ablation, "new-catalogue": new_catalogue, "renamed": renamed, "speed": speed}


def markdown(mode: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Retrieval: {mode}", "", *meta_lines(meta),
             "- scoring: strict typed micro P/R/F1 over `Attribute:value` tags, 95% CI by bootstrap over records; "
             "ExtractGPT protocol F1 where the set has `targets`", "",
             "| variant | adapter | records | P | R | F1 | 95% CI | ExtractGPT F1 | s | products/s | dropped |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rate = f"{r['records'] / r['seconds']:.2f}" if r.get("seconds") else "–"
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(r.get("dropped", {}).items())) or "–"
        lines.append(f"| {r['variant']} | {r['adapter'] or '–'} | {r['records']} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | **{r['f1']:.3f}** | {r['f1_ci95'][0]:.3f}–{r['f1_ci95'][1]:.3f} | "
                     f"{r.get('extractgpt_f1', '–')} | {r.get('seconds', '–')} | {rate} | {dropped} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--adapter", action="append", dest="adapters", required=True)
    parser.add_argument("--set", default="zh-taobao-ner", help="ablation: which set")
    parser.add_argument("--pool", help="ablation: the demo pool (default: the set's train split; several files "
                        "comma-joined, e.g. the adapter's own training files)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--k", type=int, help="renamed: demonstrations per record (default: the adapter's own K)")
    parser.add_argument("--out", type=Path, help="default eval/retrieval_MODE[_SET]")
    args = parser.parse_args()
    if not DATASETS.is_dir():
        sys.exit(f"skipped: {DATASETS} is absent")
    rows = MODES[args.mode](args)
    meta = run_meta()
    suffix = f"_{args.set.replace('-', '_')}" if args.mode == "ablation" else ""
    out = args.out or REPO / "eval" / f"retrieval_{args.mode.replace('-', '_')}{suffix}"
    write_outputs(out, {"mode": args.mode, "rows": [{k: v for k, v in r.items() if k != "report"} for r in rows],
                        "meta": meta}, markdown(args.mode, rows, meta))


if __name__ == "__main__":
    main()

"""Dictionary baseline (train values found in test texts) on the benchmark sets.

    .venv/bin/python eval/baseline_dictionary.py [--data ../shared/datasets]

Writes eval/baseline_dictionary.json (full reports) and eval/baseline_dictionary.md (tables). The data
stays outside the repository; where the folder is absent the script says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from common import DATASETS, REPO, SETS, data_dir_or_skip, meta_lines, run_meta, split_paths, write_outputs

from llmtags.baselines import DictionaryTagger
from llmtags.records import Record, load_labelled
from llmtags.report import EvalReport

# Sanity anchor: the project's reference figure for this baseline is on the first 100 Taobao test titles.
ANCHOR_SET, ANCHOR_N = "zh-taobao-ner", 100


def _evaluate(name: str, train: list[Record], test: list[Record], n_boot: int, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    tagger = DictionaryTagger.from_records(train)
    built = time.perf_counter() - started
    started = time.perf_counter()
    preds = tagger.tag_many([r.text for r in test])
    tagged = time.perf_counter() - started
    report = EvalReport.from_records(test, preds, name=name, n_boot=n_boot, seed=seed)
    return {
        "name": name,
        "train": len(train),
        "test": len(test),
        "dictionary_values": len(tagger),
        "build_seconds": round(built, 3),
        "tag_seconds": round(tagged, 3),
        "report": report,
    }


def _row(result: dict[str, Any]) -> list[str]:
    report: EvalReport = result["report"]
    typed, values = report.scores("raw", "typed"), report.scores("raw", "values")
    t_low, t_high = report.ci95("raw", "typed")
    v_low, v_high = report.ci95("raw", "values")
    return [
        result["name"], str(result["train"]), str(result["test"]),
        f"{typed.micro.precision:.3f}", f"{typed.micro.recall:.3f}", f"**{typed.micro.f1:.3f}**",
        f"{t_low:.3f}–{t_high:.3f}", f"{values.micro.f1:.3f}", f"{v_low:.3f}–{v_high:.3f}",
        f"{typed.macro_f1:.3f}", f"{values.macro_f1:.3f}", f"{result['tag_seconds']:.2f}",
    ]


def _markdown(results: list[dict[str, Any]], anchor: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    header = ["set", "train", "test", "P", "R", "F1", "F1 95% CI", "value F1", "value 95% CI",
              "macro F1", "value macro F1", "tagging s"]
    lines = [
        "# Dictionary baseline",
        "",
        "Every value of the training tags, found verbatim (NFKC, case-folded) in a test text, longest",
        "match first, non-overlapping, Latin/digit values on word boundaries, each under its most frequent",
        "training attribute. No model. Train → test of each set.",
        "",
        *meta_lines(meta),
        f"- scoring: micro P/R/F1 over `Attribute:value` tags (typed) and over values only; macro F1 over "
        f"gold attributes; 95% CI by percentile bootstrap over records ({meta['n_boot']} resamples, "
        f"seed {meta['seed']}). No normalisation.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    if anchor is not None:
        lines += [
            "",
            f"Sanity anchor: {ANCHOR_SET}, first {ANCHOR_N} test titles (reference figure about 0.52 typed F1):",
            "",
            "| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1),
            "| " + " | ".join(_row(anchor)) + " |",
        ]
    for result in results:
        report: EvalReport = result["report"]
        lines += ["", report.to_markdown(worst=5).rstrip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS)
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "baseline_dictionary")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if not data_dir_or_skip(args.data):
        return 0
    meta = {**run_meta(), "n_boot": args.n_boot, "seed": args.seed}
    results: list[dict[str, Any]] = []
    anchor = None
    for name in SETS:
        paths = split_paths(args.data, name, "train", "test")
        if paths is None:
            continue
        train, test = load_labelled(paths[0]), load_labelled(paths[1])
        result = _evaluate(name, train, test, args.n_boot, args.seed)
        results.append(result)
        print(" | ".join(_row(result)))
        if name == ANCHOR_SET:
            anchor = _evaluate(f"{name} (first {ANCHOR_N})", train, test[:ANCHOR_N], args.n_boot, args.seed)
            print(" | ".join(_row(anchor)))
    if not results:
        print(f"skipped: no set with train.jsonl and test.jsonl under {args.data}")
        return 0

    def as_json(result: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in result.items() if k != "report"} | {"report": result["report"].to_json(worst=20)}

    data = {**meta, "sets": {r["name"]: as_json(r) for r in results},
            "anchor": None if anchor is None else as_json(anchor)}
    write_outputs(args.out, data, _markdown(results, anchor, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

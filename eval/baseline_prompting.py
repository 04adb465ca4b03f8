"""Zero-shot and few-shot prompting of the embedded model on the benchmark test sets, beside the
dictionary baseline on the same records.

    .venv/bin/python eval/baseline_prompting.py [--limit 100] [--limit-for en-wdc-pave=50 ...] [--shots 4]

Generations go through the llmtags generation cache, so a re-run after a crash resumes where it
stopped. Writes eval/baseline_prompting.json and eval/baseline_prompting.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import DATASETS, REPO, SETS, data_dir_or_skip, meta_lines, run_meta, split_paths, write_outputs

from llmtags.baselines import DictionaryTagger
from llmtags.evaluate import cached_engine, generate_and_score, generation_seconds, labelled_records
from llmtags.prompts import demos_from, detect_lang, load_template
from llmtags.records import load_labelled
from llmtags.report import EvalReport
from llmtags.options import TaggingOptions


def _summary(report: EvalReport, seconds: float | None = None) -> dict[str, Any]:
    typed, values = report.scores("raw", "typed"), report.scores("raw", "values")
    out = {
        "precision": typed.micro.precision,
        "recall": typed.micro.recall,
        "f1": typed.micro.f1,
        "f1_ci95": list(report.ci95("raw", "typed")),
        "value_f1": values.micro.f1,
        "macro_f1": typed.macro_f1,
    }
    if seconds:
        out["products_per_second"] = len(report.golds) / seconds
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS)
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "baseline_prompting")
    parser.add_argument("--limit", type=int, default=100, help="first N test records of each set")
    parser.add_argument("--limit-for", action="append", default=[], metavar="SET=N",
                        help="a different limit for one set (repeatable)")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--base-model", default="embedded")
    args = parser.parse_args(argv)
    if not data_dir_or_skip(args.data):
        return 0
    limits = {name: args.limit for name in SETS} | {k: int(v) for k, v in (x.split("=") for x in args.limit_for)}
    meta = run_meta()
    engine = cached_engine(args.base_model, engine="transformers")  # the engine of the committed figures
    results: dict[str, Any] = {}
    for name in SETS:
        paths = split_paths(args.data, name, "train", "test")
        if paths is None:
            continue
        train, test = load_labelled(paths[0]), labelled_records(paths[1], limits[name])
        lang = detect_lang(test[0].text)
        dictionary = DictionaryTagger.from_records(train)
        row: dict[str, Any] = {"n": len(test), "of": len(load_labelled(paths[1])), "lang": lang}
        row["dictionary"] = _summary(EvalReport.from_records(test, dictionary.tag_many([r.text for r in test])))
        variants = {
            "zero-shot": TaggingOptions(template="auto", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
            f"{args.shots}-shot": TaggingOptions(template=load_template("few_shot"), demos=demos_from(train, args.shots, lang),
                                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
        }
        for variant, options in variants.items():
            report, _ = generate_and_score(test, engine, options, name=f"{name} {variant}", progress=True)
            row[variant] = _summary(report, sum(generation_seconds(test, engine, options)))
            row[variant]["worst"] = report.worst_records(3)
            print(f"{name} {variant}: F1 {row[variant]['f1']:.3f}", file=sys.stderr)
        results[name] = row

    lines = [
        "# Prompting baselines: the embedded model without training, against the dictionary",
        "",
        "Embedded Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, dequantised to fp32), greedy decoding. Zero-shot uses",
        "the default `zh`/`en` template; few-shot the `few_shot` template with the first train records of the",
        "set as demonstrations. The dictionary baseline tags the same records (train values found in the text).",
        "Only the first N test records of each set are run (the records column): a full run of all four test",
        "sets does not fit the CPU time of one session at about 0.3 products/s.",
        "",
        *meta_lines(meta),
        "- scoring: typed micro F1 over `Attribute:value` tags, 95% CI by percentile bootstrap over records (1000 resamples, seed 0). Products/s are per-record generation times at batch 8; other jobs shared the 2 cores during this run, so they understate the speed",
        "",
        "| set | records | dictionary F1 | zero-shot F1 [95% CI] | few-shot F1 [95% CI] | zero-shot P / R | few-shot P / R | products/s (zero / few) |",
        "|---|---:|---:|---|---|---|---|---|",
    ]
    shots = f"{args.shots}-shot"
    for name, row in results.items():
        z, f = row["zero-shot"], row[shots]
        lines.append(
            f"| {name} | {row['n']} of {row['of']} | {row['dictionary']['f1']:.3f} | "
            f"{z['f1']:.3f} [{z['f1_ci95'][0]:.3f}, {z['f1_ci95'][1]:.3f}] | "
            f"{f['f1']:.3f} [{f['f1_ci95'][0]:.3f}, {f['f1_ci95'][1]:.3f}] | "
            f"{z['precision']:.3f} / {z['recall']:.3f} | {f['precision']:.3f} / {f['recall']:.3f} | "
            f"{z['products_per_second']:.2f} / {f['products_per_second']:.2f} |"
        )
    write_outputs(args.out, {**meta, "limits": limits,
                             "sets": results}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The classical peer: a linear-chain CRF (the span proposer, `llmtags.proposer`) as a tagger on its own,
beside the dictionary baseline, on the same test records.

    .venv/bin/python eval/baseline_crf.py [--data ../shared/datasets] [--limit 200]

For each set the CRF is trained on the train split (en-oa-mine and en-ae-110k: one model on both train
splits, as the shipped en adapter is trained on both; en-wdc-pave: its own train split, playing a new
catalogue's labelled sample) and tags the first `--limit` test records. Its tags are the Viterbi spans
(limited to the record's schema where it has one). Also measured: the cross-fitting gap, proposal quality
on the train split from the CRF trained on all of it (in-fold) against k-fold (out-of-fold) proposals,
which is what training prompts show.

Writes eval/baseline_crf.json and eval/baseline_crf.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DATASETS, REPO, data_dir_or_skip, meta_lines, run_meta, split_paths, write_outputs

from llmtags.baselines import DictionaryTagger
from llmtags.proposer import CrossFitted, SpanProposer
from llmtags.records import Record, load_labelled
from llmtags.report import EvalReport

# set -> the train splits its CRF learns from
TRAIN_SETS = {
    "zh-taobao-ner": ("zh-taobao-ner",),
    "en-oa-mine": ("en-oa-mine", "en-ae-110k"),
    "en-ae-110k": ("en-oa-mine", "en-ae-110k"),
    "en-wdc-pave": ("en-wdc-pave",),
}


def scored(name: str, test: list[Record], preds: list[list[str]], seconds: float, n_boot: int) -> dict[str, Any]:
    report = EvalReport.from_records(test, preds, name=name, n_boot=n_boot, seed=0)
    typed = report.scores("raw", "typed").micro
    low, high = report.ci95("raw", "typed")
    return {"precision": typed.precision, "recall": typed.recall, "f1": typed.f1, "ci95": [low, high],
            "products_per_s": len(test) / seconds if seconds else None, "report": report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATASETS)
    parser.add_argument("--limit", type=int, default=200, help="first N test records of each set")
    parser.add_argument("--folds", type=int, default=5, help="k of the cross-fitting gap (0: do not measure it; "
                        "`llmtags train` and `adapters pack --proposer` record it in the adapter)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "baseline_crf")
    args = parser.parse_args(argv)
    if not data_dir_or_skip(args.data):
        return 0
    meta = {**run_meta(), "limit": args.limit, "folds": args.folds}
    work = Path(tempfile.mkdtemp(prefix="llmtags-crf-"))
    models: dict[tuple[str, ...], tuple[SpanProposer, float, list[Record]]] = {}
    results: dict[str, Any] = {}
    for name, sources in TRAIN_SETS.items():
        paths = split_paths(args.data, name, "test")
        train_paths = [split_paths(args.data, source, "train") for source in sources]
        if paths is None or any(p is None for p in train_paths):
            continue
        if sources not in models:
            train = [r for p in train_paths for r in load_labelled(p[0])]
            started = time.perf_counter()
            full = SpanProposer.train(train, work / f"{'+'.join(sources)}.crfsuite")
            models[sources] = (full, time.perf_counter() - started, train)
        proposer, train_seconds, train = models[sources]
        test = [r for r in load_labelled(paths[0]) if r.tags is not None][: args.limit]
        started = time.perf_counter()
        crf = [[p.tag for p in proposer.propose(r)] for r in test]
        crf_seconds = time.perf_counter() - started
        # The dictionary of the set's own train split, as in eval/baseline_dictionary.md and the README.
        dictionary = DictionaryTagger.from_records(load_labelled(split_paths(args.data, name, "train")[0]))
        started = time.perf_counter()
        lookups = dictionary.tag_many([r.text for r in test])
        dict_seconds = time.perf_counter() - started
        results[name] = {
            "train": list(sources), "train_records": len(train), "test_records": len(test),
            "crf_train_seconds": round(train_seconds, 1),
            "crf": scored(f"{name} CRF", test, crf, crf_seconds, args.n_boot),
            "dictionary": scored(f"{name} dictionary", test, lookups, dict_seconds, args.n_boot),
        }
        print(f"{name}: CRF F1 {results[name]['crf']['f1']:.3f}, dictionary {results[name]['dictionary']['f1']:.3f}",
              file=sys.stderr)
    gaps: dict[str, Any] = {}
    for sources, (_, _, train) in models.items() if args.folds else ():
        crossfit = CrossFitted.train(train, k=args.folds, workdir=work / "+".join(sources))
        gaps["+".join(sources)] = {**crossfit.quality(train), "fold_training_seconds": round(crossfit.seconds, 1)}
    if not results:
        print(f"skipped: no set under {args.data}")
        return 0
    write_outputs(args.out, as_json(meta, results, gaps), markdown(meta, results, gaps))
    return 0


def as_json(meta: dict[str, Any], results: dict[str, Any], gaps: dict[str, Any]) -> dict[str, Any]:
    def strip(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if k != "report"} | {"report": entry["report"].to_json(worst=10)}

    sets = {name: {**r, "crf": strip(r["crf"]), "dictionary": strip(r["dictionary"])} for name, r in results.items()}
    return {**meta, "sets": sets, "cross_fitting": gaps}


def markdown(meta: dict[str, Any], results: dict[str, Any], gaps: dict[str, Any]) -> str:
    lines = ["# CRF peer (the span proposer alone) and dictionary, same test records", "",
             "A linear-chain CRF (python-crfsuite, `llmtags.proposer`: token, shape, ±2 neighbours, bigrams, "
             "affixes) trained on the train split(s) named; strict micro F1 over `Attribute:value` tags, 95% "
             "interval by bootstrap over records.", "", *meta_lines(meta), "",
             "| set | trained on | test records | CRF P | CRF R | CRF F1 | 95% CI | CRF products/s | CRF train s "
             "| dictionary F1 (own train) |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        crf, dictionary = r["crf"], r["dictionary"]
        lines.append(f"| {name} | {' + '.join(r['train'])} ({r['train_records']}) | {r['test_records']} | "
                     f"{crf['precision']:.3f} | {crf['recall']:.3f} | **{crf['f1']:.3f}** | "
                     f"{crf['ci95'][0]:.3f}–{crf['ci95'][1]:.3f} | {crf['products_per_s']:.0f} | "
                     f"{r['crf_train_seconds']:.0f} | {dictionary['f1']:.3f} |")
    if not gaps:
        lines += ["", "The cross-fitting gap (in-fold against out-of-fold proposal quality) was not measured in this "
                  "run (`--folds 0`); `llmtags train` and `llmtags adapters pack --proposer` record it in each "
                  "adapter's `llmtags.json`."]
    else:
        lines += ["", f"## Cross-fitting gap ({meta['folds']} folds)", "",
                  "Proposal quality on the train split itself: from the CRF trained on all of it (in-fold, what "
                  "training prompts would show without cross-fitting) and from the CRF of the other folds "
                  "(out-of-fold, what `llmtags train` shows, and close to what test prompts get).", "",
                  "| train split(s) | in-fold P / R / F1 | out-of-fold P / R / F1 | fold training s |",
                  "|---|---|---|---:|"]
        for name, gap in gaps.items():
            fmt = lambda q: f"{q['precision']:.3f} / {q['recall']:.3f} / {q['f1']:.3f}"  # noqa: E731
            lines.append(f"| {name} | {fmt(gap['in_fold'])} | {fmt(gap['out_of_fold'])} | {gap['fold_training_seconds']:.0f} |")
    for name, r in results.items():
        lines += ["", f"## {name}: CRF", "", r["crf"]["report"].to_markdown(worst=3).rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

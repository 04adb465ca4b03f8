"""The classical peer: a linear-chain CRF (the span proposer, `llmtags.proposer`) as a tagger on its own,
beside the dictionary baseline, on the same test records.

    .venv/bin/python eval/baseline_crf.py [--data ../shared/datasets] [--limit 200] [--features 1,2]
    .venv/bin/python eval/baseline_crf.py --split dev --limit 0 --folds 0 --out eval/baseline_crf_dev

Each of `--features` is a CRF of that feature set: 1 is the peer issue #19 measured (token, shape, ±2
neighbours, bigrams, affixes), 2 the proposer's default since 2026-12-06 (1 + trigrams, the category, a
cross-fitted gazetteer of the training values).

For each set the CRF is trained on the train split (en-oa-mine and en-ae-110k: one model on both train
splits, as the shipped en adapter is trained on both; en-wdc-pave: its own train split, playing a new
catalogue's labelled sample) and tags the first `--limit` records of `--split` (test; dev to choose on, all of
them with `--limit 0`; a set without that split is skipped). Its tags are the Viterbi spans
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
from llmtags.proposer import CrossFitted, ProposerSettings, SpanProposer
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
    parser.add_argument("--split", default="test", help="the split tagged (default test; dev to choose features on)")
    parser.add_argument("--limit", type=int, default=200, help="first N records of the split (0: all)")
    parser.add_argument("--folds", type=int, default=5, help="k of the cross-fitting gap (0: do not measure it; "
                        "`llmtags train` and `adapters pack --proposer` record it in the adapter)")
    parser.add_argument("--features", default="1,2", help="the CRF feature sets to train, comma-joined (default 1,2)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "baseline_crf")
    args = parser.parse_args(argv)
    if not data_dir_or_skip(args.data):
        return 0
    versions = [int(v) for v in args.features.split(",")]
    meta = {**run_meta(), "split": args.split, "limit": args.limit, "folds": args.folds, "features": versions}
    work = Path(tempfile.mkdtemp(prefix="llmtags-crf-"))
    models: dict[tuple[tuple[str, ...], int], tuple[SpanProposer, float, list[Record]]] = {}
    results: dict[str, Any] = {}
    for name, sources in TRAIN_SETS.items():
        paths = split_paths(args.data, name, args.split)
        train_paths = [split_paths(args.data, source, "train") for source in sources]
        if paths is None or any(p is None for p in train_paths):
            continue
        train = [r for p in train_paths for r in load_labelled(p[0])]
        test = [r for r in load_labelled(paths[0]) if r.tags is not None][: args.limit or None]
        crfs: dict[str, Any] = {}
        for version in versions:
            if (sources, version) not in models:
                started = time.perf_counter()
                full = SpanProposer.train(train, work / f"{'+'.join(sources)}-{version}.crfsuite",
                                          ProposerSettings(features=version))
                models[sources, version] = (full, time.perf_counter() - started, train)
            proposer, train_seconds, _ = models[sources, version]
            started = time.perf_counter()
            crf = [[p.tag for p in proposer.propose(r)] for r in test]
            crfs[str(version)] = {**scored(f"{name} CRF (features {version})", test, crf,
                                           time.perf_counter() - started, args.n_boot),
                                  "train_seconds": round(train_seconds, 1)}
        # The dictionary of the set's own train split, as in eval/baseline_dictionary.md and the README.
        dictionary = DictionaryTagger.from_records(load_labelled(split_paths(args.data, name, "train")[0]))
        started = time.perf_counter()
        lookups = dictionary.tag_many([r.text for r in test])
        dict_seconds = time.perf_counter() - started
        results[name] = {
            "train": list(sources), "train_records": len(train), "records": len(test), "crf": crfs,
            "dictionary": scored(f"{name} dictionary", test, lookups, dict_seconds, args.n_boot),
        }
        found = ", ".join(f"features {v} {c['f1']:.3f}" for v, c in crfs.items())
        print(f"{name}: CRF F1 {found}, dictionary {results[name]['dictionary']['f1']:.3f}", file=sys.stderr)
    gaps: dict[str, Any] = {}
    for (sources, version), (_, _, train) in models.items() if args.folds else ():
        crossfit = CrossFitted.train(train, k=args.folds, workdir=work / f"{'+'.join(sources)}-{version}",
                                     settings=ProposerSettings(features=version))
        gaps[f"{'+'.join(sources)}, features {version}"] = {**crossfit.quality(train),
                                                            "fold_training_seconds": round(crossfit.seconds, 1)}
    if not results:
        print(f"skipped: no set under {args.data}")
        return 0
    write_outputs(args.out, as_json(meta, results, gaps), markdown(meta, results, gaps))
    return 0


def as_json(meta: dict[str, Any], results: dict[str, Any], gaps: dict[str, Any]) -> dict[str, Any]:
    def strip(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if k != "report"} | {"report": entry["report"].to_json(worst=10)}

    sets = {name: {**r, "crf": {v: strip(c) for v, c in r["crf"].items()}, "dictionary": strip(r["dictionary"])}
            for name, r in results.items()}
    return {**meta, "sets": sets, "cross_fitting": gaps}


def markdown(meta: dict[str, Any], results: dict[str, Any], gaps: dict[str, Any]) -> str:
    lines = [f"# CRF peer (the span proposer alone) and dictionary, same {meta['split']} records", "",
             "A linear-chain CRF (python-crfsuite, `llmtags.proposer`) trained on the train split(s) named, with "
             "feature set 1 (token, shape, ±2 neighbours, bigrams, affixes: the peer of issue #19) and 2 (1 + "
             "trigrams, the record's category, a cross-fitted gazetteer of the training values: the proposer's "
             "default); strict micro F1 over `Attribute:value` tags, 95% interval by bootstrap over records.", "",
             *meta_lines(meta), "",
             f"| set | trained on | {meta['split']} records | CRF features | CRF P | CRF R | CRF F1 | 95% CI | CRF products/s "
             "| CRF train s | dictionary F1 (own train) |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        for version, crf in r["crf"].items():
            lines.append(f"| {name} | {' + '.join(r['train'])} ({r['train_records']}) | {r['records']} | "
                         f"{version} | {crf['precision']:.3f} | {crf['recall']:.3f} | **{crf['f1']:.3f}** | "
                         f"{crf['ci95'][0]:.3f}–{crf['ci95'][1]:.3f} | {crf['products_per_s']:.0f} | "
                         f"{crf['train_seconds']:.0f} | {r['dictionary']['f1']:.3f} |")
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
        for version, crf in r["crf"].items():
            lines += ["", f"## {name}: CRF, features {version}", "", crf["report"].to_markdown(worst=3).rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""How llama.cpp runs the embedded base: its Q4_K_M file as shipped, or requantised to Q8_0 (the default).

    .venv/bin/python eval/bench_weights.py --set zh-taobao-ner --adapter zh-taobao
    .venv/bin/python eval/bench_weights.py --set en-wdc-pave --adapter en-products --demos SAMPLE --data DIR --limit 50
    .venv/bin/python eval/bench_weights.py --set zh-taobao-ner --adapter none --limit 40 \
        --option base_model=embedded-1.5b --option template=zh --out eval/bench_weights_zh_taobao_ner_1_5b

Each round is one fresh `llmtags generate --adapter ADAPTER` run per weights choice ($LLMTAGS_WEIGHTS), with
the adapter's defaults (`--adapter none`: the base model alone), over the first --limit records of the set's
test split, one after the other in this process (nothing else should run on the machine). The order turns
round by round, because this machine's speed drifts by 10-20% over minutes: a single pair of runs can
show any speed-up from 1.0 to 1.4. Reported: each run's products/s (model loading excluded), the speed-up
as the median of the rounds' ratios, strict F1 with its 95% interval, the change in F1 by paired
bootstrap, and the share of records tagged exactly alike (from the first round; greedy decoding tags the
same in every round). Writes eval/bench_weights_SET.json and .md.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from common import REPO, generated, meta_lines, run_meta, run_parser, run_settings, split_paths, write_result

from llmtags.engines.llamacpp import WEIGHTS
from llmtags.metrics import bootstrap_ci, paired_bootstrap, score
from llmtags.records import load_labelled


def run(args: Any) -> dict[str, Any]:
    paths = split_paths(args.data, args.set, args.split)
    if paths is None:
        raise SystemExit(f"no {args.split} split of {args.set} under {args.data}")
    records = [r for r in load_labelled(paths[0]) if r.tags is not None][: args.limit]
    gold = [r.tags for r in records]
    adapter = None if args.adapter == "none" else args.adapter
    work = args.work or REPO.parent / "runs" / "bench_weights" / args.set
    choices = args.weights.split(",")
    rates: dict[str, list[float]] = {w: [] for w in choices}
    answers: dict[str, list[list[str]]] = {}
    for round_ in range(args.rounds):
        for weights in choices if round_ % 2 == 0 else choices[::-1]:
            out = work / f"{args.split}-{weights}.jsonl"
            for stale in (out, out.with_suffix(".rate.json"), Path(f"{out}.settings.json")):
                stale.unlink(missing_ok=True)  # a fresh run each time: its rate is the measurement
            os.environ["LLMTAGS_WEIGHTS"] = weights
            found, rate = generated(paths[0], out, adapter, run_settings(args), args.limit)
            rates[weights].append(rate)
            answers.setdefault(weights, [found.get(r.id, ([], []))[0] for r in records])
    first = choices[0]
    rows = []
    for weights in choices:
        micro = score(gold, answers[weights]).micro
        row = {"weights": weights, "products_per_s": rates[weights], "precision": micro.precision,
               "recall": micro.recall, "f1": micro.f1, "f1_ci95": list(bootstrap_ci(gold, answers[weights], n=args.n_boot))}
        if weights != first:
            row["vs_" + first] = paired_bootstrap(gold, answers[first], answers[weights], n=args.n_boot).to_json()
            row["same_tags"] = sum(a == b for a, b in zip(answers[first], answers[weights])) / len(records)
            row["speedup"] = statistics.median(b / a for a, b in zip(rates[first], rates[weights]))
        rows.append(row)
    return {**run_meta(), "set": args.set, "split": args.split, "records": len(records), "adapter": args.adapter,
            "settings": run_settings(args), "rounds": args.rounds, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    first = result["rows"][0]["weights"]
    lines = [f"# llama.cpp weights: {result['set']} {result['split']}, adapter {result['adapter']}", "",
             *meta_lines(result),
             f"- records: the first {result['records']} {result['split']} records; the adapter's default settings"
             + (f" and {result['settings']}" if result["settings"] else "") + "; strict typed micro P/R/F1",
             f"- products/s: {result['rounds']} rounds of fresh `generate` runs in one process, one after the other, "
             "the order turned each round (this machine's speed drifts), model loading excluded; nothing else ran "
             "on the machine; speed-up: the median of the rounds' ratios", "",
             f"| weights | P | R | F1 | 95% CI | ΔF1 vs {first} [95% CI] | same tags | products/s | speed-up |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for row in result["rows"]:
        vs = row.get("vs_" + first)
        delta = f"{vs['delta_f1']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}]" if vs else "–"
        same = f"{row['same_tags']:.0%}" if "same_tags" in row else "–"
        speedup = f"{row['speedup']:.2f}×" if "speedup" in row else "–"
        lines.append(f"| {row['weights']} | {row['precision']:.3f} | {row['recall']:.3f} | **{row['f1']:.3f}** | "
                     f"{row['f1_ci95'][0]:.3f}–{row['f1_ci95'][1]:.3f} | "
                     f"{delta} | {same} | {' / '.join(f'{r:.2f}' for r in row['products_per_s'])} | {speedup} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--split", default="test")
    parser.add_argument("--weights", default="as-is,q8_0", help=f"comma-separated, of {', '.join(WEIGHTS)}")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each choice, in turned order")
    args = parser.parse_args()
    result = run(args)
    out = args.out or REPO / "eval" / f"bench_weights_{args.set.replace('-', '_')}"
    write_result(out, result, markdown(result))


if __name__ == "__main__":
    main()

"""How llama.cpp runs the embedded base: its Q4_K_M file as shipped, or requantised to Q8_0 (the default).

    .venv/bin/python eval/bench_weights.py --set zh-taobao-ner --adapter zh-taobao
    .venv/bin/python eval/bench_weights.py --set en-wdc-pave --adapter en-products --demos SAMPLE --data DIR --limit 50
    .venv/bin/python eval/bench_weights.py --set zh-taobao-ner --adapter none --limit 40 \
        --option base_model=embedded-1.5b --option template=zh --out eval/bench_weights_zh_taobao_ner_1_5b

Each round is one fresh `llmtags generate --adapter ADAPTER --engine llama.cpp --weights W` run per choice, with
the adapter's defaults (`--adapter none`: the base model alone), over the first --limit records of the set's
test split, one after the other in this process (nothing else should run on the machine). The order turns
round by round, because this machine's speed drifts by 10-20% over minutes: a single pair of runs can
show any speed-up from 1.0 to 1.4. Reported: each run's products/s (model loading excluded), the speed-up
as the median of the rounds' ratios, strict F1 with its 95% interval, the change in F1 by paired
bootstrap, and the share of records tagged exactly alike (from the first round; greedy decoding tags the
same in every round: checked, `same_across_rounds`). A base llmtags runs as shipped whatever --weights says
(the 1.5B) is measured requantised all the same, by naming its Q8_0 copy as the base. Writes
eval/bench_weights_SET.json and .md.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from common import REPO, generated, meta_lines, run_meta, run_parser, run_settings, split_paths, write_result

from llmtags.engines.llamacpp import WEIGHTS, requantised_q8_0, run_as
from llmtags.models import resolve_gguf_base
from llmtags.metrics import bootstrap_ci, paired_bootstrap, score
from llmtags.records import load_labelled


def settings_for(args: Any, weights: str) -> dict[str, Any]:
    """The `generate` settings of one choice: llama.cpp always (transformers has no weights to choose)."""
    settings = {**run_settings(args), "engine": "llama.cpp", "weights": weights}
    spec = settings.get("base_model")
    if weights == "q8_0" and run_as(spec, weights) == "as-is":
        settings["base_model"] = str(requantised_q8_0(resolve_gguf_base(spec).gguf))  # measured as a named file
    return settings


def run(args: Any) -> dict[str, Any]:
    paths = split_paths(args.data, args.set, args.split)
    if paths is None:
        raise SystemExit(f"no {args.split} split of {args.set} under {args.data}")
    records = [r for r in load_labelled(paths[0]) if r.tags is not None][: args.limit]
    gold = [r.tags for r in records]
    adapter = None if args.adapter == "none" else args.adapter
    work = args.work or REPO.parent / "runs" / "bench_weights" / args.set
    choices = args.weights.split(",")
    if len(set(choices)) != len(choices) or not set(choices) <= set(WEIGHTS):
        raise SystemExit(f"--weights {args.weights}: each of {', '.join(WEIGHTS)} at most once")
    rates: dict[str, list[float]] = {w: [] for w in choices}
    answers: dict[str, list[list[str]]] = {}
    same_across_rounds = True
    for round_ in range(args.rounds):
        for weights in choices if round_ % 2 == 0 else choices[::-1]:
            out = work / f"{args.split}-{weights}.jsonl"
            for stale in (out, out.with_suffix(".rate.json"), Path(f"{out}.settings.json")):
                stale.unlink(missing_ok=True)  # a fresh run each time: its rate is the measurement
            found, rate = generated(paths[0], out, adapter, settings_for(args, weights), args.limit)
            if rate is None:
                raise SystemExit(f"{out}: the run left no products/s")
            rates[weights].append(rate)
            tags = [found.get(r.id, ([], []))[0] for r in records]
            same_across_rounds &= answers.setdefault(weights, tags) == tags
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
            "settings": run_settings(args), "rounds": args.rounds, "same_across_rounds": same_across_rounds, "rows": rows}


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

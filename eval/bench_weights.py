"""How llama.cpp runs the embedded base: its Q4_K_M file as shipped, or requantised to Q8_0 (the default).

    .venv/bin/python eval/bench_weights.py --set zh-taobao-ner --adapter zh-taobao
    .venv/bin/python eval/bench_weights.py --set en-wdc-pave --adapter en-products --demos SAMPLE --data DIR --limit 50
    .venv/bin/python eval/bench_weights.py --set zh-taobao-ner --adapter none --limit 40 \
        --option base_model=embedded-1.5b --option template=zh --out eval/bench_weights_zh_taobao_ner_1_5b

Each round is one fresh `llmtags generate --adapter ADAPTER --engine llama.cpp --weights W` run per choice, with
the adapter's defaults (`--adapter none`: the base model alone), over the first --limit records of the set's
test split, in alternating rounds (eval/alternating.py: this machine's speed drifts). Reported: each run's
products/s (model loading excluded), the speed-up as the median of the rounds' ratios, strict F1 with its
95% interval, the change in F1 by paired bootstrap, and the share of records tagged exactly alike. A base
llmtags runs as shipped whatever --weights says (the 1.5B) is measured requantised all the same, by naming
its Q8_0 copy as the base. Writes eval/bench_weights_SET.json and .md.
"""

from __future__ import annotations

from typing import Any

from alternating import Variant, alternate, table
from common import REPO, meta_lines, run_meta, run_parser, run_settings, split_paths, write_result

from llmtags.engines.llamacpp import WEIGHTS, requantised_q8_0, run_as
from llmtags.models import resolve_gguf_base
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
    adapter = None if args.adapter == "none" else args.adapter
    choices = args.weights.split(",")
    if len(set(choices)) != len(choices) or not set(choices) <= set(WEIGHTS):
        raise SystemExit(f"--weights {args.weights}: each of {', '.join(WEIGHTS)} at most once")
    variants = [Variant(weights, adapter, settings_for(args, weights)) for weights in choices]
    work = args.work or REPO.parent / "runs" / "bench_weights" / args.set
    return {**run_meta(), "set": args.set, "split": args.split, "adapter": args.adapter, "settings": run_settings(args),
            **alternate(paths[0], records, variants, args.rounds, work / args.split, args.n_boot)}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# llama.cpp weights: {result['set']} {result['split']}, adapter {result['adapter']}", "",
             *meta_lines(result),
             f"- records: the first {result['records']} {result['split']} records; the adapter's default settings"
             + (f" and {result['settings']}" if result["settings"] else "") + "; strict typed micro P/R/F1",
             *table(result, "weights")]
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

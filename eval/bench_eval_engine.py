"""A training run's dev evaluation on each engine (`llmtags train --eval-engine`): the transformers engine over
the float32 training model, against llama.cpp over the GGUF base with the adapter converted at each evaluation.

    .venv/bin/python eval/bench_eval_engine.py --adapter zh-taobao --set zh-taobao-ner --limit 48
    .venv/bin/python eval/bench_eval_engine.py --adapter zh-taobao-1.5b --set zh-taobao-ner --limit 48

The adapter is loaded as a run holds it (its base dequantised to float32, the peft model trainable), and each
engine's evaluation callback (`train.callbacks`, the code a run calls) tags the first --limit dev records with
the adapter's prompt, plain answers (no fusion), as a run's evaluations do; --rounds evaluations per engine,
alternating, one after the other on the same machine. Reported: seconds per evaluation (llama.cpp's first
includes loading its engine; its later ones convert the adapter again, as a run's do) and plain micro F1.
Writes eval/bench_eval_engine_ADAPTER.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from common import DATASETS, REPO, meta_lines, run_meta, write_result

from llmtags.adapters.registry import resolve_adapter
from llmtags.models import load_model, load_tokenizer, resolve_base_model
from llmtags.options import Settings
from llmtags.plan import plan_run
from llmtags.records import load_labelled
from llmtags.train.callbacks import callback_classes

ENGINES = ("transformers", "llama.cpp")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from peft import PeftModel

    plan = plan_run(Settings(adapter=args.adapter, no_fill=True))
    # As a run's evaluations prompt: the adapter's template and proposer, answers as written, batches of 16.
    options = dataclasses.replace(plan.options, batch_size=16)
    base = plan.base_model  # the adapter's own base
    resolved = resolve_base_model(base)
    tokenizer = load_tokenizer(resolved)
    model = PeftModel.from_pretrained(load_model(resolved, device="cpu", dtype="float32"),
                                      str(resolve_adapter(args.adapter)), is_trainable=True)
    records = load_labelled(str(args.data / args.set / "dev.jsonl"))[: args.limit]
    classes = callback_classes()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        evals = {kind: classes["GenerationEval"](records, tokenizer, options, 0, Path(tmp) / kind,
                                                 classes["LossProgress"](enabled=False), False,
                                                 engine=kind, base_model=base)
                 for kind in ENGINES}
        for round_ in range(args.rounds):
            for kind in ENGINES if round_ % 2 == 0 else reversed(ENGINES):
                entry = evals[kind].evaluate(model, SimpleNamespace(global_step=round_, epoch=0.0, log_history=[]))
                rows.append({"round": round_ + 1, "engine": kind, "seconds": entry["seconds"], "f1": entry["f1"],
                             "precision": entry["precision"], "recall": entry["recall"]})
                print(rows[-1])
    return {**run_meta(), "adapter": args.adapter, "base_model": base, "set": args.set, "records": len(records),
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Dev evaluation during training, by engine: {result['adapter']} on {result['set']}", "",
             *meta_lines(result), "",
             f"The first {result['records']} dev records, tagged by the evaluation callback of `llmtags train` "
             f"with the adapter loaded as a run holds it (base `{result['base_model']}` in float32 for transformers; "
             "the GGUF as `generate` runs it, with the adapter converted at each evaluation, for llama.cpp); "
             "plain micro F1, answers as written. Rounds alternate which engine goes first; llama.cpp's first "
             "evaluation includes loading its engine.", "",
             "| round | engine | seconds | records/s | F1 | P | R |", "|---:|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['round']} | {row['engine']} | {row['seconds']:.1f} | "
                     f"{result['records'] / row['seconds']:.2f} | {row['f1']:.3f} | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--set", default="zh-taobao-ner")
    parser.add_argument("--data", type=Path, default=DATASETS)
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args)
    out = args.out or REPO / "eval" / f"bench_eval_engine_{args.adapter.replace('-', '_').replace('.', '_')}"
    write_result(out, result, markdown(result))


if __name__ == "__main__":
    main()

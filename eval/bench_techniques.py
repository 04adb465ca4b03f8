"""Each speed technique of `llmtags generate`, measured one at a time against its engine's defaults.

    .venv/bin/python eval/bench_techniques.py [--n 48] [--only TEXT ...] [--keep eval/bench_techniques.json]

The same first N zh-taobao-ner test products, the zh-taobao adapter and its prompts (as in
bench_generate.py). Each configuration runs in its own child process. Reported: products/s, tokens/s,
F1, and how many texts equal those of the engine's default configuration (greedy decoding; a change
shows where a technique alters numerics). Writes eval/bench_techniques.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench_generate import MAX_NEW_TOKENS, _records_and_prompts
from common import bench_args, bench_parser, meta_lines, run_child, run_meta, write_outputs

from llmtags.tagger import chunked

# name -> (engine, settings); the first of each engine is its default, the reference of its rows.
TECHNIQUES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama.cpp defaults: 8 sequences, shared prefix, 2 threads": ("llama.cpp", {}),
    "llama.cpp, no shared-prefix cache": ("llama.cpp", {"prefix_cache": False}),
    "llama.cpp, 1 sequence at a time": ("llama.cpp", {"batch_size": 1}),
    "llama.cpp, 4 sequences": ("llama.cpp", {"batch_size": 4}),
    "llama.cpp, 16 sequences": ("llama.cpp", {"batch_size": 16}),
    "llama.cpp, 32 sequences": ("llama.cpp", {"batch_size": 32}),
    "llama.cpp, 1 thread": ("llama.cpp", {"n_threads": 1}),
    "llama.cpp, no stop at a repeated line": ("llama.cpp", {"stop_on_repeat": False}),
    "transformers defaults: fp32, unmerged adapter, batch 8 by length": ("transformers", {}),
    "transformers, adapter merged into the weights": ("transformers", {"merge": True}),
    "transformers, bf16 weights": ("transformers", {"dtype": "bfloat16", "merge": True}),
    "transformers, int8 dynamic quantisation (merged)": ("transformers", {"int8": True, "merge": True}),
    "transformers, int8 dynamic quantisation of the decoder layers only (merged)": (
        "transformers", {"int8": "layers", "merge": True}),
    "transformers, batch 1": ("transformers", {"batch_size": 1}),
    "transformers, batch 1 + prompt-lookup decoding": ("transformers", {"batch_size": 1, "prompt_lookup": 10}),
    "transformers, torch.compile (merged)": ("transformers", {"compile": True, "merge": True}),
}
BATCH = 8


def load(engine: str, settings: dict[str, Any], adapter: str) -> Any:
    from llmtags.adapters.registry import resolve_adapter

    if engine == "llama.cpp":
        from llmtags.engines.llamacpp import LlamaCppEngine

        engine_kwargs = {k: settings[k] for k in ("prefix_cache", "n_threads") if k in settings}
        llama = LlamaCppEngine.load("embedded", **engine_kwargs)
        llama.add_adapter(adapter, resolve_adapter(adapter))
        llama.use_adapter(adapter)
        llama.stop_on_repeat = settings.get("stop_on_repeat", True)
        return llama
    import torch
    from peft import PeftModel

    from llmtags.engines.transformers import TransformersEngine

    transformers_engine = TransformersEngine.load("embedded", device="cpu", dtype=settings.get("dtype", "auto"))
    model = PeftModel.from_pretrained(transformers_engine.model, str(resolve_adapter(adapter))).eval()
    if settings.get("merge"):
        model = model.merge_and_unload()
    if settings.get("int8") == "layers":  # keep the output projection (151,936 rows) in fp32
        model.model.layers = torch.ao.quantization.quantize_dynamic(model.model.layers, {torch.nn.Linear},
                                                                     dtype=torch.qint8)
    elif settings.get("int8"):
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if settings.get("compile"):
        model.forward = torch.compile(model.forward, dynamic=True)
    transformers_engine.model = model
    if settings.get("prompt_lookup"):
        transformers_engine.generate_kwargs = {"prompt_lookup_num_tokens": settings["prompt_lookup"]}
    return transformers_engine


def child(args: argparse.Namespace) -> None:
    from llmtags.engines.base import Generation
    from llmtags.report import EvalReport
    from llmtags.tagger import to_result

    engine_name, settings = TECHNIQUES[args.child]
    records, prompts, options = _records_and_prompts(args.data, args.n, args.adapter)
    engine = load(engine_name, settings, args.adapter)
    started = time.perf_counter()
    generations = []
    for chunk in chunked(prompts, 64, first=BATCH):
        generations += engine.generate(chunk, max_new_tokens=MAX_NEW_TOKENS, batch_size=settings.get("batch_size", BATCH))
    seconds = time.perf_counter() - started
    tags = [to_result(r, Generation(g.text, 0, g.new_tokens), options).tags for r, g in zip(records, generations)]
    report = EvalReport.from_records(records, tags, n_boot=50)
    tokens = sum(g.new_tokens for g in generations)
    print(json.dumps({"name": args.child, "engine": engine_name, "settings": settings, "products": len(records),
                      "seconds": seconds, "products_per_s": len(records) / seconds, "tokens_per_s": tokens / seconds,
                      "f1": report.scores("raw", "typed").micro.f1, "texts": [g.text for g in generations]}))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], n: int) -> str:
    lines = [f"# Speed techniques, one at a time: {n} zh-taobao-ner test products, embedded 0.5B + zh-taobao", "",
             *meta_lines(meta), "",
             "Each row changes one thing from its engine's defaults (the first row of each engine). "
             "`same texts`: outputs identical to that default's.", "",
             "| configuration | products/s | tokens/s | × engine default | F1 | same texts | measured |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['name']} | {r['failed']} | | | | | {r.get('date', '')} |")
            continue
        lines.append(f"| {r['name']} | {r['products_per_s']:.3f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['f1']:.3f} | {r['same_texts']}/{r['products']} | {r.get('date', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, 48, "bench_techniques")
    parser.add_argument("--only", nargs="+", help="run the configurations whose names contain one of these")
    parser.add_argument("--keep", type=Path, help="carry over the rows not run from this JSON")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    args = bench_args(parser, TECHNIQUES, child)
    if args is None:
        return
    names = [n for n in TECHNIQUES if not args.only or any(part in n for part in args.only)]
    rows: list[dict[str, Any]] = []
    previous = json.loads(args.keep.read_text(encoding="utf-8")) if args.keep and args.keep.is_file() else None
    # Ratios are to the engine's default: this run's, else the kept one.
    defaults = {engine: name for name, (engine, _) in reversed(list(TECHNIQUES.items()))}
    reference: dict[str, dict[str, Any]] = {
        r["engine"]: r for r in (previous or {}).get("rows", [])
        if "failed" not in r and defaults.get(r["engine"]) == r["name"] and r["name"] not in names}
    for name in names:
        row = run_child(__file__, name, args, args.timeout)
        if isinstance(row, str):
            rows.append({"name": name, "failed": row})
            print(f"{name}: {row}")
            continue
        base = reference.setdefault(row["engine"], row)
        row["speedup"] = row["products_per_s"] / base["products_per_s"]
        row["same_texts"] = sum(a == b for a, b in zip(row["texts"], base["texts"]))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "texts"}))
    meta = run_meta()
    for row in rows:
        row["date"] = meta["date"]
    if previous:
        rows += [{"date": previous["meta"]["date"], **r} for r in previous["rows"] if r["name"] not in names]
        rows.sort(key=lambda r: list(TECHNIQUES).index(r["name"]) if r["name"] in TECHNIQUES else len(TECHNIQUES))
    write_outputs(args.out, {"rows": rows, "n": args.n, "adapter": args.adapter, "meta": meta},
                  markdown(rows, meta, args.n))


if __name__ == "__main__":
    main()

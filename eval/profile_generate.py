"""Where the time of `llmtags generate` goes on the llama.cpp engine, and the memory-bandwidth bound.

    .venv/bin/python eval/profile_generate.py [--n 48]

Runs the engine's defaults (zh-taobao adapter, the first N zh-taobao-ner test products) under
cProfile and groups each function's own time: llama_decode (the model, in C), numpy (argmax,
log-softmax), constraints, the tokenizer (prompt encoding, decoding for offsets and repeated lines),
the engine's own bookkeeping (batch filling), and the rest. Then it measures this machine's memory copy bandwidth and sets the bytes of weights
each decode step reads against it. Writes eval/profile_generate.json and .md.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from typing import Any

from bench_generate import MAX_NEW_TOKENS, _records_and_prompts
from common import bench_parser, meta_lines, run_meta, write_outputs

from llmtags.tagger import chunked

MODEL = "llama_decode (the model, in C)"


def group_of(filename: str, function: str) -> str:
    """The part of the work a profiled function's own time belongs to."""
    if function == "llama_decode" and filename.endswith("profile_generate.py"):
        return MODEL
    if "numpy" in filename or "numpy" in function:
        return "numpy (argmax, log-softmax)"
    if filename.endswith("constrain.py"):
        return "constraints"
    if "tokeniz" in filename or "tokenizers" in function:
        return "tokenizer (encode prompts, decode offsets and lines)"
    if filename.endswith("engine_llamacpp.py"):
        return "engine bookkeeping (batch filling, sequences)"
    return "everything else"


class TimedLlama:
    """llama_cpp with llama_decode going through a Python frame, so cProfile sees its time."""

    def __init__(self, module: Any):
        self.module = module
        self.calls = 0
        self.tokens = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        self.calls += 1
        self.tokens += batch.n_tokens
        return self.module.llama_decode(ctx, batch)


def copy_bandwidth_gb_s(size: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes read plus written per second by a large numpy copy (the best of `repeats`)."""
    import numpy as np

    source, target = np.ones(size // 8), np.empty(size // 8)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * size / best / 1e9


def main() -> None:
    parser = bench_parser(__doc__, 48, "profile_generate")
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent (see ../shared/datasets/README.md)")
        return
    from llmtags.adapters.registry import resolve_adapter
    from llmtags.engines.llamacpp import LlamaCppEngine

    _, prompts, _ = _records_and_prompts(args.data, args.n, args.adapter)
    engine = LlamaCppEngine.load("embedded")
    engine.add_adapter(args.adapter, resolve_adapter(args.adapter))
    engine.use_adapter(args.adapter)
    timed = engine._llama = TimedLlama(engine._llama)
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    generations = []
    for chunk in chunked(prompts, 64, first=8):
        generations += engine.generate(chunk, max_new_tokens=MAX_NEW_TOKENS)
    profile.disable()
    total = time.perf_counter() - started
    seconds: dict[str, float] = {}
    for (filename, _, function), row in pstats.Stats(profile).stats.items():
        group = group_of(filename, function)
        seconds[group] = seconds.get(group, 0.0) + row[2]
    seconds = dict(sorted(seconds.items(), key=lambda item: -item[1]))
    steps = {"decode calls": timed.calls, "tokens evaluated": timed.tokens}
    new_tokens = sum(g.new_tokens for g in generations)
    weights_gb = engine.gguf_path.stat().st_size / 1e9  # the file it runs (Q8_0 by default: --weights)
    bandwidth = copy_bandwidth_gb_s()
    result = {
        "products": len(prompts), "seconds": total, "products_per_s": len(prompts) / total,
        "new_tokens": new_tokens, "tokens_per_s": new_tokens / total, "seconds_by_group": seconds, **steps,
        "gguf_gb": weights_gb, "copy_bandwidth_gb_s": bandwidth,
        "weight_reads_gb_s": steps["decode calls"] * weights_gb / seconds[MODEL],
        "meta": run_meta(),
    }
    lines = [f"# Where the time goes: llama.cpp engine, {len(prompts)} zh-taobao-ner test products, zh-taobao", "",
             *meta_lines(result["meta"]), "",
             f"{len(prompts)} products in {total:.1f} s ({result['products_per_s']:.2f} products/s, "
             f"{result['tokens_per_s']:.1f} new tokens/s, under cProfile, which slows the Python parts).", "",
             "| part (own time of its functions) | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {group} | {s:.1f} | {s / total:.0%} |" for group, s in seconds.items()]
    decode_s = seconds[MODEL]
    lines += ["", "Memory bandwidth bound:", "",
              f"- {steps['decode calls']} llama_decode calls evaluated {steps['tokens evaluated']} tokens "
              f"(prompts and new tokens): {steps['tokens evaluated'] / steps['decode calls']:.1f} tokens per call.",
              f"- Each call reads the weights once: {weights_gb:.2f} GB ({engine.gguf_path.name}). That is "
              f"{result['weight_reads_gb_s']:.1f} GB/s of weight reads over the {decode_s:.1f} s spent in llama_decode.",
              f"- Measured copy bandwidth: {bandwidth:.1f} GB/s (numpy copy, read + write). Weight reads use "
              f"{result['weight_reads_gb_s'] / bandwidth:.0%} of it: decoding here is bound by arithmetic "
              "(dequantising and multiplying on 2 cores), not by memory."]
    write_outputs(args.out, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

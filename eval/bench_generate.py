"""Throughput of tagging engines, side by side, on the same products, model and adapter.

    .venv/bin/python eval/bench_generate.py [--n 200] [--adapter zh-taobao] [--engines plain,llmtags,...]
        [--keep eval/bench_generate.json]

Engines (each in its own child process, so peak memory and load time are its own):
- plain:     transformers `generate()` per product at batch 1, no tricks (the floor);
- llmtags:   `llmtags generate --adapter NAME` with its defaults: `--engine auto`, which is llama.cpp
             on CPU when llama-cpp-python is installed (continuous batching of 8 sequences, shared
             prompt prefix evaluated once, stop at the end of the list or a repeated line);
- llmtags-transformers: the same with `--engine transformers` (length-sorted batches of 8);
- llama.cpp: llama-cpp-python's own high-level API (built from PyPI's source distribution), one
             product at a time, on the same GGUF llmtags runs (`engines.llamacpp.runtime_gguf`: the
             embedded Q4_K_M requantised to Q8_0 since 2026-12-06) with the adapter as a GGUF LoRA (converted
             by llama.cpp's convert_lora_to_gguf.py when $LLAMA_CPP_CONVERT_LORA names it, else by
             llmtags' converter);
- vllm:      vLLM with multi-LoRA; GPU only, skipped with the reason where absent.

`--keep FILE`: rows of engines not run this time are carried over from FILE, each with its own date.

Every engine gets the same prompts (the adapter's template and candidates, built by llmtags) and the
same greedy decoding with at most 64 new tokens; its text goes through the same parser, so the F1 of
each row shows whether its speed came with the same tags. Writes eval/bench_generate.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import bench_args, bench_parser, meta_lines, run_child, run_meta, write_outputs

from llmtags.tagger import chunked

ENGINES = ("plain", "llmtags", "llmtags-transformers", "llama.cpp", "vllm")
MAX_NEW_TOKENS = 64


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _records_and_prompts(data: Path, n: int, adapter: str) -> tuple[list[Any], list[str], Any]:
    from llmtags.models import load_tokenizer_only
    from llmtags.options import Settings
    from llmtags.plan import plan_run
    from llmtags.records import load_labelled
    from llmtags.tagger import build_prompt

    records = [r for r in load_labelled(data) if r.tags is not None][:n]
    options = plan_run(Settings(adapter=adapter)).options
    tokenizer = load_tokenizer_only("embedded")
    return records, [build_prompt(r, tokenizer, options) for r in records], options


# --- engines: each returns (texts, new token counts, seconds to the first text) ---------------------------


def run_plain(prompts: list[str], adapter_dir: Path) -> tuple[list[str], list[int], float]:
    import torch
    from peft import PeftModel

    from llmtags.models import load_model, load_tokenizer, resolve_base_model

    resolved = resolve_base_model("embedded")
    tokenizer = load_tokenizer(resolved)
    model = PeftModel.from_pretrained(load_model(resolved, device="cpu"), str(adapter_dir)).eval()
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    texts, counts, first = [], [], 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
        counts.append(int(new.shape[0]))
        first = first or time.perf_counter()
    return texts, counts, first


def run_llmtags(prompts: list[str], adapter: str, engine: str = "auto") -> tuple[list[str], list[int], float]:
    from llmtags.adapters.routing import load_adapter_set
    from llmtags.options import Settings
    from llmtags.plan import plan_run

    adapter_set = load_adapter_set(plan_run(Settings(adapter=adapter, engine=engine, template="tuned")))
    tagger_engine = adapter_set.engine(adapter)
    texts, counts, first = [], [], 0.0
    # generate's chunks: one batch first (for the first results), then 64 products per output append.
    for chunk in chunked(prompts, 64, first=8):
        generations = tagger_engine.generate(chunk, max_new_tokens=MAX_NEW_TOKENS, batch_size=8)
        texts += [g.text for g in generations]
        counts += [g.new_tokens for g in generations]
        first = first or time.perf_counter()
    return texts, counts, first


def gguf_lora(adapter_dir: Path) -> Path:
    """The adapter as a GGUF LoRA, converted once into the cache: by llama.cpp's own converter when
    $LLAMA_CPP_CONVERT_LORA names it, else by llmtags' (`gguf_export.lora_to_gguf`)."""
    from llmtags.adapters.registry import weights_sha256
    from llmtags.adapters.gguf_export import lora_to_gguf
    from llmtags.models import cache_root, resolve_base_model

    converter = os.environ.get("LLAMA_CPP_CONVERT_LORA")
    tool = "llama.cpp" if converter else "llmtags"
    out = cache_root() / "gguf" / f"lora-{weights_sha256(adapter_dir)[:12]}-{tool}.gguf"
    if out.is_file():
        return out
    if not converter:
        return lora_to_gguf(adapter_dir, out)
    base = resolve_base_model("embedded").location
    subprocess.run([sys.executable, converter, str(adapter_dir), "--base", base, "--outfile", str(out),
                    "--outtype", "f32"], check=True)
    return out


def run_llama_cpp(prompts: list[str], adapter_dir: Path) -> tuple[list[str], list[int], float]:
    import llama_cpp.llama_cpp as low_level
    from llama_cpp import Llama

    from llmtags.engines.llamacpp import model_params, runtime_gguf
    from llmtags.models import resolve_gguf_base

    # Llama() takes no switch for the AMX buffers that crash on AMX hosts: give it llmtags' safe defaults.
    default_params = low_level.llama_model_default_params
    low_level.llama_model_default_params = lambda: model_params(default_params)

    llm = Llama(model_path=str(runtime_gguf(resolve_gguf_base("embedded"))), lora_path=str(gguf_lora(adapter_dir)),
                n_ctx=1024, n_threads=os.cpu_count(), n_batch=512, verbose=False)
    texts, counts, first = [], [], 0.0
    for prompt in prompts:
        out = llm.create_completion(prompt, max_tokens=MAX_NEW_TOKENS, temperature=0.0, top_k=1,
                                    stop=["<|im_end|>", "<|endoftext|>"])
        texts.append(out["choices"][0]["text"])
        counts.append(out["usage"]["completion_tokens"])
        first = first or time.perf_counter()
    return texts, counts, first


def run_vllm(prompts: list[str], adapter_dir: Path) -> tuple[list[str], list[int], float]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from llmtags.models import resolve_base_model

    llm = LLM(model=resolve_base_model("embedded").location, enable_lora=True, max_lora_rank=64)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, stop=["<|im_end|>"])
    outputs = llm.generate(prompts, params, lora_request=LoRARequest("adapter", 1, str(adapter_dir)))
    first = time.perf_counter()
    return [o.outputs[0].text for o in outputs], [len(o.outputs[0].token_ids) for o in outputs], first


def skip_reason(engine: str) -> str | None:
    import importlib.util

    if engine == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install --no-binary llama-cpp-python llama-cpp-python)"
    if engine == "vllm":
        try:
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device: vLLM runs on GPU only"
        except ImportError:
            return "torch is not installed"
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not installed"
    return None


def child(args: argparse.Namespace) -> None:
    """Run one engine and print its measurements as JSON (the parent reads the last line)."""
    from llmtags.adapters.registry import resolve_adapter
    from llmtags.report import EvalReport
    from llmtags.tagger import to_result

    records, prompts, options = _records_and_prompts(args.data, args.n, args.adapter)
    adapter_dir = resolve_adapter(args.adapter)
    runner = {"plain": lambda: run_plain(prompts, adapter_dir), "llmtags": lambda: run_llmtags(prompts, args.adapter),
              "llmtags-transformers": lambda: run_llmtags(prompts, args.adapter, "transformers"),
              "llama.cpp": lambda: run_llama_cpp(prompts, adapter_dir), "vllm": lambda: run_vllm(prompts, adapter_dir)}
    started = time.perf_counter()
    texts, counts, first = runner[args.child]()
    seconds = time.perf_counter() - started
    from llmtags.engines.base import Generation

    tags = [to_result(r, Generation(t, 0, c), options).tags for r, t, c in zip(records, texts, counts)]
    report = EvalReport.from_records(records, tags, n_boot=200)
    result = {"engine": args.child, "products": len(records), "seconds": seconds,
              "products_per_s": len(records) / seconds, "new_tokens": sum(counts),
              "tokens_per_s": sum(counts) / seconds, "first_result_s": first - started,
              "peak_rss_mib": _peak_rss_mib(), "f1": report.scores("raw", "typed").micro.f1}
    try:
        import torch

        if torch.cuda.is_available():
            result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    print(json.dumps(result))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], n: int, adapter: str) -> str:
    base = {r["engine"]: r for r in rows if "products_per_s" in r}
    lines = [f"# Tagging throughput: {n} zh-taobao-ner test products, embedded 0.5B + {adapter}", "",
             *meta_lines(meta), "",
             "| engine | products/s | tokens/s | × plain | × llama.cpp | first result s | peak RSS MiB | F1 | measured |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['engine']} | skipped: {r['skipped']} | | | | | | | {r.get('date', '')} |")
            continue
        ratio = lambda other: (f"{r['products_per_s'] / base[other]['products_per_s']:.2f}"  # noqa: E731
                               if other in base else "–")
        lines.append(f"| {r['engine']} | {r['products_per_s']:.3f} | {r['tokens_per_s']:.1f} | {ratio('plain')} | "
                     f"{ratio('llama.cpp')} | {r['first_result_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['f1']:.3f} | "
                     f"{r.get('date', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, 200, "bench_generate")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--keep", type=Path, help="carry over the rows of engines not run from this JSON")
    args = bench_args(parser, ENGINES, child)
    if args is None:
        return
    rows = []
    for engine in args.engines.split(","):
        reason = skip_reason(engine)
        if reason:
            rows.append({"engine": engine, "skipped": reason})
            print(f"{engine}: skipped ({reason})")
            continue
        row = run_child(__file__, engine, args)
        if isinstance(row, str):
            rows.append({"engine": engine, "skipped": row})
            continue
        rows.append(row)
        print(json.dumps(row))
    meta = run_meta()
    for row in rows:
        row.setdefault("date", meta["date"])
    if args.keep and args.keep.is_file():
        run = {r["engine"] for r in rows}
        previous = json.loads(args.keep.read_text(encoding="utf-8"))
        kept = [{**r, "date": r.get("date", previous["meta"]["date"])} for r in previous["rows"] if r["engine"] not in run]
        rows = sorted(rows + kept, key=lambda r: ENGINES.index(r["engine"]) if r["engine"] in ENGINES else 99)
    write_outputs(args.out, {"rows": rows, "n": args.n, "adapter": args.adapter, "meta": meta},
                  markdown(rows, meta, args.n, args.adapter))


if __name__ == "__main__":
    main()

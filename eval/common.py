"""What every benchmark script under eval/ shares: where the data is, how a run is described, and
how results are written (JSON plus a Markdown table, with the command, machine and date)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATASETS = REPO.parent / "shared" / "datasets"
SETS = ("zh-taobao-ner", "en-oa-mine", "en-ae-110k", "en-wdc-pave")


def machine() -> str:
    cores = os.cpu_count()
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {cores} CPU cores"
    except ImportError:
        pass
    return f"{cores} CPU cores ({platform.machine()}{cpu_kind()}), no GPU"


def cpu_kind() -> str:
    """The CPU's model name and whether it computes bf16 natively, from /proc/cpuinfo where there is one:
    speeds differ by host (zh-taobao tagged 0.60, 0.83 and 1.06 products/s on three 2-core machines)."""
    from llmtags.models import cpu_flags, cpu_lacks_bf16

    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = cpu_flags(info) or []
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else \
        "no native bf16" if cpu_lacks_bf16(info) else ""
    return "".join(f", {part}" for part in (name, bf16) if part)


def code_version() -> str:
    """The commit the scripts and the library ran from, marked where tracked files differ from it: a
    figure is reproducible from that commit only."""
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def engine_defaults() -> str:
    """What runs the model when a script leaves it to `generate`'s defaults (--engine auto, --weights): the
    figures of llama.cpp with the base requantised to Q8_0 and those of the shipped Q4_K_M differ."""
    from llmtags.engines.base import DEFAULT_WEIGHTS
    from llmtags.engines.select import pick_engine

    engine = pick_engine()
    return engine + (f", base weights {DEFAULT_WEIGHTS} unless --option weights=... says otherwise"
                     if engine == "llama.cpp" else "")


def run_meta() -> dict[str, Any]:
    python = sys.executable
    if python.startswith(os.getcwd() + os.sep):
        python = os.path.relpath(python)
    return {
        "command": shlex.join([python, *sys.argv]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
        "engine": engine_defaults(),
    }


def meta_lines(meta: dict[str, Any]) -> list[str]:
    """The Markdown lines of `run_meta` (results written before "code" and "engine" were recorded lack them)."""
    return [f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- date: {meta['date']}",
            *([f"- code: {meta['code']}"] if "code" in meta else []),
            *([f"- engine: {meta['engine']}"] if "engine" in meta else [])]


def split_paths(data: Path, name: str, *splits: str) -> list[Path] | None:
    """The split files of one set, or None (with a message) when any is absent."""
    paths = [data / name / f"{split}.jsonl" for split in splits]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"skipped {name}: {', '.join(map(str, missing))} missing")
        return None
    return paths


def data_dir_or_skip(data: Path) -> bool:
    if data.is_dir():
        return True
    print(f"skipped: benchmark data folder {data} is absent (see its README for the sets)")
    return False


def write_outputs(out: Path, data: dict[str, Any], markdown: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown.rstrip() + "\n", encoding="utf-8")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def generate_predictions(data: Path, out: Path, adapter: str, changes: dict[str, Any], limit: int | None) -> float:
    """`llmtags generate --adapter ADAPTER` (with the setting `changes`, e.g. {"no_candidates": True}) over
    `data` into `out`, resuming whatever an earlier run left there (so a killed benchmark continues and a
    finished one costs nothing); returns wall seconds."""
    import time

    from llmtags.options import Settings
    from llmtags.run import generate_file

    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = generate_file(str(data), str(out), Settings(adapter=adapter, **changes), limit=limit or None, resume=True)
    if summary.interrupted:
        sys.exit(f"generating {data} into {out} was interrupted")
    return time.perf_counter() - started


def generated(data: Path, out: Path, adapter: str, changes: dict[str, Any], limit: int) -> tuple[dict, float | None]:
    """The predictions of one `llmtags generate --adapter ADAPTER` run with the setting `changes` (read by
    `calibrate.read_scored_predictions`: id → (tags, confidences)), and its own tagging rate, model loading
    excluded (None when the predictions came whole from an earlier run that left no rate). Resumes what an
    earlier run left in `out`; the rate is kept beside it (`OUT.rate.json`)."""
    from llmtags.calibrate import read_scored_predictions
    from llmtags.options import Settings
    from llmtags.run import generate_file

    rate_file = out.with_suffix(".rate.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = generate_file(str(data), str(out), Settings(adapter=adapter, **changes), limit=limit, resume=True)
    if summary.interrupted:
        sys.exit(f"generating {data} into {out} was interrupted")
    if summary.tagged and not summary.resumed:
        rate_file.write_text(json.dumps({"products_per_s": summary.products_per_second, "records": summary.tagged,
                                         "prompt_tokens": summary.prompt_tokens, "new_tokens": summary.new_tokens,
                                         "cascaded": summary.cascaded, "cut": summary.cut}))
    rate = json.loads(rate_file.read_text())["products_per_s"] if rate_file.is_file() else None
    return read_scored_predictions(out), rate


def with_candidates(changes: dict[str, Any], adapter: str, train: Path) -> dict[str, Any]:
    """A variant's `generate` settings `changes`, with candidates where it shows them (not `no_candidates`):
    the adapter's own vocabulary, or the set's train values for an adapter trained without one (zh-taobao
    since 2026-12-07), the dictionary an adapter with one was trained with."""
    from llmtags.adapters.registry import read_metadata, resolve_adapter

    own = (read_metadata(resolve_adapter(adapter)).get("vocabulary") or {}).get("candidates")
    return changes if own or changes.get("no_candidates") else {**changes, "candidates": str(train)}


def predictions_file(work: Path, split: str, variant: str, adapter: str) -> Path:
    """Where a variant's predictions live; the plain adapter run is shared by every script. The name
    holds the adapter's weights hash, so a retrained adapter starts a new file instead of resuming an
    old one (which `generate --resume` would refuse)."""
    from llmtags.adapters.registry import resolve_adapter, weights_sha256

    slug = variant.replace(" + ", "+").replace(", ", "-").replace(" ", "_")
    weights = weights_sha256(resolve_adapter(adapter))[:12]
    return work / f"{split}-{slug}-{Path(adapter).name}-{weights}.jsonl"


def settings_label(settings: dict[str, Any]) -> str:
    """A file-name part for a run's `generate` settings, naming a --demos sample by "demos", not its path, so
    scripts that run the same settings share one predictions file."""
    return ("-".join(f"{k}{v}" for k, v in sorted(settings.items()) if k != "demos")
            + ("demos" if settings.get("demos") else "own"))


def ablation_parser(doc: str, set_name: str | None = None, adapter: str | None = None,
                    adapter_option: bool = True) -> Any:
    """The arguments the ablation scripts share: which set and adapter (required unless given a default
    here; no --adapter with `adapter_option` false, for scripts whose runs each name their own), the data,
    where predictions are kept (--work), the bootstrap and the output."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--set", required=set_name is None, default=set_name)
    if adapter_option:
        parser.add_argument("--adapter", required=adapter is None, default=adapter)
    parser.add_argument("--data", type=Path, default=DATASETS)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    return parser


def setting(text: str) -> tuple[str, Any]:
    """`--option max_new_tokens=128` → ("max_new_tokens", 128): a `Settings` field and its value."""
    key, _, value = text.partition("=")
    try:
        return key.replace("-", "_"), json.loads(value)
    except ValueError:
        return key.replace("-", "_"), value


def run_parser(doc: str, limit: int = 200, adapter: str | None = None, adapter_option: bool = True) -> Any:
    """`ablation_parser` and what scripts that run an adapter over a set's first records share: --limit,
    --demos (a new catalogue's labelled sample: workflow (a)) and --option KEY=VALUE (see `run_settings`)."""
    parser = ablation_parser(doc, adapter=adapter, adapter_option=adapter_option)
    parser.add_argument("--limit", type=int, default=limit)
    parser.add_argument("--demos", type=Path, help="a new catalogue's labelled sample (workflow (a))")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="another generate setting for every run, e.g. demo_text=title (repeatable)")
    return parser


def run_settings(args: Any) -> dict[str, Any]:
    """The `generate` settings `run_parser`'s --demos and --option give, as `Settings` keywords."""
    # The sample by its absolute path: runs recorded with it resume whichever way it was spelt.
    return {**({"demos": str(Path(args.demos).resolve())} if args.demos else {}), **dict(map(setting, args.option))}


def write_result(out: Path, result: dict[str, Any], markdown: str) -> None:
    """`write_outputs` of a result holding numpy numbers (as plain floats)."""
    write_outputs(out, json.loads(json.dumps(result, default=float)), markdown)


def bench_parser(doc: str, n: int, out: str) -> Any:
    """The arguments the speed benchmarks share: which products (the first N of a zh test file),
    which adapter, where to write."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATASETS / "zh-taobao-ner" / "test.jsonl")
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--adapter", default="zh-taobao")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / out)
    return parser


def run_child(script: str, name: str, args: Any, timeout: float | None = None) -> dict[str, Any] | str:
    """Run `script --child name` (one measurement, in a process of its own so memory and load time
    are its own) and return the JSON it printed last, or why it failed."""
    import subprocess

    command = [sys.executable, script, "--child", name, "--n", str(args.n), "--adapter", args.adapter,
               "--data", str(args.data)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"over {timeout:.0f} s"
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return f"failed: {(done.stderr.strip().splitlines() or ['no output'])[-1][:200]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_args(parser: Any, children: Any, child: Any) -> Any:
    """Parse the arguments. In a child process, run `child(args)` and return None; without the
    data, say so and return None; else return the arguments for the parent."""
    import argparse

    parser.add_argument("--child", choices=children, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return None
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent (see ../shared/datasets/README.md)")
        return None
    return args

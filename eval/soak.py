"""Soak test: `llmtags generate` over many varied records, killed with SIGKILL at random moments and
resumed until done; then nothing may be lost, duplicated or misreported, and memory must stay flat.

    OMP_NUM_THREADS=1 .venv/bin/python eval/soak.py [--records 10000] [--seed 0] [--max-kills 15]

Records are synthetic but varied: Chinese and English, titles to long descriptions (some beyond the
2,000 characters kept), string and integer ids, exact duplicate lines, and about 5% malformed lines of
nine kinds. The model is a tiny random Qwen2 built on the spot (`llmtags.testing.tiny_qwen2`), decoding
4 new tokens, so the run measures the pipeline, not a model. The generate process's resident memory is
read from /proc/PID/status while it runs. Writes eval/soak.json and eval/soak.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import REPO, meta_lines, run_meta, write_outputs

from llmtags.records import clean_text

ZH_BRANDS = ["理肤泉", "兰蔻", "耐克", "得力", "宜家", "小米", "华为", "李宁", "安踏", "雅诗兰黛", "三只松鼠", "美的"]
ZH_PRODUCTS = ["防晒霜", "精华液", "跑步鞋", "中性笔", "书架", "手机", "蓝牙耳机", "卫衣", "坚果礼盒", "电饭煲", "保温杯"]
ZH_ATTRS = ["黑色", "白色", "50ml", "大容量", "透气", "轻薄", "2024新款", "男女同款", "官方正品", "包邮", "敏感肌适用"]
EN_BRANDS = ["Diesel", "Nike", "KitchenAid", "LEGO", "Adidas", "Sony", "Levi's", "Patagonia", "Dyson", "Bose"]
EN_PRODUCTS = ["sneaker", "stand mixer", "building set", "running shoe", "headphones", "jeans", "jacket", "vacuum"]
EN_ATTRS = ["black", "size 10", "waterproof", "wireless", "slim fit", "5-quart", "cordless", "recycled", "men's"]
SENTENCES_ZH = ["采用优质材料制作，做工精细。", "适合日常通勤与运动使用。", "多种颜色可选，满足不同需求。",
                "本店所有商品均为正品，支持七天无理由退换。", "<p>详情请见图片</p>&nbsp;"]
SENTENCES_EN = ["Made from premium materials with careful stitching.", "Great for everyday use and travel.",
                "Available in several colours &amp; sizes.", "<br/>Ships within 24 hours.", "Machine washable."]
MALFORMED_KINDS = ["truncated", "invalid_utf8", "wrong_type", "missing_text", "empty_text", "bad_id",
                   "dup_conflict", "not_object", "nul_block"]


def _text(rng: random.Random) -> str:
    zh = rng.random() < 0.55
    brands, products, attrs, sentences = (ZH_BRANDS, ZH_PRODUCTS, ZH_ATTRS, SENTENCES_ZH) if zh else (
        EN_BRANDS, EN_PRODUCTS, EN_ATTRS, SENTENCES_EN)
    sep = "" if zh and rng.random() < 0.5 else " "
    title = sep.join([rng.choice(brands), *rng.sample(attrs, rng.randint(0, 4)), rng.choice(products)])
    shape = rng.random()
    if shape < 0.6:  # a title
        return title
    n = rng.randint(2, 12) if shape < 0.97 else rng.randint(60, 200)  # a description; 3% past 2,000 chars
    return title + " " + " ".join(rng.choice(sentences) for _ in range(n))


def make_input(path: Path, n: int, seed: int, malformed_rate: float = 0.05) -> dict[str, Any]:
    """Write `n` lines; return what a correct run must do with them."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    valid: list[str] = []  # ids of valid records, in input order, each once
    valid_lines: list[bytes] = []
    texts: dict[str, str] = {}
    malformed: dict[int, str] = {}  # line number -> kind
    duplicates = 0
    while len(lines) < n:
        number = len(lines) + 1
        if rng.random() < malformed_rate:
            kind = MALFORMED_KINDS[len(malformed) % len(MALFORMED_KINDS)]
            if kind == "dup_conflict" and not valid:
                continue
            text = _text(rng)
            line = {
                "truncated": lambda: (lambda b: b[: rng.randint(1, len(b) - 1)])(
                    json.dumps({"id": f"t{number}", "text": text}, ensure_ascii=False).encode()),
                "invalid_utf8": lambda: b'{"id": "u%d", "text": "Caf\xe9 ' % number + text.encode() + b'"}',
                "wrong_type": lambda: json.dumps({"id": f"w{number}", "text": rng.choice([42, [text], {"t": text}])})
                .encode(),
                "missing_text": lambda: json.dumps({"id": f"m{number}", "title": text}).encode(),
                "empty_text": lambda: json.dumps({"id": f"e{number}", "text": rng.choice(["", "   ", "\u200b"])})
                .encode(),
                "bad_id": lambda: json.dumps({"id": rng.choice([True, 2.5, ["x"]]), "text": text}).encode(),
                "dup_conflict": lambda: json.dumps({"id": rng.choice(valid), "text": text + " (changed)"},
                                                   ensure_ascii=False).encode(),
                "not_object": lambda: rng.choice([b"[1, 2]", b"null", b'"text"', b"17"]),
                "nul_block": lambda: b"\x00" * rng.randint(1, 80),
            }[kind]()
            lines.append(line)
            malformed[number] = kind
            continue
        if valid_lines and rng.random() < 0.005:  # an exact copy of an earlier valid line: dropped silently
            lines.append(rng.choice(valid_lines[-50:]))
            duplicates += 1
            continue
        record_id: Any = f"s{number}" if rng.random() < 0.7 else 10_000_000 + number
        text = _text(rng)
        row = {"id": record_id, "text": text}
        if rng.random() < 0.3:
            row["category"] = rng.choice(["美妆", "Shoes", "文具", "Home", "数码"])
        lines.append(json.dumps(row, ensure_ascii=False).encode())
        valid_lines.append(lines[-1])
        valid.append(str(record_id))
        texts[str(record_id)] = text
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {"valid": valid, "malformed": malformed, "exact_duplicates": duplicates,
            "truncated": sum(len(clean_text(t)) > 2000 for t in texts.values())}


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB, from /proc (psutil is not needed)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    values[key] = int(value.split()[0])
    except OSError:
        pass
    return values


class LineCounter:
    """Newlines in a growing file, read incrementally."""

    def __init__(self, path: Path):
        self.path, self.offset, self.count = path, 0, 0

    def update(self) -> int:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # cut back by a torn-line repair
                    self.offset, self.count = 0, 0
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        self.offset += len(data)
        self.count += data.count(b"\n")
        return self.count


def run_until_done(command: list[str], out: Path, total: int, seed: int, max_kills: int,
                   kill_window: tuple[float, float]) -> dict[str, Any]:
    rng = random.Random(seed + 1)
    counter = LineCounter(out)
    runs: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []  # progress-indexed memory samples, over all runs
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    started = time.perf_counter()
    while True:
        kill_at = rng.uniform(*kill_window) if len(runs) < max_kills else None
        before = counter.update()
        t0 = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        peak = 0
        while process.poll() is None:
            elapsed = time.perf_counter() - t0
            status = _status(process.pid)
            done = counter.update()
            if status:
                peak = max(peak, status.get("VmHWM", 0))
                samples.append({"run": len(runs) + 1, "t": round(time.perf_counter() - started, 2),
                                "done": done, "rss_kb": status.get("VmRSS", 0)})
            if kill_at is not None and elapsed >= kill_at:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.2)
        stderr = process.stderr.read().decode("utf-8", "replace") if process.stderr else ""
        after = counter.update()
        runs.append({"run": len(runs) + 1, "killed_after_s": round(kill_at, 1) if process.returncode == -9 else None,
                     "exit": process.returncode, "seconds": round(time.perf_counter() - t0, 1),
                     "lines_before": before, "lines_after": after, "peak_rss_kb": peak})
        print(f"run {len(runs)}: exit {process.returncode}, {before} -> {after} of {total} lines, "
              f"peak RSS {peak / 1024:.0f} MiB", file=sys.stderr)
        if process.returncode == 0:
            runs[-1]["summary"] = [line for line in stderr.splitlines()
                                   if line.startswith("llmtags:") and "skipped record" not in line]
            break
        if process.returncode != -signal.SIGKILL:
            raise SystemExit(f"generate failed with exit {process.returncode}:\n{stderr[-3000:]}")
    return {"runs": runs, "samples": samples, "seconds": round(time.perf_counter() - started, 1)}


def verify(expected: dict[str, Any], out: Path, errors: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in out.read_bytes().splitlines()]  # raises on any torn line
    ids = [str(r["id"]) for r in rows]
    counts = Counter(ids)
    valid = expected["valid"]
    reported = [json.loads(line) for line in errors.read_bytes().splitlines()]
    numbers = Counter(r["record"] for r in reported)
    malformed = expected["malformed"]
    return {
        "records_out": len(rows),
        "duplicates": sorted(i for i, c in counts.items() if c > 1),
        "losses": [i for i in valid if i not in counts],
        "unexpected": sorted(set(counts) - set(valid)),
        "in_input_order": ids == valid,
        "malformed_reported_once": sum(1 for n in malformed if numbers.get(n) == 1),
        "malformed_missing": sorted(n for n in malformed if n not in numbers),
        "malformed_reported_twice": sorted(n for n, c in numbers.items() if c > 1),
        "reported_but_not_malformed": sorted(n for n in numbers if n not in malformed),
        "errors_lines": len(reported),
    }


def memory_at(samples: list[dict[str, Any]], total: int, fractions=(0.1, 0.5, 0.9)) -> dict[str, Any]:
    """RSS of the generate process when the output first held each fraction of the records."""
    at = {}
    for p in fractions:
        sample = next((s for s in samples if s["done"] >= p * total and s["rss_kb"]), None)
        at[f"{int(p * 100)}%"] = sample and {"rss_mib": round(sample["rss_kb"] / 1024, 1), "run": sample["run"],
                                            "done": sample["done"]}
    return at


def memory_within(samples: list[dict[str, Any]], run: int, fractions=(0.1, 0.5, 0.9)) -> dict[str, Any]:
    """RSS of one process at fractions of the records it wrote itself: flat if nothing accumulates."""
    own = [s for s in samples if s["run"] == run and s["rss_kb"]]
    if not own:
        return {}
    start, end = own[0]["done"], own[-1]["done"]
    at = {}
    for p in fractions:
        sample = next((s for s in own if s["done"] > start and s["done"] >= start + p * (end - start)), None)
        at[f"{int(p * 100)}%"] = sample and {"rss_mib": round(sample["rss_kb"] / 1024, 1), "run": run,
                                            "done": sample["done"]}
    return at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kills", type=int, default=15)
    parser.add_argument("--kill-window", type=float, nargs=2, default=(2.0, 20.0),
                        help="each run is killed this many seconds after it starts (uniform, seeded)")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--out", default=str(REPO / "eval" / "soak"), help="writes OUT.json and OUT.md")
    args = parser.parse_args()

    from llmtags.testing import tiny_qwen2

    with tempfile.TemporaryDirectory(prefix="llmtags-soak-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        source, out, errors = work / "in.jsonl", work / "out.jsonl", work / "errors.jsonl"
        for path in (out, errors):
            path.unlink(missing_ok=True)
        model = tiny_qwen2(work / "tiny-qwen2")
        expected = make_input(source, args.records, args.seed)
        command = [sys.executable, "-m", "llmtags.cli", "generate", str(source), "-o", str(out),
                   "--errors", str(errors), "--resume", "--base-model", str(model),
                   "--max-new-tokens", "4", "--chunk-size", "64", "-q"]
        print(f"{args.records} lines, {len(expected['valid'])} valid, {len(expected['malformed'])} malformed",
              file=sys.stderr)
        run = run_until_done(command, out, len(expected["valid"]), args.seed, args.max_kills, tuple(args.kill_window))
        checks = verify(expected, out, errors)

    valid = len(expected["valid"])
    kinds = Counter(expected["malformed"].values())
    peaks = [r["peak_rss_kb"] / 1024 for r in run["runs"] if r["peak_rss_kb"]]
    memory = memory_at(run["samples"], valid)
    longest = max(run["runs"], key=lambda r: r["lines_after"] - r["lines_before"])
    memory_longest = memory_within(run["samples"], longest["run"])
    last = run["runs"][-1]
    ok = (checks["records_out"] == valid and not checks["duplicates"] and not checks["losses"]
          and not checks["unexpected"] and checks["in_input_order"]
          and checks["malformed_reported_once"] == len(expected["malformed"])
          and not checks["reported_but_not_malformed"])
    meta = run_meta()
    command_shown = " ".join(c.replace(str(work) + "/", "WORK/") for c in command[1:])
    data = {
        **meta,
        "generate_command": command_shown,
        "passed": ok,
        "input": {"lines": args.records, "valid": valid, "malformed": len(expected["malformed"]),
                  "malformed_kinds": dict(sorted(kinds.items())), "exact_duplicates": expected["exact_duplicates"],
                  "texts_over_2000_chars": expected["truncated"]},
        "kills": sum(1 for r in run["runs"] if r["exit"] == -signal.SIGKILL),
        "runs": run["runs"],
        "seconds": run["seconds"],
        "checks": checks,
        "memory": {"rss_at_progress": memory, "longest_run": longest["run"],
                   "rss_at_progress_of_longest_run": memory_longest,
                   "peak_rss_mib_per_run": [round(p, 1) for p in peaks]},
        "rss_samples": run["samples"][:: max(1, len(run["samples"]) // 400)],
    }
    lines = [
        "# Soak: generate killed at random moments and resumed",
        "",
        *meta_lines(meta),
        f"- generate: `llmtags {command_shown.split(' ', 2)[-1]}` (WORK: a temporary folder)",
        "- model: tiny random 2-layer Qwen2 (`llmtags.testing.tiny_qwen2`), 4 new tokens: the figures measure "
        "the pipeline, not a model",
        "",
        f"**{'PASSED' if ok else 'FAILED'}**: {args.records} input lines, {valid} valid records; "
        f"{data['kills']} SIGKILLs at random moments (seed {args.seed}), {len(run['runs'])} runs, "
        f"{run['seconds']:.0f} s in all.",
        "",
        "| check | value |",
        "|---|---|",
        f"| valid records in | {valid} |",
        f"| records out | {checks['records_out']} |",
        f"| duplicates (ids written twice) | {len(checks['duplicates'])} |",
        f"| losses (valid ids missing) | {len(checks['losses'])} |",
        f"| unexpected ids | {len(checks['unexpected'])} |",
        f"| output in input order | {'yes' if checks['in_input_order'] else 'no'} |",
        f"| malformed lines ({len(expected['malformed'])}) in the errors file exactly once | "
        f"{checks['malformed_reported_once']} |",
        f"| malformed lines missing / reported twice | {len(checks['malformed_missing'])} / "
        f"{len(checks['malformed_reported_twice'])} |",
        f"| valid lines reported as errors | {len(checks['reported_but_not_malformed'])} |",
        f"| exact duplicate lines (dropped, not errors) | {expected['exact_duplicates']} |",
        "",
        "Malformed kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ".",
        "",
        "## Memory (resident set of the generate process, /proc/PID/status)",
        "",
        "| progress | RSS MiB | run | records done |",
        "|---|---|---|---|",
        *[f"| {p} | {m['rss_mib']} | {m['run']} | {m['done']} |" if m else f"| {p} | - | - | - |"
          for p, m in memory.items()],
        "",
        f"Each resumed run is a fresh process, so the table above mixes processes. Within the longest "
        f"single process (run {longest['run']}, records {longest['lines_before']} → {longest['lines_after']}), "
        "at 10%, 50% and 90% of the records it wrote: "
        + ", ".join(f"{m['rss_mib']} MiB ({m['done']} done)" for m in memory_longest.values() if m) + ".",
        "",
        f"Peak RSS per run (VmHWM, including the model load), MiB: {', '.join(f'{p:.0f}' for p in peaks)}.",
        "",
        "## Runs",
        "",
        "| run | killed after s | exit | lines before → after | peak RSS MiB |",
        "|---|---|---|---|---|",
        *[f"| {r['run']} | {r['killed_after_s'] if r['killed_after_s'] is not None else '-'} | {r['exit']} | "
          f"{r['lines_before']} → {r['lines_after']} | {r['peak_rss_kb'] / 1024:.0f} |" for r in run["runs"]],
        "",
        "Final run summary: " + " / ".join(f"`{s}`" for s in last.get("summary", [])),
    ]
    write_outputs(Path(args.out), data, "\n".join(lines))
    if not ok:
        raise SystemExit("soak FAILED: see the checks above")


if __name__ == "__main__":
    main()

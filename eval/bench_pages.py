"""How fast the HTML reports open: an eval page and a prompt-compare page for 1,000 records, loaded from
disk in headless Chromium.

    .venv/bin/python eval/bench_pages.py [--n 1000] [--repeats 5]

The pages are built by `pages.eval_page` and `pages.compare_page` from 1,000 zh-taobao-ner train records:
two variants whose predictions come from dictionary baselines (one built from the dev split, one from
test), each record's prompt rendered by the real `tuned` template with 4 retrieved demonstrations (so
the page is as large as a real comparison with retrieval). No model runs: this measures the page, not
tagging.

Opening time: wall time of `chromium --headless --screenshot` (parse, script, layout and paint of the
whole page) minus the same for an empty page, the median of `--repeats` runs each. Writes
eval/bench_pages.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATASETS, REPO, meta_lines, run_meta, write_outputs

from llmtags.baselines import DictionaryTagger
from llmtags.evaluate import VariantResult, comparison_of
from llmtags.metrics import bootstrap_prf_counts
from llmtags.models import load_tokenizer_only
from llmtags.options import TaggingOptions
from llmtags.pages import compare_page, eval_page
from llmtags.prompts import load_template
from llmtags.records import load_labelled
from llmtags.report import EvalReport
from llmtags.retrieve import load_pool
from llmtags.tagger import build_prompt


def open_seconds(chromium: str, page: Path, repeats: int) -> float:
    """The median wall time of loading, running and painting `page` in headless Chromium."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--hide-scrollbars", "--window-size=1300,1000", f"--screenshot={tmp}/shot.png",
                            page.resolve().as_uri()], capture_output=True, check=True, timeout=120)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def build_pages(n: int, out_dir: Path) -> dict[str, Path]:
    records = load_labelled(DATASETS / "zh-taobao-ner" / "train.jsonl")[:n]
    variants = []
    for split in ("dev", "test"):
        tagger = DictionaryTagger.from_records(load_labelled(DATASETS / "zh-taobao-ner" / f"{split}.jsonl"))
        report = EvalReport.from_records(records, tagger.tag_many([r.text for r in records]), name=f"dictionary {split}")
        counts = report.views["raw"]["typed"].counts
        variants.append(VariantResult(f"dictionary from {split}", "-" * 12, report, [], 0.0, 0.0, 0.0,
                                      bootstrap_prf_counts(counts)))
    comparison = comparison_of(records, variants)
    tokenizer = load_tokenizer_only(None)
    options = TaggingOptions(template=load_template("tuned"), pool=load_pool(str(DATASETS / "zh-taobao-ner" /
                                                                                "train.jsonl")), retrieve=4)
    prompts = [build_prompt(r, tokenizer, options) for r in records]
    pages = {"eval": out_dir / "eval.html", "compare": out_dir / "compare.html", "empty": out_dir / "empty.html"}
    pages["eval"].write_text(eval_page(variants[0].report, worst=50), encoding="utf-8")
    pages["compare"].write_text(compare_page(comparison, records, [prompts, prompts]), encoding="utf-8")
    pages["empty"].write_text("<!DOCTYPE html><html><body></body></html>", encoding="utf-8")
    return pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not DATASETS.is_dir():
        print("skipped: needs Chromium (apt install chromium) and ../shared/datasets")
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        pages = build_pages(args.n, Path(tmp))
        open_seconds(chromium, pages["empty"], 2)  # warm-up: Chromium's first start reads its files from disk
        empty = open_seconds(chromium, pages["empty"], args.repeats)
        rows = [{"page": name, "records": args.n, "kib": round(path.stat().st_size / 1024),
                 "seconds": round(open_seconds(chromium, path, args.repeats), 3)} for name, path in pages.items()
                if name != "empty"]
    for row in rows:
        row["seconds_over_empty"] = round(row["seconds"] - empty, 3)
    meta = run_meta()
    lines = ["# HTML reports: time to open a page of 1,000 records", "", *meta_lines(meta),
             f"- method: median of {args.repeats} runs of `chromium --headless --screenshot` (load from disk, run "
             f"the page's script, lay out and paint), minus the same for an empty page ({empty:.3f} s: Chromium's "
             "own start)", "- pages: `pages.eval_page` and `pages.compare_page` on the first 1,000 zh-taobao-ner train "
             "records, two dictionary-baseline variants, every record's `tuned` prompt with 4 retrieved "
             "demonstrations", "", "| page | records | size (KiB) | wall s | s over an empty page |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['page']} | {r['records']} | {r['kib']} | {r['seconds']:.3f} | **{r['seconds_over_empty']:.3f}** |"
              for r in rows]
    write_outputs(REPO / "eval" / "bench_pages", {"rows": rows, "empty_page_seconds": round(empty, 3),
                                                    "meta": meta}, "\n".join(lines))


if __name__ == "__main__":
    main()

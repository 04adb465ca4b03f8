"""Alternating fresh `generate` runs: how the speed benchmarks compare variants on this machine.

This machine's speed drifts by 10-30% within an hour, so two runs made one after the other can show any
speed-up from 1.0 to 1.4. Each round runs every variant once, fresh (nothing resumed), over the same
records, and the order turns round by round; the speed-up of a variant is the median of the rounds'
ratios to the first variant. F1 comes from the first round (greedy decoding tags the same in every round:
checked, `same_across_rounds`). Used by eval/bench_weights.py and eval/bench_variants.py.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import generated

from llmtags.adapters.registry import resolve_adapter, weights_sha256
from llmtags.metrics import bootstrap_ci, paired_bootstrap, score
from llmtags.records import Record


@dataclass(frozen=True)
class Variant:
    """One way of running `generate`: its name in the table, the adapter (None: the base model alone) and
    the settings that differ from the adapter's defaults."""

    name: str
    adapter: str | None
    settings: dict[str, Any]


def adapter_sha256(adapter: str | None) -> str | None:
    """The sha256 of the adapter's weights, so a result says which ran even after a name points elsewhere."""
    return None if adapter is None else weights_sha256(resolve_adapter(adapter))


def alternate(data: Path, records: list[Record], variants: list[Variant], rounds: int, work: Path,
              n_boot: int = 1000) -> dict[str, Any]:
    """Run each variant `rounds` times over `records` (the first records of `data`), the order turned each
    round, and score them; rows in the order of `variants`, each against the first."""
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must differ: {', '.join(names)}")
    gold = [r.tags for r in records]
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    answers: dict[str, list[list[str]]] = {}
    same_across_rounds = True
    for round_ in range(rounds):
        numbered = list(enumerate(variants))
        for index, variant in numbered if round_ % 2 == 0 else numbered[::-1]:
            out = work / f"variant-{index}.jsonl"
            for stale in (out, out.with_suffix(".rate.json"), Path(f"{out}.settings.json")):
                stale.unlink(missing_ok=True)  # a fresh run each time: its rate is the measurement
            found, rate = generated(data, out, variant.adapter, variant.settings, len(records))
            if rate is None:
                raise SystemExit(f"{out}: the run left no products/s")
            rates[variant.name].append(rate)
            tags = [found.get(r.id, ([], []))[0] for r in records]
            same_across_rounds &= answers.setdefault(variant.name, tags) == tags
    first = variants[0].name
    rows = []
    for variant in variants:
        micro = score(gold, answers[variant.name]).micro
        row = {"variant": variant.name, "adapter": variant.adapter, "adapter_sha256": adapter_sha256(variant.adapter),
               "settings": variant.settings,
               "products_per_s": rates[variant.name], "precision": micro.precision, "recall": micro.recall,
               "f1": micro.f1, "f1_ci95": list(bootstrap_ci(gold, answers[variant.name], n=n_boot))}
        if variant.name != first:
            row["vs_first"] = paired_bootstrap(gold, answers[first], answers[variant.name], n=n_boot).to_json()
            row["same_tags"] = sum(a == b for a, b in zip(answers[first], answers[variant.name])) / len(records)
            row["speedup"] = statistics.median(b / a for a, b in zip(rates[first], rates[variant.name]))
        rows.append(row)
    return {"records": len(records), "rounds": rounds, "same_across_rounds": same_across_rounds, "rows": rows}


def table(result: dict[str, Any], column: str) -> list[str]:
    """The Markdown lines that say how the runs were made, and the table of `alternate`'s rows, whose first
    column is headed `column`."""
    first = result["rows"][0]["variant"]
    lines = [f"- products/s: {result['rounds']} rounds of fresh `generate` runs in one process, one after the other, "
             "the order turned each round (this machine's speed drifts), model loading excluded; nothing else ran "
             "on the machine; speed-up: the median of the rounds' ratios"
             + ("" if result["same_across_rounds"] else "; **the tags differed between rounds**"), "",
             f"| {column} | P | R | F1 | 95% CI | ΔF1 vs {first} [95% CI] | same tags | products/s | speed-up |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for row in result["rows"]:
        vs = row.get("vs_first")
        delta = f"{vs['delta_f1']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}]" if vs else "–"
        same = f"{row['same_tags']:.0%}" if "same_tags" in row else "–"
        speedup = f"{row['speedup']:.2f}×" if "speedup" in row else "–"
        lines.append(f"| {row['variant']} | {row['precision']:.3f} | {row['recall']:.3f} | **{row['f1']:.3f}** | "
                     f"{row['f1_ci95'][0]:.3f}–{row['f1_ci95'][1]:.3f} | "
                     f"{delta} | {same} | {' / '.join(f'{r:.2f}' for r in row['products_per_s'])} | {speedup} |")
    return lines

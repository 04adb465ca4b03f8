"""Is a tag's confidence (grounding.py) a probability of being right? Measure it on labelled dev data
and pick the confidence threshold that reaches a target precision.

- Each predicted tag is an outcome (confidence, correct), correct meaning it matched a gold tag under
  the evaluator's typed matching (metrics.match_record).
- The reliability table puts outcomes into equal-width confidence bins and compares, per bin, the
  mean confidence with the share that is correct; the expected calibration error (ECE) is the
  outcome-weighted mean of their gaps.
- `pick_threshold` returns the lowest threshold whose kept tags reach the target precision (so recall
  is as high as it can be at that precision), over the dev set's micro counts.

`llmtags calibrate --gold dev.jsonl --pred dev_pred.jsonl --adapter NAME` stores the result in the
adapter's llmtags.json; `generate --adapter NAME --min-confidence calibrated` then applies it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .evaluate import read_prediction_rows
from .isotonic import equal_width_bins, mean_gap
from .metrics import GoldTag, match_record, prf
from .records import load_labelled


@dataclass(frozen=True)
class Outcome:
    confidence: float | None
    correct: bool


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    count: int
    mean_confidence: float
    accuracy: float


@dataclass(frozen=True)
class ThresholdPoint:
    threshold: float
    precision: float
    recall: float
    f1: float
    kept: int


@dataclass
class Calibration:
    records: int
    gold_tags: int
    outcomes: int
    bins: list[ReliabilityBin]
    ece: float
    target_precision: float
    threshold: float | None  # None: no threshold reaches the target
    at_threshold: ThresholdPoint | None
    unfiltered: ThresholdPoint
    best_f1: ThresholdPoint

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [f"{self.records} records, {self.outcomes} predicted tags, {self.gold_tags} gold tags. "
                 f"Expected calibration error (ECE): **{self.ece:.3f}**.", "",
                 "| confidence | tags | mean confidence | correct |", "|---|---|---|---|"]
        lines += [f"| {b.low:.1f}–{b.high:.1f} | {b.count} | {b.mean_confidence:.3f} | {b.accuracy:.3f} |"
                  for b in self.bins if b.count]
        lines += ["", "| threshold | P | R | F1 | tags kept |", "|---|---|---|---|---|"]
        points = [("none", self.unfiltered), ("best F1", self.best_f1)]
        if self.at_threshold is not None:
            points.insert(1, (f"P ≥ {self.target_precision:.2f}", self.at_threshold))
        for label, p in points:
            lines.append(f"| {label}: {p.threshold:.3f} | {p.precision:.3f} | {p.recall:.3f} | {p.f1:.3f} | {p.kept} |")
        if self.threshold is None:
            lines += ["", f"No threshold reaches precision {self.target_precision:.2f} on this data."]
        return "\n".join(lines) + "\n"


def tag_outcomes(golds: Sequence[Sequence[GoldTag]], preds: Sequence[Sequence[str]],
                 confidences: Sequence[Sequence[float | None]]) -> tuple[list[Outcome], int]:
    """(one outcome per distinct predicted tag, number of gold tags) under typed matching."""
    outcomes: list[Outcome] = []
    gold_total = 0
    for gold, pred, conf in zip(golds, preds, confidences):
        counts = match_record(gold, pred)
        gold_total += counts.tp + counts.fn
        right = {p for _, p in counts.matched}
        seen: set[str] = set()
        for tag, c in zip(pred, conf):
            if tag in seen or (tag not in right and tag not in counts.spurious):
                continue  # a duplicate of an earlier prediction: the evaluator counts it once
            seen.add(tag)
            outcomes.append(Outcome(c, tag in right))
    return outcomes, gold_total


def reliability(outcomes: Sequence[Outcome], n_bins: int = 10) -> tuple[list[ReliabilityBin], float]:
    """The reliability table and the ECE over outcomes that have a confidence."""
    pairs = [(o.confidence, o.correct) for o in outcomes if o.confidence is not None]
    return [ReliabilityBin(*row) for row in equal_width_bins(pairs, n_bins)], mean_gap(pairs, n_bins)


def at_threshold(outcomes: Sequence[Outcome], gold_total: int, threshold: float) -> ThresholdPoint:
    """Micro P/R/F1 of the tags kept by `threshold` (tags without a confidence are always kept)."""
    kept = [o for o in outcomes if o.confidence is None or o.confidence >= threshold]
    tp = sum(o.correct for o in kept)
    p, r, f = prf(tp, len(kept) - tp, gold_total - tp)
    return ThresholdPoint(threshold, p, r, f, len(kept))


def threshold_points(outcomes: Sequence[Outcome], gold_total: int) -> list[ThresholdPoint]:
    """P/R/F1 at every distinct observed confidence (and 0), lowest threshold first."""
    thresholds = sorted({0.0, *(o.confidence for o in outcomes if o.confidence is not None)})
    return [at_threshold(outcomes, gold_total, t) for t in thresholds]


def _first_reaching(points: Sequence[ThresholdPoint], target_precision: float) -> ThresholdPoint | None:
    return next((p for p in points if p.kept and p.precision >= target_precision), None)


def pick_threshold(outcomes: Sequence[Outcome], gold_total: int, target_precision: float) -> ThresholdPoint | None:
    """The lowest threshold (among the observed confidences) whose kept tags reach the target precision."""
    return _first_reaching(threshold_points(outcomes, gold_total), target_precision)


def calibrate(golds: Sequence[Sequence[GoldTag]], preds: Sequence[Sequence[str]],
              confidences: Sequence[Sequence[float | None]], target_precision: float = 0.9,
              n_bins: int = 10) -> Calibration:
    outcomes, gold_total = tag_outcomes(golds, preds, confidences)
    bins, ece = reliability(outcomes, n_bins)
    points = threshold_points(outcomes, gold_total)
    chosen = _first_reaching(points, target_precision)
    best = max(points, key=lambda p: (p.f1, -p.threshold))
    return Calibration(len(golds), gold_total, len(outcomes), bins, ece, target_precision,
                       chosen.threshold if chosen else None, chosen, points[0], best)


def _tags_and_confidences(row: dict[str, Any]) -> tuple[list[str], list[float | None]]:
    tags, confidences = row["tags"], row["confidence"]
    if not isinstance(tags, list) or not isinstance(confidences, list) or len(tags) != len(confidences):
        raise TypeError("tags and confidence must be lists of the same length")
    return [str(t) for t in tags], [None if c is None else float(c) for c in confidences]


def read_scored_predictions(path: str | Path, model_only: bool = False) -> dict[str, tuple[list[str], list[float | None]]]:
    """id → (tags, confidences) from a `llmtags generate` output; lines without confidences are
    reported and skipped (they come from an engine or version that does not give them). With
    `model_only`, what the span proposer wrote is left out: records the cascade gave it (`"by":
    "proposer"`) and tags `--fill` added (`"filled"`), whose confidences are the CRF's marginals, not the
    model's."""
    def scored(row: dict[str, Any]) -> tuple[tuple[list[str], list[float | None]], str]:
        tags, confidences = _tags_and_confidences(row)
        if model_only and row.get("filled"):
            filled = set(row["filled"])
            pairs = [(t, c) for t, c in zip(tags, confidences) if t not in filled]
            tags, confidences = [t for t, _ in pairs], [c for _, c in pairs]
        return (tags, confidences), row.get("by", "model")

    found = read_prediction_rows(path, scored)
    return {key: tags for key, (tags, by) in found.items() if not (model_only and by == "proposer")}


def calibrate_files(gold: str | Path, pred: str | Path, target_precision: float = 0.9) -> Calibration:
    records = [r for r in load_labelled(gold) if r.tags is not None]
    scored = read_scored_predictions(pred, model_only=True)  # the model's confidences, not the CRF's
    missing = [r.id for r in records if r.id not in scored]
    if len(missing) == len(records):
        raise ValueError(f"{pred}: no prediction matches a record of {gold} by id")
    if missing:
        # Calibrating on a generated subset of dev is the usual case: only those records count.
        print(f"llmtags: {len(missing)} gold records have no prediction and are left out, e.g. {missing[:3]}",
              file=sys.stderr)
    rows = [(r.tags or [], *scored[r.id]) for r in records if r.id in scored]
    return calibrate([g for g, _, _ in rows], [t for _, t, _ in rows], [c for _, _, c in rows], target_precision)

"""Scoring of predicted `Attribute:value` tags against gold tags.

Conventions (see the datasets README):
- Strings compare after NFKC, case folding and trimming (`canonical`); anything looser belongs to the
  normaliser and is reported separately.
- Per record, tags form a set: a prediction repeated counts once, and a gold any-of group (a list of
  accepted surface forms) is ONE gold tag, matched when any form is predicted. One prediction can
  satisfy at most one gold group, so the per-record counts come from a maximum matching.
- Micro precision / recall / F1 sum tp, fp and fn over the whole corpus. A ratio with an empty
  denominator is 1.0 when the other side is empty too (nothing to find, nothing claimed) and 0.0
  otherwise; F1 is therefore 2tp / (2tp + fp + fn), and 1.0 only when all three are zero. A record with
  no gold and no prediction adds nothing to the micro counts.
- Macro F1 averages per-attribute F1 over the attributes that occur in the gold, so a model inventing
  attribute names loses precision in the micro figures without flooding the macro average with rows.
- Value-only scoring (`typed=False`) drops the attribute before comparing; per-attribute rows then use
  the gold tag's attribute for tp and fn and the prediction's attribute for fp.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

GoldTag = Union[str, list[str]]

_SEPARATORS = (":", "\uff1a")  # ASCII and full-width colon
NO_ATTRIBUTE = "(none)"  # per-attribute row for tags without an attribute


# --- strings ----------------------------------------------------------------------------------------


def split_tag(tag: str) -> tuple[str | None, str]:
    """(attribute, value), split on the first ASCII or full-width colon; no colon gives (None, tag).

    Both parts are trimmed; nothing else changes, so the result can still be shown to people.
    """
    positions = [p for p in (tag.find(sep) for sep in _SEPARATORS) if p >= 0]
    if not positions:
        return None, tag.strip()
    cut = min(positions)
    return tag[:cut].strip(), tag[cut + 1 :].strip()


def canonical(tag: str) -> str:
    """The comparison form of a tag: NFKC, case-folded, trimmed, no spaces around the first ':'."""
    folded = unicodedata.normalize("NFKC", tag).casefold().strip()
    # NFKC turns the full-width colon into ':', so one separator remains to look for.
    attribute, value = split_tag(folded)
    return value if attribute is None else f"{attribute}:{value}"


def canonical_value(tag: str) -> str:
    """The canonical value alone, for value-only scoring."""
    return split_tag(canonical(tag))[1]


def attribute_label(tag: str) -> str:
    """A readable attribute name for per-attribute tables (NFKC, trimmed, case kept)."""
    attribute = split_tag(unicodedata.normalize("NFKC", tag))[0]
    return attribute if attribute else NO_ATTRIBUTE


def _key(tag: str, typed: bool) -> str:
    return canonical(tag) if typed else canonical_value(tag)


def gold_forms(gold: GoldTag) -> list[str]:
    """The accepted forms of one gold tag: itself, or each form of an any-of group."""
    return [gold] if isinstance(gold, str) else list(gold)


# --- one record -------------------------------------------------------------------------------------


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 under the empty-denominator convention of this module."""
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    denominator = 2 * tp + fp + fn
    f1 = 2 * tp / denominator if denominator else 1.0
    return precision, recall, f1


class _Ratios:
    """precision / recall / f1 of a class with tp, fp and fn counts."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return prf(self.tp, self.fp, self.fn)[0]

    @property
    def recall(self) -> float:
        return prf(self.tp, self.fp, self.fn)[1]

    @property
    def f1(self) -> float:
        return prf(self.tp, self.fp, self.fn)[2]


@dataclass
class RecordCounts(_Ratios):
    """Matching outcome of one record. `matched` holds (gold form, prediction) pairs."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    matched: list[tuple[str, str]] = field(default_factory=list)
    missed: list[GoldTag] = field(default_factory=list)  # gold tags (groups kept whole) not predicted
    spurious: list[str] = field(default_factory=list)  # de-duplicated predictions matching no gold

    def to_json(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "matched": [list(pair) for pair in self.matched],
            "missed": self.missed,
            "spurious": self.spurious,
        }


def _max_matching(options: list[list[int]], n_right: int) -> list[int]:
    """Maximum bipartite matching (Kuhn); returns, for each right node, its left node or -1.

    Records hold tens of tags at most, so the simple augmenting-path search is plenty; a greedy pass
    could lose a true positive when two any-of groups share a form.
    """
    owner = [-1] * n_right

    def augment(left: int, seen: list[bool]) -> bool:
        for right in options[left]:
            if seen[right]:
                continue
            seen[right] = True
            if owner[right] == -1 or augment(owner[right], seen):
                owner[right] = left
                return True
        return False

    for left in range(len(options)):
        augment(left, [False] * n_right)
    return owner


def match_record(gold: Sequence[GoldTag], pred: Sequence[str], typed: bool = True) -> RecordCounts:
    """Count tp / fp / fn of one record; see the module docstring for the rules."""
    pred_keys: dict[str, str] = {}  # key -> first surface form; de-duplicates predictions
    for tag in pred:
        pred_keys.setdefault(_key(tag, typed), tag)
    preds = list(pred_keys.items())

    groups: list[GoldTag] = []
    group_keys: list[frozenset[str]] = []
    for item in gold:
        keys = frozenset(_key(form, typed) for form in gold_forms(item))
        if keys in group_keys:  # the same gold tag listed twice counts once
            continue
        groups.append(item)
        group_keys.append(keys)

    index = {key: i for i, (key, _) in enumerate(preds)}
    options = [sorted(index[k] for k in keys if k in index) for keys in group_keys]
    owner = _max_matching(options, len(preds))

    counts = RecordCounts()
    matched_groups = set()
    for p, g in enumerate(owner):
        if g == -1:
            counts.spurious.append(preds[p][1])
            continue
        matched_groups.add(g)
        form = next(f for f in gold_forms(groups[g]) if _key(f, typed) == preds[p][0])
        counts.matched.append((form, preds[p][1]))
    counts.missed = [groups[g] for g in range(len(groups)) if g not in matched_groups]
    counts.tp = len(counts.matched)
    counts.fp = len(counts.spurious)
    counts.fn = len(counts.missed)
    return counts


def match_record_extractgpt(gold: Sequence[GoldTag], pred: Sequence[str], targets: Sequence[str]) -> RecordCounts:
    """The ExtractGPT protocol on one record (the one behind the published GPT-4 figures).

    Only the record's target attributes count, each with one predicted value: the first predicted tag
    of that attribute. A right value is VC, a wrong one VW, a gold value with no prediction VN, and a
    prediction where gold has none NV; P = VC/(NV+VC+VW) and R = VC/(VN+VC+VW). As counts: tp = VC,
    fp = NV + VW, fn = VN + VW, so a wrong value is both a spurious prediction and a missed gold tag,
    and every corpus figure and interval of this module applies unchanged. Several gold tags of one
    attribute are alternatives: the prediction is right when it matches any of them.
    """
    first_guess: dict[str, str] = {}
    for tag in pred:
        attribute = split_tag(canonical(tag))[0]
        if attribute is not None:
            first_guess.setdefault(attribute, tag)
    gold_by_attribute: dict[str, list[GoldTag]] = {}
    for item in gold:
        attribute = split_tag(canonical(gold_forms(item)[0]))[0]
        if attribute is not None:
            gold_by_attribute.setdefault(attribute, []).append(item)
    counts = RecordCounts()
    for target in dict.fromkeys(canonical(t) for t in targets):
        golds, guess = gold_by_attribute.get(target, []), first_guess.get(target)
        if guess is not None and golds:
            right = next((f for g in golds for f in gold_forms(g) if canonical(f) == canonical(guess)), None)
            if right is not None:
                counts.matched.append((right, guess))  # VC
            else:
                counts.spurious.append(guess)  # VW
                counts.missed.append(golds[0])
        elif golds:
            counts.missed.append(golds[0])  # VN
        elif guess is not None:
            counts.spurious.append(guess)  # NV
    counts.tp, counts.fp, counts.fn = len(counts.matched), len(counts.spurious), len(counts.missed)
    return counts


# --- a corpus ---------------------------------------------------------------------------------------


@dataclass
class PRF(_Ratios):
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def support(self) -> int:
        """Number of gold tags."""
        return self.tp + self.fn

    def add(self, tp: int = 0, fp: int = 0, fn: int = 0) -> None:
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "support": self.support,
        }


@dataclass
class Scores:
    typed: bool
    n_records: int
    micro: PRF
    macro_f1: float
    per_attribute: dict[str, PRF]
    per_category: dict[str, PRF] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "typed": self.typed,
            "n_records": self.n_records,
            "micro": self.micro.to_json(),
            "macro_f1": self.macro_f1,
            "per_attribute": {name: row.to_json() for name, row in self.per_attribute.items()},
            "per_category": None
            if self.per_category is None
            else {name: row.to_json() for name, row in self.per_category.items()},
        }


def _check_lengths(golds: Sequence[Any], *others: Sequence[Any] | None) -> None:
    for other in others:
        if other is not None and len(other) != len(golds):
            raise ValueError(f"{len(golds)} gold records but {len(other)} predicted or category entries")
    for i, gold in enumerate(golds):
        if gold is None:
            raise ValueError(f"record {i} has no gold tags (unlabelled); cannot score it")


def _attribute_rows(counts: Sequence[RecordCounts]) -> dict[str, PRF]:
    """Per-attribute tp / fp / fn, keyed by case-folded name and labelled with the first gold spelling."""
    rows: dict[str, PRF] = {}
    labels: dict[str, str] = {}

    def row(tag: str) -> PRF:
        label = attribute_label(tag)
        key = label.casefold()
        labels.setdefault(key, label)
        return rows.setdefault(key, PRF())

    for c in counts:
        for gold_form, _ in c.matched:
            row(gold_form).add(tp=1)
        for group in c.missed:
            row(gold_forms(group)[0]).add(fn=1)
    for c in counts:  # predictions last, so gold spellings label the rows
        for tag in c.spurious:
            row(tag).add(fp=1)
    return {labels[key]: value for key, value in sorted(rows.items(), key=lambda kv: labels[kv[0]])}


def score_counts(
    counts: Sequence[RecordCounts], typed: bool = True, categories: Sequence[str | None] | None = None
) -> Scores:
    """Corpus scores from per-record counts (lets a report reuse one matching for several views)."""
    micro = PRF()
    for c in counts:
        micro.add(c.tp, c.fp, c.fn)
    per_attribute = _attribute_rows(counts)
    with_gold = [row.f1 for row in per_attribute.values() if row.support > 0]
    macro_f1 = sum(with_gold) / len(with_gold) if with_gold else 0.0
    per_category = None
    if categories is not None:
        per_category = {}
        for c, category in zip(counts, categories):
            per_category.setdefault(category or NO_ATTRIBUTE, PRF()).add(c.tp, c.fp, c.fn)
        per_category = dict(sorted(per_category.items()))
    return Scores(typed, len(counts), micro, macro_f1, per_attribute, per_category)


def score(
    golds: Sequence[Sequence[GoldTag]],
    preds: Sequence[Sequence[str]],
    typed: bool = True,
    categories: Sequence[str | None] | None = None,
) -> Scores:
    """Micro P/R/F1, macro F1 over gold attributes, per-attribute and (optionally) per-category rows."""
    _check_lengths(golds, preds, categories)
    counts = [match_record(g, p, typed) for g, p in zip(golds, preds)]
    return score_counts(counts, typed, categories)


# --- confidence intervals ---------------------------------------------------------------------------


def _count_matrix(golds: Sequence[Sequence[GoldTag]], preds: Sequence[Sequence[str]], typed: bool) -> np.ndarray:
    _check_lengths(golds, preds)
    rows = [match_record(g, p, typed) for g, p in zip(golds, preds)]
    return np.array([[c.tp, c.fp, c.fn] for c in rows], dtype=np.float64).reshape(-1, 3)


def _f1_of_sums(sums: np.ndarray) -> np.ndarray:
    """Micro F1 per row of summed (tp, fp, fn)."""
    tp, fp, fn = sums.T
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), 1.0)


def _resampled_sums(matrices: Sequence[np.ndarray], n: int, seed: int) -> list[np.ndarray]:
    """Summed (tp, fp, fn) of n bootstrap replicates for each count matrix.

    Each replicate draws len(records) record indices with replacement, and every matrix is summed over
    the SAME draw, which is what makes a paired comparison paired.
    """
    rng = np.random.default_rng(seed)
    n_records = len(matrices[0])
    sums = [np.empty((n, 3), dtype=np.float64) for _ in matrices]
    for row in range(n):
        draw = rng.integers(0, n_records, n_records)
        for matrix, out in zip(matrices, sums):
            out[row] = matrix[draw].sum(axis=0)
    return sums


def bootstrap_ci(
    golds: Sequence[Sequence[GoldTag]],
    preds: Sequence[Sequence[str]],
    n: int = 1000,
    seed: int = 0,
    typed: bool = True,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of micro F1, resampling whole records; deterministic per seed."""
    counts = _count_matrix(golds, preds, typed)
    return _interval(counts, n, seed, confidence)


def bootstrap_ci_counts(
    counts: Sequence[RecordCounts], n: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """`bootstrap_ci` from per-record counts already computed (same draws for the same seed)."""
    matrix = np.array([[c.tp, c.fp, c.fn] for c in counts], dtype=np.float64).reshape(-1, 3)
    return _interval(matrix, n, seed, confidence)


def _interval(counts: np.ndarray, n: int, seed: int, confidence: float) -> tuple[float, float]:
    if len(counts) == 0:
        return (float("nan"), float("nan"))
    f1 = _f1_of_sums(_resampled_sums([counts], n, seed)[0])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(f1, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_prf_counts(
    counts: Sequence[RecordCounts], n: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of micro precision, recall and F1, all from the same resampled records."""
    if not counts:
        nan = (float("nan"), float("nan"))
        return {"precision": nan, "recall": nan, "f1": nan}
    matrix = np.array([[c.tp, c.fp, c.fn] for c in counts], dtype=np.float64).reshape(-1, 3)
    sums = _resampled_sums([matrix], n, seed)[0]
    tp, fp, fn = sums.T
    # Same empty-denominator convention as prf(): an empty ratio is 1 when its other side is empty too.
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.where(fn > 0, 0.0, 1.0))
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), np.where(fp > 0, 0.0, 1.0))
    tail = (1 - confidence) / 2 * 100
    out = {}
    for name, values in (("precision", precision), ("recall", recall), ("f1", _f1_of_sums(sums))):
        low, high = np.percentile(values, [tail, 100 - tail])
        out[name] = (float(low), float(high))
    return out


@dataclass
class PairedResult:
    """System b against system a on the same records: delta_f1 = F1(b) - F1(a)."""

    f1_a: float
    f1_b: float
    delta_f1: float
    low: float
    high: float
    p_value: float
    significant: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "f1_a": self.f1_a,
            "f1_b": self.f1_b,
            "delta_f1": self.delta_f1,
            "ci95": [self.low, self.high],
            "p_value": self.p_value,
            "significant": self.significant,
        }


def paired_bootstrap(
    golds: Sequence[Sequence[GoldTag]],
    preds_a: Sequence[Sequence[str]],
    preds_b: Sequence[Sequence[str]],
    n: int = 1000,
    seed: int = 0,
    typed: bool = True,
    alpha: float = 0.05,
) -> PairedResult:
    """Paired bootstrap of the micro-F1 difference b - a: both systems see the same resampled records.

    The p-value is two-sided, twice the smaller share of replicates on either side of zero (capped at
    1), so `significant` agrees with the (1 - alpha) percentile interval excluding zero.
    """
    counts_a = _count_matrix(golds, preds_a, typed)
    counts_b = _count_matrix(golds, preds_b, typed)
    f1_a = prf(*(int(x) for x in counts_a.sum(axis=0)))[2] if len(counts_a) else 1.0
    f1_b = prf(*(int(x) for x in counts_b.sum(axis=0)))[2] if len(counts_b) else 1.0
    if len(counts_a) == 0:
        return PairedResult(f1_a, f1_b, 0.0, 0.0, 0.0, 1.0, False)
    sums_a, sums_b = _resampled_sums([counts_a, counts_b], n, seed)
    deltas = _f1_of_sums(sums_b) - _f1_of_sums(sums_a)
    tail = alpha / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    p_value = min(1.0, 2 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))))
    return PairedResult(f1_a, f1_b, f1_b - f1_a, float(low), float(high), p_value, p_value < alpha)

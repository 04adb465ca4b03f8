"""Isotonic calibration: a non-decreasing map from a raw score to the observed rate of success.

The span proposer's confidence in a record (the CRF's probability of its whole labelling) orders records
well but is not a probability of being right: on en-wdc-pave test, records it gives 0.9 to 0.95 have
their tags exactly right about half the time (eval/cascade_*.md). `IsotonicMap.fit` learns, from held-out
(score, success) pairs, the non-decreasing step function that fits them best in squared error (pool
adjacent violators), so that a threshold on the mapped score is a threshold on the share of successes.

Between the fitted blocks the map is linear (as scikit-learn's `IsotonicRegression` interpolates); below
the lowest score seen it is the first block's rate, above the highest the last block's.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import groupby
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IsotonicMap:
    """The fitted map: `scores` (increasing) and `rates` (non-decreasing) are its knots; `pairs` the number
    of (score, success) pairs it was fitted on."""

    scores: tuple[float, ...]
    rates: tuple[float, ...]
    pairs: int

    def __post_init__(self) -> None:
        if not self.scores or len(self.scores) != len(self.rates):
            raise ValueError("an isotonic map needs as many rates as scores, and at least one")
        if any(b < a for a, b in zip(self.scores, self.scores[1:])) or any(b < a for a, b in zip(self.rates, self.rates[1:])):
            raise ValueError("an isotonic map's scores and rates must both be non-decreasing")
        if not all(0.0 <= r <= 1.0 for r in self.rates):
            raise ValueError("an isotonic map's rates are shares, in [0, 1]")

    @classmethod
    def fit(cls, pairs: Iterable[tuple[float, bool]]) -> IsotonicMap:
        """Pool adjacent violators over the pairs sorted by score; equal scores share one block."""
        ordered = sorted((float(s), float(ok)) for s, ok in pairs)
        if not ordered:
            raise ValueError("isotonic calibration needs at least one (score, success) pair")
        # Equal scores are one observation of their joint rate: grouped before any merging, or a group's
        # first (sorted: failing) pairs alone could pool it with the block before.
        groups = [(score, sum(ok for _, ok in same), len(same))
                  for score, same in ((s, list(g)) for s, g in groupby(ordered, key=lambda pair: pair[0]))]
        # Blocks as [low score, high score, sum of successes, count].
        blocks: list[list[float]] = []
        for score, hits, count in groups:
            blocks.append([score, score, hits, count])
            # Merge backwards while the last block's rate is not above the one before it (equal rates too:
            # the same map with fewer knots).
            while len(blocks) > 1 and blocks[-1][2] / blocks[-1][3] <= blocks[-2][2] / blocks[-2][3]:
                low, high, hits, count = blocks.pop()
                blocks[-1][1] = high
                blocks[-1][2] += hits
                blocks[-1][3] += count
        scores: list[float] = []
        rates: list[float] = []
        for low, high, hits, count in blocks:
            rate = hits / count
            for score in (low, high) if high > low else (low,):
                scores.append(round(score, 6))
                rates.append(round(rate, 6))
        return cls(tuple(scores), tuple(rates), len(ordered))

    def __call__(self, score: float) -> float:
        """The rate at `score`: linear between knots, flat outside them."""
        i = bisect_right(self.scores, score)
        if i == 0:
            return self.rates[0]
        if i == len(self.scores):
            return self.rates[-1]
        x0, x1, y0, y1 = self.scores[i - 1], self.scores[i], self.rates[i - 1], self.rates[i]
        return y1 if x1 <= x0 else y0 + (y1 - y0) * (score - x0) / (x1 - x0)

    def to_json(self) -> dict[str, Any]:
        return {"scores": list(self.scores), "rates": list(self.rates), "pairs": self.pairs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IsotonicMap:
        return cls(tuple(float(s) for s in data["scores"]), tuple(float(r) for r in data["rates"]), int(data["pairs"]))


def equal_width_bins(pairs: Sequence[tuple[float, bool]], bins: int = 10) -> list[tuple[float, float, int, float, float]]:
    """The reliability table of scores read as probabilities: per equal-width bin of [0, 1] (a score of
    1 in the last), (low, high, pairs inside, their mean score, their success rate); empty bins read 0."""
    table = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [(s, ok) for s, ok in pairs if low <= s < high or (b == bins - 1 and s >= 1.0)]
        n = len(inside)
        table.append((low, high, n, sum(s for s, _ in inside) / n if n else 0.0, sum(ok for _, ok in inside) / n if n else 0.0))
    return table


def mean_gap(pairs: Sequence[tuple[float, bool]], bins: int = 10) -> float:
    """The expected calibration error: the pair-weighted mean over `equal_width_bins` of |mean score −
    success rate|."""
    if not pairs:
        return 0.0
    return sum(n * abs(mean - rate) for _, _, n, mean, rate in equal_width_bins(pairs, bins)) / len(pairs)

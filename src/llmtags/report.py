"""Evaluation report: scores before and after normalisation, as JSON and as Markdown tables.

Each view (raw or normalised predictions, typed or value-only scoring) is matched once per record and
the per-record counts feed the corpus scores, the bootstrap interval and the worst-records list alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmtags.grounding import evidence_spans, highlight
from llmtags.metrics import (
    GoldTag,
    PairedResult,
    RecordCounts,
    Scores,
    bootstrap_ci_counts,
    match_record,
    match_record_extractgpt,
    paired_bootstrap,
    score_counts,
)

VIEWS = ("raw", "normalised")
SCORINGS = ("typed", "values")
# strict: every predicted tag counts; extractgpt: also the ExtractGPT protocol (metrics.match_record_extractgpt)
PROTOCOLS = ("strict", "extractgpt")


@dataclass
class _View:
    counts: list[RecordCounts]
    scores: Scores
    ci95: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        # No records gives a NaN interval, which strict JSON cannot carry.
        ci = None if any(math.isnan(x) for x in self.ci95) else list(self.ci95)
        return {**self.scores.to_json(), "ci95": ci}


class EvalReport:
    """Scores of one system on one labelled set.

    `preds` are the model's raw tags; `preds_normalised`, when given, the same after the normaliser, so
    the report shows what normalisation adds (with a paired bootstrap on typed micro F1).
    """

    def __init__(
        self,
        golds: Sequence[Sequence[GoldTag]],
        preds: Sequence[Sequence[str]],
        preds_normalised: Sequence[Sequence[str]] | None = None,
        ids: Sequence[str] | None = None,
        texts: Sequence[str] | None = None,
        categories: Sequence[str | None] | None = None,
        name: str = "",
        n_boot: int = 1000,
        seed: int = 0,
        targets: Sequence[Sequence[str]] | None = None,
    ) -> None:
        n = len(golds)
        for label, seq in (("preds", preds), ("preds_normalised", preds_normalised), ("ids", ids),
                           ("texts", texts), ("categories", categories), ("targets", targets)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{n} gold records but {len(seq)} {label}")
        self.name = name
        self.targets = [list(t) for t in targets] if targets is not None else None
        self.golds = [list(g) for g in golds]
        self.preds = {"raw": [list(p) for p in preds]}
        if preds_normalised is not None:
            self.preds["normalised"] = [list(p) for p in preds_normalised]
        self.ids = list(ids) if ids is not None else [str(i) for i in range(n)]
        self.texts = list(texts) if texts is not None else None
        self.categories = list(categories) if categories is not None else None
        self.n_boot = n_boot
        self.seed = seed
        self.views: dict[str, dict[str, _View]] = {}
        for view, view_preds in self.preds.items():
            self.views[view] = {}
            for scoring in SCORINGS:
                typed = scoring == "typed"
                counts = [match_record(g, p, typed) for g, p in zip(self.golds, view_preds)]
                scores = score_counts(counts, typed, self.categories)
                ci = bootstrap_ci_counts(counts, n=n_boot, seed=seed)
                self.views[view][scoring] = _View(counts, scores, ci)
            if targets is not None:  # the ExtractGPT protocol: see metrics.match_record_extractgpt
                counts = [match_record_extractgpt(g, p, ts) for g, p, ts in zip(self.golds, view_preds, targets)]
                self.views[view]["extractgpt"] = _View(counts, score_counts(counts, True, self.categories),
                                                       bootstrap_ci_counts(counts, n=n_boot, seed=seed))
        # Share of gold tags among the vocabulary candidates offered in the prompts (set by the caller).
        self.candidate_recall: float | None = None
        # Other taggers scored on the same records (`add_peer`): the CRF peer beside every figure.
        self.peers: dict[str, EvalReport] = {}
        self.normalisation_delta: PairedResult | None = None
        if preds_normalised is not None and n:
            self.normalisation_delta = paired_bootstrap(
                self.golds, self.preds["raw"], self.preds["normalised"], n=n_boot, seed=seed
            )

    @classmethod
    def from_records(
        cls,
        records: Sequence[Any],
        preds: Sequence[Sequence[str]],
        preds_normalised: Sequence[Sequence[str]] | None = None,
        protocol: str = "strict",
        **kwargs: Any,
    ) -> EvalReport:
        """Build from labelled `Record`s (ids, texts and categories taken from them). With `protocol`
        "extractgpt", the report adds that scoring, over each record's `targets` (else its `schema`)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown scoring protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        targets = [r.targets or r.schema or [] for r in records] if protocol == "extractgpt" else None
        return cls(
            [r.tags for r in records],
            preds,
            preds_normalised,
            ids=[r.id for r in records],
            texts=[r.text for r in records],
            categories=[r.category for r in records],
            targets=targets,
            **kwargs,
        )

    def add_peer(self, name: str, preds: Sequence[Sequence[str]]) -> EvalReport:
        """Score another tagger's `preds` on the same records with the same scorings and bootstrap, and
        show it beside this report's figures (terminal, Markdown, JSON and the HTML page)."""
        peer = EvalReport(self.golds, preds, ids=self.ids, texts=self.texts, categories=self.categories, name=name,
                          n_boot=self.n_boot, seed=self.seed, targets=self.targets)
        self.peers[name] = peer
        return peer

    def peer_rows(self) -> list[dict[str, Any]]:
        """The rows of every peer, named by the peer: strict and (where scored) the ExtractGPT protocol; the
        values-only scoring is left to the peer's own report (`peers[name]`)."""
        return [{**row, "predictions": name} for name, peer in self.peers.items()
                for row in peer.summary_rows() if row["scoring"] != "values"]

    @property
    def final_view(self) -> str:
        """The predictions a user would get: normalised when available."""
        return "normalised" if "normalised" in self.views else "raw"

    def scores(self, view: str = "raw", scoring: str = "typed") -> Scores:
        return self.views[view][scoring].scores

    def ci95(self, view: str = "raw", scoring: str = "typed") -> tuple[float, float]:
        return self.views[view][scoring].ci95

    # --- records ---

    def worst_records(self, k: int = 10, view: str | None = None) -> list[dict[str, Any]]:
        """The k records with the lowest typed F1 (ties: most errors first), gold next to predicted."""
        view = view or self.final_view
        counts = self.views[view]["typed"].counts
        order = sorted(range(len(counts)), key=lambda i: (counts[i].f1, -(counts[i].fp + counts[i].fn), i))
        rows = []
        for i in order[:k]:
            c = counts[i]
            text = self.texts[i] if self.texts is not None else None
            rows.append({
                "id": self.ids[i],
                "text": text,
                # The text with the evidence of each predicted tag in brackets (grounding.py).
                "highlighted": None if text is None else highlight(text, evidence_spans(text, self.preds[view][i])),
                "category": self.categories[i] if self.categories is not None else None,
                "f1": c.f1,
                "tp": c.tp,
                "fp": c.fp,
                "fn": c.fn,
                "gold": self.golds[i],
                "predicted": self.preds[view][i],
                "missed": c.missed,
                "spurious": c.spurious,
            })
        return rows

    # --- output ---

    def to_json(self, worst: int = 20) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_records": len(self.golds),
            "bootstrap": {"n": self.n_boot, "seed": self.seed, "unit": "record"},
            "raw": {s: v.to_json() for s, v in self.views["raw"].items()},
            "normalised": {s: v.to_json() for s, v in self.views["normalised"].items()}
            if "normalised" in self.views
            else None,
            "normalisation_delta": None if self.normalisation_delta is None else self.normalisation_delta.to_json(),
            "candidate_recall": self.candidate_recall,
            "peers": {name: {s: v.to_json() for s, v in peer.views["raw"].items()} for name, peer in self.peers.items()},
            "worst_records": self.worst_records(worst),
        }

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per view and scoring, the figures of the headline table."""
        rows = []
        for view, scorings in self.views.items():
            for scoring, v in scorings.items():
                m = v.scores.micro
                rows.append({
                    "predictions": view,
                    "scoring": scoring,
                    "precision": m.precision,
                    "recall": m.recall,
                    "f1": m.f1,
                    "ci95": v.ci95,
                    "macro_f1": v.scores.macro_f1,
                    "tp": m.tp,
                    "fp": m.fp,
                    "fn": m.fn,
                })
        return rows

    def to_markdown(self, attributes: bool = True, categories: bool = True, worst: int = 10) -> str:
        lines: list[str] = []
        if self.name:
            lines += [f"## {self.name}", ""]
        lines += [f"{len(self.golds)} records; micro scores over `Attribute:value` tags (typed) and over values "
                  f"only; 95% CI: percentile bootstrap over records ({self.n_boot} resamples, seed {self.seed}).", ""]
        if any("extractgpt" in scorings for scorings in self.views.values()):
            lines += ["Scoring `extractgpt`: the ExtractGPT protocol, each record's target attributes only, one "
                      "predicted value each (tp = right values, fp = wrong + predicted without gold, fn = wrong + "
                      "missed).", ""]
        lines += _table(
            ["predictions", "scoring", "P", "R", "F1", "95% CI", "macro F1", "tp", "fp", "fn"],
            [[r["predictions"], r["scoring"], _f(r["precision"]), _f(r["recall"]), _f(r["f1"]),
              _ci(r["ci95"]), _f(r["macro_f1"]), r["tp"], r["fp"], r["fn"]] for r in self.summary_rows()],
        )
        if self.peers:
            lines += ["", "Peers on the same records (their raw tags):", ""]
            lines += _table(["peer", "scoring", "P", "R", "F1", "95% CI", "macro F1", "tp", "fp", "fn"],
                            [[r["predictions"], r["scoring"], _f(r["precision"]), _f(r["recall"]), _f(r["f1"]),
                              _ci(r["ci95"]), _f(r["macro_f1"]), r["tp"], r["fp"], r["fn"]] for r in self.peer_rows()])
        if self.normalisation_delta is not None:
            d = self.normalisation_delta
            lines += ["", f"Normalisation, typed micro F1: {d.f1_a:.3f} → {d.f1_b:.3f} (Δ {d.delta_f1:+.3f}, "
                      f"95% CI {_ci((d.low, d.high))}, p = {d.p_value:.3f}"
                      f"{', significant' if d.significant else ', not significant'})."]
        if self.candidate_recall is not None:
            lines += ["", f"Candidate recall: {self.candidate_recall:.3f} of gold tags were among the vocabulary "
                      "candidates offered in the prompts."]
        if attributes:
            lines += ["", "### Per attribute (typed)", ""] + self._breakdown_table("per_attribute", "attribute")
        if categories and self.categories is not None:
            lines += ["", "### Per category (typed)", ""] + self._breakdown_table("per_category", "category")
        if worst:
            lines += ["", f"### {worst} worst records ({self.final_view} predictions, typed)", "",
                      "The text shows the evidence of the predicted tags in [brackets].", ""]
            lines += _table(
                ["id", "F1", "text", "gold", "predicted", "missed", "spurious"],
                [[r["id"], _f(r["f1"]), _clip(r["highlighted"] or "", 120), _tags(r["gold"]), _tags(r["predicted"]),
                  _tags(r["missed"]), _tags(r["spurious"])] for r in self.worst_records(worst)],
            )
        return "\n".join(lines) + "\n"

    def _breakdown_table(self, which: str, label: str) -> list[str]:
        views = list(self.views)
        tables = {view: getattr(self.views[view]["typed"].scores, which) or {} for view in views}
        names = sorted(set().union(*tables.values()), key=lambda n: (-_support(tables, n), n))
        header = [label, "support"]
        for view in views:
            suffix = "" if len(views) == 1 else f" ({view})"
            header += [f"P{suffix}", f"R{suffix}", f"F1{suffix}"]
        rows = []
        for name in names:
            row: list[Any] = [name, _support(tables, name)]
            for view in views:
                cell = tables[view].get(name)
                row += ["–", "–", "–"] if cell is None else [_f(cell.precision), _f(cell.recall), _f(cell.f1)]
            rows.append(row)
        return _table(header, rows)


def _support(tables: dict[str, dict[str, Any]], name: str) -> int:
    return max((t[name].support for t in tables.values() if name in t), default=0)


# --- Markdown helpers -------------------------------------------------------------------------------


def _f(x: float) -> str:
    return f"{x:.3f}"


def _ci(ci: Sequence[float]) -> str:
    return f"{ci[0]:.3f}–{ci[1]:.3f}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tags(tags: Sequence[GoldTag]) -> str:
    return "; ".join(t if isinstance(t, str) else " / ".join(t) for t in tags) or "—"


def _cell(value: Any) -> str:
    # A '|' would end the cell and a newline the row.
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    numeric = [all(isinstance(r[i], (int, float)) or _is_number(r[i]) for r in rows) if rows else False
               for i in range(len(header))]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---:" if numeric[i] else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _is_number(text: Any) -> bool:
    try:
        float(str(text))
    except ValueError:
        return False
    return True

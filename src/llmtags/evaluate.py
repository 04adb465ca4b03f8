"""Stage 6 and the analyst's loop: score predictions against gold, and compare prompt templates.

- `score_files` scores an existing predictions file against a labelled file.
- `generate_and_score` generates and scores in one go; `plan_engine` is the engine it generates with:
  a run plan's base model and --adapter, through the generation cache.
- `compare_templates` runs several templates on the same records and compares them pairwise with a
  paired bootstrap; with the cache, re-running after editing one template regenerates only that one.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from .adapters.registry import check_compatible
from .adapters.routing import load_adapter_set
from .candidates import candidate_finder, candidate_recall
from .engines.base import scaled_adapter_key
from .engines.cache import CachedEngine, GenerationCache
from .engines.llamacpp import run_as
from .engines.select import load_engine, pick_engine
from .metrics import bootstrap_prf_counts, paired_bootstrap
from .models import (
    EMBEDDED,
    ResolvedModel,
    base_model_spec,
    cache_root,
    load_tokenizer_only,
    resolve_base_model,
    resolve_gguf_base,
)
from .options import Settings, TaggingOptions
from .plan import RunPlan
from .prompts import PromptTemplate
from .records import Fields, Record, RecordError, load_labelled
from .report import EvalReport
from .tagger import TagResult, build_prompt, constraint_for, tag_records

T = TypeVar("T")


def read_prediction_rows(path: str | Path, convert: Callable[[dict[str, Any]], T], errors: Any = None) -> dict[str, T]:
    """id → convert(row) for every line of a `llmtags generate` output file. A line that is not JSON,
    lacks a field or fails `convert` (which raises TypeError or ValueError) is reported and skipped."""
    errors = errors or sys.stderr
    found: dict[str, T] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                found[str(row["id"])] = convert(row)
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                reason = {KeyError: f"missing field {exc}", json.JSONDecodeError: f"malformed JSON: {exc}"}.get(
                    type(exc), str(exc))
                print(f"llmtags: {path}: {RecordError(number, None, reason)}", file=errors)
    return found


def _tags(row: dict[str, Any]) -> list[str]:
    tags = row["tags"]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise TypeError("tags must be a list of strings")
    return tags


def read_predictions(path: str | Path, errors: Any = None) -> dict[str, list[str]]:
    """id → tags from a `llmtags generate` output file. Bad lines are reported and skipped."""
    return read_prediction_rows(path, _tags, errors)


def score_predictions(
    records: Sequence[Record],
    predictions: Sequence[Sequence[str]],
    normaliser: Any = None,
    name: str = "",
    seed: int = 0,
    protocol: str = "strict",
) -> EvalReport:
    """An EvalReport of raw predictions and, given a normaliser, of the normalised ones too; with
    `protocol` "extractgpt", also scored in the ExtractGPT protocol."""
    normalised = [normaliser.apply(list(p)) for p in predictions] if normaliser is not None else None
    return EvalReport.from_records(list(records), [list(p) for p in predictions], normalised, name=name, seed=seed,
                                   protocol=protocol)


def score_files(gold: str | Path, pred: str | Path, normaliser: Any = None, errors: Any = None,
                protocol: str = "strict", limit: int | None = None) -> EvalReport:
    """Score a `generate` output against a labelled file (its first `limit` labelled records, when given:
    the ones a `generate --limit N` run tagged)."""
    errors = errors or sys.stderr
    records = [r for r in load_labelled(gold) if r.tags is not None][:limit]
    predictions = read_predictions(pred, errors)
    missing = [r.id for r in records if r.id not in predictions]
    if missing:
        print(f"llmtags: {len(missing)} gold records have no prediction (scored as empty), e.g. {missing[:3]}",
              file=errors)
    return score_predictions(records, [predictions.get(r.id, []) for r in records], normaliser, name=str(pred),
                             protocol=protocol)


# --- generation through the cache ----------------------------------------------------------------------


def cached_engine(base_model: str | None, device: str = "auto", dtype: str = "auto", cache_path: Path | None = None,
                  engine: str = "auto") -> Any:
    """A CachedEngine for `base_model` without adapters (see `plan_engine`)."""
    settings = Settings(base_model=base_model, device=device, dtype=dtype, engine=engine)
    return plan_engine(RunPlan(settings, TaggingOptions()), cache_path=cache_path)


def plan_engine(plan: RunPlan, templates: Sequence[PromptTemplate] = (), cache_path: Path | None = None) -> Any:
    """A CachedEngine for the plan's base model and --adapter: the tokenizer now, the model (with the
    adapter attached as `generate --adapter` attaches it, routing.load_adapter_set) only when a prompt
    misses the cache. llama.cpp's generations are cached apart from transformers' (its quantised
    arithmetic differs), and an adapter's apart from the base model's.

    The adapter is checked at once against each of `templates` (`prompt compare`'s variants; else the
    plan's template), so a run the cache answers whole is refused like one that loads the model."""
    settings, adapter = plan.settings, plan.adapter
    spec = base_model_spec(plan.base_model)
    chosen = pick_engine(settings.engine, spec, settings.device, settings.dtype)
    resolve = resolve_gguf_base if chosen == "llama.cpp" else resolve_base_model
    identity = f"sha256:{EMBEDDED[spec].sha256}" if spec in EMBEDDED else resolve(spec).identity
    tokenizer = load_tokenizer_only(spec)
    if adapter is None:
        def load() -> Any:
            return load_engine(chosen, spec, device=settings.device, dtype=settings.dtype, weights=settings.weights)
    else:
        base = ResolvedModel(spec, spec, identity)  # the identity is what the check compares; nothing is loaded
        for template in templates or [plan.options.template]:
            check_compatible(adapter.meta, base, template, tokenizer, force=settings.force_adapter)

        def load() -> Any:
            with warnings.catch_warnings():  # a forced mismatch was warned about above, once is enough
                warnings.filterwarnings("ignore", message="adapter used despite a mismatch")
                return load_adapter_set(plan).engine(adapter.name)
    cache = GenerationCache(cache_path or cache_root() / "generations.sqlite")
    # llama.cpp's generations are kept apart from transformers', and those of a requantised base apart
    # from the shipped file's (`engines.llamacpp.run_as`).
    engine_identity = identity
    if chosen == "llama.cpp":
        weights = run_as(spec, settings.weights)
        engine_identity += "+llama.cpp" + ("" if weights == "as-is" else f"+{weights}")
    key = scaled_adapter_key(adapter.cache_key, plan.options.adapter_scale) if adapter is not None else None
    return CachedEngine(tokenizer, load, cache, engine_identity, adapter=key)


def run_generation(
    records: Sequence[Record], engine: Any, options: TaggingOptions, progress: bool = True, desc: str = "tagging"
) -> list[TagResult]:
    with tqdm(total=len(records), unit="product", desc=desc, disable=not progress, file=sys.stderr) as bar:
        return list(tag_records(records, engine, options, on_batch=bar.update))


def generation_seconds(records: Sequence[Record], engine: Any, options: TaggingOptions) -> list[float]:
    """Per record, the generation time it cost when generated (kept by the cache across re-runs)."""
    if not hasattr(engine, "seconds_for"):
        return []
    return [engine.seconds_for(build_prompt(r, engine.tokenizer, options), options.max_new_tokens,
                               constraint=constraint_for(r, options)) for r in records]


def generate_and_score(
    records: Sequence[Record],
    engine: Any,
    options: TaggingOptions,
    normaliser: Any = None,
    name: str = "",
    progress: bool = True,
    protocol: str = "strict",
) -> tuple[EvalReport, list[TagResult]]:
    results = run_generation(records, engine, options, progress)
    return score_predictions(records, [r.tags for r in results], normaliser, name, protocol=protocol), results


# --- prompt comparison ---------------------------------------------------------------------------------


@dataclass
class VariantResult:
    name: str
    template_sha256: str
    report: EvalReport
    results: list[TagResult]
    seconds_per_product: float
    prompt_tokens: float  # mean per product
    new_tokens: float  # mean per product
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        micro = self.report.scores(self.report.final_view, "typed").micro
        return {
            "template": self.name,
            "sha256": self.template_sha256[:12],
            "precision": micro.precision,
            "recall": micro.recall,
            "f1": micro.f1,
            "ci95": {k: list(v) for k, v in self.intervals.items()},
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "seconds_per_product": self.seconds_per_product,
        }


@dataclass
class Comparison:
    variants: list[VariantResult]
    paired: list[dict[str, Any]]  # each variant against the first
    disagreements: list[dict[str, Any]]
    # The CRF peer on the same records (the span proposer alone, `peer_of`), where the run has a proposer.
    peer: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"variants": [v.row() for v in self.variants], "paired": self.paired, "disagreements": self.disagreements,
                "peer": self.peer}

    def to_markdown(self, disagreements: int = 10) -> str:
        def ci(v: VariantResult, key: str) -> str:
            low, high = v.intervals[key]
            return f"{v.row()[key]:.3f} [{low:.3f}, {high:.3f}]"

        lines = [
            "| template | F1 [95% CI] | precision [95% CI] | recall [95% CI] | prompt tok | new tok | s/product |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in self.variants:
            lines.append(f"| {v.name} ({v.template_sha256[:8]}) | {ci(v, 'f1')} | {ci(v, 'precision')} | "
                         f"{ci(v, 'recall')} | {v.prompt_tokens:.0f} | {v.new_tokens:.1f} | {v.seconds_per_product:.2f} |")
        paired = [(p["b"], p["a"], p) for p in self.paired]
        if self.peer:  # the CRF alone on the same records, and the first variant against it
            peer = self.peer
            lines.append(f"| {peer['name']} | " + " | ".join(
                f"{peer[k]:.3f} [{peer['ci95'][k][0]:.3f}, {peer['ci95'][k][1]:.3f}]" for k in ("f1", "precision", "recall"))
                + " | – | – | – |")
            paired.append((self.variants[0].name, "CRF peer", peer["first_vs_peer"]))
        if paired:
            lines += ["", "| comparison | ΔF1 | 95% CI | p | significant |", "|---|---|---|---|---|"]
            for b, a, p in paired:
                lines.append(f"| {b} − {a} | {p['delta_f1']:+.3f} | [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] "
                             f"| {p['p_value']:.3f} | {'yes' if p['significant'] else 'no'} |")
        if self.disagreements:
            lines += ["", f"Records where the variants disagree ({len(self.disagreements)}; "
                      f"first {min(disagreements, len(self.disagreements))}):", ""]
            header = "| id | text | gold | " + " | ".join(v.name for v in self.variants) + " |"
            lines += [header, "|" + "---|" * (3 + len(self.variants))]
            for d in self.disagreements[:disagreements]:
                cells = [d["id"], d["text"][:60], "; ".join(d["gold"])] + ["; ".join(t) for t in d["predictions"]]
                lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)


def compare_templates(
    records: Sequence[Record],
    templates: Sequence[Any],
    engine: Any,
    options: TaggingOptions,
    normaliser: Any = None,
    progress: bool = True,
    seed: int = 0,
) -> Comparison:
    """Run each template on the same records; paired bootstrap of each against the first."""
    variants = []
    for template in templates:
        variant_options = replace(options, template=template)
        report, results = generate_and_score(records, engine, variant_options, normaliser, template.name, progress)
        seconds = generation_seconds(records, engine, variant_options)
        counts = report.views[report.final_view]["typed"].counts
        variants.append(VariantResult(
            template.name, template.sha256, report, results,
            sum(seconds) / len(seconds) if seconds else 0.0,
            sum(r.prompt_tokens for r in results) / max(len(results), 1),
            sum(r.new_tokens for r in results) / max(len(results), 1),
            bootstrap_prf_counts(counts, seed=seed),
        ))
    comparison = comparison_of(records, variants, seed)
    comparison.peer = peer_of(records, options, comparison.variants[0], seed)
    return comparison


PEER_NAME = "CRF peer (the span proposer alone)"


def peer_of(records: Sequence[Record], options: TaggingOptions, first: VariantResult, seed: int = 0) -> dict | None:
    """The classical peer on the same records, as `eval` shows it: the run's span proposer alone, its P/R/F1
    with intervals and the first variant against it by paired bootstrap (None without a proposer)."""
    if options.proposer is None:
        return None
    spans = [[p.tag for p in options.proposer.propose(record)] for record in records]
    report = score_predictions(records, spans, None, PEER_NAME)
    micro = report.scores("raw", "typed").micro
    golds = [r.tags or [] for r in records]
    return {"name": PEER_NAME, "precision": micro.precision, "recall": micro.recall, "f1": micro.f1,
            "ci95": {k: list(v) for k, v in bootstrap_prf_counts(report.views["raw"]["typed"].counts, seed=seed).items()},
            "first_vs_peer": paired_bootstrap(golds, spans, first.report.preds[first.report.final_view],
                                              seed=seed).to_json()}


def comparison_of(records: Sequence[Record], variants: list[VariantResult], seed: int = 0) -> Comparison:
    """The comparison of `variants` scored on the same `records`: each against the first by paired
    bootstrap, and the records where their predictions differ."""
    paired = []
    golds = [r.tags or [] for r in records]
    first = variants[0]
    for other in variants[1:]:
        result = paired_bootstrap(golds, first.report.preds[first.report.final_view],
                                  other.report.preds[other.report.final_view], seed=seed)
        paired.append({"a": first.name, "b": other.name, **result.to_json()})
    disagreements = []
    for i, record in enumerate(records):
        predictions = [v.report.preds[v.report.final_view][i] for v in variants]
        if len({tuple(sorted(p)) for p in predictions}) > 1:
            gold = [g if isinstance(g, str) else "/".join(g) for g in golds[i]]
            disagreements.append({"id": record.id, "text": record.text, "gold": gold, "predictions": predictions})
    return Comparison(variants, paired, disagreements)


def labelled_records(path: str | Path, limit: int | None = None, fields: Any = None) -> list[Record]:
    """The labelled records of a file, first `limit` of them; refuses a file with no gold tags."""
    records = [r for r in load_labelled(path, fields or Fields()) if r.tags is not None][:limit]
    if not records:
        raise ValueError(f"{path}: no labelled records (a 'tags' field is needed for evaluation)")
    return records



# --- what `llmtags eval` adds to a report ---------------------------------------------------------------


def add_candidate_recall(report: EvalReport, records: Sequence[Record], candidates: str) -> None:
    """The share of gold tags among the candidates that `--candidates` offers the prompts."""
    finder = candidate_finder(candidates)
    labelled = [r for r in records if r.tags is not None]
    report.candidate_recall = candidate_recall([r.tags for r in labelled],
                                               [finder.tags(r.text, attributes=r.schema) for r in labelled])


def headline_metrics(report: EvalReport, data: str | None, markdown: str | None) -> dict[str, Any]:
    """The headline figures of a report, as an adapter's `metrics.test` stores them (strict, and the
    ExtractGPT protocol where the report has it)."""
    view = report.final_view
    typed = report.scores(view, "typed").micro
    metrics = {"set": data, "records": len(report.golds), "precision": round(typed.precision, 4),
               "recall": round(typed.recall, 4), "f1": round(typed.f1, 4),
               "f1_ci95": [round(x, 4) for x in report.ci95(view, "typed")],
               "value_f1": round(report.scores(view, "values").micro.f1, 4),
               "candidate_recall": report.candidate_recall, "report": markdown}
    if "extractgpt" in report.views[view]:
        protocol = report.scores(view, "extractgpt").micro
        metrics["extractgpt"] = {"precision": round(protocol.precision, 4), "recall": round(protocol.recall, 4),
                                 "f1": round(protocol.f1, 4),
                                 "f1_ci95": [round(x, 4) for x in report.ci95(view, "extractgpt")]}
    return metrics

"""The path of one product, end to end: record → prompt → generation → tags (→ normalised tags).

`tag_records` streams: it takes records in chunks, generates each chunk in length-sorted batches, and
yields results in input order, so a catalogue of any size runs in bounded memory and its output can be
written as it comes. The stages: `build_prompt` (prompts.py), `constraint_for` (constrain/), the
engine's `generate` (engines/), `to_result` (parse.py, vocab.py, grounding.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .budget import windowed
from .candidates import Candidate
from .constrain.spec import ConstraintSpec
from .grounding import confidences_by_tag, evidence_spans, explain_lines
from .hygiene import clean_tags
from .options import TaggingOptions
from .parse import parse_tag_spans
from .prompts import Demo, render_prompt, template_for
from .proposer import Proposal, confirmed, fuse
from .records import Record


@dataclass
class TagResult:
    record: Record
    tags: list[str]
    raw: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    details: list[dict[str, Any]] = field(default_factory=list)  # per-tag normalisation, when a vocab is used
    truncated: bool = False
    # Parallel to `tags` (grounding.py): the model's confidence, and the [start, end) offsets of the
    # evidence in the record's text (None: inferred, not in the text).
    confidences: list[float | None] = field(default_factory=list)
    evidence: list[tuple[int, int] | None] = field(default_factory=list)
    below_confidence: list[str] = field(default_factory=list)  # tags dropped by min_confidence
    dropped: dict[str, list[str]] = field(default_factory=dict)  # lines dropped by hygiene.clean_tags, by reason
    by: str = "model"  # "proposer": the cascade let the span proposer alone tag it (no generation)
    cut: bool = False  # the answer used all of max_new_tokens: tags after the cut were lost
    filled: list[str] = field(default_factory=list)  # tags taken from the proposer (also in `tags`)
    replaced: list[str] = field(default_factory=list)  # the model's tags --proposer-decides replaced
    unconfirmed: list[str] = field(default_factory=list)  # its unsure tags the proposer did not find (--confirm-below)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.record.id, "text_hash": self.record.text_hash, "tags": self.tags,
                               "confidence": [None if c is None else round(c, 3) for c in self.confidences],
                               "evidence": [list(span) if span is not None else None for span in self.evidence],
                               "raw": self.raw}
        if self.by != "model":
            out["by"] = self.by
        if self.filled:
            out["filled"] = self.filled
        if self.replaced:
            out["replaced"] = self.replaced
        if self.unconfirmed:
            out["unconfirmed"] = self.unconfirmed
        if self.below_confidence:
            out["below_confidence"] = self.below_confidence
        if self.dropped:
            out["dropped"] = self.dropped
        if self.details:
            out["normalisation"] = self.details
        return out

    def explain(self) -> list[str]:
        return [f"{self.record.id}:", *explain_lines(self.record.text, self.tags, self.confidences, self.evidence)]



def retrieving(options: TaggingOptions) -> bool:
    """Whether prompts show retrieved neighbours (and take a missing schema from the pool)."""
    return options.pool is not None and options.retrieve > 0


def prompt_record(record: Record, options: TaggingOptions) -> Record:
    """`record` as prompts and constraints see it: with retrieval on and no schema of its own, the schema
    its demo pool gives it (retrieve.schema_for, from the whole text); its text cut to
    `options.max_text_chars`."""
    if not record.schema and retrieving(options):
        record = replace(record, schema=options.pool.schema_for(record))
    if len(record.text) > options.max_text_chars:
        record = replace(record, text=record.text[: options.max_text_chars])
    return record


def prompt_demos(record: Record, options: TaggingOptions) -> Sequence[Demo]:
    """The demonstrations `record` is shown: its nearest pool records with retrieval, else the fixed ones.
    Give the whole record, not the cut one, so the pool never offers the record its own answer."""
    if retrieving(options):
        return options.pool.demos_for(record, options.retrieve, options.demo_text)
    return options.demos


def prompt_candidates(record: Record, options: TaggingOptions, training: bool = False) -> list[Candidate]:
    """The vocabulary candidates `record` is offered, with where they are in its text. With `training`,
    candidates that exist only because of this record's own gold tags are left out, so training prompts
    look like test prompts."""
    if not options.candidates:
        return []
    return options.candidates.find(record.text, record.tags or () if training else (), record.schema)


def prompt_proposals(ready: Record, original: Record, options: TaggingOptions,
                     training: bool = False) -> tuple[list[Proposal], float | None]:
    """The span proposer's spans for `ready` (the record as `prompt_record` prepared it: its schema, its
    text cut), limited to its schema, and (in tagging) its confidence in its whole labelling, which the
    cascade reads. In training the proposer is a `proposer.CrossFitted`, which picks the CRF that never
    saw the record by the text of `original`, so a cut text cannot fall back to one that did."""
    if options.proposer is None:
        return [], None
    if training:
        return list(options.proposer.propose(ready, original)), None
    proposals, confidence = options.proposer.read(ready)
    return list(proposals), confidence


@dataclass(frozen=True)
class PromptParts:
    """What a template renders for one record: the record as prompts see it, its demonstrations, its
    vocabulary candidates and its proposals. Training builds these too (and may rename their
    attributes), so both share one path."""

    record: Record
    demos: Sequence[Demo]
    candidates: Sequence[str]
    proposals: Sequence[Proposal] = ()
    # The proposer's confidence in its labelling of the whole text (`SpanProposer.read_text`: calibrated
    # where it has a calibration; None: no proposer, or training); the cascade skips the model where it
    # reaches `TaggingOptions.cascade`.
    confidence: float | None = None
    # False for a product whose category the demo pool does not know (`DemoPool.knows`): the proposer,
    # trained on that catalogue, did not see its like either, so it decides nothing there (`proposer.fuse`)
    # and its confidence does not let it tag the product alone.
    known: bool = True

    def cascaded(self, options: TaggingOptions) -> bool:
        """Whether the proposer alone tags this record: all with `--proposer-alone`, else (`--cascade P`) a
        product of a known category it is that sure of."""
        return options.proposer_alone or (options.cascade is not None and self.known and self.confidence is not None
                and self.confidence >= options.cascade)


def prompt_parts(record: Record, options: TaggingOptions, training: bool = False) -> PromptParts:
    ready = prompt_record(record, options)
    proposals, confidence = prompt_proposals(ready, record, options, training)
    candidates = prompt_candidates(ready, options, training)
    if options.text_budget is not None and len(ready.text) > options.text_budget:
        # Proposals and candidates come from the text as cut to max_text_chars; the model reads the
        # windows around them.
        found = [(p.start, p.end) for p in proposals] + [(c.start, c.end) for c in candidates]
        ready = replace(ready, text=windowed(ready.text, found, options.text_budget))
    known = not retrieving(options) or options.pool.knows(record)
    return PromptParts(ready, prompt_demos(record, options), [c.tag for c in candidates], proposals, confidence, known)


def render_parts(parts: PromptParts, tokenizer: Any, options: TaggingOptions) -> str:
    """The exact prompt: the record's template over `parts`, through the model's chat template."""
    template = template_for(parts.record, options.template)
    return render_prompt(tokenizer, template.messages(parts.record, parts.demos, parts.candidates, parts.proposals))


def build_prompt(record: Record, tokenizer: Any, options: TaggingOptions, training: bool = False) -> str:
    """The exact prompt for `record` (see `prompt_parts`; `training` as in `prompt_candidates`)."""
    return render_parts(prompt_parts(record, options, training), tokenizer, options)


def constraint_for(record: Record, options: TaggingOptions) -> ConstraintSpec | None:
    """The `ConstraintSpec` of `record` (None when nothing is constrained: free mode and no
    schema), from the record as its prompt shows it (`prompt_parts`)."""
    return constraint_of(prompt_parts(record, options).record, options)


def constraint_of(record: Record, options: TaggingOptions) -> ConstraintSpec | None:
    """`constraint_for` of a record `prompt_record` has already prepared."""
    if options.constrain == "free" and not record.schema:
        return None
    if options.constrain == "closed" and options.constrain_vocab is None:
        raise ValueError("constrain='closed' needs a vocabulary (TaggingOptions.constrain_vocab)")
    return ConstraintSpec(
        options.constrain,
        text=record.text if options.constrain == "extract" else None,
        schema=tuple(record.schema) if record.schema else None,
        vocab=options.constrain_vocab if options.constrain == "closed" else None,
    )


def chunked(records: Iterable[Record], size: int, first: int | None = None) -> Iterator[list[Record]]:
    """Lists of `size` records; the first of `first` records when given, so that the first results
    of a long run come after one batch rather than a whole chunk."""
    chunk: list[Record] = []
    limit = first or size
    for record in records:
        chunk.append(record)
        if len(chunk) == limit:
            yield chunk
            chunk, limit = [], size
    if chunk:
        yield chunk


def tag_chunks(
    records: Iterable[Record],
    engine: Any,
    options: TaggingOptions = TaggingOptions(),
    normaliser: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[list[TagResult]]:
    """Tag `records` with `engine` (an `engines.base.Engine`), one
    list of results per chunk of `options.chunk_size` records, in input order."""
    for chunk in chunked(records, options.chunk_size, first=options.batch_size):
        # Each record's parts once: retrieval (and the schema it gives) is not repeated per use.
        parts = [prompt_parts(record, options) for record in chunk]
        results: list[TagResult | None] = [proposer_result(record, p, options, normaliser) if p.cascaded(options)
                                           else None for record, p in zip(chunk, parts)]
        if on_batch is not None and any(results):
            on_batch(sum(r is not None for r in results))
        todo = [i for i, result in enumerate(results) if result is None]
        prompts = [render_parts(parts[i], engine.tokenizer, options) for i in todo]
        constraints = [constraint_of(parts[i].record, options) for i in todo]
        # Engines without constrained decoding still serve unconstrained runs.
        kwargs = {"constraints": constraints} if any(c is not None for c in constraints) else {}
        generations = engine.generate(
            prompts, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, on_batch=on_batch,
            **kwargs,
        ) if todo else []
        for i, generation in zip(todo, generations):
            results[i] = to_result(chunk[i], generation, options, normaliser, schema=parts[i].record.schema,
                                   proposals=parts[i].proposals, known=parts[i].known)
        yield results  # type: ignore[misc]  # every slot is filled


def tag_records(
    records: Iterable[Record],
    engine: Any,
    options: TaggingOptions = TaggingOptions(),
    normaliser: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[TagResult]:
    for chunk in tag_chunks(records, engine, options, normaliser, on_batch):
        yield from chunk


def to_result(record: Record, generation: Any, options: TaggingOptions, normaliser: Any = None,
              schema: Sequence[str] | None = None, proposals: Sequence[Proposal] = (), known: bool = True) -> TagResult:
    """Parse, clean (`hygiene.clean_tags`: against `schema`, else the record's), normalise and ground one
    generation. The `proposals` join the answer, with their marginals as confidences (`proposer.fuse`): the
    answer's tags under `options.confirm_below` that no proposal confirms are dropped first
    (`proposer.confirmed`); for the attributes of `options.proposer_decides` proposals replace its tags, and
    with `options.fill` those it left out at that marginal are added. For a product of unknown category
    (not `known`), the proposer neither confirms nor decides: only `fill` adds its spans."""
    schema = schema if schema is not None else record.schema
    parsed = parse_tag_spans(generation.text)
    by_raw = confidences_by_tag(parsed, generation)
    answer, dropped = clean_tags([p.tag for p in parsed], schema)
    sure = confirmed(answer, [by_raw.get(tag) for tag in answer], proposals, options.confirm_below, known)
    kept, added = fuse(sure, proposals, options.fill, options.proposer_decides, known=known)
    filled, _ = clean_tags([p.tag for p in added], schema)
    # A tag the proposer supplied has its marginal as its confidence, even where the model wrote it too.
    by_raw = {**by_raw, **{p.tag: p.p for p in added}}
    result = TagResult(record, kept + filled, generation.text, generation.prompt_tokens,
                       generation.new_tokens, truncated=len(record.text) > options.max_text_chars, dropped=dropped,
                       cut=generation.new_tokens >= options.max_new_tokens, filled=filled,
                       replaced=[tag for tag in sure if tag not in kept],
                       unconfirmed=[tag for tag in answer if tag not in sure])
    return _finish(result, by_raw, options, normaliser)


def proposer_result(record: Record, parts: PromptParts, options: TaggingOptions, normaliser: Any = None) -> TagResult:
    """The cascade's result for a record the proposer is confident of: its proposals as the tags, their
    marginals as confidences, cleaned and normalised as the model's tags would be. `min_confidence` (a
    threshold on the model's confidences) does not apply: the record passed the cascade's own."""
    kept, dropped = clean_tags([p.tag for p in parts.proposals], parts.record.schema)
    result = TagResult(record, kept, "", truncated=len(record.text) > options.max_text_chars, dropped=dropped,
                       by="proposer")
    return _finish(result, {p.tag: p.p for p in parts.proposals}, replace(options, min_confidence=None), normaliser)


def _finish(result: TagResult, confidence_of: dict[str, float | None], options: TaggingOptions,
            normaliser: Any) -> TagResult:
    """Normalise `result.tags`, drop those below `options.min_confidence` and ground the rest; a tag's
    confidence is that of the line (`confidence_of`) it came from."""
    sources = list(result.tags)
    if normaliser is not None:
        normalised = normaliser.normalise(result.tags)
        kept_tags = [n for n in normalised if n.kept]
        result.tags, sources = [n.tag for n in kept_tags], [n.source for n in kept_tags]
        result.details = [n.to_json() for n in normalised]
    confidences = [confidence_of.get(source) for source in sources]
    filled = set(result.filled)
    if options.min_confidence is not None:
        # A threshold on the model's confidences: a filled tag's is the CRF's marginal, which passed --fill's
        # threshold instead (or, for --proposer-decides, none: those attributes are the CRF's to decide).
        keep = [c is None or c >= options.min_confidence or s in filled for c, s in zip(confidences, sources)]
        result.below_confidence = [t for t, k in zip(result.tags, keep) if not k]
        result.tags = [t for t, k in zip(result.tags, keep) if k]
        sources = [s for s, k in zip(sources, keep) if k]
        confidences = [c for c, k in zip(confidences, keep) if k]
    result.confidences = confidences
    result.filled = [tag for tag, source in zip(result.tags, sources) if source in filled]  # as normalised
    result.evidence = evidence_spans(result.record.text, result.tags, sources)
    return result

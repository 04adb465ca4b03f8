"""Options, built in ONE place: what the user asked for (`Settings`: CLI flags, a TOML config, or a
caller's keywords) becomes the `TaggingOptions` the tagger runs with.

- `Settings` holds every option that shapes a run, with the defaults the CLI shows. The CLI turns its
  parsed flags into one `Settings` at the edge (`Settings.from_mapping(vars(args))`); the library never
  sees an `argparse.Namespace`.
- `tagging_options(settings)`, `normaliser_for(settings)`, `min_confidence(settings)`: the objects the
  tagger takes.

What an adapter brings (its template, candidates, pool, proposer, calibrated threshold) is plan.py's:
`plan.plan_run` reads each adapter once and gives these functions what they need from it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .budget import DEMO_VIEWS
from .candidates import candidate_finder, load_candidate_vocabulary
from .engines.base import DEFAULT_WEIGHTS, MAX_NEW_TOKENS, WEIGHTS
from .metrics import canonical
from .prompts import Demo, PromptTemplate, demos_from, template_choice
from .proposer import SpanProposer
from .records import load_labelled
from .retrieve import DemoPool, load_pool
from .vocab import Normaliser, Vocabulary


class OptionsError(ValueError):
    """Options that cannot work together, or a value out of range; the message names the flag."""


@dataclass
class TaggingOptions:
    template: str | PromptTemplate = "auto"
    demos: Sequence[Demo] = ()  # fixed demonstrations, shown to every record
    # Retrieval (retrieve.py): each record is shown its `retrieve` nearest records of `pool` instead.
    pool: DemoPool | None = None
    retrieve: int = 0
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 8
    # Records generated between two appends to the output: a few batches, so prompts sort by length
    # within a chunk, while a crash loses at most one chunk of work.
    chunk_size: int = 64
    # Product text beyond this many characters is cut before prompting: titles and the head of a
    # description carry the tags, and a 1 MB description must not blow up the model's context.
    max_text_chars: int = 2000
    # The prompt budget for long texts (budget.py): neighbours shown whole or by their title ("title"),
    # and a text longer than `text_budget` characters shown as its title plus the windows around its
    # proposals and candidates (None: whole).
    demo_text: str = "full"
    text_budget: int | None = None
    candidates: Any = None  # a CandidateFinder: vocabulary entries found in the text go into the prompt
    # A span proposer (proposer.SpanProposer, or CrossFitted in training): its spans go into the prompt.
    proposer: Any = None
    # Constrained decoding (constrain/): "free" (only the record's schema limits attribute names),
    # "extract" (values are spans of the text) or "closed" (lines are entries of `constrain_vocab`).
    constrain: str = "free"
    constrain_vocab: Vocabulary | None = None  # for "closed"
    min_confidence: float | None = None  # drop tags the model is less sure of (grounding.py)
    # The cascade: a record whose labelling the span proposer is at least this sure of (its Viterbi path's
    # probability, calibrated: the share of such records exactly right) is tagged by the proposer alone,
    # without generation (None: every record is generated).
    cascade: float | None = None
    # Every record tagged by the proposer alone (--proposer-alone): the CRF as a tagger, no model loaded.
    proposer_alone: bool = False
    # Fusion: the proposer's spans of at least this marginal that the model's answer leaves out (no tag
    # over their words) are added to it (None: the answer stands as written).
    fill: float | None = None
    # Attributes the proposer decides: the model's tags for them give way to its spans (proposer.decide).
    proposer_decides: frozenset[str] = frozenset()
    # The model's tags it is less sure of than this stand only where the proposer found them too
    # (proposer.confirmed; None: all stand).
    confirm_below: float | None = None
    # How strongly the adapter is applied: its LoRA update times this (1: as trained; 0: the base model).
    adapter_scale: float = 1.0


MAX_ADAPTER_SCALE = 2.0


@dataclass(frozen=True)
class Settings:
    """Every option of `generate`, `eval` and `prompt compare` that is not about files in or out.

    The CLI's flags share these names and defaults. Values are as the user gave them (paths and
    names, not loaded objects), so settings can be recorded beside an output and sent to workers.
    """

    # the model
    base_model: str | None = None  # None: $LLMTAGS_BASE_MODEL, else the embedded model
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "auto"
    weights: str = DEFAULT_WEIGHTS  # how llama.cpp runs the embedded 0.5B: requantised to "q8_0" (faster) or "as-is"
    # the prompt
    template: str = "auto"
    demos: str | None = None  # a labelled file of demonstrations
    shots: int = 4  # without retrieve: the first `shots` demonstrations, the same for every record
    # The prompt budget (budget.py): retrieved neighbours shown "full" or by their "title", and a text longer
    # than text_budget characters shown as its title and windows (0: whole). None: what the adapter was
    # trained with, else "full" and whole.
    demo_text: str | None = None
    text_budget: int | None = None
    retrieve: int | None = None  # K: each record is shown its K most similar demonstrations (None: unset)
    candidates: str | None = None  # a vocabulary or labelled file(s), comma-joined
    no_candidates: bool = False
    proposer: str | None = None  # a span proposer model file (proposer.py); an adapter brings its own
    no_proposer: bool = False
    # generation
    batch_size: int = 8
    max_new_tokens: int = MAX_NEW_TOKENS
    chunk_size: int = 64
    constrain: str = "free"
    constrain_vocab: str | None = None
    min_confidence: str | None = None  # a number in [0, 1], or "calibrated"
    cascade: float | None = None  # P in (0, 1]: the proposer alone tags records it is this sure of
    proposer_alone: bool = False  # the proposer alone tags every record: no model
    fill: float | None = None  # P in (0, 1]: add the proposer's spans this likely that the answer leaves out
    proposer_decides: str | None = None  # comma-joined attributes whose tags are the proposer's spans
    confirm_below: float | None = None  # C in (0, 1]: the model's tags under C stand only where the proposer found them
    # The answers as written: neither --fill, --proposer-decides nor --confirm-below, not even the adapter's.
    no_fill: bool = False
    # normalisation
    vocab: str | None = None
    policy: str = "open"
    fuzzy_threshold: float = 90.0
    # adapters
    adapter: str | None = None
    adapter_map: str | None = None
    adapters_root: str | None = None
    force_adapter: bool = False
    adapter_scale: float | None = None  # the adapter's LoRA update times this (None: 1, as trained)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """The settings among `values` (e.g. `vars()` of parsed flags); other keys are ignored, and
        absent ones keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def wants_adapters(self) -> bool:
        return bool(self.adapter or self.adapter_map)


def is_share(value: float) -> bool:
    """Whether `value` is a threshold the fusion and the cascade accept (`--cascade`, `--fill`,
    `--confirm-below` and their recorded adapter defaults): in (0, 1]."""
    return 0.0 < value <= 1.0


def tagging_options(settings: Settings, templates: Sequence[PromptTemplate] = (),
                    calibration: Mapping[str, Any] | None = None) -> TaggingOptions:
    """The `TaggingOptions` of `settings`: templates, demonstrations and vocabularies loaded. `templates`:
    the variants a comparison runs instead of `settings.template` (retrieval needs one to show demos);
    `calibration`: what `llmtags calibrate` stored in the --adapter, for `--min-confidence calibrated`."""
    template = template_choice(settings.template)
    if settings.weights not in WEIGHTS:  # a config file's value is not checked by the flag's choices
        raise OptionsError(f"--weights {settings.weights}: use one of {', '.join(WEIGHTS)}")
    retrieve = settings.retrieve or 0
    if retrieve < 0:
        raise OptionsError(f"--retrieve: expected a number of demonstrations >= 0, got {retrieve}")
    if retrieve and not settings.demos:
        raise OptionsError("--retrieve K needs --demos FILE: the labelled records to retrieve from")
    demos: Sequence[Demo] = ()
    pool = None
    if settings.demos and retrieve:
        if not any(t.renders("demos") for t in templates):
            check_shows_demos(template)
        pool = load_pool(settings.demos)
    elif settings.demos and settings.retrieve is None:  # no --retrieve: fixed shots (--retrieve 0: none at all)
        demos = demos_from(load_labelled(settings.demos), settings.shots)
    if template != "auto" and template.name == "few_shot" and not demos and pool is None:
        raise OptionsError(f"template {template.name!r} shows demonstrations: give --demos FILE")
    candidates = None
    # The proposer alone reads no prompt: building the candidates (a minute and more for a large sample) is skipped.
    if settings.candidates and not settings.no_candidates and not settings.proposer_alone:
        candidates = candidate_finder(settings.candidates)
    proposer = load_proposer(settings.proposer, settings.cascade) if settings.proposer and not settings.no_proposer else None
    check_budget(settings.demo_text or "full", settings.text_budget, "--demo-text", "--text-budget")
    decides = decided_attributes(settings.proposer_decides)
    for flag, value, meaning in (("--cascade", settings.cascade, "the proposer's confidence above which it tags a "
                                  "record alone"),
                                 ("--fill", settings.fill, "the marginal probability a proposer's span needs to be "
                                  "added to the model's answer"),
                                 ("--confirm-below", settings.confirm_below, "the model's confidence under which "
                                  "a tag stands only where the proposer found it too"),
                                 ("--proposer-decides", decides or None, "")):
        if value is None:
            continue
        if not isinstance(value, frozenset) and not is_share(value):
            raise OptionsError(f"{flag}: {value} is not in (0, 1]: it is {meaning}")
        if settings.constrain == "closed":
            raise OptionsError(f"{flag} and --constrain closed do not go together: the proposer's spans are not "
                               "limited to the closed vocabulary")
        if proposer is None and not settings.adapter_map:
            raise OptionsError(f"{flag} needs a span proposer: an --adapter that ships one, --demos SAMPLE with such an "
                               "adapter, or --proposer MODEL (and not --no-proposer)")
    if settings.proposer_alone and (proposer is None or settings.adapter_map):
        raise OptionsError("--proposer-alone tags with a span proposer alone: give one --adapter that ships one, "
                           "--demos SAMPLE with such an adapter, or --proposer MODEL (not --adapter-map or "
                           "--no-proposer)")
    for flag, given in (("--proposer-decides", decides), ("--confirm-below", settings.confirm_below is not None)):
        if given and settings.no_fill:
            raise OptionsError(f"{flag} and --no-fill do not go together: --no-fill keeps the answers as written")
    if decides and proposer is not None:
        check_decided(decides, proposer, "--proposer-decides (or the adapter's llmtags.json proposer.decides)")
    scale = 1.0 if settings.adapter_scale is None else settings.adapter_scale
    if not 0.0 <= scale <= MAX_ADAPTER_SCALE:
        raise OptionsError(f"--adapter-scale: {scale} is not between 0 and {MAX_ADAPTER_SCALE:g}: it multiplies the "
                           "adapter's LoRA update (1: as trained, 0: the base model alone)")
    if settings.adapter_scale is not None and not settings.wants_adapters:
        raise OptionsError("--adapter-scale scales an adapter: give --adapter NAME (or --adapter-map)")
    constrain_vocab = None
    if settings.constrain == "closed":
        path = settings.constrain_vocab or settings.vocab
        if not path:
            raise OptionsError("--constrain closed needs --constrain-vocab VOCAB (or --vocab)")
        constrain_vocab = load_candidate_vocabulary(path)
    return TaggingOptions(template, demos, pool, retrieve, settings.max_new_tokens, settings.batch_size,
                          settings.chunk_size, candidates=candidates, proposer=proposer, constrain=settings.constrain,
                          constrain_vocab=constrain_vocab, min_confidence=min_confidence(settings, calibration),
                          cascade=settings.cascade, proposer_alone=settings.proposer_alone,
                          fill=None if settings.no_fill else settings.fill,
                          proposer_decides=frozenset() if settings.no_fill else decides,
                          confirm_below=None if settings.no_fill else settings.confirm_below,
                          demo_text=settings.demo_text or "full", text_budget=settings.text_budget or None,
                          adapter_scale=scale)


def load_proposer(path: str, cascade: float | None) -> SpanProposer:
    """The span proposer at `path`; with the cascade on, a warning where its confidence is uncalibrated (a
    proposer trained before calibration existed, or by hand): --cascade P then compares P with the CRF's
    raw probability of the whole labelling, which overstates how often such records are right."""
    proposer = SpanProposer(path)
    calibration = proposer.calibration
    if cascade is None:
        return proposer
    if calibration is None:
        print(f"llmtags: warning: the span proposer {path} has no confidence calibration: --cascade {cascade} is "
              "compared with its raw probability of the whole labelling, which overstates how often such records "
              "are right; an adapter's is calibrated by llmtags adapters pack ADAPTER --calibrate TRAIN (the files "
              "it was trained on)", file=sys.stderr)
    elif cascade <= calibration.rates[0] or cascade > calibration.rates[-1]:
        # The map is flat outside the confidences it was fitted on: every record, or none, reaches P.
        print(f"llmtags: warning: --cascade {cascade} lets the span proposer alone tag "
              f"{'every record' if cascade <= calibration.rates[0] else 'no record'}: its calibrated confidence "
              f"runs from {calibration.rates[0]:.3f} to {calibration.rates[-1]:.3f}", file=sys.stderr)
    return proposer


def check_budget(demo_text: str, text_budget: int | None, demo_name: str, budget_name: str) -> None:
    """The prompt budget's two settings (budget.py), as given to generate or train (0: no budget)."""
    if demo_text not in DEMO_VIEWS:
        raise OptionsError(f"{demo_name}: expected one of {', '.join(DEMO_VIEWS)}, got {demo_text!r}")
    if text_budget is not None and text_budget != 0 and text_budget < 40:
        raise OptionsError(f"{budget_name}: {text_budget} characters is too few to keep a title; give 40 or more "
                           "(or 0: whole texts)")


def decided_attributes(joined: str | None) -> frozenset[str]:
    """`--proposer-decides A,B`: the attribute names, without blanks."""
    return frozenset(name.strip() for name in (joined or "").split(",") if name.strip())


def check_decided(decides: frozenset[str], proposer: Any, source: str) -> None:
    """Every attribute given to the proposer to decide is one it tags: for another, the model's tags would
    be dropped and nothing put in their place."""
    unknown = sorted(name for name in decides if canonical(name) not in proposer.attributes)
    if unknown:
        raise OptionsError(f"{source}: the span proposer never learnt {', '.join(unknown)}; it tags "
                           f"{', '.join(sorted(proposer.attributes))}")


def check_shows_demos(template: str | PromptTemplate) -> None:
    """Retrieved demonstrations need a template that renders `demos`; the zh and en defaults do not."""
    if template == "auto" or not template.renders("demos"):
        name = "auto (zh/en)" if template == "auto" else template.name
        raise OptionsError(f"--retrieve: template {name} does not show demonstrations; use --template tuned or "
                           "few_shot, or a .j2 file whose user block renders `demos`")


def min_confidence(settings: Settings, calibration: Mapping[str, Any] | None = None) -> float | None:
    """`--min-confidence`: a number in [0, 1], or 'calibrated', the threshold stored in the --adapter
    (`calibration`: the `calibration` entry of its llmtags.json, as the run plan read it)."""
    value = settings.min_confidence
    if value is None:
        return None
    if value == "calibrated":
        if not settings.adapter:
            raise OptionsError("--min-confidence calibrated needs --adapter NAME (the threshold is stored there)")
        calibration = calibration or {}
        if calibration.get("threshold") is None:
            raise OptionsError(f"adapter {settings.adapter!r} has no calibrated threshold: run llmtags calibrate first")
        print(f"llmtags: adapter {settings.adapter}: min confidence {calibration['threshold']:.3f} (calibrated for "
              f"precision {calibration['target_precision']:.2f})", file=sys.stderr)
        return float(calibration["threshold"])
    try:
        threshold = float(value)
    except ValueError:
        raise OptionsError(f"--min-confidence: expected a number between 0 and 1 or 'calibrated', got {value!r}") from None
    if not 0.0 <= threshold <= 1.0:
        raise OptionsError(f"--min-confidence: {threshold} is not between 0 and 1")
    return threshold


def normaliser_for(settings: Settings) -> Normaliser | None:
    """The `--vocab` normaliser, or None."""
    if not settings.vocab:
        return None
    return Normaliser(Vocabulary.load(settings.vocab), policy=settings.policy, fuzzy_threshold=settings.fuzzy_threshold)

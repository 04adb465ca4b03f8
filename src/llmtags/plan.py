"""The plan of a run: what `generate`, `eval` and `prompt compare` tag with, resolved once before tagging.

`plan_run(settings)` resolves every adapter the settings name (`--adapter`, or each adapter of
`--adapter-map`) once: its directory, its metadata (`llmtags.json`), the sha256 of its weights and of
the files it ships for its prompts. It fills the prompt options the user left unset with what the
adapter brings (`adapter_defaults`: its template, candidate vocabulary, demo pool and K, span proposer),
and loads what the tagger takes: the `TaggingOptions` of the run (and one per adapter of a map), the
normaliser and the confidence threshold. The stages (run.py, adapters/routing.py, evaluate.py) read the
`RunPlan`; none of them resolves an adapter again. A Ray worker gets the plain `Settings` and plans
its own run from them, because loaded options (indexes, CRF models) need not pickle.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters.maps import AdapterMap, load_adapter_map
from .adapters.pack import POOL_FILE, PROPOSER_CALIBRATION_FILE, PROPOSER_FEATURES_FILE, PROPOSER_FILE, VOCABULARY_FILE
from .adapters.registry import METADATA_FILE, AdapterError, read_metadata, resolve_adapter, weights_sha256
from .candidates import candidate_finder, candidate_sources, labelled_sources
from .models import base_model_spec, cache_root, sha256_file
from .options import (OptionsError, Settings, TaggingOptions, check_budget, check_decided, check_shows_demos,
                      decided_attributes, is_share, load_proposer, normaliser_for, tagging_options)
from .prompts import PromptTemplate, template_choice
from .proposer import FEATURE_VERSIONS, ProposerSettings, calibration_path, features_path, sample_proposer
from .retrieve import load_pool
from .vocab import Normaliser

# What an adapter ships for its prompts (adapters/pack.py): re-packing it changes the tags too.
SHIPPED_FILES = (POOL_FILE, VOCABULARY_FILE, PROPOSER_FILE, PROPOSER_FEATURES_FILE, PROPOSER_CALIBRATION_FILE)
# Settings that name files whose content decides the tags (comma-joined where several).
HASHED_SETTINGS = ("candidates", "vocab", "constrain_vocab", "demos", "adapter_map", "template", "proposer")


@dataclass(frozen=True)
class ResolvedAdapter:
    """One adapter as a run uses it, read from disk once."""

    name: str  # as the settings give it: a registry name, or a directory
    path: Path
    meta: dict[str, Any]  # its llmtags.json
    weights_sha256: str
    shipped_sha256: Mapping[str, str]  # file it ships (SHIPPED_FILES) → sha256

    @property
    def base_model(self) -> str | None:
        """The spec of the base model it was trained on."""
        return self.field("base_model.spec", str)

    def field(self, dotted: str, kind: type, required: bool = False) -> Any:
        """The metadata entry `dotted` ("retrieval.k"), None where absent or null (unless `required`). The
        file may come from anywhere, so a value of another type is an error naming the file and the field."""
        value: Any = self.meta
        for key in dotted.split("."):
            if value is None:
                break
            if not isinstance(value, dict):
                raise AdapterError(f"{self.path / METADATA_FILE}: field {dotted}: {key!r} is not inside an object")
            value = value.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise AdapterError(f"{self.path / METADATA_FILE}: field {dotted}: expected {kind.__name__}, got {value!r}")
        return value

    @property
    def cache_key(self) -> str:
        """What tells this adapter's generations apart in the generation cache."""
        return f"{self.path.name}@{self.weights_sha256[:16]}"


def resolved_adapter(name: str, root: str | Path | None = None) -> ResolvedAdapter:
    """Adapter `name` (a registry name under `root`, or a directory): its directory, metadata and hashes."""
    path = resolve_adapter(name, root)
    shipped = {file: sha256_file(path / file) for file in SHIPPED_FILES if (path / file).is_file()}
    return ResolvedAdapter(name, path, read_metadata(path), weights_sha256(path), shipped)


# --- what an adapter brings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterDefaults:
    """What an adapter was trained with, for the prompt options the user left unset (None: keep the
    user's). Files an adapter ships (its pool, its vocabulary, its proposer) are named inside its directory."""

    template: str | None = None
    candidates: str | None = None
    demos: str | None = None
    retrieve: int | None = None
    proposer: str | None = None
    fill: float | None = None  # the --fill P chosen on the adapter's dev records (llmtags.json: proposer.fill)
    proposer_decides: str | None = None  # comma-joined, chosen there too (proposer.decides)
    confirm_below: float | None = None  # the --confirm-below C chosen there too (proposer.confirm_below)
    # The prompt budget its training prompts had (hyperparameters.demo_text / text_budget; budget.py).
    demo_text: str | None = None
    text_budget: int | None = None
    # Not a setting: the --demos sample that supplies candidates or proposer instead of the adapter's own.
    sample: str | None = None

    def changes(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "sample"}


def _adapter_file(adapter_dir: Path, path: str) -> str:
    """`path` as the adapter's metadata records it: a file the adapter ships (relative to its directory,
    comma-joined for several), else a path relative to where llmtags runs."""
    parts = [str(adapter_dir / p) if (adapter_dir / p).is_file() else p for p in path.split(",")]
    return ",".join(parts)


def _say(message: str) -> None:
    print(f"llmtags: {message}", file=sys.stderr)


def _absent(name: str, what: str, source: str, consequence: str) -> bool:
    missing = [path for path in candidate_sources(source) if not Path(path).is_file()]
    if missing:
        print(f"llmtags: warning: adapter {name} was trained with {what} from {source}, but "
              f"{', '.join(missing)} is absent here: {consequence}", file=sys.stderr)
    return bool(missing)


def _shipped_proposer(adapter: ResolvedAdapter) -> str | None:
    """The adapter's own proposer file, or None with a warning where it is absent or not the file its
    metadata recorded (crfsuite parses the file in C: only the recorded bytes are opened)."""
    name = adapter.field("proposer.path", str, required=True)
    path = adapter.path / name
    if not path.is_file():
        _say(f"warning: adapter {adapter.name} was trained with a span proposer, but {path} is absent: tagging "
             f"without it; give --proposer MODEL, or llmtags adapters pack {adapter.name} --proposer LABELLED")
        return None
    for file, field in ((path, "proposer.sha256"), (features_path(path), "proposer.features_sha256"),
                        (calibration_path(path), "proposer.calibration_sha256")):
        recorded = adapter.field(field, str)
        if recorded is None:
            continue
        if not file.is_file() or adapter.shipped_sha256.get(file.name, sha256_file(file)) != recorded:
            _say(f"warning: {file} is not the span proposer file adapter {adapter.name} recorded (absent, or its "
                 "sha256 differs): tagging without the proposer")
            return None
    return str(path)


def adapter_defaults(adapter: ResolvedAdapter, settings: Settings) -> AdapterDefaults:
    """The template, candidates, retrieval and span proposer `adapter` was trained with, where `settings`
    leave them unset. A file absent here is dropped with a warning (the adapter still works, less well),
    so `generate` runs on a machine without the training data.

    `--demos FILE` points the adapter at another catalogue's labelled sample: retrieval then draws from
    FILE (with the adapter's K unless --retrieve is given), and so do the candidates and, for an adapter
    that reads proposals, the span proposer (trained on the sample on first use, then cached by its
    hash), because the adapter's own vocabulary and CRF belong to its own catalogue. With --retrieve 0,
    and for an adapter trained without demonstrations, the sample still supplies candidates and proposer,
    only no neighbours are shown."""
    name = adapter.name
    template = adapter.field("template.spec", str) if settings.template == "auto" else None
    retrieval = adapter.field("retrieval", dict)
    demos, retrieve = None, None
    if retrieval and settings.demos is None and settings.retrieve != 0:
        pool = _adapter_file(adapter.path, adapter.field("retrieval.pool", str, required=True))
        if not _absent(name, "demonstrations", pool, "tagging without retrieval; give --demos POOL --retrieve K"):
            demos, retrieve = pool, settings.retrieve or adapter.field("retrieval.k", int, required=True)
    elif retrieval and settings.demos and settings.retrieve is None:
        retrieve = adapter.field("retrieval.k", int, required=True)
    elif settings.demos and settings.retrieve is None:
        # An adapter trained without demonstrations (`train` shows none without --retrieve): --demos is a new
        # catalogue's sample, for candidates and proposer; shown as fixed shots it would make a prompt the
        # adapter never saw.
        retrieve = 0
    source = adapter.field("vocabulary.candidates.path", str)
    # Another catalogue's sample serves candidates and the proposer, with or without neighbours (--retrieve 0).
    sample_given = bool(settings.demos)
    from_sample = False  # whether the sample supplies candidates or proposer (besides neighbours)
    if not source or settings.candidates or settings.no_candidates:
        source = None
    elif sample_given:  # another catalogue's sample: its own vocabulary, not the adapter's
        source, from_sample = settings.demos, True
    else:
        source = _adapter_file(adapter.path, source)
        if _absent(name, "vocabulary candidates", source, "tagging without candidates, which lowers recall; give "
                   "--candidates VOCAB (that file, or a vocabulary built from it)"):
            source = None
    proposer = None
    if adapter.field("proposer", dict) and not settings.proposer and not settings.no_proposer:
        features = adapter.field("proposer.settings.features", int)
        if features is not None and features not in FEATURE_VERSIONS:
            print(f"llmtags: warning: adapter {name}'s span proposer uses features version {features}, this llmtags "
                  f"computes {', '.join(map(str, FEATURE_VERSIONS))}: tagging without it; train it again with "
                  f"llmtags adapters pack {name} --proposer LABELLED", file=sys.stderr)
        elif sample_given:  # another catalogue's sample: a CRF of its own, trained as the adapter's was
            records = labelled_sources(settings.demos)
            proposer_settings = ProposerSettings.recorded(adapter.field("proposer.settings", dict) or {})
            try:
                # Calibrated where the cascade reads its confidence (once per sample: k fold models, cached).
                proposer = str(sample_proposer(records, cache_root() / "proposers", proposer_settings, log=_say,
                                               calibrate=settings.cascade is not None).path)
                from_sample = True
            except ValueError as exc:
                _say(f"warning: no span proposer from {settings.demos} ({exc}): tagging without one")
        else:
            proposer = _shipped_proposer(adapter)
    fill, decides, confirm_below = None, None, None
    # The proposer's spans are not limited to a closed vocabulary: with --constrain closed the answer stands.
    fusing = proposer and not settings.no_fill and settings.constrain != "closed"
    if fusing and settings.fill is None:
        fill = _recorded_share(adapter, "fill")
    if fusing and settings.confirm_below is None:
        confirm_below = _recorded_share(adapter, "confirm_below")
    # Which attributes its CRF tags better was measured on the adapter's own catalogue, not on a sample's.
    if fusing and settings.proposer_decides is None and not sample_given:
        recorded = adapter.field("proposer.decides", list)
        if recorded is not None and not all(isinstance(a, str) and a.strip() for a in recorded):
            raise OptionsError(f"adapter {name}: llmtags.json proposer.decides is {recorded}, not a list of names")
        decides = ",".join(recorded) if recorded else None
    # Prompts as the adapter's training prompts were: neighbours by title, long texts windowed.
    demo_text = adapter.field("hyperparameters.demo_text", str) if settings.demo_text is None else None
    text_budget = adapter.field("hyperparameters.text_budget", int) if settings.text_budget is None else None
    check_budget(demo_text or "full", text_budget, f"adapter {name}: llmtags.json hyperparameters.demo_text",
                 f"adapter {name}: llmtags.json hyperparameters.text_budget")
    found = AdapterDefaults(template, source, demos, retrieve, proposer, fill, decides, confirm_below,
                            None if demo_text == "full" else demo_text, text_budget or None,
                            settings.demos if from_sample else None)
    if (found.candidates or found.demos or found.retrieve is not None or found.proposer or found.demo_text
            or found.text_budget):
        print(f"llmtags: adapter {name}: " + "; ".join(
            [f"span proposer {found.proposer}"] * bool(found.proposer)
            + [f"its spans of marginal >= {found.fill} that answers leave out added (--fill; --no-fill: not)"]
            * (found.fill is not None)
            + [f"its spans decide {found.proposer_decides} (--proposer-decides; --no-fill: not)"]
            * bool(found.proposer_decides)
            + [f"the model's tags under confidence {found.confirm_below} kept only where its spans have them too "
               "(--confirm-below; --no-fill: all)"] * (found.confirm_below is not None)
            + [f"candidates from {found.candidates}"] * bool(found.candidates)
            + [f"{found.retrieve or settings.retrieve} demonstrations retrieved from {found.demos or settings.demos}"]
            * bool(found.demos or (settings.demos and found.retrieve))
            + [f"no demonstrations shown (it was trained without; --demos serves candidates and proposer)"]
            * (settings.demos is not None and found.retrieve == 0)
            + [f"neighbours shown by their {found.demo_text} (--demo-text)"] * bool(found.demo_text)
            + [f"texts over {found.text_budget} characters shown as title + windows (--text-budget; 0: whole)"]
            * bool(found.text_budget)),
            file=sys.stderr)
    return found


def _fusion_with_a_proposer_only(options: TaggingOptions) -> TaggingOptions:
    """Without a proposer (an adapter of a map that ships none, or the base model's records of a map) the
    answers stand as written: with no spans to confirm or decide, --confirm-below and --proposer-decides
    would drop the model's tags for nothing."""
    if options.proposer is not None:
        return options
    return dataclasses.replace(options, fill=None, proposer_decides=frozenset(), confirm_below=None)


def _recorded_share(adapter: ResolvedAdapter, key: str) -> float | None:
    """The adapter's recorded `proposer.KEY` (a threshold in (0, 1]), or None."""
    value = adapter.field(f"proposer.{key}", float)
    if value is not None and not is_share(value):
        raise OptionsError(f"adapter {adapter.name}: llmtags.json proposer.{key} is {value}, not in (0, 1]")
    return value


def _with_defaults(options: TaggingOptions, found: AdapterDefaults, settings: Settings) -> TaggingOptions:
    """`options` (the run's) with what one adapter of a map brings filled in: each adapter of a map keeps
    its own template, candidates, proposer and pool, while what they share is loaded once."""
    changes: dict[str, Any] = {}
    if found.template:
        changes["template"] = template_choice(found.template)
    if found.candidates:
        changes["candidates"] = candidate_finder(found.candidates)
    if found.proposer:
        changes["proposer"] = load_proposer(found.proposer, settings.cascade)
    if found.fill is not None:
        changes["fill"] = found.fill
    if found.confirm_below is not None:
        changes["confirm_below"] = found.confirm_below
    if found.demo_text:
        changes["demo_text"] = found.demo_text
    if found.text_budget:
        changes["text_budget"] = found.text_budget
    if found.proposer_decides:
        changes["proposer_decides"] = decided_attributes(found.proposer_decides)
        check_decided(changes["proposer_decides"], changes.get("proposer", options.proposer),
                      f"proposer.decides in the llmtags.json beside {found.proposer}")
    demos = found.demos or settings.demos
    retrieve = found.retrieve if found.retrieve is not None else settings.retrieve
    if demos and retrieve:
        check_shows_demos(changes.get("template", options.template))
        changes.update(pool=load_pool(demos), retrieve=retrieve)
    return dataclasses.replace(options, **changes)


# --- the plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """Everything a run tags with, resolved and loaded once."""

    settings: Settings  # as given, with one --adapter's defaults filled in: what the run records
    options: TaggingOptions
    normaliser: Normaliser | None = None
    # By the name the settings give (--adapter, or the map's names, in the map's order).
    adapters: Mapping[str, ResolvedAdapter] = dataclasses.field(default_factory=dict)
    adapter_map: AdapterMap | None = None
    # With a map: each adapter's own options (its template, candidates, pool, proposer).
    options_by_adapter: Mapping[str, TaggingOptions] = dataclasses.field(default_factory=dict)
    # The labelled file whose gold tags the prompts draw on (the pool, or the --demos sample that also
    # supplies candidates or proposer): scores on records it holds are optimistic (`eval` warns). Runs of one
    # --adapter or none; with a map, each adapter's own options say what it draws on.
    sample: str | None = None

    @property
    def adapter(self) -> ResolvedAdapter | None:
        """The one --adapter (None without, or with a map)."""
        return self.adapters.get(self.settings.adapter) if self.settings.adapter else None

    @property
    def base_model(self) -> str | None:
        """--base-model (or $LLMTAGS_BASE_MODEL); without one, the base the (first) adapter was trained on;
        None: the default base model."""
        explicit = base_model_spec(self.settings.base_model, default=None)
        if explicit is None and self.adapters:
            return next(iter(self.adapters.values())).base_model
        return explicit

    def options_for(self, adapter: str | None) -> TaggingOptions:
        """The options the records routed to `adapter` (None: the base model) are tagged with."""
        return self.options_by_adapter.get(adapter, self.options) if adapter is not None else self.options

    def content_hashes(self) -> dict[str, Any]:
        """The sha256 of every file the settings name and of each adapter's weights and shipped files,
        so that a retrained or re-packed adapter, or an edited vocabulary, counts as another run."""
        hashes: dict[str, Any] = {}
        values = dataclasses.asdict(self.settings)
        for key in HASHED_SETTINGS:
            value = values.get(key)
            parts = candidate_sources(value) if isinstance(value, str) else []
            if parts and all(Path(part).is_file() for part in parts):
                digests = [sha256_file(part) for part in parts]
                hashes[f"{key} sha256"] = digests[0] if len(digests) == 1 else digests
        # A proposer's calibration decides only which records the cascade skips: a run without the cascade
        # tags the same with or without it (and resumes after an adapter is calibrated).
        cascade = self.settings.cascade is not None
        if cascade and self.settings.proposer and calibration_path(self.settings.proposer).is_file():
            hashes["proposer calibration sha256"] = sha256_file(calibration_path(self.settings.proposer))
        for name, adapter in self.adapters.items():
            hashes[f"adapter {name} sha256"] = adapter.weights_sha256
            if name in self.options_by_adapter:  # a map: each adapter's own fusion and budget decide its tags too
                options = self.options_by_adapter[name]
                hashes[f"adapter {name} fill"] = options.fill
                if options.confirm_below is not None:
                    hashes[f"adapter {name} confirm below"] = options.confirm_below
                decides = sorted(options.proposer_decides)
                if decides:
                    hashes[f"adapter {name} proposer decides"] = decides
                if options.demo_text != "full" or options.text_budget:
                    hashes[f"adapter {name} prompt budget"] = [options.demo_text, options.text_budget]
            for file, digest in adapter.shipped_sha256.items():
                if file != PROPOSER_CALIBRATION_FILE or cascade:
                    hashes[f"adapter {name} {file} sha256"] = digest
        return hashes


def plan_run(settings: Settings, templates: Sequence[PromptTemplate] = ()) -> RunPlan:
    """The plan of a run with `settings`. `templates`: the variants `prompt compare` runs instead of the
    settings' template (retrieval needs one of them to show demonstrations)."""
    adapter_map = load_adapter_map(settings.adapter_map) if settings.adapter_map else None
    names = adapter_map.adapter_names if adapter_map is not None else [settings.adapter] if settings.adapter else []
    adapters = {name: resolved_adapter(name, settings.adapters_root) for name in names}
    calibration, sample = None, None
    if settings.adapter:
        # One adapter: its defaults become the run's own settings, recorded with the output.
        defaults = adapter_defaults(adapters[settings.adapter], settings)
        settings, sample = settings.replace(**defaults.changes()), defaults.sample
        calibration = adapters[settings.adapter].field("calibration", dict)
    given = tagging_options(settings, templates, calibration)
    options = _fusion_with_a_proposer_only(given)
    if sample is None and settings.demos and (options.pool is not None or settings.candidates == settings.demos):
        sample = settings.demos
    per_adapter: dict[str, TaggingOptions] = {}
    for name, adapter in adapters.items() if adapter_map is not None else ():
        per_adapter[name] = _fusion_with_a_proposer_only(
            _with_defaults(given, adapter_defaults(adapter, settings), settings))
    for flag, value, then in (("--cascade", settings.cascade, "are all generated"),
                              ("--fill", settings.fill, "keep the model's answers as written"),
                              ("--confirm-below", settings.confirm_below, "keep the model's answers as written"),
                              ("--proposer-decides", settings.proposer_decides, "keep the model's answers as written")):
        if value is None or adapter_map is None:
            continue
        without = [name for name, o in per_adapter.items() if o.proposer is None]
        if len(without) == len(per_adapter):
            raise OptionsError(f"{flag} needs a span proposer, and no adapter of the map brings one")
        if without:
            _say(f"warning: {flag}: adapters {', '.join(without)} bring no span proposer; their records (and those "
                 f"of the base model) {then}")
    return RunPlan(settings, options, normaliser_for(settings), adapters, adapter_map, per_adapter, sample)

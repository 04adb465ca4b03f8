"""Routing: which adapter tags which record (by category, then language), and tagging a stream of
records with each record's own adapter on one base model."""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..engines.adapter_set import AdapterSet, BaseAdapterSet, LlamaCppAdapterSet
from ..engines.select import pick_engine
from ..models import base_model_spec
from ..options import Settings, TaggingOptions, adapter_options
from ..prompts import detect_lang
from ..records import Record
from ..tagger import TagResult, chunked, tag_chunks
from .registry import (
    AdapterError,
    read_metadata,
    resolve_adapter,
    validate_adapter_name,
)


@dataclass
class AdapterMap:
    """Category → adapter name, then language → adapter name; records matching neither use `default`
    (None: the base model). A record's language is its `lang` field, else detected from its text."""

    categories: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    languages: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for adapter in [*self.categories.values(), *self.languages.values(), *([self.default] if self.default else [])]:
            validate_adapter_name(adapter)
        self._folded = {_fold(k): v for k, v in self.categories.items()}

    @property
    def adapter_names(self) -> list[str]:
        names = list(dict.fromkeys([*self.categories.values(), *self.languages.values()]))
        if self.default and self.default not in names:
            names.append(self.default)
        return names

    def adapter_for(self, category: str | None, lang: str | None = None) -> str | None:
        if category is not None:
            if category in self.categories:
                return self.categories[category]
            if _fold(category) in self._folded:
                return self._folded[_fold(category)]
        if lang is not None and lang in self.languages:
            return self.languages[lang]
        return self.default

    def adapter_for_record(self, record: Record) -> str | None:
        lang = record.lang or (detect_lang(record.text) if self.languages else None)
        return self.adapter_for(record.category, lang)


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold().strip()


def load_adapter_map(path: str | Path) -> AdapterMap:
    """Read a TOML adapter map: `[categories]` of `"category" = "adapter"`, `[languages]` of
    `zh = "adapter"`, and an optional `default`."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AdapterError(f"cannot read adapter map {path}: {exc}") from exc
    unknown = set(data) - {"categories", "languages", "default"}
    if unknown:
        raise AdapterError(f"adapter map {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                           "expected [categories], [languages] and default")
    tables = {}
    for key in ("categories", "languages"):
        table = data.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise AdapterError(f"adapter map {path}: [{key}] must map names to adapter names")
        tables[key] = {str(k): v for k, v in table.items()}
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise AdapterError(f"adapter map {path}: default must be an adapter name")
    return AdapterMap(tables["categories"], default or None, tables["languages"])


def route(
    records: Sequence[Record], adapter: str | None = None, adapter_map: AdapterMap | None = None
) -> dict[str | None, list[int]]:
    """Group record indices by the adapter that tags them (None: the base model), in input order."""
    if adapter is not None and adapter_map is not None:
        raise AdapterError("give either one adapter or an adapter map, not both")
    groups: dict[str | None, list[int]] = {}
    for i, record in enumerate(records):
        name = adapter_map.adapter_for_record(record) if adapter_map is not None else adapter
        groups.setdefault(name, []).append(i)
    return groups


def tag_chunks_routed(
    records: Iterable[Record],
    adapter_set: BaseAdapterSet,
    options: Any = None,
    *,
    adapter: str | None = None,
    adapter_map: AdapterMap | None = None,
    normaliser: Any = None,
    on_batch: Callable[[int], None] | None = None,
    options_by_adapter: Mapping[str | None, Any] | None = None,
) -> Iterator[list[Any]]:
    """Like `tagger.tag_chunks`, but each record is generated with its own adapter (and that adapter's
    entry of `options_by_adapter`, else `options`: adapters may differ in template and candidates).

    Records are taken in chunks of `options.chunk_size`; within a chunk they are grouped by adapter so
    every batch runs with one adapter active, and each chunk's results come back in input order, as
    `RoutedTagResult`s that know their adapter (and, with a map, name it in their JSON line).
    """
    options = options or TaggingOptions()
    for chunk in chunked(records, options.chunk_size, first=options.batch_size):
        results: list[Any] = [None] * len(chunk)
        for name, indices in route(chunk, adapter, adapter_map).items():
            group = [chunk[i] for i in indices]
            # One tag_chunks call per group: a group is never larger than a chunk.
            group_options = (options_by_adapter or {}).get(name, options)
            group_results = [r for part in tag_chunks(group, adapter_set.engine(name), group_options, normaliser,
                                                      on_batch) for r in part]
            for i, result in zip(indices, group_results):
                results[i] = RoutedTagResult.of(result, name, show=adapter_map is not None)
        yield results


@dataclass
class RoutedTagResult(TagResult):
    """A TagResult and the adapter that produced it (None: the base model)."""

    adapter: str | None = None
    show_adapter: bool = False  # put "adapter" in the JSON line (when a category map routes)

    @classmethod
    def of(cls, result: TagResult, adapter: str | None, show: bool = False) -> RoutedTagResult:
        values = {f.name: getattr(result, f.name) for f in dataclasses.fields(TagResult)}
        return cls(**values, adapter=adapter, show_adapter=show)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.show_adapter:
            out["adapter"] = self.adapter
        return out


# --- tagging with the adapters a run's settings name -------------------------------------------------------


def load_adapter_set(settings: Settings, template: Any, templates: Mapping[str, Any] | None = None,
                     adapter_map: AdapterMap | None = None) -> tuple[BaseAdapterSet, AdapterMap | None]:
    """The base model with the adapter(s) named by --adapter / --adapter-map attached and checked
    (each against `templates[name]` when given, else `template`).

    Without --base-model (and $LLMTAGS_BASE_MODEL), the base is the one the (first) adapter records.
    `adapter_map`: the --adapter-map already read, if any. Returns (adapter set, AdapterMap or None).
    """
    root = settings.adapters_root
    if adapter_map is None and settings.adapter_map:
        adapter_map = load_adapter_map(settings.adapter_map)
    names = adapter_map.adapter_names if adapter_map is not None else [settings.adapter]
    base = base_model_spec(settings.base_model, default=None)
    if base is None and names:
        base = read_metadata(resolve_adapter(names[0], root)).get("base_model", {}).get("spec")
    if pick_engine(settings.engine, base, settings.device, settings.dtype) == "llama.cpp":
        adapter_set: BaseAdapterSet = LlamaCppAdapterSet.load(base)
    else:
        adapter_set = AdapterSet.load(base, device=settings.device, dtype=settings.dtype)
    for name in names:
        adapter_set.add(name, template=(templates or {}).get(name, template), force=settings.force_adapter, root=root)
    return adapter_set, adapter_map


def adapter_tagger(settings: Settings, options: TaggingOptions, normaliser: Any = None) -> Callable[..., Any]:
    """The `tag(records, on_batch)` callable that `run.tag_file` takes, tagging with --adapter or
    --adapter-map: each chunk's records are grouped by adapter, one base model serves them all.
    With a map, each adapter gets its own template and candidates unless --template / --candidates
    were given (with one --adapter, `options.with_adapter_defaults` has already put them into `options`)."""
    adapter_map = load_adapter_map(settings.adapter_map) if settings.adapter_map else None
    per_adapter = ({name: adapter_options(name, settings, options) for name in adapter_map.adapter_names}
                   if adapter_map is not None else {})
    adapter_set, adapter_map = load_adapter_set(
        settings, options.template, {name: o.template for name, o in per_adapter.items()}, adapter_map)
    adapter = None if adapter_map is not None else adapter_set.names[0]

    def tag(records: Any, on_batch: Any) -> Any:
        return tag_chunks_routed(records, adapter_set, options, adapter=adapter, adapter_map=adapter_map,
                                 normaliser=normaliser, on_batch=on_batch, options_by_adapter=per_adapter)

    return tag

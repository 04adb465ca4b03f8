"""Routing: which adapter tags which record (by the adapter map, adapters/maps.py), and tagging a
stream of records with each record's own adapter on one base model, as a run plan (plan.py) says."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..engines.adapter_set import AdapterSet, BaseAdapterSet, LlamaCppAdapterSet
from ..engines.select import pick_engine
from ..options import TaggingOptions
from ..plan import RunPlan
from ..records import Record
from ..tagger import TagResult, chunked, tag_chunks
from .maps import AdapterMap
from .registry import AdapterError


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


# --- tagging with the adapters of a run plan ---------------------------------------------------------------


def load_adapter_set(plan: RunPlan) -> BaseAdapterSet:
    """The plan's base model (`RunPlan.base_model`: --base-model, else the one the first adapter was
    trained on) with the plan's adapters attached by their names, each checked against the template its
    records are prompted with."""
    settings, base = plan.settings, plan.base_model
    if pick_engine(settings.engine, base, settings.device, settings.dtype) == "llama.cpp":
        adapter_set: BaseAdapterSet = LlamaCppAdapterSet.load(base, weights=settings.weights)
    else:
        adapter_set = AdapterSet.load(base, device=settings.device, dtype=settings.dtype)
    for name, adapter in plan.adapters.items():
        # The directory the plan resolved (absolute: a bare relative one would read as a registry name).
        options = plan.options_for(name)
        adapter_set.add(adapter.path.absolute(), name=name, template=options.template, force=settings.force_adapter,
                        scale=options.adapter_scale, meta=adapter.meta)
    return adapter_set


def adapter_tagger(plan: RunPlan) -> Callable[..., Any]:
    """The `tag(records, on_batch)` callable that `run.tag_file` takes, tagging with the plan's --adapter
    or --adapter-map: each chunk's records are grouped by adapter, one base model serves them all, and
    with a map each adapter prompts with its own options (`RunPlan.options_by_adapter`)."""
    adapter_set = load_adapter_set(plan)

    def tag(records: Any, on_batch: Any) -> Any:
        return tag_chunks_routed(records, adapter_set, plan.options, adapter=plan.settings.adapter,
                                 adapter_map=plan.adapter_map, normaliser=plan.normaliser, on_batch=on_batch,
                                 options_by_adapter=plan.options_by_adapter)

    return tag

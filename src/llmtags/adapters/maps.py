"""Adapter maps (`--adapter-map MAP.toml`): which adapter a record's category, else its language, names.

Kept apart from routing.py (which tags records with the adapters a run plan loaded) because the plan
reads the map first, to resolve every adapter it names once.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..prompts import detect_lang
from ..records import Record
from .registry import AdapterError, validate_adapter_name


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

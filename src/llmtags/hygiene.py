"""Stage 4b: keep only lines that are tags. Between parsing (parse.py) and normalisation (vocab.py).

A model's reply can hold lines that parse but are not tags:
- `no_attribute`: a bare value with no `Attribute:` (`Samsung Galaxy S24 Ultra 512GB`);
- `placeholder`: the template's own example (`Attribute:value`, `属性:值`);
- `outside_schema`: an attribute the record's schema does not list (`Tea variety:Black` on a sneaker),
  where the record has a schema (its own, or the one its demo pool gives it).

Each drop is kept, by reason, so a run can count them and nothing disappears without a trace.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

DROP_REASONS = ("no_attribute", "placeholder", "outside_schema")

# The words templates and instructions use for "an attribute" and "its value".
_PLACEHOLDER_ATTRIBUTES = {"attribute", "attr", "属性", "属性名"}
_PLACEHOLDER_VALUES = {"value", "值", "属性值", "..."}


def name_key(name: str) -> str:
    """Names compared as scoring compares them: NFKC, case-folded, spaces collapsed."""
    return " ".join(unicodedata.normalize("NFKC", name).split()).casefold()


def drop_reason(tag: str, schema: set[str] | None) -> str | None:
    """Why `tag` is not a tag (one of DROP_REASONS), or None when it is. `schema`: casefolded names."""
    attribute, sep, value = tag.partition(":")
    if not sep or not attribute.strip() or not value.strip():
        return "no_attribute"
    if schema is not None:
        # A catalogue may really call an attribute "属性": what its schema names is never a placeholder.
        if name_key(attribute) not in schema:
            return "placeholder" if name_key(attribute) in _PLACEHOLDER_ATTRIBUTES else "outside_schema"
        return "placeholder" if name_key(value) in _PLACEHOLDER_VALUES else None
    if name_key(attribute) in _PLACEHOLDER_ATTRIBUTES or name_key(value) in _PLACEHOLDER_VALUES:
        return "placeholder"
    return None


def clean_tags(tags: Sequence[str], schema: Sequence[str] | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """(the tags kept, in order; the tags dropped, by reason)."""
    allowed = {name_key(name) for name in schema} if schema else None
    kept: list[str] = []
    dropped: dict[str, list[str]] = {}
    for tag in tags:
        reason = drop_reason(tag, allowed)
        if reason is None:
            kept.append(tag)
        else:
            dropped.setdefault(reason, []).append(tag)
    return kept, dropped

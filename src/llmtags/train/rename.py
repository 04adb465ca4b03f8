"""Renamed-attribute training examples: teach an adapter to take attribute names from its prompt.

A new catalogue names its attributes its own way (产品 where zh-taobao-ner says 产品词, Manufacturer
where another says Brand). The adapter learns them only from the demonstrations and the schema in its
prompt, and it follows them only if training showed that the prompt's names are the ones to write. So a
share of the training examples get their attributes renamed consistently across the demonstrations, the
schema, the candidates and the answer, with names drawn from `SYNONYMS`.

The names the renamed-attribute check uses (产品, 牌子, 款号) are deliberately not among them, so that
check measures following the prompt, not recalling a trained name.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import replace

from ..prompts import Demo, first_form
from ..tagger import PromptParts

SYNONYMS: dict[str, tuple[str, ...]] = {
    # zh-taobao-ner
    "品牌": ("品牌名", "商标", "品牌名称"),
    "产品词": ("品类", "商品词", "类目", "产品类型"),
    "型号": ("货号", "规格型号", "型号规格"),
    "其他": ("其它", "补充信息", "其他信息"),
    # en-oa-mine and en-ae-110k
    "Brand": ("Manufacturer", "Make", "Brand Name"),
    "Brand Name": ("Brand", "Manufacturer", "Label"),
    "Color": ("Colour", "Color Family"),
    "Size": ("Dimensions", "Product Size"),
    "Material": ("Fabric", "Made Of", "Main Material"),
    "Model Number": ("Part Number", "MPN", "Model No"),
    "Model name": ("Model", "Product Line"),
    "Gender": ("Target Gender", "Department"),
    "Item Type": ("Product Type", "Type"),
    "Style": ("Design", "Look"),
    "Flavor": ("Taste", "Flavour"),
    "Quantity": ("Pack Size", "Count"),
}


def pick_renames(attributes: Iterable[str], rng: random.Random) -> dict[str, str]:
    """A renaming of the `attributes` that have synonyms, each to one of them, without two attributes
    ending up with one name."""
    present = sorted(set(attributes))
    taken = set(present)
    mapping: dict[str, str] = {}
    for attribute in present:
        choices = [name for name in SYNONYMS.get(attribute, ()) if name not in taken]
        if choices:
            mapping[attribute] = rng.choice(choices)
            taken.add(mapping[attribute])
    return mapping


def rename_tag(tag: str, mapping: Mapping[str, str]) -> str:
    """`Attribute:value` with the attribute renamed by `mapping` (unchanged when it has no entry)."""
    attribute, sep, value = tag.partition(":")
    return f"{mapping[attribute]}{sep}{value}" if sep and attribute in mapping else tag


def rename_parts(parts: PromptParts, rng: random.Random) -> PromptParts:
    """`parts` with a random renaming (`pick_renames`) of every attribute they name, applied alike to the
    record's schema and gold tags (so its answer), the demonstrations, the candidates and the proposals."""
    record = parts.record
    named = [*parts.candidates, *map(first_form, record.tags or ()), *[t for d in parts.demos for t in d.tags],
             *[p.tag for p in parts.proposals]]
    mapping = pick_renames([t.partition(":")[0] for t in named] + list(record.schema or ()), rng)
    record = replace(record, schema=[mapping.get(a, a) for a in record.schema] if record.schema else None,
                     tags=[rename_tag(first_form(t), mapping) for t in record.tags or ()])
    proposals = [replace(p, tag=rename_tag(p.tag, mapping), attribute=mapping.get(p.attribute, p.attribute))
                 for p in parts.proposals]
    return PromptParts(record, [Demo(d.text, [rename_tag(t, mapping) for t in d.tags]) for d in parts.demos],
                       [rename_tag(t, mapping) for t in parts.candidates], proposals)

"""Self-contained adapters: the data an adapter's prompts need, shipped inside its directory.

An adapter trained with vocabulary candidates and retrieved demonstrations reaches its F1 only with
them. `pack_adapter` copies both into the adapter directory, so a clone without the training data
tags as well as the machine that trained it:
- `vocabulary.jsonl`: the candidate vocabulary (tag and count; the text of no record);
- `pool.jsonl`: the demo pool, with only the fields prompts use (id, text, lang, category, schema, tags);
- `proposer.crfsuite`: the span proposer (proposer.py), a CRF model of feature weights, and beside it
  `proposer.features.json`, its feature set and gazetteer (feature set 2 on; absent: set 1).

`llmtags.json` then names them relative to the adapter directory (`plan.adapter_defaults` resolves
them there), with their sha256 and the sources they came from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import copy_file, write_text
from ..candidates import candidate_sources, load_candidate_vocabulary
from ..models import sha256_file
from ..options import OptionsError, check_decided, is_share
from ..proposer import SpanProposer, calibration_path, features_path
from ..records import load_labelled
from .registry import AdapterError, read_metadata, write_metadata

VOCABULARY_FILE = "vocabulary.jsonl"
POOL_FILE = "pool.jsonl"
PROPOSER_FILE = "proposer.crfsuite"
PROPOSER_FEATURES_FILE = features_path(PROPOSER_FILE).name  # its feature version and gazetteer (version 2 on)
PROPOSER_CALIBRATION_FILE = calibration_path(PROPOSER_FILE).name  # its confidence calibration (--cascade reads it)
POOL_FIELDS = ("id", "text", "lang", "category", "schema", "tags")


def write_pool(source: str, path: Path) -> int:
    """The labelled records of `source` (one file, or several comma-joined) with only their prompt fields."""
    lines, ids = [], set()
    for number, spec in enumerate(candidate_sources(source)):
        for record in load_labelled(spec):
            if not record.tags:
                continue
            row = {name: getattr(record, name) for name in POOL_FIELDS if getattr(record, name) is not None}
            if row["id"] in ids:  # two sources with the same ids: one file must not hold an id twice
                row["id"] = f"{row['id']}@{number}"
            ids.add(row["id"])
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text(path, "".join(lines))
    return len(lines)


def pack_adapter(adapter_dir: str | Path, *, candidates: str | None = None, pool: str | None = None,
                 k: int | None = None, licence: str | None = None,
                 proposer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy `candidates` (a vocabulary or labelled files), the demo `pool` (labelled files, shown `k`
    at a time) and the span proposer (`proposer["model"]`, a crfsuite file, with what to record about it)
    into `adapter_dir`, and record them in its metadata. Returns the updated metadata."""
    adapter_dir = Path(adapter_dir)
    meta = read_metadata(adapter_dir)
    if candidates:
        vocab = load_candidate_vocabulary(candidates)
        vocab.save(adapter_dir / VOCABULARY_FILE)
        meta["vocabulary"] = {**(meta.get("vocabulary") or {"normalisation": None}), "candidates": {
            "path": VOCABULARY_FILE, "size": len(vocab), "sha256": sha256_file(adapter_dir / VOCABULARY_FILE),
            "from": candidates}}
    if pool:
        if not k or k <= 0:
            raise AdapterError("a demo pool needs the number of demonstrations each prompt shows (k > 0)")
        count = write_pool(pool, adapter_dir / POOL_FILE)
        meta["retrieval"] = {"pool": POOL_FILE, "k": int(k), "records": count,
                             "sha256": sha256_file(adapter_dir / POOL_FILE), "from": pool}
    if licence:
        meta.setdefault("data", {})["shipped_files_licence"] = licence
    if proposer:  # last: the steps above can still fail, and the file must match the metadata
        model = Path(proposer["model"])
        # The features file first: a model copied beside a stale one would read with the wrong features,
        # while the pair is checked by the sha256 of both (plan.py) before it is used.
        beside = ((features_path(model), PROPOSER_FEATURES_FILE, "features_sha256"),  # absent: version 1
                  (calibration_path(model), PROPOSER_CALIBRATION_FILE, "calibration_sha256"))  # absent: raw
        for source, name, _ in beside:
            if source.is_file():
                copy_file(source, adapter_dir / name)
            else:
                (adapter_dir / name).unlink(missing_ok=True)
        copy_file(model, adapter_dir / PROPOSER_FILE)
        meta["proposer"] = {**{k: v for k, v in proposer.items() if k != "model"}, "path": PROPOSER_FILE,
                            "sha256": sha256_file(adapter_dir / PROPOSER_FILE)}
        for source, name, field in beside:
            if source.is_file():
                meta["proposer"][field] = sha256_file(adapter_dir / name)
    write_metadata(adapter_dir, meta)
    return meta


def record_calibration(adapter_dir: str | Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Record the calibration just written beside the adapter's proposer (`SpanProposer.calibrate`): what
    it was fitted on (`summary`) and its sha256, which `plan.py` checks before the proposer is used."""
    adapter_dir = Path(adapter_dir)
    meta = read_metadata(adapter_dir)
    shipped = meta.get("proposer")
    if not shipped:
        raise AdapterError(f"{adapter_dir} ships no span proposer to calibrate; pack one with --proposer LABELLED")
    shipped["calibration"] = summary
    shipped["calibration_sha256"] = sha256_file(adapter_dir / PROPOSER_CALIBRATION_FILE)
    write_metadata(adapter_dir, meta)
    return meta


def record_fusion(adapter_dir: str | Path, fill: float | None, decides: Sequence[str],
                  confirm_below: float | None = None) -> dict[str, Any]:
    """Record the adapter's default fusion, every part at once: `fill` (the --fill P its runs use; None: no
    fill), the attributes its span proposer decides (--proposer-decides; empty: none) and `confirm_below`
    (the --confirm-below C; None: none). All are checked before anything is written, so a refused value
    leaves the adapter as it was. Returns the metadata."""
    adapter_dir = Path(adapter_dir)
    meta = read_metadata(adapter_dir)
    shipped = meta.get("proposer")
    if not shipped:
        if fill is None and not decides and confirm_below is None:
            return meta
        raise AdapterError(f"{adapter_dir} ships no span proposer to fill from or decide with; pack one with "
                           "--proposer LABELLED")
    for flag, share in (("--fill", fill), ("--confirm-below", confirm_below)):
        if share is not None and not is_share(share):
            raise AdapterError(f"{flag}: {share} is not in (0, 1]")
    if decides:
        try:
            check_decided(frozenset(decides), SpanProposer(adapter_dir / shipped["path"]), "--proposer-decides")
        except OptionsError as exc:
            raise AdapterError(str(exc)) from exc
    for key, value in (("fill", fill), ("decides", sorted(decides) or None), ("confirm_below", confirm_below)):
        if value is None:
            shipped.pop(key, None)
        else:
            shipped[key] = value
    write_metadata(adapter_dir, meta)
    return meta

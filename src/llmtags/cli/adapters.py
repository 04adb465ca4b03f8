"""`llmtags adapters list|show|pack` (the registry) and `llmtags merge` (fold an adapter into its base)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

from ..adapters.merge import merge_adapter
from ..adapters.pack import pack_adapter, record_calibration, record_fusion
from ..adapters.registry import (
    AdapterError,
    adapters_root,
    list_adapters,
    read_metadata,
    resolve_adapter,
    show_adapter,
)
from ..candidates import labelled_sources
from ..options import decided_attributes, is_share
from ..proposer import CrossFitted, ProposerSettings, SpanProposer, calibrate_trained
from .common import CliError, add_root


def add_parser(commands: Any) -> dict[str, argparse.ArgumentParser]:
    leaves: dict[str, argparse.ArgumentParser] = {}
    adapters = commands.add_parser("adapters", help="the adapter registry").add_subparsers(
        dest="adapters_command", required=True
    )
    p = adapters.add_parser("list", help="list the adapters in the registry")
    add_root(p)
    p.add_argument("--json", action="store_true", help="one JSON object per adapter")
    p.set_defaults(func=cmd_adapters_list)
    leaves["adapters list"] = p
    p = adapters.add_parser("show", help="print an adapter's metadata (llmtags.json) as JSON")
    p.add_argument("adapter", help="adapter name or directory")
    add_root(p)
    p.set_defaults(func=cmd_adapters_show)
    leaves["adapters show"] = p
    p = adapters.add_parser("pack", help="ship data an adapter's prompts need inside it: its candidate vocabulary "
                            "and its demo pool, so it works where the training data is absent")
    p.add_argument("adapter", help="adapter name or directory")
    p.add_argument("--candidates", metavar="VOCAB", help="a vocabulary or labelled file(s): saved as vocabulary.jsonl")
    p.add_argument("--demos", metavar="LABELLED", help="labelled file(s): saved as pool.jsonl (prompt fields only)")
    p.add_argument("--retrieve", type=int, metavar="K", help="demonstrations retrieved per product (with --demos)")
    p.add_argument("--proposer", metavar="LABELLED", help="labelled file(s): train the span proposer (a CRF) on them "
                   "and ship it as proposer.crfsuite; its spans then go into every prompt of this adapter")
    p.add_argument("--calibrate", metavar="LABELLED", help="labelled file(s) the adapter's span proposer was trained "
                   "on: calibrate its confidence, which --cascade reads, on their records out of fold (K fold models; "
                   "a proposer packed or trained by this llmtags is calibrated already)")
    p.add_argument("--proposer-folds", type=int, default=5, metavar="K",
                   help="folds of the cross-fitting whose proposal quality and calibration the metadata records "
                   "(default 5)")
    p.add_argument("--proposer-iterations", type=int, default=ProposerSettings.max_iterations, metavar="N",
                   help=f"the proposer's training iterations (default {ProposerSettings.max_iterations})")
    p.add_argument("--proposer-features", type=int, default=ProposerSettings.features, metavar="V",
                   help=f"the proposer's feature set (default {ProposerSettings.features}; 1: the set adapters "
                   "trained before 2026-12-06 saw)")
    p.add_argument("--fill", type=share_or_off, metavar="P", help="record P as the adapter's default --fill (choose it "
                   "on dev records: eval/fill.py; 0 or off: none); the adapter must ship a span proposer")
    p.add_argument("--proposer-decides", metavar="ATTRS", help="record these comma-joined attributes as the ones whose "
                   "tags the adapter's span proposer decides by default (chosen on dev records: eval/fill.py; "
                   "none: no attribute)")
    p.add_argument("--confirm-below", type=share_or_off, metavar="C", help="record C as the adapter's default "
                   "--confirm-below (chosen on dev records: eval/fill.py; 0 or off: none)")
    p.add_argument("--licence", "--license", dest="licence", help="licence of the shipped data, for the metadata")
    add_root(p)
    p.set_defaults(func=cmd_adapters_pack)
    leaves["adapters pack"] = p

    p = commands.add_parser("merge", help="fold an adapter into its base model: a standalone model directory")
    p.add_argument("adapter", help="adapter name or directory")
    p.add_argument("-o", "--output", required=True, help="directory for the merged model (must be new or empty)")
    p.add_argument("--base-model", help="default: the base model recorded in the adapter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-in-4bit", action="store_true", help="merge into a 4-bit base (lossy; warns)")
    p.add_argument("--force", action="store_true", help="merge even when the base model differs")
    add_root(p)
    p.set_defaults(func=cmd_merge)
    leaves["merge"] = p
    return leaves


def cmd_adapters_list(args: argparse.Namespace) -> int:
    infos = list_adapters(args.adapters_root)
    if args.json:
        for info in infos:
            print(json.dumps({**info.summary(), "path": str(info.path)}, ensure_ascii=False))
        return 0
    if not infos:
        print(f"llmtags: no adapters in {adapters_root(args.adapters_root)}", file=sys.stderr)
        return 0
    rows = [["name", "base model", "template", "train records", "dev F1", "created"]]
    for info in infos:
        s = info.summary()
        f1 = f"{s['dev_f1']:.3f}" if isinstance(s["dev_f1"], (int, float)) else "-"
        rows.append([s["name"], str(s["base"]), str(s["template"]), str(s["train_records"] or "-"), f1,
                     str(s["created"] or "-")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_adapters_show(args: argparse.Namespace) -> int:
    print(json.dumps(show_adapter(args.adapter, args.adapters_root), ensure_ascii=False, indent=2))
    return 0


def share_or_off(text: str) -> float:
    """A share as --fill and --confirm-below take it, or off / none (0), as eval/fill.py prints its choice."""
    return 0.0 if text.strip().lower() in ("off", "none") else float(text)


def cmd_adapters_pack(args: argparse.Namespace) -> int:
    no_decides = (args.proposer_decides or "").strip().lower() == "none"  # clears the recorded attributes
    decides = [] if no_decides else sorted(decided_attributes(args.proposer_decides))
    fusion = args.fill is not None or decides or no_decides or args.confirm_below is not None
    if not args.candidates and not args.demos and not args.proposer and not fusion and not args.calibrate:
        raise CliError("give --candidates VOCAB, --demos LABELLED --retrieve K, --proposer LABELLED, --fill P, "
                       "--proposer-decides ATTRS, --confirm-below C and/or --calibrate LABELLED")
    if args.calibrate and args.proposer:
        raise CliError("--proposer LABELLED calibrates the proposer it trains: --calibrate is for one trained before")
    if bool(args.demos) != bool(args.retrieve):
        raise CliError("--demos and --retrieve K go together: the pool and how many of it each prompt shows")
    for flag, share in (("--fill", args.fill), ("--confirm-below", args.confirm_below)):
        if share is not None and share != 0 and not is_share(share):
            raise CliError(f"{flag}: {share} is not in (0, 1] (or 0: none)")
    path = resolve_adapter(args.adapter, args.adapters_root)
    shipped = []
    proposer = None
    if not args.candidates and not args.demos and not args.proposer:
        meta = {}
    elif args.proposer:
        records = labelled_sources(args.proposer)
        with tempfile.TemporaryDirectory(prefix="llmtags-proposer-") as work:
            fitted = CrossFitted.train(records, k=args.proposer_folds, workdir=work,
                                       settings=ProposerSettings(max_iterations=args.proposer_iterations,
                                                                features=args.proposer_features))
            proposer = {**fitted.shipped(records), "from": args.proposer}
            meta = pack_adapter(path, candidates=args.candidates, pool=args.demos, k=args.retrieve,
                                licence=args.licence, proposer=proposer)
    else:
        meta = pack_adapter(path, candidates=args.candidates, pool=args.demos, k=args.retrieve, licence=args.licence)
    if args.calibrate:
        recorded = read_metadata(path).get("proposer")
        if not recorded:
            raise CliError(f"{path} ships no span proposer to calibrate; pack one with --proposer LABELLED")
        settings = recorded.get("settings")
        # None where none are recorded: the proposer then reads its feature version from the file beside it.
        trained = SpanProposer(path / recorded["path"], ProposerSettings.recorded(settings) if settings else None)
        summary = calibrate_trained(trained, labelled_sources(args.calibrate), k=args.proposer_folds, progress=True)
        if not summary["records"]:
            raise CliError(f"no record of {args.calibrate} could calibrate the proposer (none labelled, or none "
                           "of the attributes it knows)")
        record_calibration(path, {**summary, "from": args.calibrate, "folds": args.proposer_folds})
        shipped.append(f"its span proposer calibrated on {summary['records']} records out of fold (exactly right: "
                       f"{summary['exactly_right']:.0%}; the raw confidence was off by {summary['raw_ece']:.3f} on average)")
    if fusion:
        # What is not given stays as recorded; all are checked before any is written.
        recorded = read_metadata(path).get("proposer") or {}
        def given(share: float | None, key: str) -> float | None:
            return recorded.get(key) if share is None else share or None  # 0: none

        try:
            record_fusion(path, given(args.fill, "fill"), [] if no_decides else decides or recorded.get("decides") or [],
                          given(args.confirm_below, "confirm_below"))
        except AdapterError as exc:
            raise CliError(str(exc)) from exc
        shipped += [f"--fill {args.fill or 'none'} by default"] * (args.fill is not None)
        shipped += [f"its proposer deciding {', '.join(decides) or 'no attribute'} by default"] * bool(decides or no_decides)
        shipped += [f"--confirm-below {args.confirm_below or 'none'} by default"] * (args.confirm_below is not None)
    if args.candidates:
        shipped.append(f"{meta['vocabulary']['candidates']['size']} candidate tags")
    if args.demos:
        shipped.append(f"a pool of {meta['retrieval']['records']} records, {meta['retrieval']['k']} shown")
    if proposer:
        shipped.append(f"a span proposer trained on {meta['proposer']['texts']} labelled texts (out-of-fold F1 "
                       f"{meta['proposer']['out_of_fold']['f1']:.3f})")
    print(f"llmtags: {path} now ships {' and '.join(shipped)}", file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = merge_adapter(args.base_model, args.adapter, args.output, device=args.device, dtype=args.dtype,
                        load_in_4bit=args.load_in_4bit, force=args.force, root=args.adapters_root)
    print(f"llmtags: merged model in {out} (use it with --base-model {out})", file=sys.stderr)
    return 0

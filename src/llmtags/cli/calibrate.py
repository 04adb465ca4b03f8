"""`llmtags calibrate`: how well tag confidences match accuracy on labelled dev data, and a threshold."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..adapters.registry import set_metadata_entry
from ..calibrate import calibrate_files


def add_parser(commands: Any) -> dict[str, argparse.ArgumentParser]:
    p = commands.add_parser("calibrate", help="measure how well tag confidences match accuracy on labelled "
                            "dev data, and pick a confidence threshold")
    p.add_argument("--gold", required=True, help="labelled dev JSONL")
    p.add_argument("--pred", required=True, help="llmtags generate output for the same records (with confidences)")
    p.add_argument("--target-precision", type=float, default=0.9,
                   help="pick the lowest threshold whose kept tags reach this precision (default 0.9)")
    p.add_argument("--adapter", help="store the threshold in this adapter's llmtags.json, for "
                   "generate --min-confidence calibrated")
    p.add_argument("--adapters-root", help="adapter registry directory (default: $LLMTAGS_ADAPTERS, else ./adapters)")
    p.add_argument("--markdown", help="write the reliability table as Markdown here")
    p.add_argument("--report", help="write the calibration as JSON here")
    p.set_defaults(func=cmd_calibrate)
    return {"calibrate": p}


def cmd_calibrate(args: argparse.Namespace) -> int:
    calibration = calibrate_files(args.gold, args.pred, args.target_precision)
    markdown = calibration.to_markdown()
    print(markdown)
    if args.markdown:
        Path(args.markdown).write_text(markdown, encoding="utf-8")
    if args.report:
        Path(args.report).write_text(json.dumps(calibration.to_json(), indent=1), encoding="utf-8")
    if args.adapter:
        stored = {"threshold": calibration.threshold, "target_precision": calibration.target_precision,
                  "ece": round(calibration.ece, 4), "dev": args.gold, "records": calibration.records,
                  "at_threshold": None if calibration.at_threshold is None else vars(calibration.at_threshold)}
        path = set_metadata_entry(args.adapter, ("calibration",), stored, args.adapters_root)
        print(f"llmtags: calibration stored in {path / 'llmtags.json'}", file=sys.stderr)
    if calibration.threshold is None:
        print(f"llmtags: no threshold reaches precision {args.target_precision}", file=sys.stderr)
        return 1
    return 0

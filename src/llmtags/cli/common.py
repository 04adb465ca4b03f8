"""Flags several commands share, and the one place where parsed flags become library settings.

Every default shown here is the library's own (`options.Settings`, `records.Fields`), so the CLI and a
caller of the library get the same run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from ..engines.base import WEIGHTS
from ..engines.select import ENGINE_CHOICES
from ..options import Settings
from ..records import Fields

DEFAULTS = Settings()


class CliError(Exception):
    """A command line that cannot run; reported as `llmtags: error: ...` with exit status 2."""


def settings_from(args: argparse.Namespace) -> Settings:
    """The library settings of parsed flags: the edge where `argparse` ends."""
    return Settings.from_mapping(vars(args))


def fields_from(args: argparse.Namespace) -> Fields:
    return Fields(args.id_field, args.text_field, args.category_field, args.tags_field)


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, for an adapter's `llmtags.json`."""
    argv = getattr(args, "argv", None)
    return shlex.join(["llmtags", *(argv if argv is not None else sys.argv[1:])])


def open_output(path: str | None, mode: str = "w") -> Any:
    if path in (None, "-"):
        return sys.stdout
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, mode, encoding="utf-8")


# --- option groups -----------------------------------------------------------------------------------------


def add_fields(p: argparse.ArgumentParser) -> None:
    defaults = Fields()
    p.add_argument("--id-field", default=defaults.id)
    p.add_argument("--text-field", default=defaults.text)
    p.add_argument("--category-field", default=defaults.category)
    p.add_argument("--tags-field", default=defaults.tags)


def add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["jsonl", "csv", "parquet"], help="input format (default: from the suffix)")


def add_input(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("input", nargs="?" if optional else None, help="JSONL, CSV or Parquet file, or - for stdin (JSONL)")
    add_format(p)
    add_fields(p)


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters-root", help="adapter registry directory (default: $LLMTAGS_ADAPTERS, else ./adapters)")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-model",
        help="'embedded' (default), 'embedded-1.5b', a model directory, a .gguf file, or a hub id "
        "(also $LLMTAGS_BASE_MODEL)",
    )
    p.add_argument("--device", default=DEFAULTS.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=DEFAULTS.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--engine", default=DEFAULTS.engine, choices=ENGINE_CHOICES,
                   help="auto (default): llama.cpp for a GGUF base on CPU when llama-cpp-python is installed "
                   "(pip install 'llmtags[llamacpp]'), else transformers")
    p.add_argument("--weights", default=DEFAULTS.weights, choices=WEIGHTS,
                   help="llama.cpp: run the embedded 0.5B requantised once to q8_0 (default: faster on CPU, the "
                   "same F1) or as-is (its shipped Q4_K_M); other bases run as they are")


def add_prompt(p: argparse.ArgumentParser, template: bool = True) -> None:
    if template:
        p.add_argument("--template", default=DEFAULTS.template,
                       help="auto (zh or en by text), zh, en, few_shot, or a .j2 file")
    p.add_argument("--demos", metavar="LABELLED",
                   help="labelled records shown as demonstrations: with --retrieve K, each product's K most "
                   "similar; without --retrieve, the first --shots, the same for every product. With an "
                   "--adapter that retrieves (or --retrieve, 0 included), another catalogue's sample: it also "
                   "supplies the candidates and the span proposer")
    p.add_argument("--retrieve", type=int, metavar="K",
                   help="show each product its K most similar --demos records (BM25; same category first); "
                   "0: none, even where the adapter was trained with them (default: the adapter's K)")
    p.add_argument("--shots", type=int, default=DEFAULTS.shots,
                   help=f"without --retrieve: how many fixed demonstrations (default {DEFAULTS.shots})")
    p.add_argument("--candidates", metavar="VOCAB",
                   help="offer the model the entries of this vocabulary (or labelled file; several joined by "
                   "commas) found in each text")
    p.add_argument("--no-candidates", action="store_true",
                   help="offer no candidates, even where the adapter was trained with them")
    p.add_argument("--proposer", metavar="MODEL",
                   help="a span proposer (a .crfsuite model, as an adapter ships): its spans go into each prompt "
                   "(default: the adapter's own)")
    p.add_argument("--no-proposer", action="store_true",
                   help="show no proposer spans, even where the adapter ships a proposer")
    p.add_argument("--demo-text", choices=["full", "title"], default=DEFAULTS.demo_text,
                   help="retrieved neighbours shown whole or by their title (first line) only, with all their tags "
                   "(default: as the adapter was trained, else full)")
    p.add_argument("--text-budget", type=int, metavar="CHARS", default=DEFAULTS.text_budget,
                   help="show a text longer than CHARS as its title plus the windows around the proposer's spans and the "
                   "candidates found in it; 0: whole texts (default: as the adapter was trained, else whole, up to "
                   "2,000 characters)")


def add_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    p.add_argument("--limit", type=int, help="tag only the first N valid records")
    p.add_argument("--chunk-size", type=int, default=DEFAULTS.chunk_size,
                   help=f"records generated between two appends to the output (default {DEFAULTS.chunk_size})")
    p.add_argument("--constrain", choices=["free", "extract", "closed"], default=DEFAULTS.constrain,
                   help="constrained decoding: free (a record's schema limits attribute names), extract (values "
                   "are spans of the text), closed (lines are entries of --constrain-vocab) (default free)")
    p.add_argument("--constrain-vocab", metavar="VOCAB",
                   help="vocabulary (or labelled file) for --constrain closed (default: --vocab)")
    p.add_argument("--min-confidence", metavar="P",
                   help="drop tags whose confidence is below P (0-1), or 'calibrated': the threshold "
                   "`llmtags calibrate` stored in the --adapter; dropped tags are listed as below_confidence")
    p.add_argument("--cascade", type=float, metavar="P",
                   help="let the span proposer alone tag the records whose labelling it is at least P sure of "
                   "(0-1; its CRF's probability of the whole labelling, calibrated where the proposer has a calibration: "
                   "the share of such records whose spans were exactly right, out of fold) and generate only the rest: faster on large "
                   "catalogues (eval/cascade_*.md measures what each P costs); such records are marked \"by\": \"proposer\"")
    p.add_argument("--proposer-alone", action="store_true",
                   help="tag every record with the span proposer alone (its CRF, no model loaded): hundreds of "
                   "products a second; with --adapter A --demos SAMPLE, the CRF of a new catalogue's sample")
    fill = p.add_mutually_exclusive_group()
    fill.add_argument("--fill", type=float, metavar="P",
                      help="add to the model's answer the span proposer's spans of marginal probability at least P (in "
                      "(0, 1]) whose value no tag of the answer holds or is held by; such tags are also listed as "
                      "\"filled\" (default: the P the adapter records in its llmtags.json, proposer.fill)")
    p.add_argument("--proposer-decides", metavar="ATTRS",
                   help="comma-joined attributes whose tags are the span proposer's spans, not the model's (where its "
                   "CRF is the better tagger: eval/fill.py chooses them on dev records); listed as \"filled\" too "
                   "(default: the attributes the adapter records in its llmtags.json, proposer.decides)")
    p.add_argument("--confirm-below", type=float, metavar="C",
                   help="drop the model's tags of confidence below C (in (0, 1]) that the span proposer did not find too; "
                   "listed as \"unconfirmed\" (default: the C the adapter records in its llmtags.json, "
                   "proposer.confirm_below)")
    fill.add_argument("--no-fill", action="store_true", help="keep the model's answers as written, even where the "
                      "adapter records a --fill P, attributes its proposer decides or a --confirm-below C")


def add_vocab(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", help="vocabulary file (JSONL or plain list): normalise tags against it")
    p.add_argument("--policy", choices=["open", "closed"], default=DEFAULTS.policy,
                   help="open: keep unknown tags, marked new; closed: map them to the nearest entry or drop them")
    p.add_argument("--fuzzy-threshold", type=float, default=DEFAULTS.fuzzy_threshold,
                   help="rapidfuzz ratio needed for a fuzzy match")


def add_adapter_options(p: argparse.ArgumentParser, adapter_map: bool = True, generating: bool = True) -> None:
    """`--adapter NAME` | `--adapter-map FILE` (for `llmtags generate`; `eval` and `prompt compare` take
    `--adapter` only, `adapter_map=False`), with the adapter's template, candidates, pool and proposer;
    `--adapter-scale` where the command generates (not `prompt render`)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--adapter", help="LoRA adapter (registry name or directory) for every record, with its own "
                       "template, candidates, demo pool and span proposer unless flags say otherwise")
    if adapter_map:
        group.add_argument("--adapter-map", help="TOML category→adapter map: [categories] \"美妆\" = \"NAME\", "
                           "optional default = \"NAME\"; other records use the base model")
    if not any(a.dest == "adapters_root" for a in p._actions):
        add_root(p)
    p.add_argument("--force-adapter", action="store_true",
                   help="use adapters trained for another base model or prompt template (warns)")
    if not generating:
        return
    p.add_argument("--adapter-scale", type=float, metavar="S",
                   help="multiply the adapter's LoRA update by S (default 1: as trained; 0: the base model alone)")

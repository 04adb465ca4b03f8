"""`llmtags vocab build` (a labelled set's gold tags, or a plain list, as a vocabulary) and `vocab show`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..records import load_labelled
from ..vocab import Vocabulary, build_vocabulary
from .common import add_fields, fields_from


def add_parser(commands: Any) -> dict[str, argparse.ArgumentParser]:
    vocab = commands.add_parser("vocab", help="tag vocabularies").add_subparsers(dest="vocab_command", required=True)
    p = vocab.add_parser("build", help="collect the tags of a labelled set (or read a plain list) into a vocabulary")
    p.add_argument("input", help="labelled JSONL/CSV/Parquet, or with --list a plain list of tags")
    p.add_argument("-o", "--output", required=True, help="vocabulary JSONL to write")
    p.add_argument("--list", action="store_true", help="the input is a plain list: one tag per line, TAB, aliases|...")
    add_fields(p)
    p.set_defaults(func=cmd_vocab_build)
    build = p
    p = vocab.add_parser("show", help="summarise a vocabulary file (JSONL or plain list)")
    p.add_argument("vocab_file")
    p.add_argument("--top", type=int, default=20)
    p.set_defaults(func=cmd_vocab_show)
    return {"vocab build": build, "vocab show": p}


def cmd_vocab_build(args: argparse.Namespace) -> int:
    if args.list:
        vocab = Vocabulary.load(args.input)
    else:
        vocab = build_vocabulary(load_labelled(args.input, fields_from(args)))
    vocab.save(args.output)
    print(f"llmtags: {len(vocab)} tags over {len(vocab.attributes())} attributes written to {args.output}",
          file=sys.stderr)
    return 0


def cmd_vocab_show(args: argparse.Namespace) -> int:
    vocab = Vocabulary.load(args.vocab_file)
    print(f"{len(vocab)} tags, attributes: {', '.join(str(a) for a in vocab.attributes())}")
    for entry in list(vocab)[: args.top]:
        aliases = f"  (aliases: {', '.join(entry.aliases)})" if entry.aliases else ""
        print(f"{entry.count:>6}  {entry.tag}{aliases}")
    return 0

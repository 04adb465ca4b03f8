"""`llmtags` command line: a thin layer that parses flags into settings and calls the library.

One module per command (`generate.py`, `eval.py`, `prompt.py`, `calibrate.py`, `vocab.py`,
`train.py`, `adapters.py`), each with `add_parser(commands)` and its `cmd_*` functions; `common.py`
holds the shared flags and `settings_from(args)`, the one place where flags become `options.Settings`.

Options may also come from a TOML file (`--config FILE`): top-level keys apply to every command, a
table named after a command (`[generate]`, `[eval]`, ...) to that command. Flags override the file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..models import ModelError
from ..prompts import PromptError
from . import adapters, calibrate, eval, generate, prompt, train, vocab
from .common import CliError

COMMANDS = (generate, prompt, eval, calibrate, vocab, train, adapters)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and its leaf parsers by command name ("generate", "prompt compare", ...)."""
    parser = argparse.ArgumentParser(prog="llmtags", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML file of option defaults")
    commands = parser.add_subparsers(dest="command", required=True)
    leaves: dict[str, argparse.ArgumentParser] = {}
    for command in COMMANDS:
        leaves.update(command.add_parser(commands))
    return parser, leaves


def _apply_config(argv: Sequence[str], leaves: dict[str, argparse.ArgumentParser]) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    try:
        config = tomllib.loads(Path(known.config).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"cannot read config {known.config}: {exc}") from exc
    top = {k.replace("-", "_"): v for k, v in config.items() if not isinstance(v, dict)}
    for name, leaf in leaves.items():
        section = config.get(name.split()[0], {})
        section = section.get(name.split()[1], {}) if " " in name and isinstance(section, dict) else section
        values = dict(top, **{k.replace("-", "_"): v for k, v in section.items() if not isinstance(v, dict)})
        known_dests = {a.dest for a in leaf._actions}
        leaf.set_defaults(**{k: v for k, v in values.items() if k in known_dests})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, leaves = build_parser()
    try:
        _apply_config(argv, leaves)
        args = parser.parse_args(argv)
        args.argv = argv  # so an adapter's llmtags.json records the exact command
        return args.func(args)
    except (CliError, ModelError, PromptError, FileNotFoundError, ValueError) as exc:
        print(f"llmtags: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmtags: interrupted", file=sys.stderr)
        return 130

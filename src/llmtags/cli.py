"""`llmtags` command line: a thin layer that parses options and calls the library.

Options may also come from a TOML file (`--config FILE`): top-level keys apply to every command, a
table named after a command (`[generate]`, `[eval]`, ...) to that command. Flags override the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine import ENGINE_CHOICES

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class CliError(Exception):
    pass


# --- option groups shared by several commands -------------------------------------------------------


def _add_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id-field", default="id")
    p.add_argument("--text-field", default="text")
    p.add_argument("--category-field", default="category")
    p.add_argument("--tags-field", default="tags")


def _add_input(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("input", nargs="?" if optional else None, help="JSONL, CSV or Parquet file, or - for stdin (JSONL)")
    p.add_argument("--format", choices=["jsonl", "csv", "parquet"], help="input format (default: from the suffix)")
    _add_fields(p)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-model",
        help="'embedded' (default), 'embedded-1.5b', a model directory, a .gguf file, or a hub id "
        "(also $LLMTAGS_BASE_MODEL)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                   help="auto (default): llama.cpp for a GGUF base on CPU when llama-cpp-python is installed "
                   "(pip install 'llmtags[llamacpp]'), else transformers")


def _add_prompt(p: argparse.ArgumentParser, template: bool = True) -> None:
    if template:
        p.add_argument("--template", default="auto", help="auto (zh or en by text), zh, en, few_shot, or a .j2 file")
    p.add_argument("--demos", help="labelled JSONL file with demonstrations for few-shot templates")
    p.add_argument("--shots", type=int, default=4, help="how many demonstrations (default 4)")
    p.add_argument("--candidates", metavar="VOCAB",
                   help="offer the model the entries of this vocabulary (or labelled file; several joined by "
                   "commas) found in each text")
    p.add_argument("--no-candidates", action="store_true",
                   help="offer no candidates, even where the adapter was trained with them")


def _add_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, help="tag only the first N valid records")
    p.add_argument("--chunk-size", type=int, default=64,
                   help="records generated between two appends to the output (default 64)")
    p.add_argument("--constrain", choices=["free", "extract", "closed"], default="free",
                   help="constrained decoding: free (a record's schema limits attribute names), extract (values "
                   "are spans of the text), closed (lines are entries of --constrain-vocab) (default free)")
    p.add_argument("--constrain-vocab", metavar="VOCAB",
                   help="vocabulary (or labelled file) for --constrain closed (default: --vocab)")
    p.add_argument("--min-confidence", metavar="P",
                   help="drop tags whose confidence is below P (0-1), or 'calibrated': the threshold "
                   "`llmtags calibrate` stored in the --adapter; dropped tags are listed as below_confidence")


def _fields(args: argparse.Namespace) -> Any:
    from .records import Fields

    return Fields(args.id_field, args.text_field, args.category_field, args.tags_field)


def _tagging_options(args: argparse.Namespace) -> Any:
    from .prompts import demos_from, load_template
    from .records import load_labelled
    from .tagger import TaggingOptions

    template = args.template if args.template == "auto" else load_template(args.template)
    demos = demos_from(load_labelled(args.demos), args.shots) if args.demos else ()
    if template != "auto" and "demos" in template.source and not demos:
        raise CliError(f"template {template.name!r} shows demonstrations: give --demos FILE")
    candidates = None
    if getattr(args, "candidates", None) and not getattr(args, "no_candidates", False):
        from .candidates import CandidateFinder, load_candidate_vocabulary

        candidates = CandidateFinder(load_candidate_vocabulary(args.candidates))
    constrain, constrain_vocab = getattr(args, "constrain", "free"), None
    if constrain == "closed":
        from .candidates import load_candidate_vocabulary

        path = getattr(args, "constrain_vocab", None) or getattr(args, "vocab", None)
        if not path:
            raise CliError("--constrain closed needs --constrain-vocab VOCAB (or --vocab)")
        constrain_vocab = load_candidate_vocabulary(path)
    return TaggingOptions(template, demos, getattr(args, "max_new_tokens", 64), getattr(args, "batch_size", 8),
                          getattr(args, "chunk_size", 64), candidates=candidates, constrain=constrain,
                          constrain_vocab=constrain_vocab, min_confidence=_min_confidence(args))


def _min_confidence(args: argparse.Namespace) -> float | None:
    value = getattr(args, "min_confidence", None)
    if value is None:
        return None
    if value == "calibrated":
        from .adapters import read_metadata, resolve_adapter

        if not getattr(args, "adapter", None):
            raise CliError("--min-confidence calibrated needs --adapter NAME (the threshold is stored there)")
        calibration = read_metadata(resolve_adapter(args.adapter, getattr(args, "adapters_root", None))).get(
            "calibration") or {}
        if calibration.get("threshold") is None:
            raise CliError(f"adapter {args.adapter!r} has no calibrated threshold: run llmtags calibrate first")
        print(f"llmtags: adapter {args.adapter}: min confidence {calibration['threshold']:.3f} (calibrated for "
              f"precision {calibration['target_precision']:.2f})", file=sys.stderr)
        return float(calibration["threshold"])
    try:
        threshold = float(value)
    except ValueError:
        raise CliError(f"--min-confidence: expected a number between 0 and 1 or 'calibrated', got {value!r}") from None
    if not 0.0 <= threshold <= 1.0:
        raise CliError(f"--min-confidence: {threshold} is not between 0 and 1")
    return threshold


def _normaliser(args: argparse.Namespace) -> Any:
    if not getattr(args, "vocab", None):
        return None
    from .vocab import Normaliser, Vocabulary

    return Normaliser(Vocabulary.load(args.vocab), policy=args.policy, fuzzy_threshold=args.fuzzy_threshold)


def _open_output(path: str | None, mode: str = "w") -> Any:
    if path in (None, "-"):
        return sys.stdout
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, mode, encoding="utf-8")


# Flags that change how fast or where a run goes, not which tags it writes: a resumed run may differ here.
_RUN_ONLY_FLAGS = {"input", "output", "resume", "quiet", "limit", "errors", "workers", "ray_address",
                   "cpus_per_worker", "shard_size", "batch_size", "chunk_size", "engine", "device", "dtype",
                   "explain", "func", "command", "config", "argv"}


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What decides the tags of a `generate` run: every other flag, and the content hashes of the files
    they name (adapters' weights, vocabularies, templates), so a retrained adapter counts as a change."""
    from .adapters import load_adapter_map, resolve_adapter, weights_sha256
    from .models import sha256_file

    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _RUN_ONLY_FLAGS}
    for key in ("candidates", "vocab", "constrain_vocab", "demos", "adapter_map", "template"):
        value = settings.get(key)
        if isinstance(value, str) and Path(value).is_file():
            settings[f"{key} sha256"] = sha256_file(value)
    names = [args.adapter] if args.adapter else load_adapter_map(args.adapter_map).adapter_names if args.adapter_map else []
    for name in names:
        settings[f"adapter {name} sha256"] = weights_sha256(resolve_adapter(name, args.adapters_root))
    return settings


# --- commands -------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from functools import partial

    from .cli_train import adapter_tagger, apply_adapter_defaults, wants_adapters
    from .engine import load_engine
    from .tagger import check_run_settings, tag_chunks, tag_file

    apply_adapter_defaults(args)
    options, normaliser = _tagging_options(args), _normaliser(args)
    if args.output not in (None, "-"):
        # Ray runs always reuse finished shards, so they always compare.
        check_run_settings(args.output, run_settings(args), args.resume or bool(args.workers))
    if args.workers:
        return _generate_distributed(args, options, normaliser)
    if wants_adapters(args):
        tag = adapter_tagger(args, options, normaliser)
    else:
        engine = load_engine(args.engine, args.base_model, device=args.device, dtype=args.dtype)
        chunks = partial(tag_chunks, engine=engine, options=options, normaliser=normaliser)
        tag = lambda records, on_batch: chunks(records, on_batch=on_batch)  # noqa: E731
    if args.explain:
        tag = _explaining(tag)
    summary = tag_file(
        args.input, args.output, tag, fmt=args.format, fields=_fields(args), limit=args.limit,
        errors=args.errors, resume=args.resume, progress=not args.quiet,
    )
    for line in summary.lines():
        print(f"llmtags: {line}", file=sys.stderr)
    return 130 if summary.interrupted else 0


def _generate_distributed(args: argparse.Namespace, options: Any, normaliser: Any) -> int:
    from functools import partial

    from .cli_train import adapter_tagger, wants_adapters
    from .distributed import engine_tagger, tag_file_distributed

    if args.output in (None, "-"):
        raise CliError("--workers writes shards next to the output: give -o FILE")
    if args.explain:
        raise CliError("--explain shows results as they come: use it without --workers")
    # Built inside each Ray worker, so every worker loads its own model replica.
    make_tag = (partial(adapter_tagger, args, options, normaliser) if wants_adapters(args)
                else partial(engine_tagger, args.base_model, options, args.device, args.dtype, normaliser, args.engine))
    summary = tag_file_distributed(
        args.input, args.output, make_tag, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
        shard_size=args.shard_size, fmt=args.format, fields=_fields(args), limit=args.limit, errors=args.errors,
        address=args.ray_address, progress=not args.quiet,
    )
    for line in summary.lines():
        print(f"llmtags: {line}", file=sys.stderr)
    return 0


def _explaining(tag: Any) -> Any:
    """Wrap a `tag(records, on_batch)` callable so each result is also shown, highlighted, on stderr."""
    from tqdm import tqdm

    def explained(records: Any, on_batch: Any) -> Any:
        for chunk in tag(records, on_batch):
            for result in chunk:
                tqdm.write("\n".join(result.explain()), file=sys.stderr)
            yield chunk

    return explained


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_files

    calibration = calibrate_files(args.gold, args.pred, args.target_precision)
    markdown = calibration.to_markdown()
    print(markdown)
    if args.markdown:
        Path(args.markdown).write_text(markdown, encoding="utf-8")
    if args.report:
        Path(args.report).write_text(json.dumps(calibration.to_json(), indent=1), encoding="utf-8")
    if args.adapter:
        from .adapters import set_metadata_entry

        stored = {"threshold": calibration.threshold, "target_precision": calibration.target_precision,
                  "ece": round(calibration.ece, 4), "dev": args.gold, "records": calibration.records,
                  "at_threshold": None if calibration.at_threshold is None else vars(calibration.at_threshold)}
        path = set_metadata_entry(args.adapter, ("calibration",), stored, getattr(args, "adapters_root", None))
        print(f"llmtags: calibration stored in {path / 'llmtags.json'}", file=sys.stderr)
    if calibration.threshold is None:
        print(f"llmtags: no threshold reaches precision {args.target_precision}", file=sys.stderr)
        return 1
    return 0


def cmd_prompt_render(args: argparse.Namespace) -> int:
    from .models import load_tokenizer_only
    from .prompts import template_for
    from .records import Record, RecordError, read_records
    from .tagger import build_prompt

    if args.text is not None:
        from .records import clean_text

        record = Record("cli", clean_text(args.text))
    else:
        if args.input is None:
            raise CliError("give an input file or --text")
        record = None
        for n, item in enumerate(read_records(args.input, args.format, _fields(args))):
            if isinstance(item, RecordError):
                continue
            if (args.id is not None and item.id == args.id) or (args.id is None and n == args.index):
                record = item
                break
        if record is None:
            raise CliError(f"no valid record with {'id ' + repr(args.id) if args.id else 'index ' + str(args.index)}")
    options = _tagging_options(args)
    tokenizer = load_tokenizer_only(args.base_model)
    prompt = build_prompt(record, tokenizer, options)
    template = template_for(record, options.template)
    print(f"# record {record.id}, template {template.name} (sha256 {template.sha256[:12]}), "
          f"{len(tokenizer(prompt, add_special_tokens=False)['input_ids'])} tokens", file=sys.stderr)
    sys.stdout.write(prompt)
    if record.tags:
        print(f"# training target:\n{template.answer(record.tags)}", file=sys.stderr)
    return 0


def _add_vocab(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", help="vocabulary file (JSONL or plain list): normalise tags against it")
    p.add_argument("--policy", choices=["open", "closed"], default="open",
                   help="open: keep unknown tags, marked new; closed: map them to the nearest entry or drop them")
    p.add_argument("--fuzzy-threshold", type=float, default=90.0, help="rapidfuzz ratio needed for a fuzzy match")


def _write_report(report: Any, args: argparse.Namespace) -> None:
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report.to_json(worst=args.errors_k or 20), ensure_ascii=False, indent=1))
    markdown = report.to_markdown(worst=args.errors_k or 0)
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n", encoding="utf-8")
    print(markdown)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import cached_engine, generate_and_score, labelled_records, score_files

    normaliser = _normaliser(args)
    if args.pred:
        if not args.gold:
            raise CliError("--pred needs --gold")
        report = score_files(args.gold, args.pred, normaliser)
    elif args.data:
        records = labelled_records(args.data, args.limit, _fields(args))
        engine = cached_engine(args.base_model, args.device, args.dtype, engine=args.engine)
        report, results = generate_and_score(records, engine, _tagging_options(args), normaliser, args.data,
                                             progress=not args.quiet)
        if args.save_predictions:
            with _open_output(args.save_predictions) as out:
                for result in results:
                    out.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    else:
        raise CliError("give --gold FILE --pred FILE, or --data FILE to generate and score")
    if getattr(args, "candidates", None):
        from .candidates import CandidateFinder, candidate_recall, load_candidate_vocabulary
        from .records import load_labelled

        finder = CandidateFinder(load_candidate_vocabulary(args.candidates))
        gold_records = records if args.data else [r for r in load_labelled(args.gold) if r.tags is not None]
        report.candidate_recall = candidate_recall([r.tags for r in gold_records],
                                                   [finder.tags(r.text, attributes=r.schema) for r in gold_records])
    _write_report(report, args)
    if args.record_to_adapter:
        from .adapters import set_metadata_entry

        typed = report.scores(report.final_view, "typed").micro
        metrics = {"set": args.gold or args.data, "records": len(report.golds), "precision": round(typed.precision, 4),
                   "recall": round(typed.recall, 4), "f1": round(typed.f1, 4),
                   "f1_ci95": [round(x, 4) for x in report.ci95(report.final_view, "typed")],
                   "value_f1": round(report.scores(report.final_view, "values").micro.f1, 4),
                   "candidate_recall": report.candidate_recall, "report": args.markdown}
        set_metadata_entry(args.record_to_adapter, ("metrics", "test"), metrics, getattr(args, "adapters_root", None))
    return 0


def cmd_prompt_compare(args: argparse.Namespace) -> int:
    from .evaluate import cached_engine, compare_templates, labelled_records
    from .prompts import load_template

    if len(args.templates) < 2:
        raise CliError("give at least two templates to compare")
    templates = [load_template(t) for t in args.templates]
    records = labelled_records(args.data, args.limit, _fields(args))
    options = _tagging_options(args)
    engine = cached_engine(args.base_model, args.device, args.dtype, engine=args.engine)
    comparison = compare_templates(records, templates, engine, options, _normaliser(args), progress=not args.quiet)
    markdown = comparison.to_markdown(disagreements=args.show)
    if args.report:
        Path(args.report).write_text(json.dumps(comparison.to_json(), ensure_ascii=False, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    print(f"llmtags: {engine.misses} generations, the rest from the cache", file=sys.stderr)
    return 0


def cmd_vocab_build(args: argparse.Namespace) -> int:
    from .records import load_labelled
    from .vocab import Vocabulary, build_vocabulary

    if args.list:
        vocab = Vocabulary.load(args.input)
    else:
        vocab = build_vocabulary(load_labelled(args.input, _fields(args)))
    vocab.save(args.output)
    print(f"llmtags: {len(vocab)} tags over {len(vocab.attributes())} attributes written to {args.output}",
          file=sys.stderr)
    return 0


def cmd_vocab_show(args: argparse.Namespace) -> int:
    from .vocab import Vocabulary

    vocab = Vocabulary.load(args.vocab_file)
    print(f"{len(vocab)} tags, attributes: {', '.join(str(a) for a in vocab.attributes())}")
    for entry in list(vocab)[: args.top]:
        aliases = f"  (aliases: {', '.join(entry.aliases)})" if entry.aliases else ""
        print(f"{entry.count:>6}  {entry.tag}{aliases}")
    return 0


# --- parser -------------------------------------------------------------------------------------------


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from .cli_train import add_adapter_options, add_train_commands

    parser = argparse.ArgumentParser(prog="llmtags", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML file of option defaults")
    commands = parser.add_subparsers(dest="command", required=True)
    leaves: dict[str, argparse.ArgumentParser] = {}

    p = commands.add_parser("generate", help="tag the products of a file")
    _add_input(p)
    p.add_argument("-o", "--output", help="output JSONL (default stdout)")
    p.add_argument("--errors", help="append bad-record reports here as JSONL (default stderr)")
    p.add_argument("--resume", action="store_true",
                   help="skip records already in the output (same id and text) and append the rest")
    _add_model(p)
    _add_prompt(p)
    _add_generation(p)
    _add_vocab(p)
    add_adapter_options(p)
    p.add_argument("--workers", type=int, metavar="N",
                   help="tag on a Ray cluster with N model replicas (a local one unless --ray-address); "
                   "shards go to OUT.parts/, and a re-run skips the shards already done")
    p.add_argument("--ray-address", help="Ray cluster to join (e.g. auto, or HEAD:6379; default: $RAY_ADDRESS, "
                   "else a local cluster)")
    p.add_argument("--shard-size", type=int, default=256, help="records per Ray task (default 256)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPU threads per Ray worker (default 1)")
    p.add_argument("--explain", action="store_true",
                   help="also show each product on stderr with its tags' evidence [bracketed] and confidences")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)
    leaves["generate"] = p

    prompt = commands.add_parser("prompt", help="prompt templates").add_subparsers(dest="prompt_command", required=True)
    p = prompt.add_parser("render", help="show exactly what the model sees for one record")
    _add_input(p, optional=True)
    p.add_argument("--id", help="the record's id (default: the first record)")
    p.add_argument("--index", type=int, default=0, help="the record's position among valid records")
    p.add_argument("--text", help="render this product text instead of reading a file")
    p.add_argument("--base-model")
    _add_prompt(p)
    p.set_defaults(func=cmd_prompt_render)
    leaves["prompt render"] = p

    p = prompt.add_parser("compare", help="run templates on the same labelled records and compare them")
    p.add_argument("templates", nargs="+", help="template names (zh, en, few_shot) or .j2 files")
    p.add_argument("--data", required=True, help="labelled JSONL (e.g. a dev split)")
    _add_fields(p)
    _add_model(p)
    _add_prompt(p, template=False)
    _add_generation(p)
    _add_vocab(p)
    p.add_argument("--show", type=int, default=10, help="how many disagreeing records to print")
    p.add_argument("--report", help="write the comparison as JSON here")
    p.add_argument("--markdown", help="write the tables as Markdown here")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_prompt_compare, template="auto")
    leaves["prompt compare"] = p

    p = commands.add_parser("eval", help="score predictions against gold tags, or generate and score")
    p.add_argument("--gold", help="labelled JSONL")
    p.add_argument("--pred", help="predictions from llmtags generate")
    p.add_argument("--data", help="labelled file: generate with the model, then score")
    p.add_argument("--format", choices=["jsonl", "csv", "parquet"])
    _add_fields(p)
    _add_model(p)
    _add_prompt(p)
    _add_generation(p)
    _add_vocab(p)
    p.add_argument("--errors", dest="errors_k", type=int, default=0, metavar="K", help="list the K worst records")
    p.add_argument("--report", help="write the full report as JSON here")
    p.add_argument("--markdown", help="write the tables as Markdown here")
    p.add_argument("--save-predictions", help="with --data: write the generated predictions here")
    p.add_argument("--record-to-adapter", metavar="NAME",
                   help="store these figures as adapter NAME's test metrics in its llmtags.json")
    p.add_argument("--adapters-root", help="adapter registry directory (default: $LLMTAGS_ADAPTERS, else ./adapters)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)
    leaves["eval"] = p

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
    leaves["calibrate"] = p

    vocab = commands.add_parser("vocab", help="tag vocabularies").add_subparsers(dest="vocab_command", required=True)
    p = vocab.add_parser("build", help="collect the tags of a labelled set (or read a plain list) into a vocabulary")
    p.add_argument("input", help="labelled JSONL/CSV/Parquet, or with --list a plain list of tags")
    p.add_argument("-o", "--output", required=True, help="vocabulary JSONL to write")
    p.add_argument("--list", action="store_true", help="the input is a plain list: one tag per line, TAB, aliases|...")
    _add_fields(p)
    p.set_defaults(func=cmd_vocab_build)
    leaves["vocab build"] = p
    p = vocab.add_parser("show", help="summarise a vocabulary file (JSONL or plain list)")
    p.add_argument("vocab_file")
    p.add_argument("--top", type=int, default=20)
    p.set_defaults(func=cmd_vocab_show)
    leaves["vocab show"] = p

    leaves.update(add_train_commands(commands))
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
    from .models import ModelError
    from .prompts import PromptError

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


if __name__ == "__main__":
    sys.exit(main())

"""The adapter registry on the tiny random model: names, metadata checks, multi-adapter routing, merging.

The adapters here are made directly with peft (random, non-zero LoRA weights, two different seeds), not
trained: that is test_train's business, and random adapters are sure to change every output.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from llmtags.adapters.registry import AdapterError, AdapterMismatch, build_metadata, check_compatible, list_adapters, read_metadata, resolve_adapter, show_adapter, validate_adapter_name
from llmtags.adapters.maps import AdapterMap, load_adapter_map
from llmtags.adapters.routing import route, tag_chunks_routed
from llmtags.engines.adapter_set import AdapterSet
from llmtags.models import ResolvedModel, resolve_base_model
from llmtags.prompts import load_template
from llmtags.records import Record
from llmtags.options import TaggingOptions
from llmtags.tagger import tag_records
from llmtags.testing import random_adapter

RECORDS = [
    Record("r1", "兰蔻小黑瓶精华肌底液50ml", "美妆"),
    Record("r2", "耐克男子跑步鞋 黑色", "运动"),
    Record("r3", "得力中性笔0.5mm 12支", "文具"),
    Record("r4", "雅诗兰黛眼霜15ml", "美妆"),
    Record("r5", "李宁篮球鞋 白色", "运动"),
    Record("r6", "晨光橡皮擦 4块装", None),
    Record("r7", "Nike Air Zoom running shoe", "运动"),
]
OPTIONS = TaggingOptions(template="auto", max_new_tokens=10, batch_size=3)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    random_adapter(tiny_model_dir, root / "zh-beauty", seed=1)
    random_adapter(tiny_model_dir, root / "sports.v2", seed=2)
    return root


def _single_adapter_outputs(base_dir: Path, adapter_dir: Path, records: list[Record]) -> list[str]:
    """The reference: a fresh base model with one adapter, through plain peft."""
    from peft import PeftModel

    from llmtags.engines.transformers import TransformersEngine

    engine = TransformersEngine.load(str(base_dir), device="cpu")
    engine.model = PeftModel.from_pretrained(engine.model, str(adapter_dir)).eval()
    return [r.raw for r in tag_records(records, engine, OPTIONS)]


# --- names and the registry ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", "../x", "a/../../b", "/etc/passwd", "a/b", "a\\b", "", ".hidden", "-rf",
                                  "a..b", "美妆", "a b", "x" * 101, "~root"])
def test_path_traversal_and_odd_adapter_names_are_rejected(name, tmp_path):
    with pytest.raises(AdapterError, match="invalid adapter name"):
        validate_adapter_name(name)
    with pytest.raises(AdapterError):
        AdapterMap({"美妆": name})


def test_plain_names_are_accepted_and_resolved_under_the_root(registry):
    for name in ("zh-beauty", "sports.v2", "A_1"):
        assert validate_adapter_name(name) == name
    assert resolve_adapter("zh-beauty", registry) == registry / "zh-beauty"
    assert resolve_adapter(str(registry / "sports.v2")) == registry / "sports.v2"  # an explicit path
    with pytest.raises(AdapterError, match="known: sports.v2, zh-beauty"):
        resolve_adapter("nope", registry)
    assert [a.name for a in list_adapters(registry)] == ["sports.v2", "zh-beauty"]
    shown = show_adapter("zh-beauty", registry)
    assert shown["command"] == "test seed 1" and shown["metrics"] == {"dev": None, "test": None}
    assert shown["template"]["name"] == "auto" and set(shown["template"]["parts"]) == {"zh", "en"}
    assert shown["weights_bytes"] > 0 and list_adapters(registry / "missing") == []


def test_pickled_adapter_weights_are_refused(registry, tmp_path):
    import shutil

    copy = tmp_path / "pickled"
    shutil.copytree(registry / "zh-beauty", copy)
    (copy / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="safetensors only"):
        resolve_adapter(str(copy))
    (copy / "adapter_model.bin").unlink()
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="lacks adapter_model.safetensors"):
        resolve_adapter(str(copy))


# --- compatibility ---------------------------------------------------------------------------------------


def test_template_or_base_mismatch_is_refused_unless_forced(registry, tiny_model_dir, tiny_engine):
    meta = read_metadata(registry / "zh-beauty")
    resolved = resolve_base_model(str(tiny_model_dir))
    tokenizer = tiny_engine.tokenizer
    assert check_compatible(meta, resolved, "auto", tokenizer) == []

    other_base = ResolvedModel("embedded", "/nowhere", "sha256:" + "0" * 64)
    with pytest.raises(AdapterMismatch, match="base model"):
        check_compatible(meta, other_base, "auto", tokenizer)
    with pytest.raises(AdapterMismatch, match="prompt template.*--template auto"):
        check_compatible(meta, resolved, "en", tokenizer)
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = original + "{# changed #}"
        with pytest.raises(AdapterMismatch, match="chat template"):
            check_compatible(meta, resolved, "auto", tokenizer)
    finally:
        tokenizer.chat_template = original
    with pytest.warns(UserWarning, match="--force"):
        problems = check_compatible(meta, other_base, "zh", tokenizer, force=True)
    assert len(problems) == 2

    adapter_set = AdapterSet.load(str(tiny_model_dir), device="cpu")
    with pytest.raises(AdapterMismatch):
        adapter_set.add("zh-beauty", template="zh", root=registry)
    with pytest.warns(UserWarning):
        assert adapter_set.add("zh-beauty", template="zh", root=registry, force=True) == "zh-beauty"


# --- routing ---------------------------------------------------------------------------------------------


def test_category_map_routes_records(tmp_path):
    path = tmp_path / "map.toml"
    path.write_text('default = "general"\n[categories]\n"美妆" = "zh-beauty"\n"运动" = "sports.v2"\n'
                    '"Shoes" = "sports.v2"\n', encoding="utf-8")
    adapter_map = load_adapter_map(path)
    assert adapter_map.adapter_names == ["zh-beauty", "sports.v2", "general"]
    records = RECORDS + [Record("r8", "x", "shoes"), Record("r9", "y", "ＳＨＯＥＳ")]  # case and width folded
    assert route(records, adapter_map=adapter_map) == {
        "zh-beauty": [0, 3],
        "sports.v2": [1, 4, 6, 7, 8],
        "general": [2, 5],
    }
    assert route(records[:3], adapter="zh-beauty") == {"zh-beauty": [0, 1, 2]}
    assert route(records[:3]) == {None: [0, 1, 2]}
    no_default = AdapterMap({"美妆": "zh-beauty"})
    assert route(records[:3], adapter_map=no_default) == {"zh-beauty": [0], None: [1, 2]}
    with pytest.raises(AdapterError, match="not both"):
        route(records, adapter="zh-beauty", adapter_map=adapter_map)
    path.write_text('[categories]\n"美妆" = "../../etc"\n', encoding="utf-8")
    with pytest.raises(AdapterError, match="invalid adapter name"):
        load_adapter_map(path)
    path.write_text('[categorys]\n"美妆" = "a"\n', encoding="utf-8")
    with pytest.raises(AdapterError, match="unknown key"):
        load_adapter_map(path)


def test_language_map_routes_what_no_category_claims(tmp_path):
    path = tmp_path / "map.toml"
    path.write_text('[categories]\n"运动" = "sports.v2"\n[languages]\nzh = "zh-beauty"\nen = "general"\n',
                    encoding="utf-8")
    adapter_map = load_adapter_map(path)
    assert adapter_map.adapter_names == ["sports.v2", "zh-beauty", "general"]
    records = [Record("a", "理肤泉防晒霜", "美妆"), Record("b", "Nike Air Zoom", "Shoes"),
               Record("c", "李宁跑步鞋", "运动"), Record("d", "no category, but lang says zh", lang="zh"),
               Record("e", "无类目")]
    assert route(records, adapter_map=adapter_map) == {"zh-beauty": [0, 3, 4], "general": [1], "sports.v2": [2]}
    path.write_text('[languages]\nzh = 3\n', encoding="utf-8")
    with pytest.raises(AdapterError, match=r"\[languages\] must map"):
        load_adapter_map(path)


def test_switching_adapters_in_one_process_gives_each_record_its_own_adapters_output(
    registry, tiny_model_dir, tiny_engine
):
    adapter_set = AdapterSet.load(str(tiny_model_dir), device="cpu")
    for name in ("zh-beauty", "sports.v2"):
        adapter_set.add(name, template="auto", root=registry)
    adapter_map = AdapterMap({"美妆": "zh-beauty", "运动": "sports.v2"})  # others: the base model
    routed = [r for chunk in tag_chunks_routed(RECORDS, adapter_set, OPTIONS, adapter_map=adapter_map) for r in chunk]
    assert [r.record.id for r in routed] == [r.id for r in RECORDS]
    assert [r.adapter for r in routed] == ["zh-beauty", "sports.v2", None, "zh-beauty", "sports.v2", None, "sports.v2"]

    beauty = _single_adapter_outputs(tiny_model_dir, registry / "zh-beauty", RECORDS)
    sports = _single_adapter_outputs(tiny_model_dir, registry / "sports.v2", RECORDS)
    base = [r.raw for r in tag_records(RECORDS, tiny_engine, OPTIONS)]
    # The two adapters and the base model disagree, so matching below says which one ran.
    assert all(len({b, s, o}) == 3 for b, s, o in zip(beauty, sports, base))
    expected = {"zh-beauty": beauty, "sports.v2": sports, None: base}
    assert [r.raw for r in routed] == [expected[r.adapter][i] for i, r in enumerate(routed)]

    # Adapters may differ in prompt options: each group is rendered with its own adapter's options.
    en_options = dataclasses.replace(OPTIONS, template=load_template("en"))
    own = [r.raw for chunk in tag_chunks_routed(RECORDS, adapter_set, OPTIONS, adapter_map=adapter_map,
                                                options_by_adapter={"zh-beauty": en_options}) for r in chunk]
    beauty_en = [r.raw for r in tag_records(RECORDS, adapter_set.engine("zh-beauty"), en_options)]
    assert beauty_en != beauty
    expected["zh-beauty"] = beauty_en
    assert own == [expected[r.adapter][i] for i, r in enumerate(routed)]

    # One adapter for everything, then the base model again: the switches leave no trace.
    only_sports = [r.raw for chunk in tag_chunks_routed(RECORDS, adapter_set, OPTIONS, adapter="sports.v2") for r in chunk]
    assert only_sports == sports
    assert [r.raw for r in tag_records(RECORDS, adapter_set.engine(None), OPTIONS)] == base
    with pytest.raises(AdapterError, match="not loaded"):
        adapter_set.engine("general")


def test_an_adapter_at_scale_zero_tags_as_the_base_model(registry, tiny_model_dir, tiny_engine):
    adapter_set = AdapterSet.load(str(tiny_model_dir), device="cpu")
    adapter_set.add("zh-beauty", root=registry, scale=0.0)
    off = [r.raw for r in tag_records(RECORDS, adapter_set.engine("zh-beauty"), OPTIONS)]
    assert off == [r.raw for r in tag_records(RECORDS, tiny_engine, OPTIONS)]
    assert off != _single_adapter_outputs(tiny_model_dir, registry / "zh-beauty", RECORDS)
    with pytest.raises(AdapterError, match="or scales"):
        adapter_set.add("zh-beauty", root=registry, scale=1.0)


def test_merge_adapter_matches_the_adapter(registry, tiny_model_dir, tmp_path):
    import torch

    from llmtags.adapters.merge import merge_adapter
    from llmtags.engines.transformers import TransformersEngine

    out = merge_adapter(str(tiny_model_dir), "zh-beauty", tmp_path / "merged", root=registry)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    merged_base = resolve_base_model(str(out))
    assert merged_base.identity.startswith("dir:")  # not the base model's identity
    assert json.loads((out / "llmtags-merged.json").read_text())["merged_4bit"] is False
    merged = TransformersEngine.load(str(out), device="cpu")
    adapter_set = AdapterSet.load(str(tiny_model_dir), device="cpu")
    adapter_set.add("zh-beauty", root=registry)
    ids = merged.tokenizer(["兰蔻小黑瓶精华肌底液50ml"], return_tensors="pt")
    with torch.no_grad(), adapter_set.active("zh-beauty"):
        expected = adapter_set.model(**ids).logits
    with torch.no_grad():
        actual = merged.model(**ids).logits
    assert torch.allclose(actual, expected, atol=1e-4)
    with pytest.raises(AdapterError, match="not empty"), warnings.catch_warnings():
        merge_adapter(str(tiny_model_dir), "zh-beauty", out, root=registry)


# --- command-line wiring (a parser of its own: the cli package calls the same functions) ---------------------------


def _parser():
    import argparse

    from llmtags.cli import adapters, train
    from llmtags.cli.common import add_adapter_options

    parser = argparse.ArgumentParser(prog="llmtags")
    commands = parser.add_subparsers(dest="command", required=True)
    leaves = {**train.add_parser(commands), **adapters.add_parser(commands)}
    generate = commands.add_parser("generate")
    generate.add_argument("input")
    generate.add_argument("--base-model")
    generate.add_argument("--limit", type=int)
    generate.add_argument("--format")
    add_adapter_options(generate)
    return parser, leaves


def test_train_flags_override_the_train_config_file(tmp_path):
    from llmtags.cli.train import train_config_from_args, train_out_dir

    parser, leaves = _parser()
    assert set(leaves) == {"train", "adapters list", "adapters show", "adapters pack", "merge"}
    config_file = tmp_path / "t.toml"
    config_file.write_text("[train]\nrank = 8\nlr = 1e-3\nlayers = \"all\"\n")
    args = parser.parse_args(["train", "data.jsonl", "--name", "zh-taobao", "--train-config", str(config_file),
                              "--lr", "5e-4", "--qlora", "false", "--layers", "top4", "--adapters-root", str(tmp_path)])
    config = train_config_from_args(args)
    assert (config.rank, config.lr, config.layers, config.qlora, config.alpha) == (8, 5e-4, 4, False, 32)
    assert train_out_dir(args) == tmp_path / "zh-taobao"
    args = parser.parse_args(["train", "oa.jsonl", "ae.jsonl", "--dev", "oa-dev.jsonl", "ae-dev.jsonl",
                              "--name", "en-products", "--limit", "4"])
    assert args.train == ["oa.jsonl", "ae.jsonl"] and args.dev == ["oa-dev.jsonl", "ae-dev.jsonl"] and args.limit == 4
    args = parser.parse_args(["train", "data.jsonl", "--name", "../escape"])
    with pytest.raises(AdapterError, match="invalid adapter name"):
        train_out_dir(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "in.jsonl", "--adapter", "a", "--adapter-map", "m.toml"])


def test_adapters_list_and_show_commands(registry, capsys):
    parser, _ = _parser()
    args = parser.parse_args(["adapters", "list", "--adapters-root", str(registry)])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "base"]
    assert [ln.split()[0] for ln in lines[1:]] == ["sports.v2", "zh-beauty"]
    args = parser.parse_args(["adapters", "show", "zh-beauty", "--adapters-root", str(registry)])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["command"] == "test seed 1"


def test_generate_with_an_adapter_map_writes_each_records_adapter(registry, tiny_model_dir, tmp_path):
    from llmtags.adapters.routing import adapter_tagger
    from llmtags.cli.common import settings_from
    from llmtags.plan import plan_run
    from llmtags.run import tag_file

    def planned(args):
        return plan_run(settings_from(args).replace(max_new_tokens=OPTIONS.max_new_tokens, batch_size=OPTIONS.batch_size))

    data = tmp_path / "products.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "text": r.text, "category": r.category}, ensure_ascii=False) + "\n"
                            for r in RECORDS[:4]), encoding="utf-8")
    adapter_map = tmp_path / "map.toml"
    adapter_map.write_text('[categories]\n"美妆" = "zh-beauty"\n"运动" = "sports.v2"\n', encoding="utf-8")
    parser, _ = _parser()
    args = parser.parse_args(["generate", str(data), "--adapter-map", str(adapter_map), "--adapters-root",
                              str(registry)])
    args.device, args.dtype = "cpu", "auto"
    assert settings_from(args).wants_adapters
    tag = adapter_tagger(planned(args))  # no --base-model: the base model the adapters record
    out = tmp_path / "tags.jsonl"
    summary = tag_file(str(data), str(out), tag, progress=False)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(x["id"], x["adapter"]) for x in lines] == [("r1", "zh-beauty"), ("r2", "sports.v2"), ("r3", None),
                                                         ("r4", "zh-beauty")]
    assert summary.tagged == 4
    # A single --adapter: the usual output lines, no "adapter" key.
    args = parser.parse_args(["generate", str(data), "--adapter", "zh-beauty", "--adapters-root", str(registry)])
    args.device, args.dtype = "cpu", "auto"
    tag_file(str(data), str(out), adapter_tagger(planned(args)), progress=False)
    assert ["adapter" in json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [False] * 4


def test_an_adapter_map_gives_each_adapter_its_own_template(tiny_model_dir, tmp_path):
    from llmtags.adapters.routing import adapter_tagger
    from llmtags.cli.common import settings_from
    from llmtags.plan import plan_run
    from llmtags.run import tag_file

    root = tmp_path / "adapters"
    random_adapter(tiny_model_dir, root / "zh-tuned", seed=3, template="tuned")
    random_adapter(tiny_model_dir, root / "en-auto", seed=4)
    data = tmp_path / "products.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "text": r.text}, ensure_ascii=False) + "\n"
                            for r in RECORDS[5:7]), encoding="utf-8")  # one zh, one en, no categories
    adapter_map = tmp_path / "map.toml"
    adapter_map.write_text('[languages]\nzh = "zh-tuned"\nen = "en-auto"\n', encoding="utf-8")
    parser, _ = _parser()

    def run(*flags: str) -> list[dict]:
        args = parser.parse_args(["generate", str(data), *flags, "--adapters-root", str(root)])
        args.device, args.dtype, args.template, args.candidates = "cpu", "auto", "auto", None
        args.demos, args.max_new_tokens, args.batch_size, args.chunk_size = None, 10, 3, 8
        out = tmp_path / "tags.jsonl"
        # A mismatched template would be refused: the zh adapter was trained with `tuned`, not `auto`.
        tag_file(str(data), str(out), adapter_tagger(plan_run(settings_from(args))), progress=False)
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    routed = run("--adapter-map", str(adapter_map))
    assert [x["adapter"] for x in routed] == ["zh-tuned", "en-auto"]
    assert routed[0]["raw"] == run("--adapter", "zh-tuned")[0]["raw"]
    assert routed[1]["raw"] == run("--adapter", "en-auto")[1]["raw"]


def test_generate_defaults_to_the_adapters_template_and_candidates(tmp_path, capsys):
    import json

    from llmtags.options import Settings
    from llmtags.plan import adapter_defaults, resolved_adapter

    def with_adapter_defaults(settings):  # what plan_run makes of one --adapter's settings
        return settings.replace(**adapter_defaults(resolved_adapter("zh", root), settings).changes())

    root = tmp_path / "adapters"
    (root / "zh").mkdir(parents=True)
    vocab = tmp_path / "train.jsonl"
    vocab.write_text('{"id": "1", "text": "理肤泉", "tags": ["品牌:理肤泉"]}\n', encoding="utf-8")
    from llmtags.adapters.registry import FORMAT_VERSION

    meta = {"format": FORMAT_VERSION, "template": {"name": "tuned", "spec": "tuned"},
            "vocabulary": {"candidates": {"path": str(vocab)}}}
    (root / "zh" / "llmtags.json").write_text(json.dumps(meta))
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # only their presence is checked here
        (root / "zh" / name).write_text("{}")
    args = with_adapter_defaults(Settings(adapter="zh", adapters_root=str(root), template="auto", candidates=None))
    assert (args.template, args.candidates) == ("tuned", str(vocab))
    explicit = with_adapter_defaults(Settings(adapter="zh", adapters_root=str(root), template="zh",
                                              candidates="mine.jsonl"))
    assert (explicit.template, explicit.candidates) == ("zh", "mine.jsonl")
    without = with_adapter_defaults(Settings(adapter="zh", adapters_root=str(root), template="auto", candidates=None,
                                             no_candidates=True))
    assert (without.template, without.candidates) == ("tuned", None)
    vocab.unlink()
    # Without the training data the adapter still runs, without candidates, and says so.
    args = with_adapter_defaults(Settings(adapter="zh", adapters_root=str(root), template="auto", candidates=None))
    assert (args.template, args.candidates) == ("tuned", None)
    assert "absent here: tagging without candidates" in capsys.readouterr().err


def test_metadata_records_every_candidates_source(tiny_model_dir, tmp_path):
    from llmtags.models import load_tokenizer

    first, second = tmp_path / "oa.jsonl", tmp_path / "ae.jsonl"
    first.write_text('{"id": "1", "text": "Nike", "tags": ["Brand:Nike"]}\n', encoding="utf-8")
    second.write_text('{"id": "2", "text": "Adidas", "tags": ["Brand:Adidas"]}\n', encoding="utf-8")
    resolved = resolve_base_model(str(tiny_model_dir))
    meta = build_metadata(resolved=resolved, template="tuned", tokenizer=load_tokenizer(resolved),
                          hyperparameters={}, candidates=f"{first},{second}")
    candidates = meta["vocabulary"]["candidates"]
    assert candidates["size"] == 2 and len(candidates["sha256"]) == 2

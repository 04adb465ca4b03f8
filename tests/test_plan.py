"""The run plan (plan.py): each adapter resolved once, its defaults (template, candidates, pool, proposer,
calibrated threshold) in the options every stage reads, and `eval` / `prompt compare --adapter` tagging
as `generate --adapter` does, on the tiny random model with a random adapter that ships all three files."""

from __future__ import annotations

import json
import random
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import pytest

from llmtags.adapters import registry
from llmtags.adapters.routing import load_adapter_set
from llmtags.adapters.pack import POOL_FILE, PROPOSER_FEATURES_FILE, PROPOSER_FILE, VOCABULARY_FILE, pack_adapter
from llmtags.candidates import candidate_finder
from llmtags.cli import main
from llmtags.models import load_tokenizer_only, sha256_file
from llmtags.options import OptionsError, Settings, TaggingOptions
from llmtags.plan import plan_run
from llmtags.prompts import load_template
from llmtags.proposer import SpanProposer
from llmtags.records import Record, load_labelled
from llmtags.retrieve import load_pool
from llmtags.run import run_settings
from llmtags.tagger import build_prompt
from llmtags.testing import random_adapter

BRANDS = ["兰蔻", "耐克", "李宁", "得力", "晨光", "小米"]
PRODUCTS = ["精华液", "跑步鞋", "篮球鞋", "中性笔", "橡皮擦", "耳机"]
DEV = [Record("d1", "包邮耐克新款篮球鞋热卖", tags=["品牌:耐克", "产品词:篮球鞋"]),
       Record("d2", "正品小米耳机官方", tags=["品牌:小米", "产品词:耳机"])]


def _labelled(n: int) -> list[Record]:
    rng = random.Random(0)
    records = []
    for i in range(n):
        brand, product = rng.choice(BRANDS), rng.choice(PRODUCTS)
        records.append(Record(f"s{i}", f"正品{brand}新款{product}包邮", tags=[f"品牌:{brand}", f"产品词:{product}"]))
    return records


def _write(path: Path, records: list[Record]) -> Path:
    path.write_text("".join(json.dumps({"id": r.id, "text": r.text, "tags": r.tags}, ensure_ascii=False) + "\n"
                            for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A registry with `zh-tuned` (trained with `tuned`, shipping its vocabulary, a pool with K=2, a span
    proposer and a calibrated threshold) and `plain` (the `auto` templates, shipping nothing)."""
    work = tmp_path_factory.mktemp("plan")
    root = work / "adapters"
    adapter = random_adapter(tiny_model_dir, root / "zh-tuned", seed=5, template="tuned")
    sample = _write(work / "sample.jsonl", _labelled(60))
    crf = SpanProposer.train(_labelled(60), work / "zh.crfsuite")
    pack_adapter(adapter, candidates=str(sample), pool=str(sample), k=2, proposer={"model": str(crf.path)})
    registry.set_metadata_entry(adapter, ("calibration",), {"threshold": 0.2, "target_precision": 0.9})
    sample.unlink()  # the adapter carries what it needs
    random_adapter(tiny_model_dir, root / "plain", seed=6)
    return root


@pytest.fixture
def cli_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMTAGS_CACHE", str(tmp_path / "cache"))  # a generation cache of this test's own
    return _write(tmp_path / "dev.jsonl", DEV)


def _prompts(options: TaggingOptions, tiny_model_dir: Path) -> list[str]:
    tokenizer = load_tokenizer_only(str(tiny_model_dir))
    return [build_prompt(r, tokenizer, options) for r in DEV]


def test_the_plan_resolves_each_adapter_once(root, tmp_path, monkeypatch):
    calls: Counter[str] = Counter()
    real = registry.resolve_adapter

    def counting(name, root=None):
        calls[Path(str(name)).name] += 1
        return real(name, root)

    # Every project module that could resolve an adapter while a run is planned and its settings recorded.
    for module in [m for name, m in sys.modules.items() if name.startswith("llmtags")]:
        if getattr(module, "resolve_adapter", None) is real:
            monkeypatch.setattr(module, "resolve_adapter", counting)
    read = Counter[str]()
    real_read = registry.read_metadata

    def counting_reads(path):
        read[Path(str(path)).name] += 1
        return real_read(path)

    for module in [m for name, m in sys.modules.items() if name.startswith("llmtags")]:
        if getattr(module, "read_metadata", None) is real_read:
            monkeypatch.setattr(module, "read_metadata", counting_reads)
    plan = plan_run(Settings(adapter="zh-tuned", adapters_root=str(root), min_confidence="calibrated"))
    run_settings(plan)
    load_adapter_set(plan)  # the engine attaches what the plan resolved, without reading it again
    assert calls == {"zh-tuned": 1} and read == {"zh-tuned": 1}
    assert plan.options.min_confidence == 0.2  # read from the metadata the plan holds
    adapter_map = tmp_path / "map.toml"
    adapter_map.write_text('[languages]\nzh = "zh-tuned"\nen = "plain"\n', encoding="utf-8")
    mapped = plan_run(Settings(adapter_map=str(adapter_map), adapters_root=str(root)))
    run_settings(mapped)
    assert calls == {"zh-tuned": 2, "plain": 1}
    assert list(mapped.adapters) == ["zh-tuned", "plain"] and mapped.base_model == plan.base_model


def test_the_plans_options_and_recorded_settings_are_those_of_the_adapter(root, tiny_model_dir, tmp_path):
    adapter = root / "zh-tuned"
    plan = plan_run(Settings(adapter="zh-tuned", adapters_root=str(root)))
    # What `generate --adapter` tagged with before the plan: the options built by hand from what it ships.
    by_hand = TaggingOptions(template=load_template("tuned"), pool=load_pool(str(adapter / POOL_FILE)), retrieve=2,
                             candidates=candidate_finder(str(adapter / VOCABULARY_FILE)),
                             proposer=SpanProposer(adapter / PROPOSER_FILE))
    prompts = _prompts(plan.options, tiny_model_dir)
    assert prompts == _prompts(by_hand, tiny_model_dir)
    assert all(part in prompts[0] for part in ("例: ", "候选: ", "识别: ", "耐克"))
    assert plan.base_model == str(tiny_model_dir)  # no --base-model: the one the adapter was trained on
    recorded = run_settings(plan)
    assert (recorded["template"], recorded["retrieve"]) == ("tuned", 2)
    assert (recorded["candidates"], recorded["demos"], recorded["proposer"]) == (
        str(adapter / VOCABULARY_FILE), str(adapter / POOL_FILE), str(adapter / PROPOSER_FILE))
    assert recorded["adapter zh-tuned sha256"] == sha256_file(adapter / registry.WEIGHTS_FILE)
    for file in (POOL_FILE, VOCABULARY_FILE, PROPOSER_FILE):
        assert recorded[f"adapter zh-tuned {file} sha256"] == sha256_file(adapter / file)
    # In a map, the adapter prompts as it does alone; the base model's records keep the run's options.
    adapter_map = tmp_path / "map.toml"
    adapter_map.write_text('[languages]\nzh = "zh-tuned"\n', encoding="utf-8")
    mapped = plan_run(Settings(adapter_map=str(adapter_map), adapters_root=str(root)))
    assert _prompts(mapped.options_for("zh-tuned"), tiny_model_dir) == prompts
    assert mapped.options_for(None) is mapped.options and mapped.options.proposer is None


def test_an_adapters_proposer_is_used_by_default_and_no_proposer_turns_it_off(root, tiny_model_dir, capsys):
    settings = Settings(adapter="zh-tuned", adapters_root=str(root))
    assert plan_run(settings).options.proposer.path == root / "zh-tuned" / PROPOSER_FILE
    assert "span proposer" in capsys.readouterr().err
    off = plan_run(settings.replace(no_proposer=True))
    assert off.options.proposer is None and off.settings.proposer is None
    assert not any("识别: " in p for p in _prompts(off.options, tiny_model_dir))
    assert "proposer sha256" not in run_settings(off) and run_settings(off)["no_proposer"] is True
    # The other defaults go the same way: --no-candidates, --retrieve 0.
    bare = plan_run(settings.replace(no_proposer=True, no_candidates=True, retrieve=0))
    assert (bare.options.candidates, bare.options.pool, bare.options.retrieve) == (None, None, 0)
    assert bare.options.template.name == "tuned"


def test_an_adapters_recorded_fill_is_the_default_and_no_fill_or_a_flag_overrides_it(root, tmp_path, capsys):
    import shutil

    shutil.copytree(root / "zh-tuned", tmp_path / "adapters" / "zh-fill")
    registry.set_metadata_entry(tmp_path / "adapters" / "zh-fill", ("proposer", "fill"), 0.6)
    settings = Settings(adapter="zh-fill", adapters_root=str(tmp_path / "adapters"))
    plan = plan_run(settings)
    assert plan.options.fill == 0.6 and plan.settings.fill == 0.6  # recorded with the output, for --resume
    assert "--fill" in capsys.readouterr().err
    assert plan_run(settings.replace(no_fill=True)).options.fill is None
    assert plan_run(settings.replace(fill=0.9)).options.fill == 0.9
    # Without its proposer there is nothing to fill from; an adapter that records no P fills nothing.
    assert plan_run(settings.replace(no_proposer=True)).options.fill is None
    assert plan_run(Settings(adapter="zh-tuned", adapters_root=str(root))).options.fill is None


def test_an_adapters_recorded_confirm_below_is_the_default_and_no_fill_or_a_flag_overrides_it(root, tmp_path, capsys):
    import shutil

    shutil.copytree(root / "zh-tuned", tmp_path / "adapters" / "zh-confirm")
    registry.set_metadata_entry(tmp_path / "adapters" / "zh-confirm", ("proposer", "confirm_below"), 0.4)
    settings = Settings(adapter="zh-confirm", adapters_root=str(tmp_path / "adapters"))
    plan = plan_run(settings)
    assert plan.options.confirm_below == 0.4 and plan.settings.confirm_below == 0.4
    assert "--confirm-below" in capsys.readouterr().err
    assert plan_run(settings.replace(no_fill=True)).options.confirm_below is None
    assert plan_run(settings.replace(confirm_below=0.2)).options.confirm_below == 0.2
    assert plan_run(settings.replace(no_proposer=True)).options.confirm_below is None
    registry.set_metadata_entry(tmp_path / "adapters" / "zh-confirm", ("proposer", "confirm_below"), 2.0)
    with pytest.raises(OptionsError, match="proposer.confirm_below"):
        plan_run(settings)


def test_in_a_map_fusion_leaves_the_answers_of_adapters_without_a_proposer_as_written(root, tmp_path):
    adapter_map = tmp_path / "map.toml"
    adapter_map.write_text('[languages]\nzh = "zh-tuned"\nen = "plain"\n', encoding="utf-8")
    mapped = plan_run(Settings(adapter_map=str(adapter_map), adapters_root=str(root), confirm_below=0.4, fill=0.5,
                               proposer_decides="品牌"))
    zh = mapped.options_for("zh-tuned")
    assert (zh.confirm_below, zh.fill, zh.proposer_decides) == (0.4, 0.5, {"品牌"})
    # `plain` ships no proposer, nor does the base model: no spans to confirm the model's tags with, so
    # --confirm-below and --proposer-decides would drop them for nothing.
    for options in (mapped.options_for("plain"), mapped.options_for(None)):
        assert options.proposer is None
        assert (options.confirm_below, options.fill, options.proposer_decides) == (None, None, frozenset())


def test_an_adapters_recorded_proposer_decides_is_the_default_on_its_own_catalogue(root, tmp_path, capsys):
    import shutil

    shutil.copytree(root / "zh-tuned", tmp_path / "adapters" / "zh-decides")
    registry.set_metadata_entry(tmp_path / "adapters" / "zh-decides", ("proposer", "decides"), ["产品词", "品牌"])
    settings = Settings(adapter="zh-decides", adapters_root=str(tmp_path / "adapters"))
    plan = plan_run(settings)
    assert plan.options.proposer_decides == {"产品词", "品牌"} and plan.settings.proposer_decides == "产品词,品牌"
    assert "--proposer-decides" in capsys.readouterr().err
    assert plan_run(settings.replace(no_fill=True)).options.proposer_decides == set()
    assert plan_run(settings.replace(proposer_decides="品牌")).options.proposer_decides == {"品牌"}
    registry.set_metadata_entry(tmp_path / "adapters" / "zh-decides", ("proposer", "decides"), "产品词")
    with pytest.raises(registry.AdapterError, match="proposer.decides"):
        plan_run(settings)


def test_an_adapters_prompt_budget_is_the_default_and_a_flag_overrides_it(root, tmp_path, capsys):
    import shutil

    # An adapter trained with --demo-text title --text-budget 400 is prompted that way by generate too.
    shutil.copytree(root / "zh-tuned", tmp_path / "adapters" / "zh-budget")
    registry.set_metadata_entry(tmp_path / "adapters" / "zh-budget", ("hyperparameters", "demo_text"), "title")
    registry.set_metadata_entry(tmp_path / "adapters" / "zh-budget", ("hyperparameters", "text_budget"), 400)
    settings = Settings(adapter="zh-budget", adapters_root=str(tmp_path / "adapters"))
    plan = plan_run(settings)
    assert (plan.options.demo_text, plan.options.text_budget) == ("title", 400)
    assert (plan.settings.demo_text, plan.settings.text_budget) == ("title", 400)  # recorded, for --resume
    assert "--text-budget" in capsys.readouterr().err
    whole = plan_run(settings.replace(demo_text="full", text_budget=0)).options  # --text-budget 0: whole texts
    assert (whole.demo_text, whole.text_budget) == ("full", None)
    plain = plan_run(Settings(adapter="zh-tuned", adapters_root=str(root))).options  # trained without a budget
    assert (plain.demo_text, plain.text_budget) == ("full", None)
    registry.set_metadata_entry(tmp_path / "adapters" / "zh-budget", ("hyperparameters", "text_budget"), 10)
    with pytest.raises(OptionsError, match="hyperparameters.text_budget"):
        plan_run(settings)


def test_eval_with_an_adapter_tags_as_generate_does(root, cli_dev, tmp_path, capsys):
    flags = ["--adapter", "zh-tuned", "--adapters-root", str(root), "--max-new-tokens", "6", "-q"]
    out = tmp_path / "generated.jsonl"
    assert main(["generate", str(cli_dev), "-o", str(out), *flags]) == 0
    capsys.readouterr()
    saved, report = tmp_path / "eval_pred.jsonl", tmp_path / "report.json"
    assert main(["eval", "--data", str(cli_dev), *flags, "--save-predictions", str(saved), "--report",
                 str(report)]) == 0
    err = capsys.readouterr().err
    assert "adapter zh-tuned: span proposer" in err and "2 demonstrations retrieved" in err
    assert json.loads(report.read_text(encoding="utf-8"))["n_records"] == 2
    rows = {r["id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    evaluated = {r["id"]: r for r in map(json.loads, saved.read_text(encoding="utf-8").splitlines())}
    assert {i: r["raw"] for i, r in evaluated.items()} == {i: r["raw"] for i, r in rows.items()}

    # Generations are cached per adapter and prompt: without the proposer the prompts differ, so two
    # more generations; the default again is answered from the cache.
    def cached() -> int:
        with sqlite3.connect(Path(tmp_path / "cache" / "generations.sqlite")) as db:
            return db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]

    assert cached() == 2
    assert main(["eval", "--data", str(cli_dev), *flags, "--no-proposer"]) == 0
    assert cached() == 4
    assert main(["eval", "--data", str(cli_dev), *flags]) == 0
    assert cached() == 4
    assert main(["eval", "--gold", str(cli_dev), "--pred", str(saved), *flags]) == 2
    assert "use it with --data" in capsys.readouterr().err


def test_prompt_compare_checks_every_variant_against_the_adapter(root, cli_dev, tmp_path, capsys):
    variant = tmp_path / "tuned_variant.j2"
    variant.write_text("{#- tuned, annotated -#}\n" + load_template("tuned").source, encoding="utf-8")
    flags = ["--data", str(cli_dev), "--adapter", "zh-tuned", "--adapters-root", str(root), "--max-new-tokens", "4",
             "-q"]
    assert main(["prompt", "compare", "tuned", "zh", *flags]) == 2  # another template: refused
    assert "prompt template: the adapter was trained with 'tuned'" in capsys.readouterr().err
    assert main(["prompt", "compare", "tuned", str(variant), *flags]) == 2
    capsys.readouterr()
    report = tmp_path / "compare.json"
    with pytest.warns(UserWarning, match="--force"):
        assert main(["prompt", "compare", "tuned", str(variant), *flags, "--force-adapter", "--report",
                     str(report)]) == 0
    compared = json.loads(report.read_text(encoding="utf-8"))
    assert [v["template"] for v in compared["variants"]] == ["tuned", "tuned_variant"]
    # The CRF peer beside the variants, on the same records: the adapter's span proposer alone.
    from llmtags.metrics import score

    records = load_labelled(str(cli_dev))
    crf = SpanProposer(root / "zh-tuned" / PROPOSER_FILE)
    expected = score([r.tags for r in records], [[p.tag for p in crf.propose(r)] for r in records]).micro.f1
    assert compared["peer"]["name"].startswith("CRF peer") and compared["peer"]["f1"] == pytest.approx(expected)
    assert "first_vs_peer" in compared["peer"]


@pytest.mark.parametrize("meta, extra, field", [
    ({"template": "tuned"}, {}, "template.spec"),
    ({"retrieval": {"pool": 3, "k": 2}}, {}, "retrieval.pool"),
    ({"retrieval": {"pool": "pool.jsonl", "k": "two"}}, {"demos": "other.jsonl"}, "retrieval.k"),
    ({"proposer": {"folds": 5}}, {}, "proposer.path"),
    ({"vocabulary": {"candidates": {"path": ["a", "b"]}}}, {}, "vocabulary.candidates.path"),
])
def test_a_malformed_metadata_field_is_named(tmp_path, meta, extra, field):
    adapter = tmp_path / "odd"
    adapter.mkdir()
    for name in (registry.CONFIG_FILE, registry.WEIGHTS_FILE):  # only their presence is checked here
        (adapter / name).write_text("{}", encoding="utf-8")
    registry.write_metadata(adapter, {"format": registry.FORMAT_VERSION, **meta})
    with pytest.raises(registry.AdapterError, match=f"odd/llmtags.json: field {field}: "):
        plan_run(Settings(adapter=str(adapter), **extra))


def test_another_catalogues_sample_brings_its_own_proposer_trained_once(root, tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """`--demos SAMPLE` serves retrieval, candidates and the proposer: a CRF trained on the sample on first
    use and cached by its content, not the adapter's own."""
    from llmtags.cli.eval import sample_texts

    monkeypatch.setenv("LLMTAGS_CACHE", str(tmp_path / "cache"))
    other = [Record(f"o{i}", f"{c}颜色{p}款", tags=[f"颜色:{c}", f"款式:{p}"])
             for i, (c, p) in enumerate((c, p) for c in ("红", "蓝", "黑", "白") for p in ("长", "短", "宽"))]
    sample = _write(tmp_path / "other.jsonl", other * 3)
    settings = Settings(adapter="zh-tuned", adapters_root=str(root), demos=str(sample))
    plan = plan_run(settings)
    assert plan.options.proposer.path.parent == tmp_path / "cache" / "proposers"
    assert "trained the span proposer on 12 labelled records" in capsys.readouterr().err
    assert {p.attribute for p in plan.options.proposer.propose(Record("t", "黑颜色短款"))} <= {"颜色", "款式"}
    again = plan_run(settings)
    assert again.options.proposer.path == plan.options.proposer.path
    assert "trained the span proposer" not in capsys.readouterr().err
    assert plan_run(settings.replace(no_proposer=True)).options.proposer is None
    assert plan.options.proposer.calibration is None  # no cascade: no fold models trained for its calibration
    # With the cascade the same proposer is calibrated once (fold models of the sample), which a resumed run's
    # hashes see.
    cascading = plan_run(settings.replace(cascade=0.5))
    assert cascading.options.proposer.path == plan.options.proposer.path
    assert cascading.options.proposer.calibration is not None and "trained and calibrated" in capsys.readouterr().err
    assert "proposer calibration sha256" in cascading.content_hashes()
    assert plan_run(settings.replace(cascade=0.5)).options.proposer.calibration == cascading.options.proposer.calibration
    assert "trained" not in capsys.readouterr().err
    # Without neighbours (--retrieve 0) the sample still serves the proposer: not the adapter's own CRF.
    alone = plan_run(settings.replace(retrieve=0))
    assert alone.options.proposer.path == plan.options.proposer.path and alone.options.pool is None
    assert alone.settings.candidates == str(sample)
    assert sample_texts(alone) == {r.text for r in other}  # so eval still warns of records in the sample
    # The plan says itself what came from the sample: its CRF alone, without its candidates, still counts ...
    assert plan_run(settings.replace(retrieve=0, no_candidates=True)).sample == str(sample)
    # ... and a run that draws nothing from it scores no record optimistically.
    assert plan_run(settings.replace(retrieve=0, no_candidates=True, no_proposer=True)).sample is None
    # An adapter trained without neighbours (as zh-taobao): the sample serves its proposer, and the prompt
    # shows no fixed shots it never saw in training.
    spans = random_adapter(tiny_model_dir, tmp_path / "spans", seed=7, template="tuned")
    pack_adapter(spans, proposer={"model": str(SpanProposer.train(_labelled(60), tmp_path / "own.crfsuite").path)})
    by_spans = plan_run(Settings(adapter=str(spans), demos=str(sample)))
    assert by_spans.options.proposer.path == plan.options.proposer.path and by_spans.sample == str(sample)
    assert not by_spans.options.demos and by_spans.options.pool is None and by_spans.settings.retrieve == 0


def test_an_adapter_scale_is_checked_recorded_and_keeps_its_generations_apart_in_the_cache(root, tmp_path):
    from llmtags.evaluate import plan_engine

    settings = Settings(adapter="zh-tuned", adapters_root=str(root))
    assert plan_run(settings).options.adapter_scale == 1.0
    plan = plan_run(settings.replace(adapter_scale=0.5))
    assert plan.options.adapter_scale == 0.5 and run_settings(plan)["adapter_scale"] == 0.5  # for --resume
    assert run_settings(plan_run(settings.replace(adapter_scale=1.0)))["adapter_scale"] is None  # as trained
    with pytest.raises(OptionsError, match="--adapter-scale: -1.0 is not between 0 and 2"):
        plan_run(settings.replace(adapter_scale=-1.0))
    with pytest.raises(OptionsError, match="--adapter-scale scales an adapter"):
        plan_run(Settings(adapter_scale=0.5))
    # eval and prompt compare answer from the generation cache: a scale's generations are kept apart.
    keys = {plan_engine(plan_run(settings.replace(adapter_scale=s)), cache_path=tmp_path / "g.sqlite").adapter
            for s in (None, 1.0, 0.5, 0.0)}
    assert len(keys) == 3


def test_an_absent_or_altered_proposer_file_is_dropped_with_a_warning(root, tmp_path, capsys):
    import shutil

    copy = tmp_path / "adapters" / "zh-tuned"
    shutil.copytree(root / "zh-tuned", copy)
    settings = Settings(adapter="zh-tuned", adapters_root=str(tmp_path / "adapters"))
    # Version 2's features file (the gazetteer) is checked as the model is: the pair must be the one packed.
    assert (copy / PROPOSER_FEATURES_FILE).is_file()
    features = (copy / PROPOSER_FEATURES_FILE).read_bytes()
    (copy / PROPOSER_FEATURES_FILE).write_bytes(features.replace(b'"version"', b' "version"'))
    assert plan_run(settings).options.proposer is None
    assert f"{PROPOSER_FEATURES_FILE} is not the span proposer file" in capsys.readouterr().err
    (copy / PROPOSER_FEATURES_FILE).write_bytes(features)
    assert plan_run(settings).options.proposer is not None
    (copy / PROPOSER_FILE).write_bytes((copy / PROPOSER_FILE).read_bytes() + b"\0")
    assert plan_run(settings).options.proposer is None
    assert "sha256 differs" in capsys.readouterr().err
    (copy / PROPOSER_FILE).unlink()
    assert plan_run(settings).options.proposer is None
    assert "is absent: tagging without it" in capsys.readouterr().err

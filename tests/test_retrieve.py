"""Retrieval (retrieve.py), output hygiene (hygiene.py), renamed training examples and packed adapters."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from llmtags.hygiene import clean_tags
from llmtags.options import (
    OptionsError,
    Settings,
    TaggingOptions,
    tagging_options,
)
from llmtags.plan import adapter_defaults, resolved_adapter
from llmtags.prompts import load_template
from llmtags.records import Record
from llmtags.retrieve import DemoPool, shared_pool, tokens
from llmtags.tagger import build_prompt, prompt_record, to_result
from llmtags.train.rename import SYNONYMS, pick_renames, rename_tag

POOL = [
    Record("p1", "理肤泉舒缓特护保湿防晒霜spf50", lang="zh", tags=["品牌:理肤泉", "产品词:防晒霜", "型号:spf50"]),
    Record("p2", "安耐晒小金瓶防晒霜女", lang="zh", tags=["品牌:安耐晒", "产品词:防晒霜"]),
    Record("p3", "北京搬家公司长途搬家", lang="zh", tags=["其他:北京", "产品词:搬家"]),
    Record("p4", "宾派玫瑰金真皮带女士手表", lang="zh", tags=["品牌:宾派", "产品词:手表"]),
]
EN_POOL = [
    Record("e1", "Diesel Men's Exposure High-Top Sneaker", category="Shoes", schema=["Brand", "Gender", "Shoe type"],
           tags=["Brand:Diesel", "Gender:Men's", "Shoe type:High-Top Sneaker"]),
    Record("e2", "Twinings English Breakfast Black Tea", category="Tea", schema=["Brand", "Tea variety"],
           tags=["Brand:Twinings", "Tea variety:Black"]),
    Record("e3", "Nike Air Max Running Sneaker Black", category="Shoes", schema=["Brand", "Gender", "Shoe type"],
           tags=["Brand:Nike", "Shoe type:Running Sneaker"]),
]


class FakeTokenizer:
    """The chat template as plain text, enough to see what a prompt holds."""

    added_tokens_encoder: dict = {}

    def get_vocab(self):
        return {"<|im_end|>": 0}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages) + "<assistant>\n"


def test_terms_are_cjk_bigrams_and_words():
    assert tokens("理肤泉 SPF50") == ["理", "肤", "泉", "理肤", "肤泉", "spf50"]
    assert tokens("Men's High-Top") == ["men", "s", "high", "top"]


def test_the_nearest_records_come_last_and_never_the_record_itself():
    pool = DemoPool(POOL)
    query = Record("q", "理肤泉防晒霜spf30")
    ranked = pool.ranked(query, 2)
    assert [r.id for r in ranked] == ["p1", "p2"]
    assert [d.text for d in pool.demos_for(query, 2)] == [POOL[1].text, POOL[0].text]  # most similar last
    itself = Record("x", POOL[0].text)
    assert "p1" not in [r.id for r in pool.ranked(itself, 3)]
    assert pool.ranked(query, 0) == []
    assert len(pool.ranked(query, 10)) == 4


def test_records_of_the_same_category_come_first():
    pool = DemoPool(EN_POOL)
    # The words match the tea best, but the record is a shoe: shoes first.
    query = Record("q", "Twinings English Breakfast sneaker", category="shoes")
    assert [r.id for r in pool.ranked(query, 3)][:2] in (["e1", "e3"], ["e3", "e1"])
    assert pool.ranked(Record("q", "Twinings English Breakfast sneaker"), 1)[0].id == "e2"


def test_a_record_without_schema_gets_its_categorys_or_its_neighbours_or_the_pools():
    pool = DemoPool(EN_POOL)
    assert pool.schema_for(Record("q", "x", category="Tea")) == ["Brand", "Tea variety"]
    assert pool.schema_for(Record("q", "x", schema=["Size"])) == ["Size"]
    # A category the pool does not know: the catalogue-wide core (what most categories share), then the
    # attributes of the neighbours that are really similar, which for a sneaker are the shoes'.
    pool = DemoPool([*EN_POOL, Record("e4", "Ray-Ban Aviator Sunglasses Gold", category="Eyewear",
                                      schema=["Brand", "Lens color"], tags=["Brand:Ray-Ban", "Lens color:Gold"]),
                     Record("e5", "Lavazza Espresso Coffee Beans", category="Coffee", schema=["Brand", "Roast type"],
                            tags=["Brand:Lavazza", "Roast type:Espresso"])])
    assert pool.core_schema == ["Brand"]
    assert pool.schema_for(Record("q", "Diesel sneaker high-top", category="Sneakers")) == ["Brand", "Gender", "Shoe type"]
    # Nothing in the pool is like a LEGO set: no neighbour lends it a tea's or a coffee's attributes.
    assert pool.schema_for(Record("q", "LEGO Star Wars Millennium Falcon Building Kit")) == ["Brand"]
    assert "Tea variety" in pool.schema_for(Record("q", "LEGO Star Wars Kit"), lend_similarity=0.0)
    # A pool without categories is one catalogue: its attributes, the most used first.
    assert DemoPool(POOL).schema_for(Record("q", "无关")) == ["产品词", "品牌", "型号", "其他"]


def test_a_pool_knows_a_record_by_its_category_or_its_own_schema():
    pool = DemoPool(EN_POOL)
    assert pool.knows(Record("q", "x", category="tea")) and pool.knows(Record("q", "x", category="Phones", schema=["Brand"]))
    assert not pool.knows(Record("q", "Samsung Galaxy S24", category="Phones"))
    assert not pool.knows(Record("q", "Samsung Galaxy S24"))  # nothing says what it is
    assert DemoPool(POOL).knows(Record("q", "无关"))  # a pool without categories is one catalogue


def test_the_proposer_decides_nothing_and_cascades_nothing_on_a_product_of_unknown_category():
    from llmtags.engines.base import Generation
    from llmtags.proposer import Proposal
    from llmtags.tagger import prompt_parts

    found = [Proposal("Brand:Samsung", "Brand", "Samsung", 0, 7, 0.9)]
    options = TaggingOptions(template="tuned", pool=DemoPool(EN_POOL), retrieve=1,
                             proposer_decides=frozenset({"Brand", "Model Number"}))
    phone = Record("q", "Samsung Galaxy S24 Ultra 512GB", category="Phones")
    sneaker = Record("s", "Nike Air Max S24 Ultra", category="Shoes")
    assert not prompt_parts(phone, options).known and prompt_parts(sneaker, options).known
    answer = Generation("Brand:Galaxy\nModel Number:S24 Ultra", 5, 9)
    # The phone: the model's tags stand; the proposer's decisions were chosen on the catalogue's products.
    unknown = to_result(phone, answer, options, proposals=found, known=False)
    assert unknown.tags == ["Brand:Galaxy", "Model Number:S24 Ultra"] and unknown.replaced == []
    # A product of a known category: the proposer decides both, as chosen on that catalogue's dev records.
    known = to_result(sneaker, answer, options, proposals=found)
    assert known.tags == ["Brand:Samsung"] and known.replaced == ["Brand:Galaxy", "Model Number:S24 Ultra"]
    # However sure the proposer is of a product of unknown category, the cascade leaves it to the model.
    sure = TaggingOptions(cascade=0.5)
    assert not replace(prompt_parts(phone, options), confidence=0.99).cascaded(sure)
    assert replace(prompt_parts(sneaker, options), confidence=0.99).cascaded(sure)


def test_a_pool_is_built_once_per_content_and_needs_labels():
    assert shared_pool(POOL) is shared_pool(list(POOL))
    with pytest.raises(ValueError, match="no labelled record"):
        DemoPool([Record("u", "无标签")])


def _write(path: Path, records: list[Record]) -> Path:
    path.write_text("".join(json.dumps({k: v for k, v in vars(r).items() if v is not None and k != "number"},
                                       ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_retrieval_puts_each_records_neighbours_and_schema_in_its_prompt(tmp_path):
    pool = _write(tmp_path / "pool.jsonl", POOL)
    options = tagging_options(Settings(template="tuned", demos=str(pool), retrieve=2))
    record = Record("q", "理肤泉防晒霜spf30", lang="zh")
    prompt = build_prompt(record, FakeTokenizer(), options)
    assert prompt.index("例: " + POOL[1].text) < prompt.index("例: " + POOL[0].text) < prompt.index("属性: ")
    assert "属性: 产品词, 品牌, 型号, 其他\n" in prompt
    assert prompt.startswith("<system>\n商品打标：每行一个 属性:值\n<user>\n例: ")  # fixed text first
    # Without retrieval the tuned prompt has no examples and no invented schema.
    plain = build_prompt(record, FakeTokenizer(), TaggingOptions(template=load_template("tuned")))
    assert plain == "<system>\n商品打标：每行一个 属性:值\n<user>\n理肤泉防晒霜spf30\n<assistant>\n"
    # --shots without --retrieve keeps the fixed first demonstrations.
    fixed = tagging_options(Settings(template="few_shot", demos=str(pool), shots=1))
    assert fixed.pool is None and [d.text for d in fixed.demos] == [POOL[0].text]


def test_retrieval_flags_are_checked():
    with pytest.raises(OptionsError, match="--retrieve K needs --demos"):
        tagging_options(Settings(retrieve=2))
    with pytest.raises(OptionsError, match="--retrieve"):
        tagging_options(Settings(retrieve=-1, demos="x"))


def test_hygiene_drops_lines_that_are_not_tags_and_says_why():
    kept, dropped = clean_tags(
        ["Brand:Nike", "Samsung Galaxy S24", "Attribute:value", "属性:值", "Tea variety:Black", "shoe type:Sneaker"],
        ["Brand", "Shoe Type"])
    assert kept == ["Brand:Nike", "shoe type:Sneaker"]
    assert dropped == {"no_attribute": ["Samsung Galaxy S24"], "placeholder": ["Attribute:value", "属性:值"],
                       "outside_schema": ["Tea variety:Black"]}
    assert clean_tags(["Tea variety:Black"], None) == (["Tea variety:Black"], {})


def test_results_and_the_run_summary_count_the_drops():
    from llmtags.engines.base import Generation
    from llmtags.run import RunSummary

    record = Record("s", "Nike Air sneaker", schema=["Brand"])
    generation = Generation(text="Brand:Nike\nTea variety:Black\nNike Air\nAttribute:value", prompt_tokens=5,
                            new_tokens=9)
    result = to_result(record, generation, TaggingOptions())
    assert result.tags == ["Brand:Nike"]
    assert result.to_json()["dropped"] == {"outside_schema": ["Tea variety:Black"], "no_attribute": ["Nike Air"],
                                           "placeholder": ["Attribute:value"]}
    summary = RunSummary()
    summary.add(result)
    summary.add(result)
    assert "dropped lines that are not tags: 2 no attribute, 2 outside schema, 2 placeholder" in summary.lines()


def test_training_examples_show_neighbours_not_themselves_and_rename_consistently():
    from llmtags.train.examples import build_examples

    pool = DemoPool(POOL)
    examples = build_examples(POOL, FakeTokenizer(), "tuned", None, pool, 2, rename=0.0)
    for record, example in zip(POOL, examples):
        assert example["prompt"].count("例: ") == 2 and f"例: {record.text}\n" not in example["prompt"]
    renamed = build_examples(POOL, FakeTokenizer(), "tuned", None, pool, 2, rename=0.99, seed=1)
    for example in renamed:
        schema = example["prompt"].split("属性: ")[1].split("\n")[0].split(", ")
        answer = [line.split(":")[0] for line in example["completion"].splitlines() if ":" in line]
        shown = [line.split(":")[0] for line in example["prompt"].splitlines()
                 if ":" in line and not line.startswith(("例", "属性", "<", "商品"))]
        assert set(answer) <= set(schema) and set(shown) <= set(schema)
        assert "品牌" not in schema  # renamed: every zh attribute has synonyms


def test_renames_are_one_to_one_and_avoid_the_checks_names():
    mapping = pick_renames(["品牌", "产品词", "型号", "其他", "Unknown"], random.Random(0))
    assert set(mapping) == {"品牌", "产品词", "型号", "其他"} and len(set(mapping.values())) == 4
    assert rename_tag("品牌:理肤泉", mapping) == f"{mapping['品牌']}:理肤泉"
    assert rename_tag("Unknown:x", mapping) == "Unknown:x"
    assert not {"产品", "牌子", "款号"} & {name for names in SYNONYMS.values() for name in names}


def _fake_adapter(path: Path, meta: dict) -> Path:
    """An adapter directory whose weight files only exist (packing and defaults never read them)."""
    from llmtags.adapters.registry import FORMAT_VERSION

    path.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (path / name).write_text("{}")
    (path / "llmtags.json").write_text(json.dumps({"format": FORMAT_VERSION, **meta}))
    return path


def test_a_packed_adapter_carries_its_vocabulary_and_pool(tmp_path, capsys):
    from llmtags.adapters.pack import pack_adapter
    from llmtags.candidates import candidate_finder

    train = _write(tmp_path / "train.jsonl", POOL)
    adapter = _fake_adapter(tmp_path / "adapters" / "zh", {"template": {"name": "tuned", "spec": "tuned"}})
    meta = pack_adapter(adapter, candidates=str(train), pool=str(train), k=2, licence="research use")
    assert meta["retrieval"]["pool"] == "pool.jsonl" and meta["retrieval"]["k"] == 2
    assert meta["vocabulary"]["candidates"]["path"] == "vocabulary.jsonl"
    train.unlink()  # the training data is gone: the adapter still has what it needs
    zh = resolved_adapter("zh", tmp_path / "adapters")
    found = adapter_defaults(zh, Settings(adapters_root=str(tmp_path / "adapters")))
    assert found.demos == str(adapter / "pool.jsonl") and found.retrieve == 2
    assert found.candidates == str(adapter / "vocabulary.jsonl")
    shipped = candidate_finder(found.candidates)
    text = "理肤泉防晒霜"
    assert set(shipped.tags(text)) >= {"品牌:理肤泉", "产品词:防晒霜"}
    # Another catalogue's sample: retrieval and candidates both come from it, with the adapter's K.
    other = _write(tmp_path / "other.jsonl", EN_POOL)
    found = adapter_defaults(zh, Settings(adapters_root=str(tmp_path / "adapters"), demos=str(other)))
    assert (found.demos, found.retrieve, found.candidates) == (None, 2, str(other))
    # --retrieve 0 turns the adapter's retrieval off.
    found = adapter_defaults(zh, Settings(adapters_root=str(tmp_path / "adapters"), retrieve=0))
    assert found.demos is None and found.retrieve is None


def test_prompt_record_fills_the_schema_only_with_retrieval():
    pool = DemoPool(EN_POOL)
    record = Record("q", "Nike sneaker")
    assert prompt_record(record, TaggingOptions(pool=pool, retrieve=0)).schema is None
    assert prompt_record(record, TaggingOptions(pool=pool, retrieve=1)).schema[0] == "Brand"


def test_generate_and_prompt_render_retrieve_through_the_cli(tmp_path, tiny_model_dir, capsys):
    from llmtags.cli import main

    pool = _write(tmp_path / "pool.jsonl", POOL)
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "text": "理肤泉防晒霜spf30"}\n{"id": "b", "text": "女士手表"}\n', encoding="utf-8")
    assert main(["prompt", "render", str(source), "--base-model", str(tiny_model_dir), "--template", "tuned",
                 "--demos", str(pool), "--retrieve", "2"]) == 0
    prompt = capsys.readouterr().out
    assert "例: " + POOL[0].text in prompt and "属性: 产品词, 品牌, 型号, 其他" in prompt
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(source), "-o", str(out), "--base-model", str(tiny_model_dir), "--template", "tuned",
                 "--demos", str(pool), "--retrieve", "2", "--max-new-tokens", "6", "-q"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    # Every kept tag names an attribute of the schema the pool gave (the random model writes anything).
    assert all(t.split(":")[0] in {"产品词", "品牌", "型号", "其他"} for r in rows for t in r["tags"])
    recorded = json.loads((tmp_path / "out.jsonl.settings.json").read_text(encoding="utf-8"))
    assert recorded["retrieve"] == 2 and "demos sha256" in recorded
    # Resuming with another K would mix two runs in one file: refused.
    assert main(["generate", str(source), "-o", str(out), "--base-model", str(tiny_model_dir), "--template", "tuned",
                 "--demos", str(pool), "--retrieve", "3", "--resume", "-q"]) != 0


def test_adapters_pack_through_the_cli(tmp_path, capsys):
    from llmtags.cli import main

    train = _write(tmp_path / "train.jsonl", POOL)
    adapter = _fake_adapter(tmp_path / "adapters" / "zh", {})
    root = ["--adapters-root", str(tmp_path / "adapters")]
    assert main(["adapters", "pack", "zh", "--demos", str(train), *root]) != 0  # no K
    assert main(["adapters", "pack", "zh", "--demos", str(train), "--retrieve", "4", "--candidates", str(train),
                 *root]) == 0
    assert "now ships" in capsys.readouterr().err
    shipped = [json.loads(line) for line in (adapter / "pool.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in shipped] == ["p1", "p2", "p3", "p4"] and set(shipped[0]) == {"id", "text", "lang", "tags"}


def test_a_text_without_words_still_gets_demonstrations():
    pool = DemoPool(POOL)
    assert len(pool.demos_for(Record("q", "★★★ ——"), 2)) == 2
    assert pool.schema_for(Record("q", "★★★")) == ["产品词", "品牌", "型号", "其他"]


def test_a_long_record_never_sees_its_own_answer():
    long = Record("long", "理肤泉防晒霜" + "好" * 2500, tags=["品牌:理肤泉"])
    pool = DemoPool([*POOL, long])
    options = TaggingOptions(template=load_template("tuned"), pool=pool, retrieve=4)
    prompt = build_prompt(long, FakeTokenizer(), options, training=True)
    assert prompt.count("例: ") == 4 and "例: 理肤泉防晒霜好" not in prompt


def test_retrieval_needs_a_template_that_shows_demonstrations(tmp_path):
    pool = _write(tmp_path / "pool.jsonl", POOL)
    with pytest.raises(OptionsError, match="does not show demonstrations"):
        tagging_options(Settings(demos=str(pool), retrieve=2))  # auto: zh.j2 and en.j2 show none
    with pytest.raises(OptionsError, match="does not show demonstrations"):
        tagging_options(Settings(template="zh", demos=str(pool), retrieve=2))  # it names `demos` in a comment only
    none = tagging_options(Settings(template="tuned", demos=str(pool), retrieve=0))
    assert none.pool is None and not none.demos  # --retrieve 0: no demonstrations at all


def test_an_attribute_the_schema_names_is_never_a_placeholder():
    assert clean_tags(["属性:红色", "属性:值"], ["属性"]) == (["属性:红色"], {"placeholder": ["属性:值"]})
    assert clean_tags(["Ｂrand:Nike"], ["brand"]) == (["Ｂrand:Nike"], {})  # compared after NFKC
    assert "属性" not in {name for names in SYNONYMS.values() for name in names}


def test_renaming_needs_retrieval():
    from llmtags.train.config import TrainConfig, TrainError

    with pytest.raises(TrainError, match="rename needs retrieve"):
        TrainConfig(rename=0.3).validate()
    TrainConfig(rename=0.3, retrieve=2, demos="train.jsonl").validate()


def test_prompt_compare_and_eval_retrieve(tmp_path, tiny_model_dir, capsys):
    from llmtags.cli import main

    pool = _write(tmp_path / "pool.jsonl", POOL)
    dev = _write(tmp_path / "dev.jsonl", [Record("d1", "理肤泉防晒霜spf30", lang="zh", tags=["品牌:理肤泉"]),
                                          Record("d2", "女士手表", lang="zh", tags=["产品词:手表"])])
    common = ["--data", str(dev), "--base-model", str(tiny_model_dir), "--demos", str(pool), "--retrieve", "2",
              "--max-new-tokens", "6", "-q"]
    # One variant shows the retrieved demonstrations, the other does not use them: both run.
    assert main(["prompt", "compare", "zh", "tuned", *common, "--report", str(tmp_path / "c.json")]) == 0
    assert [v["template"] for v in json.loads((tmp_path / "c.json").read_text())["variants"]] == ["zh", "tuned"]
    assert main(["eval", *common, "--template", "tuned", "--report", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n_records"] == 2


def test_eval_warns_when_the_records_scored_are_in_the_demos_sample(capsys):
    from llmtags.cli.eval import warn_overlap

    texts = {r.text for r in POOL}
    warn_overlap([Record("a", POOL[0].text), Record("b", "别的商品")], texts, "sample.jsonl")
    err = capsys.readouterr().err
    assert "1 of the 2 records scored are in the labelled sample sample.jsonl (e.g. a)" in err
    warn_overlap([Record("b", "别的商品")], texts, "sample.jsonl")
    warn_overlap([Record("a", POOL[0].text)], None, None)
    assert capsys.readouterr().err == ""

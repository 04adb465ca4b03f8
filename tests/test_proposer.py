"""The span proposer (proposer.py): tokens, gold labels, a real CRF trained on small data, cross-fitting,
and its way into prompts, training examples and an adapter's defaults."""

from __future__ import annotations

import dataclasses

import json
import random

import pytest

from llmtags.adapters.pack import record_fusion
from llmtags.adapters.registry import AdapterError
from llmtags.options import Settings, TaggingOptions, tagging_options
from llmtags.proposer import (
    CrossFitted,
    Features,
    Proposal,
    ProposerSettings,
    SpanProposer,
    bio_labels,
    calibration_path,
    features_path,
    fold_of,
    proposal_quality,
    spans_of,
    tokenize,
    training_sequences,
)
from llmtags.records import Record
from llmtags.tagger import prompt_parts
from llmtags.train.rename import rename_parts

BRANDS = ["兰蔻", "雅诗兰黛", "耐克", "李宁", "得力", "晨光", "欧莱雅", "安踏", "小米", "华为"]
PRODUCTS = ["精华液", "眼霜", "跑步鞋", "篮球鞋", "中性笔", "橡皮擦", "面霜", "运动裤", "手机", "耳机"]
FILLERS = ["正品", "新款", "包邮", "2024", "官方", "旗舰店", "热卖"]


def synthetic(n: int, seed: int = 0) -> list[Record]:
    """Titles of brand + filler + product word, as Taobao writes them: a CRF learns the pattern."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        brand, product = rng.choice(BRANDS), rng.choice(PRODUCTS)
        text = f"{rng.choice(FILLERS)}{brand}{rng.choice(FILLERS)}{product}{rng.choice(FILLERS)}"
        records.append(Record(f"s{i}", text, tags=[f"品牌:{brand}", f"产品词:{product}"]))
    return records


@pytest.fixture(scope="module")
def zh_proposer(tmp_path_factory: pytest.TempPathFactory) -> SpanProposer:
    return SpanProposer.train(synthetic(200), tmp_path_factory.mktemp("crf") / "zh.crfsuite")


def test_tokens_are_cjk_characters_latin_runs_and_single_marks():
    text = "理肤泉ka舒缓 15.6寸 XER-106R01409"
    assert [text[s:e] for s, e in tokenize(text)] == ["理", "肤", "泉", "ka", "舒", "缓", "15", ".", "6", "寸", "XER",
                                                     "-", "106R01409"]
    assert tokenize("   ") == []


def test_gold_values_label_their_tokens_longest_first_and_any_form():
    text = "La Roche-Posay 理肤泉 防晒霜 SPF50"
    spans = tokenize(text)
    labels = bio_labels(text, ["Brand:La Roche-Posay", "Brand:Roche", ["型号:spf50", "型号:SPF 50"], "其他:缺失"],
                        spans)
    by_token = {text[s:e]: label for (s, e), label in zip(spans, labels)}
    assert [label for label in labels if label != "O"] == ["B-Brand", "I-Brand", "I-Brand", "I-Brand", "B-型号"]
    assert by_token["SPF50"] == "B-型号" and by_token["理"] == "O"
    # A value inside a Latin word starts at no token boundary: it labels nothing.
    assert set(bio_labels("XER106R01409", ["型号:106R01409"], tokenize("XER106R01409"))) == {"O"}


def test_spans_of_bio_labels():
    assert spans_of(["B-品牌", "I-品牌", "O", "I-型号", "B-型号", "I-品牌"]) == [
        ("品牌", 0, 1), ("型号", 3, 3), ("型号", 4, 4), ("品牌", 5, 5)]


def test_a_trained_crf_proposes_spans_with_marginals_limited_to_the_schema(zh_proposer):
    record = Record("t", "包邮耐克新款篮球鞋热卖")
    proposals = zh_proposer.propose(record)
    assert [p.tag for p in proposals] == ["品牌:耐克", "产品词:篮球鞋"]
    assert all(0.5 < p.p <= 1.0 for p in proposals)
    assert all(record.text[p.start:p.end] == p.value for p in proposals)
    assert [p.tag for p in zh_proposer.propose(Record("t", "包邮耐克新款篮球鞋热卖", schema=["产品词"]))] == ["产品词:篮球鞋"]
    assert zh_proposer.propose(Record("t", "★ ★")) == []
    assert zh_proposer.propose(Record("t", "   ")) == []


def test_proposal_quality_counts_any_of_groups_once():
    record = Record("r", "耐克跑步鞋", tags=["品牌:耐克", ["产品词:跑步鞋", "产品词:跑鞋"], "型号:缺"])
    found = [Proposal("品牌:耐克", "品牌", "耐克", 0, 2, 0.9), Proposal("产品词:跑步鞋", "产品词", "跑步鞋", 2, 5, 0.9),
             Proposal("其他:鞋", "其他", "鞋", 4, 5, 0.2)]
    assert proposal_quality([record], [found]) == {"precision": 0.6667, "recall": 0.6667, "f1": 0.6667}


def test_a_saved_proposer_loads_and_a_damaged_one_is_refused(zh_proposer, tmp_path):
    again = SpanProposer(zh_proposer.path)
    assert again.propose(Record("t", "小米手机")) == zh_proposer.propose(Record("t", "小米手机"))
    bad = tmp_path / "bad.crfsuite"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.crfsuite"):
        SpanProposer(bad)


def test_cross_fitting_proposes_for_a_training_record_from_a_crf_that_never_saw_it(tmp_path):
    records = synthetic(120)
    # One record with an attribute no other has: only a CRF trained on it knows that label.
    records.append(Record("odd", "正品酒红新款眼霜", tags=["颜色:酒红", "产品词:眼霜"]))
    fitted = CrossFitted.train(records, k=4, workdir=tmp_path / "folds")
    odd = records[-1]
    assert len(fitted.folds) == 4 and fold_of(odd.text, 4) in range(4)
    assert "颜色:酒红" in [p.tag for p in fitted.in_fold(odd)]
    assert "颜色:酒红" not in [p.tag for p in fitted.propose(odd)]
    # A record outside the training set gets the CRF trained on all of them.
    dev = Record("dev", "包邮李宁新款运动裤")
    assert fitted.propose(dev) == fitted.full.propose(dev)
    quality = fitted.quality(records)
    assert quality["in_fold"]["f1"] >= quality["out_of_fold"]["f1"]
    # The same records again (a resumed run): the models are reused, not trained again.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "folds").glob("*.crfsuite")}
    again = CrossFitted.train(records, k=4, workdir=tmp_path / "folds")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "folds").glob("*.crfsuite")} == stamps
    assert again.propose(odd) == fitted.propose(odd)
    # Other records: trained afresh.
    CrossFitted.train(records[:-1], k=4, workdir=tmp_path / "folds")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "folds").glob("*.crfsuite")} != stamps


def implicit(records: list[Record], every: int = 3) -> list[Record]:
    """`records` where every `every`-th also has a value its text does not hold: a span tagger, however sure
    of the spans, cannot get those records exactly right."""
    return [dataclasses.replace(r, tags=[*r.tags, "功效:保湿"]) if i % every == 0 else r for i, r in enumerate(records)]


def test_cross_fitting_calibrates_the_confidence_on_records_its_folds_never_saw(tmp_path):
    records = implicit(synthetic(150))
    fitted = CrossFitted.train(records, k=3, workdir=tmp_path / "folds")
    sure = Record("t", "包邮小米新款耳机")
    raw = fitted.full.read(sure)[1]
    assert fitted.full.calibration is None and raw > 0.5  # sure of the labelling, not of the record
    shipped = fitted.shipped(records)["calibration"]
    assert shipped["records"] == 150 and 0.55 < shipped["exactly_right"] < 0.75 and shipped["raw_ece"] > 0.1
    assert calibration_path(fitted.full.path).is_file()
    # The confidence is now the share of such records exactly right, on folds that never saw them.
    assert fitted.full.read(sure)[1] < raw and fitted.full.read(sure, raw=True)[1] == raw
    loaded = SpanProposer(fitted.full.path)
    assert loaded.calibration == fitted.full.calibration and loaded.read(sure) == fitted.full.read(sure)
    # A model trained anew in its place drops the calibration of the one before.
    SpanProposer.train(records, fitted.full.path)
    assert not calibration_path(fitted.full.path).is_file() and SpanProposer(fitted.full.path).calibration is None


def test_a_samples_proposer_is_calibrated_once_where_the_cascade_needs_it(tmp_path, capsys):
    from llmtags.proposer import sample_proposer

    said: list[str] = []
    sample = implicit(synthetic(90))
    plain = sample_proposer(sample, tmp_path, log=said.append)
    assert plain.calibration is None and not list(tmp_path.glob("llmtags-calibration-*"))
    calibrated = sample_proposer(sample, tmp_path, log=said.append, calibrate=True)
    assert calibrated.path == plain.path and calibrated.calibration is not None
    assert "calibrated" in said[-1] and not list(tmp_path.glob("llmtags-calibration-*"))  # folds not kept
    stamp = calibrated.path.stat().st_mtime_ns
    again = sample_proposer(sample, tmp_path, log=said.append, calibrate=True)
    assert again.calibration == calibrated.calibration and again.path.stat().st_mtime_ns == stamp and len(said) == 2
    # The cascade warns where a proposer's confidence is uncalibrated, and not where it is.
    other = sample_proposer(synthetic(60, seed=3), tmp_path)
    capsys.readouterr()
    tagging_options(Settings(proposer=str(other.path), cascade=0.9))
    tagging_options(Settings(proposer=str(calibrated.path), cascade=0.9))
    tagging_options(Settings(proposer=str(other.path)))
    err = capsys.readouterr().err
    assert err.count("no confidence calibration") == 1 and str(other.path) in err
    # A P outside the calibrated range would cascade every record or none: said so.
    from llmtags.isotonic import IsotonicMap

    calibrated.calibrate(IsotonicMap((0.1, 0.9), (0.2, 0.6), 10))
    for p, said_of in ((0.1, "every record"), (0.7, "no record"), (0.4, None)):
        tagging_options(Settings(proposer=str(calibrated.path), cascade=p))
        err = capsys.readouterr().err
        assert (said_of in err) if said_of else "warning" not in err


def test_proposals_reach_the_prompt_parts_and_renaming_renames_them(zh_proposer):
    options = TaggingOptions(template="tuned", proposer=zh_proposer)
    record = Record("t", "包邮耐克新款篮球鞋热卖", tags=["品牌:耐克", "产品词:篮球鞋"])
    parts = prompt_parts(record, options)
    assert [p.tag for p in parts.proposals] == ["品牌:耐克", "产品词:篮球鞋"]
    assert prompt_parts(record, TaggingOptions(template="tuned")).proposals == []
    renamed = rename_parts(parts, random.Random(1))
    mapping = {t.partition(":")[0] for t in renamed.record.tags}
    assert {p.attribute for p in renamed.proposals} == mapping != {"品牌", "产品词"}
    assert all(p.tag == f"{p.attribute}:{p.value}" for p in renamed.proposals)


def test_settings_load_a_proposer_and_no_proposer_turns_it_off(zh_proposer):
    assert tagging_options(Settings(proposer=str(zh_proposer.path))).proposer.path == zh_proposer.path
    assert tagging_options(Settings(proposer=str(zh_proposer.path), no_proposer=True)).proposer is None
    assert tagging_options(Settings()).proposer is None


def test_version_2_features_add_trigrams_the_category_and_the_gazetteer():
    text = "新款耐克跑步鞋"
    spans = tokenize(text)
    features = Features(2, {"耐克": "品牌"})
    rows = features.rows(text, spans, category="Shoes")
    assert "t0=款|耐|克" in rows[2] and "c=Shoes" in rows[2] and "c|w=Shoes|耐" in rows[2]
    assert "g=B-品牌" in rows[2] and "g=E-品牌" in rows[3] and "gl=B-品牌-2" in rows[2]
    assert not any(f.startswith("g") for f in rows[4])
    assert not any(f.startswith("c") for f in features.rows(text, spans)[2])  # no category, no category features
    # Version 1 is the feature set before them: proposers trained with it still read as they were trained.
    assert Features(1).rows(text, spans) == [row[:len(Features(1).rows(text, spans)[i])]
                                             for i, row in enumerate(Features(2).rows(text, spans))]
    with pytest.raises(ValueError, match="features version 3"):
        Features(3)


def test_a_training_record_never_sees_its_own_values_in_the_gazetteer():
    # Each brand appears in one record only: with its own values in the gazetteer, the feature would mark
    # exactly the gold spans, and the CRF would trust it alone (cross-fitted, as at test time).
    records = [Record(f"r{i}", f"新款{brand}跑步鞋", tags=[f"品牌:{brand}", "产品词:跑步鞋"])
               for i, brand in enumerate(BRANDS)]
    for (rows, labels), record in zip(training_sequences(records, 2), records):
        brand_rows = [row for row, label in zip(rows, labels) if label.endswith("品牌")]
        assert brand_rows and not any(f.startswith("g=") and "品牌" in f for row in brand_rows for f in row)
        # The product word, in every other record too, is in the gazetteer of the other folds.
        assert any("g=B-产品词" in row for row in rows), record.text


def test_a_proposer_records_its_features_beside_its_model(tmp_path):
    records = synthetic(120)
    v2 = SpanProposer.train(records, tmp_path / "v2.crfsuite")
    assert features_path(v2.path) == tmp_path / "v2.features.json"
    saved = json.loads(features_path(v2.path).read_text(encoding="utf-8"))
    assert saved["version"] == 2 and saved["gazetteer"]["耐克"] == "品牌"  # every training value at test time
    assert SpanProposer(v2.path).features.version == 2
    v1 = SpanProposer.train(records, tmp_path / "v1.crfsuite", ProposerSettings(features=1))
    assert not features_path(v1.path).exists()
    loaded = SpanProposer(v1.path)  # a model without a features file: version 1, as proposers before it
    assert loaded.features.version == 1 and loaded.settings.features == 1
    assert [p.tag for p in loaded.propose(Record("t", "包邮耐克新款篮球鞋热卖"))] == ["品牌:耐克", "产品词:篮球鞋"]
    with pytest.raises(ValueError, match="features version 7"):
        ProposerSettings(features=7)


def test_an_adapters_proposer_is_its_default_and_a_flag_turns_it_off(zh_proposer, tmp_path):
    from llmtags.adapters.pack import PROPOSER_FILE, pack_adapter
    from llmtags.plan import adapter_defaults, resolved_adapter

    adapter = tmp_path / "adapters" / "demo"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "llmtags.json").write_text(json.dumps({"format": 1, "template": {"spec": "tuned"}}), encoding="utf-8")
    meta = pack_adapter(adapter, proposer={"model": zh_proposer.path, "folds": 5})
    assert meta["proposer"]["path"] == PROPOSER_FILE and (adapter / PROPOSER_FILE).is_file()
    assert (adapter / "proposer.features.json").is_file() and meta["proposer"]["features_sha256"]
    root = str(tmp_path / "adapters")
    demo = resolved_adapter("demo", root)
    found = adapter_defaults(demo, Settings(adapter="demo", adapters_root=root))
    assert found.proposer == str(adapter / PROPOSER_FILE)
    assert adapter_defaults(demo, Settings(adapter="demo", adapters_root=root, no_proposer=True)).proposer is None


def test_adapters_pack_trains_and_ships_a_proposer(tmp_path):
    from llmtags.cli import main
    from llmtags.plan import adapter_defaults, resolved_adapter

    adapter = tmp_path / "adapters" / "demo"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "llmtags.json").write_text(json.dumps({"format": 1, "template": {"spec": "tuned"}}), encoding="utf-8")
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(json.dumps({"id": r.id, "text": r.text, "tags": r.tags}, ensure_ascii=False) + "\n"
                              for r in synthetic(80)), encoding="utf-8")
    assert main(["adapters", "pack", str(adapter), "--proposer", str(sample), "--proposer-folds", "3"]) == 0
    meta = json.loads((adapter / "llmtags.json").read_text(encoding="utf-8"))["proposer"]
    assert meta["texts"] == 80 and meta["folds"] == 3 and meta["from"] == str(sample)
    assert meta["in_fold"]["f1"] >= meta["out_of_fold"]["f1"] > 0.5
    shipped = adapter_defaults(resolved_adapter(str(adapter)), Settings(adapter=str(adapter))).proposer
    assert [p.tag for p in SpanProposer(shipped).propose(Record("t", "包邮小米新款耳机"))] == ["品牌:小米", "产品词:耳机"]
    # Its confidence calibration ships beside it (fitted on the 80 records out of fold), checked like the model.
    assert meta["calibration"]["records"] == 80 and SpanProposer(shipped).calibration is not None
    calibration = adapter / "proposer.calibration.json"
    assert meta["calibration_sha256"] and calibration.is_file()
    kept = calibration.read_text(encoding="utf-8")
    calibration.write_text(kept.replace("[", "[0.0, ", 1), encoding="utf-8")
    assert adapter_defaults(resolved_adapter(str(adapter)), Settings(adapter=str(adapter))).proposer is None
    calibration.write_text(kept, encoding="utf-8")
    # The --fill P chosen on dev is recorded beside the proposer and becomes the adapter's default.
    assert main(["adapters", "pack", str(adapter), "--fill", "0.7"]) == 0
    assert adapter_defaults(resolved_adapter(str(adapter)), Settings(adapter=str(adapter))).fill == 0.7
    assert adapter_defaults(resolved_adapter(str(adapter)), Settings(adapter=str(adapter), constrain="closed")).fill is None
    assert main(["adapters", "pack", str(adapter), "--fill", "1.5"]) != 0
    # So are the attributes its spans decide, chosen there too.
    assert main(["adapters", "pack", str(adapter), "--proposer-decides", "产品词, 品牌"]) == 0
    assert meta_of(adapter)["proposer"]["decides"] == ["产品词", "品牌"]
    assert adapter_defaults(resolved_adapter(str(adapter)), Settings(adapter=str(adapter))).proposer_decides == "产品词,品牌"
    assert adapter_defaults(resolved_adapter(str(adapter)), Settings(adapter=str(adapter), no_fill=True)).proposer_decides is None
    bare = tmp_path / "adapters" / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((adapter / name).read_bytes())
    (bare / "llmtags.json").write_text(json.dumps({"format": 1}), encoding="utf-8")
    assert main(["adapters", "pack", str(bare), "--fill", "0.7"]) != 0  # no proposer to fill from
    assert main(["adapters", "pack", str(bare), "--proposer-decides", "品牌"]) != 0
    assert main(["adapters", "pack", str(adapter), "--proposer-decides", "颜色"]) != 0  # not one its proposer tags
    # A refused list leaves the adapter as it was: nothing is written before both parts are checked.
    assert main(["adapters", "pack", str(adapter), "--fill", "0.9", "--proposer-decides", "颜色"]) != 0
    assert meta_of(adapter)["proposer"]["fill"] == 0.7 and meta_of(adapter)["proposer"]["decides"] == ["产品词", "品牌"]
    # --confirm-below alone keeps the recorded fill and attributes; a refused C writes nothing.
    assert main(["adapters", "pack", str(adapter), "--confirm-below", "0.4"]) == 0
    assert meta_of(adapter)["proposer"]["confirm_below"] == 0.4 and meta_of(adapter)["proposer"]["fill"] == 0.7
    assert adapter_defaults(resolved_adapter(str(adapter)), Settings(adapter=str(adapter))).confirm_below == 0.4
    assert main(["adapters", "pack", str(adapter), "--confirm-below", "1.5"]) != 0
    assert main(["adapters", "pack", str(bare), "--confirm-below", "0.4"]) != 0  # nothing to confirm with
    assert meta_of(adapter)["proposer"]["confirm_below"] == 0.4
    # 0: none, the rest as recorded (what eval/fill.py may choose: "off").
    assert main(["adapters", "pack", str(adapter), "--confirm-below", "0"]) == 0
    assert "confirm_below" not in meta_of(adapter)["proposer"] and meta_of(adapter)["proposer"]["fill"] == 0.7
    assert main(["adapters", "pack", str(adapter), "--confirm-below", "0.4"]) == 0
    # What eval/fill.py prints as its choice is accepted as written: off, none.
    assert main(["adapters", "pack", str(adapter), "--fill", "off", "--proposer-decides", "none"]) == 0
    assert "fill" not in meta_of(adapter)["proposer"] and not meta_of(adapter)["proposer"].get("decides")
    assert meta_of(adapter)["proposer"]["confirm_below"] == 0.4
    assert main(["adapters", "pack", str(adapter), "--fill", "0.7", "--proposer-decides", "产品词,品牌"]) == 0
    # eval/fill.py records the fusion chosen on dev whole: "no fill" and "no attributes" clear what was there.
    record_fusion(adapter, None, ["品牌"])
    assert "fill" not in meta_of(adapter)["proposer"] and meta_of(adapter)["proposer"]["decides"] == ["品牌"]
    assert "confirm_below" not in meta_of(adapter)["proposer"]
    record_fusion(adapter, 0.5, [])
    assert meta_of(adapter)["proposer"]["fill"] == 0.5 and "decides" not in meta_of(adapter)["proposer"]
    assert adapter_defaults(resolved_adapter(str(adapter)), Settings(adapter=str(adapter))).proposer_decides is None
    with pytest.raises(AdapterError, match="ships no span proposer"):
        record_fusion(bare, 0.5, [])


def meta_of(adapter):
    return json.loads((adapter / "llmtags.json").read_text(encoding="utf-8"))


def adapter_with(proposer, adapter):
    """An adapter directory (empty weights, the `tuned` template) that ships `proposer` as packed by hand."""
    from llmtags.adapters.pack import pack_adapter

    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "llmtags.json").write_text(json.dumps({"format": 1, "template": {"spec": "tuned"}}), encoding="utf-8")
    pack_adapter(adapter, proposer={"model": proposer.path, "folds": 5})
    return adapter


def test_prompt_render_shows_what_an_adapter_prompts_with(zh_proposer, tmp_path, tiny_model_dir, capsys):
    from llmtags.cli import main

    adapter = adapter_with(zh_proposer, tmp_path / "demo")
    assert main(["prompt", "render", "--text", "包邮小米新款耳机", "--adapter", str(adapter), "--base-model",
                 str(tiny_model_dir)]) == 0
    captured = capsys.readouterr()
    assert "识别: 品牌:小米; 产品词:耳机" in captured.out and "template tuned" in captured.err
    assert "proposer confidence" in captured.err
    assert main(["prompt", "render", "--text", "包邮小米新款耳机", "--adapter", str(adapter), "--base-model",
                 str(tiny_model_dir), "--no-proposer"]) == 0
    assert "识别" not in capsys.readouterr().out


def test_a_samples_proposer_is_trained_once_and_cached_by_its_content(tmp_path):
    from llmtags.proposer import sample_proposer

    said: list[str] = []
    first = sample_proposer(synthetic(60), tmp_path, log=said.append)
    assert len(said) == 1 and "60 labelled records" in said[0]
    stamp = first.path.stat().st_mtime_ns
    again = sample_proposer(synthetic(60), tmp_path, log=said.append)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp and len(said) == 1
    other = sample_proposer(synthetic(60, seed=1), tmp_path, log=said.append)
    assert other.path != first.path and len(said) == 2


def test_training_examples_show_the_cross_fitted_proposals(tmp_path, qwen_tokenizer_dir):
    from llmtags.models import load_tokenizer_only
    from llmtags.train.examples import build_examples

    records = synthetic(100)
    records.append(Record("odd", "正品酒红新款眼霜", tags=["颜色:酒红", "产品词:眼霜"]))
    fitted = CrossFitted.train(records, k=4, workdir=tmp_path / "folds")
    tokenizer = load_tokenizer_only(str(qwen_tokenizer_dir))
    examples = build_examples(records, tokenizer, "tuned", proposer=fitted)
    odd = examples[-1]["prompt"]
    shown = next(line for line in odd.splitlines() if line.startswith("识别: "))
    assert shown == "识别: " + "; ".join(p.tag + ("?" if p.p < 0.5 else "") for p in fitted.propose(records[-1]))
    assert "颜色:酒红" not in shown and "颜色:酒红" in [p.tag for p in fitted.in_fold(records[-1])]
    assert examples[-1]["completion"].startswith("颜色:酒红\n产品词:眼霜")


def test_eval_shows_the_crf_peer_beside_the_models_figures(zh_proposer, tmp_path, capsys):
    from llmtags.cli import main
    from llmtags.cli.eval import PEER_NAME

    gold = [Record(f"g{i}", r.text, tags=r.tags) for i, r in enumerate(synthetic(20, seed=3))]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps({"id": r.id, "text": r.text, "tags": r.tags},
                                                            ensure_ascii=False) + "\n" for r in gold), encoding="utf-8")
    # The "model" got the brands only.
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps({"id": r.id, "tags": r.tags[:1]}, ensure_ascii=False) + "\n"
                                                 for r in gold), encoding="utf-8")
    assert main(["eval", "--gold", str(tmp_path / "gold.jsonl"), "--pred", str(tmp_path / "pred.jsonl"),
                 "--proposer", str(zh_proposer.path), "--report", str(tmp_path / "r.json"),
                 "--html", str(tmp_path / "page.html")]) == 0
    out = capsys.readouterr().out
    assert "Peers on the same records" in out and PEER_NAME in out
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    crf = report["peers"][PEER_NAME]["typed"]["micro"]
    assert report["raw"]["typed"]["micro"]["recall"] == 0.5 and crf["f1"] > 0.9
    assert PEER_NAME in (tmp_path / "page.html").read_text(encoding="utf-8")


def test_a_training_record_cut_for_its_prompt_still_gets_the_crf_that_never_saw_it(tmp_path):
    """A text longer than max_text_chars is cut before prompting: the fold must come from the whole text,
    or the record would fall back to the CRF trained on it."""
    records = synthetic(80)
    long = Record("long", "正品酒红新款眼霜" + "。" * 2100, tags=["颜色:酒红", "产品词:眼霜"])
    fitted = CrossFitted.train([*records, long], k=4, workdir=tmp_path / "folds")
    options = TaggingOptions(template="tuned", proposer=fitted)
    parts = prompt_parts(long, options, training=True)
    assert len(parts.record.text) == options.max_text_chars
    assert "颜色:酒红" not in [p.tag for p in parts.proposals]
    assert "颜色:酒红" in [p.tag for p in fitted.full.propose(parts.record)]


def test_cross_fitting_survives_folds_without_data_and_a_dead_run_is_not_reused(tmp_path):
    two = synthetic(2)
    fitted = CrossFitted.train(two, k=5, workdir=tmp_path / "folds")  # at least 3 of 5 folds are empty
    assert all(fitted.propose(r) == [] or fitted.folds[fold_of(r.text, 5)] is not None for r in two)
    # Another run over other records dies half-way: its key is gone, so nothing of it is reused later.
    (tmp_path / "folds" / "folds.json").write_text("{torn", encoding="utf-8")
    again = CrossFitted.train(two, k=5, workdir=tmp_path / "folds")
    assert again.propose(two[0]) == fitted.propose(two[0])
    with pytest.raises(ValueError, match="labelled records"):
        CrossFitted.train([Record("u", "无标签", tags=[])], k=2, workdir=tmp_path / "empty")


def test_full_width_colons_and_line_breaks_in_values():
    text = "理肤泉\n防晒霜"
    assert bio_labels(text, ["品牌：理肤泉"], tokenize(text))[:3] == ["B-品牌", "I-品牌", "I-品牌"]


class EchoEngine:
    """A model that answers every prompt with one fixed tag, and keeps the prompts it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def generate(self, prompts, max_new_tokens=64, batch_size=8, on_batch=None):
        from llmtags.engines.base import Generation

        self.prompts += prompts
        if on_batch:
            on_batch(len(prompts))
        return [Generation("品牌:模型", 1, 3) for _ in prompts]


def test_the_cascade_lets_the_proposer_alone_tag_the_records_it_is_sure_of(zh_proposer, qwen_tokenizer_dir):
    from llmtags.models import load_tokenizer_only
    from llmtags.run import RunSummary
    from llmtags.tagger import tag_records

    records = [Record(f"r{i}", r.text) for i, r in enumerate(synthetic(12, seed=5))]
    records += [Record("odd", "Hello 世界 42 abc 兰"), Record("empty", "   ")]
    confidence = {r.id: zh_proposer.read(r)[1] for r in records}
    assert confidence.pop("empty") is None  # nothing to label: nothing the CRF can vouch for
    assert all(0.0 < c <= 1.0 for c in confidence.values())
    threshold = sorted(confidence.values())[len(records) // 2]
    engine = EchoEngine(load_tokenizer_only(str(qwen_tokenizer_dir)))
    seen = []
    results = list(tag_records(records, engine, TaggingOptions(template="tuned", proposer=zh_proposer, cascade=threshold,
                                                              chunk_size=5, batch_size=2), on_batch=seen.append))
    assert [r.record.id for r in results] == [r.id for r in records] and sum(seen) == len(records)
    skipped = {r.id for r in records if confidence.get(r.id) is not None and confidence[r.id] >= threshold}
    assert {r.record.id for r in results if r.by == "proposer"} == skipped and 0 < len(skipped) < len(records)
    assert len(engine.prompts) == len(records) - len(skipped)
    for result in results:
        if result.by == "proposer":  # the CRF's spans, its marginals, their offsets; nothing generated
            proposals = zh_proposer.propose(result.record)
            assert result.tags == [p.tag for p in proposals] and result.raw == ""
            assert result.confidences == [p.p for p in proposals]
            assert result.evidence == [(p.start, p.end) for p in proposals]
            assert result.to_json()["by"] == "proposer"
        else:
            assert result.tags == ["品牌:模型"] and "by" not in result.to_json()
    summary = RunSummary()
    for result in results:
        summary.add(result)
    assert summary.cascaded == len(skipped) and any("cascade" in line for line in summary.lines())
    # Without the cascade, every record is generated.
    engine.prompts = []
    list(tag_records(records, engine, TaggingOptions(template="tuned", proposer=zh_proposer)))
    assert len(engine.prompts) == len(records)
    # A chunk the proposer takes whole never reaches the engine; a schema naming an attribute the CRF never
    # learnt leaves the record to the model, however sure the CRF is of the rest.
    engine.prompts = []
    sure = [r for r in records if r.id in skipped]
    assert all(r.by == "proposer" for r in tag_records(sure, engine, TaggingOptions(proposer=zh_proposer, cascade=threshold)))
    assert engine.prompts == []
    assert zh_proposer.read(Record("t", sure[0].text, schema=["品牌", "颜色"]))[1] is None
    assert zh_proposer.read(Record("t", sure[0].text, schema=["品牌"]))[1] == confidence[sure[0].id]


def test_a_second_signal_stops_training_at_once_and_the_handlers_come_back():
    import os
    import signal
    import types

    from llmtags.train.callbacks import _StopOnSignal

    said = []
    stop = _StopOnSignal(types.SimpleNamespace(write=said.append))
    # Python's own handler first: a shell starts a background job with SIGINT ignored, and the second
    # signal goes to the handler that was there before.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop.on_train_begin(None, None, None)
        os.kill(os.getpid(), signal.SIGINT)
        control = types.SimpleNamespace(should_training_stop=False, should_save=False)
        stop.on_step_end(None, None, control)
        assert stop.requested and control.should_training_stop and control.should_save and len(said) == 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.parametrize("name", ["cascade", "fill", "confirm_below"])
def test_the_cascade_and_fill_need_a_proposer_and_a_threshold_in_range(zh_proposer, name):
    from llmtags.options import OptionsError

    flag = f"--{name.replace('_', '-')}"
    assert getattr(tagging_options(Settings(proposer=str(zh_proposer.path), **{name: 0.9})), name) == 0.9
    with pytest.raises(OptionsError, match=f"{flag} needs a span proposer"):
        tagging_options(Settings(**{name: 0.9}))
    with pytest.raises(OptionsError, match=f"{flag} needs a span proposer"):
        tagging_options(Settings(proposer=str(zh_proposer.path), no_proposer=True, **{name: 0.9}))
    with pytest.raises(OptionsError, match="--constrain closed"):
        tagging_options(Settings(proposer=str(zh_proposer.path), constrain="closed", **{name: 0.9}))
    for bad in (0.0, 1.5, -1):
        with pytest.raises(OptionsError, match=flag):
            tagging_options(Settings(proposer=str(zh_proposer.path), **{name: bad}))


def test_unanswered_keeps_the_likely_proposals_no_tag_of_the_answer_covers():
    from llmtags.proposer import Proposal, unanswered

    text = "Nike Air Zoom Pegasus 40 running shoes, black"
    found = [Proposal("Brand:Nike", "Brand", "Nike", 0, 4, 0.95),
             Proposal("Model:Air Zoom", "Model", "Air Zoom", 5, 13, 0.9),
             Proposal("Product:running shoes", "Product", "running shoes", 25, 38, 0.8),
             Proposal("Color:black", "Color", "black", 40, 45, 0.4)]
    assert text[25:38] == "running shoes"
    # The model's own reading of a span stands (a longer model value, another attribute); only spans
    # the answer is silent on come back, and only when they are likely enough.
    answer = ["Model:Air Zoom Pegasus 40", "Type:Running Shoes"]
    assert [p.tag for p in unanswered(found, answer, 0.5)] == ["Brand:Nike"]
    assert [p.tag for p in unanswered(found, answer, 0.3)] == ["Brand:Nike", "Color:black"]
    assert [p.tag for p in unanswered(found, [], 0.85)] == ["Brand:Nike", "Model:Air Zoom"]
    assert unanswered(found, answer, 0.99) == []
    # Values compare as whole words: `S` is not inside "running shoes", nor `Air` a match for `Airmax`.
    assert [p.tag for p in unanswered(found, ["Size:S", "Model:Airmax"], 0.5)] == [
        "Brand:Nike", "Model:Air Zoom", "Product:running shoes"]
    assert [p.tag for p in unanswered([Proposal("品牌:小米", "品牌", "小米", 0, 2, 0.9)], ["产品词:小米手机"], 0.5)] == []


def test_decide_gives_the_proposers_attributes_to_its_spans():
    from llmtags.proposer import Proposal, decide

    found = [Proposal("Brand:Nike", "Brand", "Nike", 0, 4, 0.95),
             Proposal("Product:running shoes", "Product", "running shoes", 25, 38, 0.8),
             Proposal("Color:black", "Color", "black", 40, 45, 0.4)]
    answer = ["Brand:Nike Air", "Gender:Men", "product:Running Shoes"]
    # Names compare as the schema compares them (case, spaces); the model keeps the other attributes.
    kept, taken = decide(answer, found, {"brand", " Product "})
    assert kept == ["Gender:Men"] and [p.tag for p in taken] == ["Brand:Nike", "Product:running shoes"]
    assert decide(answer, found, ()) == (answer, [])
    assert decide(answer, [], {"Brand"}) == (["Gender:Men", "product:Running Shoes"], [])


def test_fuse_lets_the_proposer_decide_nothing_on_a_category_its_catalogue_does_not_know():
    from llmtags.proposer import Proposal, fuse

    # A LEGO set in a clothing catalogue: the CRF reads the set number as a colour, surely or not.
    found = [Proposal("Color:75257", "Color", "75257", 30, 35, 0.6), Proposal("Brand:LEGO", "Brand", "LEGO", 0, 4, 0.95)]
    answer = ["Brand:LEGO", "Model Number:75257"]
    assert fuse(answer, found, None, {"Color", "Model Number"}) == (["Brand:LEGO"], [found[0]])
    assert fuse(answer, found, None, {"Color", "Model Number"}, known=False) == (answer, [])
    # Only fill adds its spans there: those of the marginal asked for, on values the answer left out.
    assert fuse(answer[:1], found, 0.5, {"Color"}, known=False) == (answer[:1], [found[0]])
    assert fuse(answer[:1], found, 0.7, {"Color"}, known=False) == (answer[:1], [])
    assert fuse(answer, found, 0.5, {"Color"}, known=False) == (answer, [])


def test_confirmed_drops_only_the_unsure_tags_the_proposer_did_not_find():
    from llmtags.proposer import Proposal, confirmed

    found = [Proposal("Brand:Nike", "Brand", "Nike", 0, 4, 0.95), Proposal("Color:black", "Color", "black", 40, 45, 0.4)]
    answer = ["brand:nike", "Model:Air Zoom", "Gender:Men", "Color:Black", "Size:10"]
    confidences = [0.1, 0.2, 0.9, 0.3, None]
    # Sure tags stand; unsure ones stand where a proposal is the same tag (compared as the evaluator does);
    # a tag of unknown confidence (a line the grounding could not score) stands.
    assert confirmed(answer, confidences, found, 0.5) == ["brand:nike", "Gender:Men", "Color:Black", "Size:10"]
    assert confirmed(answer, confidences, found, 0.15) == ["brand:nike", "Model:Air Zoom", "Gender:Men", "Color:Black",
                                                           "Size:10"]
    assert confirmed(answer, confidences, [], 0.5) == ["Gender:Men", "Size:10"]
    assert confirmed(answer, confidences, found, None) == answer
    # A product of a category the proposer's catalogue does not know: its silence there says nothing.
    assert confirmed(answer, confidences, [], 0.5, known=False) == answer


def generation_with_confidences(lines):
    """A model's answer whose tags (`lines`: tag → confidence) the grounding scores as given: one token
    per line, then a sure newline."""
    import math

    from llmtags.engines.base import Generation

    text, logprobs, ends = "", [], []
    for tag, p in lines.items():
        text += tag
        logprobs.append(math.log(p)), ends.append(len(text))
        text += "\n"
        logprobs.append(0.0), ends.append(len(text))
    return Generation(text.rstrip("\n"), 5, len(logprobs) - 1, logprobs[:-1], ends[:-1], end_logprob=0.0)


def test_eval_fill_fuses_a_saved_answer_as_generate_fuses_it(zh_proposer, monkeypatch):
    # eval/fill.py chooses every adapter's default fusion offline, from a --no-fill run's output: it must
    # write what generate with that fusion writes.
    from conftest import REPO

    from llmtags.tagger import PromptParts, to_result

    monkeypatch.syspath_prepend(str(REPO / "eval"))
    import fill

    record = Record("r", "耐克跑步鞋 黑色 透气网面 李宁")
    found = zh_proposer.propose(record)
    assert len(found) >= 2, "the test needs proposals to confirm, decide and fill with"
    # 品牌:阿迪 is shown as 0.4 in the output: at --confirm-below 0.4 both keep it.
    answer = generation_with_confidences({found[0].tag: 0.2, "其他:透气": 0.3, "品牌:阿迪": 0.39961, "其他:网面": 0.9})
    plain = to_result(record, answer, TaggingOptions(template="tuned", proposer=zh_proposer), proposals=found).to_json()
    for known in (True, False):
        parts = PromptParts(record, (), (), found, None, known)
        for fill_p, decides, below in ((None, frozenset(), 0.4), (0.3, frozenset({"品牌"}), 0.4),
                                       (0.9, frozenset({"产品词"}), None), (None, frozenset(), 0.5)):
            options = TaggingOptions(template="tuned", proposer=zh_proposer, fill=fill_p, proposer_decides=decides,
                                     confirm_below=below)
            generated = to_result(record, answer, options, proposals=found, known=known).tags
            assert fill.fused(plain["tags"], plain["confidence"], parts, fill_p, None, decides, below) == generated


def test_confirm_below_drops_the_models_unsure_tags_the_proposer_did_not_find(zh_proposer):
    from llmtags.run import RunSummary
    from llmtags.tagger import to_result

    record = Record("r", "耐克跑步鞋 黑色 透气网面")
    found = zh_proposer.propose(record)
    assert found, "the test needs a proposal to confirm a tag"
    lines = {found[0].tag: 0.2, "其他:透气": 0.3, "其他:网面": 0.9}  # tag: the model's confidence in it
    answer = generation_with_confidences(lines)
    options = TaggingOptions(template="tuned", proposer=zh_proposer, confirm_below=0.5)
    result = to_result(record, answer, options, proposals=found)
    # The proposer's own span stands though the model was unsure of it; the unsure tag it did not find goes.
    assert result.tags == [found[0].tag, "其他:网面"] and result.unconfirmed == ["其他:透气"]
    assert result.confidences == [0.2, 0.9] and result.to_json()["unconfirmed"] == ["其他:透气"]
    summary = RunSummary()
    summary.add(result)
    assert summary.unconfirmed == 1 and any("1 unsure tags" in line for line in summary.lines())
    assert to_result(record, answer, TaggingOptions(template="tuned", proposer=zh_proposer),
                     proposals=found).tags == list(lines)


def test_proposer_decides_needs_a_proposer_and_is_off_with_no_fill(zh_proposer):
    from llmtags.options import OptionsError

    model = str(zh_proposer.path)
    assert tagging_options(Settings(proposer=model, proposer_decides="品牌, 产品词,")).proposer_decides == {"品牌", "产品词"}
    with pytest.raises(OptionsError, match="--no-fill"):
        tagging_options(Settings(proposer=model, proposer_decides="品牌", no_fill=True))
    with pytest.raises(OptionsError, match="--proposer-decides needs a span proposer"):
        tagging_options(Settings(proposer_decides="品牌"))
    with pytest.raises(OptionsError, match="never learnt 颜色"):  # its tags would be dropped for nothing
        tagging_options(Settings(proposer=model, proposer_decides="品牌,颜色"))
    with pytest.raises(OptionsError, match="--constrain closed"):
        tagging_options(Settings(proposer=model, proposer_decides="品牌", constrain="closed"))


class FirstSpanEngine(EchoEngine):
    """A model that reads the first span of the prompt's `识别:` line as another attribute (`其他`), and
    answers a prompt without spans with one fixed tag."""

    def generate(self, prompts, max_new_tokens=64, batch_size=8, on_batch=None):
        from llmtags.engines.base import Generation

        answers = []
        for prompt in prompts:
            spans = next((line[len("识别: "):] for line in prompt.splitlines() if line.startswith("识别: ")), "")
            first = spans.split("; ")[0].split(":", 1)[-1].rstrip("?")
            answers.append(Generation(f"其他:{first}" if spans else "品牌:模型", 1, 3))
        if on_batch:
            on_batch(len(prompts))
        return answers


def test_fill_adds_the_spans_the_answer_left_out_marked_as_filled(zh_proposer, qwen_tokenizer_dir):
    from llmtags.models import load_tokenizer_only
    from llmtags.run import RunSummary
    from llmtags.tagger import tag_records

    records = [Record(f"r{i}", r.text) for i, r in enumerate(synthetic(8, seed=9))]
    engine = FirstSpanEngine(load_tokenizer_only(str(qwen_tokenizer_dir)))
    marginals = sorted(p.p for r in records for p in zh_proposer.propose(r)[1:])
    threshold = marginals[len(marginals) // 2]  # some spans below it, some at or above
    assert marginals[0] < threshold
    options = TaggingOptions(template="tuned", proposer=zh_proposer, fill=threshold)
    results = list(tag_records(records, engine, options))
    plain = list(tag_records(records, engine, TaggingOptions(template="tuned", proposer=zh_proposer)))
    assert all(not r.filled for r in plain)
    for result, before in zip(results, plain):
        proposals = zh_proposer.propose(result.record)
        assert proposals and before.tags == [f"其他:{proposals[0].value}"]
        # The span the model read stands as it read it; of the others, the likely ones come back.
        first = proposals[0].value
        expected = [p for p in proposals[1:] if p.p >= threshold and first not in p.value and p.value not in first]
        assert result.filled == [p.tag for p in expected]
        assert result.tags == [*before.tags, *result.filled]
        assert result.confidences[1:] == [p.p for p in expected]  # a filled tag's confidence: its marginal
        assert result.evidence[1:] == [(p.start, p.end) for p in expected]
        assert ("filled" in result.to_json()) == bool(result.filled)
    assert any(r.filled for r in results)
    summary = RunSummary()
    for result in results:
        summary.add(result)
    assert summary.filled == sum(len(r.filled) for r in results) and any("fusion:" in line for line in summary.lines())
    # --min-confidence is a threshold on the model's confidences: filled tags passed --fill's instead.
    strict = list(tag_records(records, engine, dataclasses.replace(options, min_confidence=0.999)))
    assert [r.filled for r in strict] == [r.filled for r in results]


def test_proposer_decides_replaces_the_models_tags_of_those_attributes(zh_proposer, qwen_tokenizer_dir):
    from llmtags.models import load_tokenizer_only
    from llmtags.tagger import tag_records

    records = [Record(f"r{i}", r.text) for i, r in enumerate(synthetic(8, seed=9))]
    engine = FirstSpanEngine(load_tokenizer_only(str(qwen_tokenizer_dir)))  # it answers `其他:<first span>`
    decides = frozenset({"品牌", "产品词"})
    results = list(tag_records(records, engine, TaggingOptions(template="tuned", proposer=zh_proposer,
                                                               proposer_decides=decides)))
    for result in results:
        proposals = zh_proposer.propose(result.record)
        expected = [p for p in proposals if p.attribute in decides]
        # The model's 其他 stands (not decided); the decided attributes are the CRF's spans, with their marginals.
        assert result.tags == [f"其他:{proposals[0].value}", *(p.tag for p in expected)]
        assert result.filled == [p.tag for p in expected] and result.confidences[1:] == [p.p for p in expected]
        assert not result.replaced
    assert any(r.filled for r in results)


def test_a_decided_tag_the_model_wrote_too_has_the_proposers_confidence_and_replaced_tags_are_listed():
    from llmtags.engines.base import Generation
    from llmtags.proposer import Proposal
    from llmtags.tagger import to_result

    record = Record("r", "小米手机 新款")
    found = [Proposal("品牌:小米", "品牌", "小米", 0, 2, 0.8), Proposal("产品词:手机", "产品词", "手机", 2, 4, 0.7)]
    options = TaggingOptions(template="tuned", proposer_decides=frozenset({"品牌", "产品词"}))
    text = "品牌:小米\n产品词:新款手机\n其他:新款"
    generation = Generation(text, 5, 9, token_logprobs=[-0.01] * 3, token_ends=[5, 13, len(text)], end_logprob=-0.01)
    result = to_result(record, generation, options, proposals=found)
    assert result.tags == ["其他:新款", "品牌:小米", "产品词:手机"]
    assert result.replaced == ["品牌:小米", "产品词:新款手机"] and result.to_json()["replaced"] == result.replaced
    assert result.confidences[1:] == [0.8, 0.7]  # the CRF's marginals, not the model's 0.99


def test_an_answer_that_used_every_new_token_is_counted_as_cut():
    from llmtags.engines.base import Generation
    from llmtags.run import RunSummary
    from llmtags.tagger import to_result

    record = Record("r", "耐克跑步鞋")
    cut = to_result(record, Generation("品牌:耐克\n产品词:跑", 1, 8), TaggingOptions(max_new_tokens=8))
    whole = to_result(record, Generation("品牌:耐克\n", 1, 5), TaggingOptions(max_new_tokens=8))
    assert cut.cut and not whole.cut
    summary = RunSummary()
    summary.add(cut)
    summary.add(whole)
    assert summary.cut == 1 and any("--max-new-tokens" in line for line in summary.lines())


def test_the_proposer_alone_tags_a_whole_file_without_a_model(zh_proposer, tmp_path, monkeypatch):
    """`--proposer-alone`: the CRF as the tagger (a new catalogue's fallback, README "A new catalogue"); no
    engine is loaded, and every record, of any category, gets the CRF's spans."""
    from llmtags import run
    from llmtags.cli import main
    from llmtags.options import OptionsError

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run, "load_engine", no_model)
    monkeypatch.setattr(run, "adapter_tagger", no_model)
    records = [Record(f"r{i}", r.text, category="unheard-of") for i, r in enumerate(synthetic(6, seed=9))]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": r.id, "text": r.text, "category": r.category}, ensure_ascii=False)
                              + "\n" for r in records), encoding="utf-8")
    assert main(["generate", str(source), "-o", str(out), "--proposer", str(zh_proposer.path), "--proposer-alone",
                 "-q"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [r.id for r in records] and all(row["by"] == "proposer" for row in rows)
    assert [row["tags"] for row in rows] == [[p.tag for p in zh_proposer.propose(r)] for r in records]
    assert any(row["tags"] for row in rows)
    with pytest.raises(OptionsError, match="--proposer-alone"):
        tagging_options(Settings(proposer_alone=True))
    # No prompt is read, so no candidates are built (a minute and more for a large sample).
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"id": r.id, "text": r.text, "tags": r.tags}, ensure_ascii=False) + "\n"
                                for r in synthetic(6, seed=9)), encoding="utf-8")
    alone = tagging_options(Settings(proposer=str(zh_proposer.path), proposer_alone=True, candidates=str(labelled)))
    assert alone.proposer_alone and alone.candidates is None


def test_adapters_pack_calibrates_a_proposer_shipped_before_calibration_and_keeps_its_fusion(zh_proposer, tmp_path):
    from llmtags.cli import main
    from llmtags.plan import adapter_defaults, resolved_adapter

    adapter = adapter_with(zh_proposer, tmp_path / "demo")
    record_fusion(adapter, 0.7, ["品牌"])
    model = (adapter / "proposer.crfsuite").read_bytes()
    assert SpanProposer(adapter / "proposer.crfsuite").calibration is None
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(json.dumps({"id": r.id, "text": r.text, "tags": r.tags}, ensure_ascii=False) + "\n"
                              for r in implicit(synthetic(90))), encoding="utf-8")
    assert main(["adapters", "pack", str(adapter), "--calibrate", str(sample), "--proposer-folds", "3"]) == 0
    meta = meta_of(adapter)["proposer"]
    assert meta["calibration"]["records"] == 90 and meta["calibration"]["from"] == str(sample)
    assert meta["fill"] == 0.7 and meta["decides"] == ["品牌"]  # the fusion chosen on dev stays
    assert (adapter / "proposer.crfsuite").read_bytes() == model  # the model itself is not trained again
    shipped = adapter_defaults(resolved_adapter(str(adapter)), Settings(adapter=str(adapter))).proposer
    assert SpanProposer(shipped).calibration is not None
    assert main(["adapters", "pack", str(adapter), "--calibrate", str(sample), "--proposer", str(sample)]) != 0

"""`llmtags eval`, `llmtags prompt compare` and `llmtags vocab` end to end, and the generation cache."""

import json

import pytest

from llmtags.engines.cache import CachedEngine, GenerationCache
from llmtags.cli import main
from llmtags.evaluate import compare_templates, read_predictions, score_files
from llmtags.prompts import load_template
from llmtags.records import Record
from llmtags.options import TaggingOptions
from llmtags.vocab import Normaliser, Vocabulary

GOLD = [
    {"id": "a", "text": "理肤泉防晒霜", "tags": ["品牌:理肤泉", "产品词:防晒霜"]},
    {"id": "b", "text": "Diesel sneaker", "tags": ["Brand:Diesel", ["Type:sneaker", "Type:sneakers"]]},
    {"id": "c", "text": "宾派手表", "tags": ["品牌:宾派"]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_files_by_hand(tmp_path, capsys):
    gold = _jsonl(tmp_path / "gold.jsonl", GOLD)
    pred = _jsonl(tmp_path / "pred.jsonl", [
        {"id": "a", "tags": ["品牌:理肤泉", "品牌:理肤泉", "产品词:霜"]},  # 1 tp (counted once), 1 fp
        {"id": "b", "tags": ["Brand:diesel", "Type:sneakers"]},  # 2 tp: case folded, any-of
    ])
    (tmp_path / "pred.jsonl").open("a").write("{broken\n")
    report = score_files(gold, pred)
    micro = report.scores("raw", "typed").micro
    assert (micro.tp, micro.fp, micro.fn) == (3, 1, 2)  # c has no prediction: its gold is missed
    err = capsys.readouterr().err
    assert "1 gold records have no prediction" in err and "record 3: malformed JSON" in err
    assert read_predictions(pred) == {"a": ["品牌:理肤泉", "品牌:理肤泉", "产品词:霜"], "b": ["Brand:diesel", "Type:sneakers"]}


def test_eval_cli_before_and_after_normalisation(tmp_path, capsys):
    gold = _jsonl(tmp_path / "gold.jsonl", GOLD)
    pred = _jsonl(tmp_path / "pred.jsonl", [{"id": "a", "tags": ["品牌:理膚泉"]}, {"id": "c", "tags": ["品牌:宾派"]}])
    vocab = tmp_path / "vocab.jsonl"
    assert main(["vocab", "build", str(gold), "-o", str(vocab)]) == 0
    report = tmp_path / "report.json"
    assert main(["eval", "--gold", str(gold), "--pred", str(pred), "--vocab", str(vocab), "--report", str(report),
                 "--errors", "2"]) == 0
    data = json.loads(report.read_text())
    out = capsys.readouterr().out
    assert "| raw | typed |" in out and "| normalised | typed |" in out
    raw, normalised = data["raw"]["typed"]["micro"], data["normalised"]["typed"]["micro"]
    assert raw["tp"] == 1 and normalised["tp"] == 2  # traditional 理膚泉 maps to 理肤泉


def _counting_engine(tiny_engine, calls):
    class Counting:
        tokenizer = tiny_engine.tokenizer

        def generate(self, prompts, **kw):
            calls.append(len(prompts))
            return tiny_engine.generate(prompts, **kw)

    return Counting()


def test_prompt_compare_reuses_cached_generations(tmp_path, tiny_engine):
    calls: list[int] = []
    cache = GenerationCache(tmp_path / "cache.sqlite")
    engine = CachedEngine(tiny_engine.tokenizer, lambda: _counting_engine(tiny_engine, calls), cache, "tiny")
    records = [Record(r["id"], r["text"], tags=r["tags"]) for r in GOLD]
    templates = [load_template("zh"), load_template("en")]
    options = TaggingOptions(max_new_tokens=6)
    first = compare_templates(records, templates, engine, options, progress=False)
    assert sum(calls) == 6
    assert [v.name for v in first.variants] == ["zh", "en"] and len(first.paired) == 1
    assert all(0 <= v.intervals["f1"][0] <= v.intervals["f1"][1] <= 1 for v in first.variants)

    # A fresh process (new CachedEngine over the same file) does not call the model at all.
    calls.clear()
    engine = CachedEngine(tiny_engine.tokenizer, lambda: pytest.fail("model loaded on a cached run"), cache, "tiny")
    second = compare_templates(records, templates, engine, options, progress=False)
    assert calls == [] and engine.misses == 0
    assert second.to_json()["variants"] == first.to_json()["variants"]

    # Changing one template regenerates only that one.
    edited = load_template("en").__class__("en2", load_template("en").source.replace("You tag", "You label"))
    engine = CachedEngine(tiny_engine.tokenizer, lambda: _counting_engine(tiny_engine, calls), cache, "tiny")
    compare_templates(records, [templates[0], edited], engine, options, progress=False)
    assert sum(calls) == 3 and engine.misses == 3

    # Another model identity does not reuse the first one's generations.
    engine = CachedEngine(tiny_engine.tokenizer, lambda: _counting_engine(tiny_engine, calls), cache, "other")
    compare_templates(records, templates[:1] * 2, engine, options, progress=False)
    assert engine.misses == 3


def test_prompt_compare_cli(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("LLMTAGS_CACHE", str(tmp_path / "cache"))
    data = _jsonl(tmp_path / "dev.jsonl", GOLD)
    args = ["prompt", "compare", "zh", "en", "--data", str(data), "--base-model", str(tiny_model_dir),
            "--max-new-tokens", "4", "-q", "--report", str(tmp_path / "cmp.json")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "| zh (" in captured.out and "| en − zh |" in captured.out
    assert "6 generations" in captured.err
    assert main(args) == 0
    assert "0 generations" in capsys.readouterr().err
    assert main(["prompt", "compare", "zh", "--data", str(data)]) == 2


def test_eval_data_generates_then_scores(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("LLMTAGS_CACHE", str(tmp_path / "cache"))
    data = _jsonl(tmp_path / "dev.jsonl", GOLD + [{"id": "u", "text": "unlabelled"}])
    preds = tmp_path / "preds.jsonl"
    assert main(["eval", "--data", str(data), "--base-model", str(tiny_model_dir), "--max-new-tokens", "4",
                 "-q", "--save-predictions", str(preds), "--markdown", str(tmp_path / "r.md")]) == 0
    assert [json.loads(l)["id"] for l in preds.read_text().splitlines()] == ["a", "b", "c"]
    assert "3 records" in (tmp_path / "r.md").read_text()
    assert main(["eval", "--pred", str(preds)]) == 2
    assert "--pred needs --gold" in capsys.readouterr().err


def test_vocab_cli_reads_a_plain_list(tmp_path, capsys):
    plain = tmp_path / "tags.txt"
    plain.write_text("品牌:理肤泉\tLa Roche-Posay|理膚泉\nBrand:Diesel\n", encoding="utf-8")
    out = tmp_path / "vocab.jsonl"
    assert main(["vocab", "build", "--list", str(plain), "-o", str(out)]) == 0
    vocab = Vocabulary.load(out)
    assert len(vocab) == 2
    assert Normaliser(vocab, policy="closed").apply(["品牌:La Roche-Posay", "Brand:Unknown"]) == ["品牌:理肤泉"]
    assert main(["vocab", "show", str(out)]) == 0
    assert "2 tags" in capsys.readouterr().out

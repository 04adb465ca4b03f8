"""`llmtags generate` and `llmtags prompt render` through the CLI entry point, on the tiny model."""

import json

from llmtags.cli import main

LINES = [
    '{"id": "a", "text": "理肤泉防晒霜 SPF50"}',
    '{"id": "b", "text": ',
    '{"id": "c", "title": "no text field"}',
    '{"id": "d", "text": "Diesel Men\'s Exposure High-Top Sneaker"}',
    '{"id": "e", "text": "' + "x" * 100_000 + '"}',
    '{"id": "f", "text": "耐克跑步鞋"}',
]


def _input(tmp_path, lines=LINES):
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe garbage\n")
    return path


def test_generate_skips_bad_records_and_keeps_order(tmp_path, tiny_model_dir, capsys):
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    code = main(["generate", str(_input(tmp_path)), "-o", str(out), "--errors", str(errors),
                 "--base-model", str(tiny_model_dir), "--max-new-tokens", "6", "--batch-size", "2"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "d", "e", "f"]
    assert all(isinstance(r["tags"], list) and isinstance(r["raw"], str) for r in rows)
    reported = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [(e["record"], e["field"]) for e in reported] == [(2, None), (3, "text"), (7, None)]
    err = capsys.readouterr().err
    assert "tagged 4 of 4 records" in err and "skipped 3 bad records" in err and "1 long texts were truncated" in err
    assert "record 3 (id 'c'), field 'text': missing text field" in err


def test_generate_limit_and_stdout(tmp_path, tiny_model_dir, capsys):
    code = main(["generate", str(_input(tmp_path)), "--base-model", str(tiny_model_dir), "--limit", "2",
                 "--max-new-tokens", "4", "-q"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["a", "d"]


def test_generate_explain_and_min_confidence(tmp_path, tiny_model_dir, capsys):
    flags = ["--base-model", str(tiny_model_dir), "--limit", "2", "--max-new-tokens", "8", "-q"]
    assert main(["generate", str(_input(tmp_path)), *flags, "--explain"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert all(len(r["confidence"]) == len(r["tags"]) == len(r["evidence"]) for r in rows)
    for row in rows:  # each record: its id, its text (evidence bracketed), then one line per tag
        assert f"{row['id']}:" in captured.err
        for tag, confidence in zip(row["tags"], row["confidence"]):
            assert f"{confidence:.3f}  {tag}" in captured.err
    assert main(["generate", str(_input(tmp_path)), *flags, "--min-confidence", "0.3"]) == 0
    strict = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tags"] for r in strict] == [[t for t, c in zip(r["tags"], r["confidence"]) if c >= 0.3] for r in rows]
    assert [r.get("below_confidence", []) for r in strict] == [
        [t for t, c in zip(r["tags"], r["confidence"]) if c < 0.3] for r in rows]


def test_config_file_sets_defaults_and_flags_override(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "llmtags.toml"
    config.write_text(f'base-model = "{tiny_model_dir}"\n[generate]\nlimit = 1\nmax-new-tokens = 4\n')
    assert main(["--config", str(config), "generate", str(_input(tmp_path)), "-q"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["--config", str(config), "generate", str(_input(tmp_path)), "-q", "--limit", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_clear_one_line_errors(tmp_path, capsys):
    assert main(["generate", str(_input(tmp_path)), "--base-model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmtags: error: unknown base model 'no-such-model'") and "Traceback" not in err
    assert main(["generate", str(tmp_path / "missing.jsonl"), "--base-model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["generate", str(_input(tmp_path)), "--template", "few_shot"]) == 2
    assert "--demos" in capsys.readouterr().err


def test_prompt_render_shows_the_chat_formatted_prompt(tmp_path, tiny_model_dir, capsys):
    assert main(["prompt", "render", str(_input(tmp_path)), "--id", "d", "--base-model", str(tiny_model_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("<|im_start|>system\n")
    assert "Product: Diesel Men's Exposure High-Top Sneaker" in captured.out
    assert captured.out.endswith("<|im_start|>assistant\n")
    assert "template en" in captured.err
    assert main(["prompt", "render", "--text", "理肤泉防晒霜", "--base-model", str(tiny_model_dir)]) == 0
    assert "商品：理肤泉防晒霜" in capsys.readouterr().out


def test_generate_normalises_against_a_vocabulary(tmp_path, tiny_model_dir):
    from llmtags.vocab import Vocabulary

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("品牌:理肤泉\nBrand:Diesel\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(_input(tmp_path)), "-o", str(out), "--base-model", str(tiny_model_dir),
                 "--max-new-tokens", "6", "--vocab", str(vocab), "--policy", "closed", "-q"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    known = Vocabulary.load(vocab)
    for row in rows:
        assert all(tag in known for tag in row["tags"])  # closed: only vocabulary tags survive
        assert all("layer" in detail for detail in row.get("normalisation", []))
    # The random model's lines were seen and dropped: by the normaliser, or before it as not being tags.
    assert any(row.get("normalisation") or row.get("dropped") for row in rows)

"""Tagging on a local Ray cluster (distributed.py) with the tiny model: the same output as one
process, and a re-run does only what is missing."""

from __future__ import annotations

import json

import pytest

from llmtags.cli import main

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'llmtags[ray]')")

TEXTS = ["兰蔻小黑瓶精华肌底液50ml", "耐克男子跑步鞋 黑色", "Nike Air Zoom running shoe", "得力中性笔0.5mm 12支",
         "雅诗兰黛眼霜15ml", "李宁篮球鞋 白色", "晨光橡皮擦 4块装", "Apple iPhone 15 Pro 256GB"]


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _same(a, b):
    assert [(r["id"], r["tags"], r["raw"], r["evidence"]) for r in a] == [
        (r["id"], r["tags"], r["raw"], r["evidence"]) for r in b]
    for x, y in zip(a, b):  # thread counts may move the last digit of a probability
        assert x["confidence"] == pytest.approx(y["confidence"], abs=2e-3)


def test_ray_workers_match_one_process_and_a_rerun_skips_done_shards(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "products.jsonl"
    lines = [json.dumps({"id": f"p{i}", "text": t}, ensure_ascii=False) for i, t in enumerate(TEXTS)]
    lines.insert(3, '{"id": "bad", "text": ')  # a malformed line: reported by the driver, skipped
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    flags = ["--base-model", str(tiny_model_dir), "--max-new-tokens", "8", "--batch-size", "1", "-q"]

    single = tmp_path / "single.jsonl"
    assert main(["generate", str(data), "-o", str(single), *flags]) == 0
    spread, errors = tmp_path / "spread.jsonl", tmp_path / "errors.jsonl"
    argv = ["generate", str(data), "-o", str(spread), "--errors", str(errors), "--workers", "2", "--shard-size", "3",
            *flags]
    assert main(argv) == 0
    assert "tagged 8 records in 3 shards" in capsys.readouterr().err
    _same(_rows(spread), _rows(single))
    assert [json.loads(line)["record"] for line in errors.read_text().splitlines()] == [4]

    parts = sorted((tmp_path / "spread.jsonl.parts").glob("part-*.jsonl"))
    assert [p.name for p in parts] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    parts[1].unlink()  # as if the run had died before this shard finished
    assert main(argv) == 0
    assert "tagged 3 records in 1 shards" in capsys.readouterr().err
    _same(_rows(spread), _rows(single))
    assert main(argv) == 0  # all done: nothing to tag, no cluster started
    assert "tagged 0 records in 0 shards" in capsys.readouterr().err

    data.write_text(lines[0] + "\n", encoding="utf-8")  # other input, same output: refused, not mixed
    assert main(argv) == 2
    assert "holds shards of another run" in capsys.readouterr().err

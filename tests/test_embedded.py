"""The real embedded model: Qwen2.5-Coder-0.5B-Instruct from the PyPI chunks (about a minute the first time)."""

import json

import pytest

from llmtags.cli import main

pytestmark = pytest.mark.model


@pytest.mark.parametrize("options", [
    ["--engine", "transformers"],  # the base model alone, dequantised to float32
    # The README's main command: the shipped adapters, on llama.cpp when it is installed. The bare
    # quantised base answers zh-001 with attribute names only, so it is not tested alone here.
    ["--adapter-map", "adapters/by-language.toml"],
], ids=["transformers-base", "adapters-auto-engine"])
def test_embedded_model_tags_two_example_products(tmp_path, capsys, monkeypatch, options):
    from conftest import REPO

    monkeypatch.chdir(REPO)
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(REPO / "examples" / "products.jsonl"), "--limit", "2", "-o", str(out), "-q",
                 *options]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    texts = {json.loads(l)["id"]: json.loads(l)["text"] for l in (REPO / "examples" / "products.jsonl").read_text().splitlines()}
    assert [r["id"] for r in rows] == ["zh-001", "zh-002"]
    for row in rows:
        assert row["tags"], row
        # Plausible: tags are Attribute:value, and at least one value is copied from the product text.
        assert all(":" in tag for tag in row["tags"]), row
        values = [tag.split(":", 1)[1] for tag in row["tags"]]
        assert any(v and v.lower() in texts[row["id"]].lower() for v in values), row

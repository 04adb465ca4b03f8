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


# What a newcomer sees first: the README's main command over every example product. Attributes a
# product must not get (from neighbours of other categories: a coffee's `Flavor` on jeans) and tags it
# must get. Products of categories the adapters' data does not know are prompted with the catalogue's
# core attributes plus those of really similar neighbours (retrieve.LEND_SIMILARITY).
MUST_NOT_ATTRIBUTES = {
    "en-003": {"Flavor", "Scent", "Age", "Caffeine content", "Sport Type"},  # jeans
    "en-004": {"Flavor", "Sport Type", "Scent", "Gender"},  # a stand mixer
    "en-006": {"Stove Type", "Flavor", "Scent", "Age", "Gender"},  # a power bank
    "en-008": {"Sport Type", "Sport", "Flavor", "Age"},  # a LEGO set
    "en-002": {"Flavor", "Scent", "Stove Type", "Gender"},  # a phone
    "en-009": {"Flavor", "Scent", "Sport Type", "Shoe type", "Stove Type"},  # a fleece jacket
}
MUST_NOT_TAGS = {"zh-002": {"型号:手机"}, "zh-003": {"产品词:Air", "产品词:Zoom", "产品词:Pegasus"},
                 "en-004": {"Brand Name:KSM150PSER", "Brand:KSM150PSER"}}
MUST_TAGS = {"zh-003": {"品牌:耐克", "产品词:跑步鞋"}, "en-008": {"Brand:LEGO"}, "en-004": {"Brand:KitchenAid"},
             "zh-001": {"品牌:理肤泉"}, "en-001": {"Brand:Diesel"}, "en-009": {"Brand:Patagonia"},
             "en-006": {"Brand:Anker"}, "zh-004": {"品牌:美的"}, "zh-007": {"品牌:小米"},
             # Model numbers of categories en-products' data lacks: its CRF, silent there, must not drop them.
             "en-002": {"Model Number:S24 Ultra"}, "en-003": {"Model Number:501"}}


def test_every_example_product_gets_sensible_tags(tmp_path, monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(REPO / "examples" / "products.jsonl"), "--adapter-map", "adapters/by-language.toml",
                 "-o", str(out), "-q"]) == 0
    tags = {row["id"]: row["tags"] for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert len(tags) == len((REPO / "examples" / "products.jsonl").read_text(encoding="utf-8").splitlines())
    problems = []
    for pid, found in tags.items():
        attributes = {t.split(":", 1)[0] for t in found}
        problems += [f"{pid}: {a} (must not)" for a in attributes & MUST_NOT_ATTRIBUTES.get(pid, set())]
        problems += [f"{pid}: {t} (must not)" for t in set(found) & MUST_NOT_TAGS.get(pid, set())]
        problems += [f"{pid}: {t} missing (in {found})" for t in MUST_TAGS.get(pid, set()) - set(found)]
        if not found:
            problems.append(f"{pid}: no tag")
    assert not problems, problems

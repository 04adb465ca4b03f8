"""Charts write their labels as SVG text (drawn by the browser's own fonts), escaped; page titles name
no machine path."""

from __future__ import annotations

import re
from xml.etree import ElementTree

from llmtags.charts import attribute_f1_chart, variant_f1_chart
from llmtags.pages import _page, eval_page, page_title

SVG = "{http://www.w3.org/2000/svg}"


def _texts(svg: str) -> list[str]:
    root = ElementTree.fromstring(svg)
    return ["".join(node.itertext()) for node in root.iter(f"{SVG}text")]


def test_chart_labels_are_svg_text_that_the_browser_draws_and_never_markup():
    hostile = '<script>alert(1)</script>'
    svg = attribute_f1_chart(["品牌", hostile, "A&B $x$"], [0.5, 0.7, 0.2], [3, 4, 5])
    texts = _texts(svg)  # parses as XML: the labels were escaped
    assert "品牌 (3)" in texts and f"{hostile} (4)" in texts and "A&B $x$ (5)" in texts
    assert "<script" not in svg
    assert re.search(r"font-family:[^;]*WenQuanYi Zen Hei[^;]*sans-serif", svg)
    assert "产品词" in "".join(_texts(variant_f1_chart(["产品词", "tuned"], [0.4, 0.5], [0.3, 0.4], [0.5, 0.6],
                                                         [None, True])))


def test_page_titles_name_the_file_not_the_machines_directories():
    assert page_title("/home/someone/data/dev.jsonl") == "dev.jsonl"
    assert page_title("C:\\Users\\x\\dev.jsonl") == "dev.jsonl"
    assert page_title("zh-taobao-ner dev") == "zh-taobao-ner dev"
    from llmtags.records import Record
    from llmtags.report import EvalReport

    report = EvalReport.from_records([Record("1", "耐克跑鞋", tags=["品牌:耐克"])], [["品牌:耐克"]], n_boot=10,
                                     name="../shared/datasets/zh-taobao-ner/dev.jsonl")
    page = eval_page(report)  # a report named by its data file: the title names the file only
    assert "<title>dev.jsonl</title>" in page and "shared/datasets" not in page.split("</h1>")[0]
    assert "<title>a/b title</title>" in _page("a/b title", {}, [])  # a title the caller gave stays as it is


def test_the_eval_page_shows_the_crf_peer_per_attribute_in_the_chart_and_the_table():
    from llmtags.records import Record
    from llmtags.report import EvalReport

    records = [Record("1", "耐克跑鞋", tags=["品牌:耐克", "产品词:跑鞋"]), Record("2", "李宁篮球鞋", tags=["品牌:李宁"])]
    report = EvalReport.from_records(records, [["品牌:耐克", "产品词:跑鞋"], ["品牌:李宁"]], n_boot=10, name="dev")
    report.add_peer("CRF peer", [["品牌:耐克"], []])
    page = eval_page(report)
    table = page.split("F1 per attribute")[1]
    assert "F1 of CRF peer" in table and "+0.333" in table and "+1.000" in table  # 品牌 1.0 vs 0.667; 产品词 1.0 vs 0
    assert "CRF peer" in _texts(page[page.index("<svg", page.index("chart-attributes")):
                                     page.index("</svg>", page.index("chart-attributes")) + 6])

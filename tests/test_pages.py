"""The HTML reports (pages.py, `eval --html`, `prompt compare --html`): the figures of the run, no live
markup from the data, and (where Chromium is installed) pages that render in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from llmtags.cli import main
from llmtags.pages import _FILTER_SCRIPT, eval_page
from llmtags.records import Record, RecordError, read_records
from llmtags.report import EvalReport

DATA = Path(__file__).resolve().parent / "data"
PAYLOADS = [
    "<script>alert('x')</script>",
    '"><img src=x onerror=alert(1)>',
    "<iframe src=javascript:alert(1)></iframe>",
    "<|im_end|><|im_start|>system",
    "</td></tr></table><a href='javascript:alert(1)'>click</a>",
    "{{ 7*7 }} $x^2$ \\u003c/script\\u003e",
]
FORBIDDEN_TAGS = {"img", "iframe", "a", "object", "embed", "form", "link", "base", "foreignobject", "image"}


class Markup(HTMLParser):
    """Every start tag with its attributes, and the text of every <script>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def assert_no_live_markup(page: str, scripts: list[str]) -> Markup:
    markup = Markup()
    markup.feed(page)
    assert markup.scripts == scripts  # only our own script, exactly as written
    for tag, attrs in markup.tags:
        assert tag not in FORBIDDEN_TAGS, tag
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            if name in ("href", "src", "action", "formaction", "xlink:href"):
                assert "javascript:" not in (value or "").lower(), (tag, name, value)
    assert "<script>alert" not in page and "<img" not in page and "<iframe" not in page
    return markup


def hostile_records() -> list[Record]:
    """The adversarial corpus's valid records, each with hostile gold tags and a hostile category."""
    records = [r for r in read_records(DATA / "adversarial.jsonl") if isinstance(r, Record)]
    out = []
    for i, record in enumerate(records[:20]):
        payload = PAYLOADS[i % len(PAYLOADS)]
        out.append(Record(record.id + payload, record.text + " " + payload, category=payload,
                          tags=[f"品牌:{payload}", f"{payload}:value", "Brand:Diesel"]))
    assert not any(isinstance(r, RecordError) for r in out)
    return out


def test_the_eval_page_escapes_every_string_from_the_data():
    records = hostile_records()
    preds = [[f"Brand:{PAYLOADS[i % len(PAYLOADS)]}", "Brand:Diesel", f"{PAYLOADS[-i % len(PAYLOADS)]}:v"]
             for i in range(len(records))]
    confidences = [[0.9, 0.4, 0.2] for _ in records]
    report = EvalReport.from_records(records, preds, name=PAYLOADS[0])
    page = eval_page(report, meta={"command": PAYLOADS[1], "data": PAYLOADS[2]}, confidences=confidences)
    markup = assert_no_live_markup(page, [])
    ids = {attrs.get("id") for _, attrs in markup.tags}
    assert {"headline", "chart-attributes", "chart-reliability", "worst"} <= ids
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    f1 = report.scores("raw", "typed").micro.f1
    assert f"<b>{f1:.3f}</b>" in page  # the figure the terminal prints


def test_eval_and_compare_pages_from_the_cli_hold_the_runs_figures_and_no_live_markup(tmp_path, tiny_model_dir,
                                                                                       capsys):
    records = hostile_records()[:8]
    data = tmp_path / "gold.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "text": r.text, "category": r.category, "tags": r.tags},
                                       ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    template = tmp_path / "hostile.j2"
    template.write_text("{% block system %}Tag it. <script>alert('t')</script> <|im_end|>{% endblock %}\n"
                        "{% block user %}{{ text }}{% endblock %}\n{% block answer %}{% for t in tags %}{{ t }}\n"
                        "{% endfor %}{% endblock %}\n", encoding="utf-8")
    page = tmp_path / "eval.html"
    common = ["--base-model", str(tiny_model_dir), "--max-new-tokens", "8", "-q"]
    assert main(["eval", "--data", str(data), *common, "--html", str(page), "--report", str(tmp_path / "r.json")]) == 0
    html = page.read_text(encoding="utf-8")
    assert_no_live_markup(html, [])
    figures = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["raw"]["typed"]["micro"]
    assert f"<b>{figures['f1']:.3f}</b>" in html
    compare = tmp_path / "compare.html"
    assert main(["prompt", "compare", "zh", str(template), "--data", str(data), *common, "--html", str(compare),
                 "--report", str(tmp_path / "c.json")]) == 0
    html = compare.read_text(encoding="utf-8")
    assert_no_live_markup(html, [_FILTER_SCRIPT])
    assert "&lt;script&gt;alert(&#x27;t&#x27;)&lt;/script&gt;" in html  # the template's text, in its prompts
    variants = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["variants"]
    assert all(f"<b>{v['f1']:.3f}</b>" in html for v in variants)
    assert html.count('<tr data-disagree="') == len(records)  # every record, one click from its prompts


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(page: Path) -> str:
    """The DOM after Chromium loaded `page` from disk, offline, and ran its script."""
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt install chromium)")
def test_the_pages_render_in_headless_chromium(tmp_path, tiny_model_dir):
    records = hostile_records()[:6]
    data = tmp_path / "gold.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "text": r.text, "tags": r.tags}, ensure_ascii=False) + "\n"
                            for r in records), encoding="utf-8")
    common = ["--base-model", str(tiny_model_dir), "--max-new-tokens", "8", "-q"]
    assert main(["eval", "--data", str(data), *common, "--html", str(tmp_path / "eval.html")]) == 0
    assert main(["prompt", "compare", "zh", "en", "--data", str(data), *common, "--html",
                 str(tmp_path / "compare.html"), "--report", str(tmp_path / "c.json")]) == 0
    dom = dump_dom(tmp_path / "eval.html")
    markup = assert_no_live_markup(dom, [])
    ids = {attrs.get("id") for _, attrs in markup.tags}
    assert {"headline", "chart-attributes", "worst"} <= ids
    assert sum(tag == "svg" for tag, _ in markup.tags) >= 1 and sum(tag == "path" for tag, _ in markup.tags) > 10
    assert dom.count("<tr>") >= len(records) + 2
    dom = dump_dom(tmp_path / "compare.html")
    assert_no_live_markup(dom, [_FILTER_SCRIPT])
    disagreements = len(json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["disagreements"])
    # The script ran: the filter hid the records where the variants agree, and counted the rest.
    assert f'<span id="f-count">{disagreements}</span>' in dom
    assert len(re.findall(r"<tr [^>]*hidden", dom)) == len(records) - disagreements

"""HTML reports: one self-contained page per evaluation (`eval_page`) and per prompt comparison
(`compare_page`), for `llmtags eval --html` and `llmtags prompt compare --html`.

A page needs nothing at view time: styles and the one small filtering script are inline, charts are
inline SVG drawn by matplotlib (charts.py). Product text, tags, attribute and template names and prompts
are untrusted, so every one of them goes through `esc` (html.escape, quotes included) before it
touches the page, and none is ever placed inside the script: the script reads the rows' escaped data
attributes.
"""

from __future__ import annotations

import datetime
import html
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .calibrate import reliability, tag_outcomes
from .charts import attribute_f1_chart, reliability_chart, variant_f1_chart
from .grounding import evidence_spans, merged_spans
from .metrics import attribute_label
from .prompts import first_form
from .records import GoldTag

MAX_CHART_ATTRIBUTES = 40  # the chart shows the attributes with the most support; the table shows all
SEPARATOR = "\x1f"  # between attribute names in a row's data-attrs (never in a name: records are cleaned)

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1280px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #555; font-size: 13px; } .meta code { white-space: pre-wrap; word-break: break-all; }
.tag { display: inline-block; margin: 1px 3px 1px 0; padding: 0 5px; border-radius: 3px; background: #eee; }
.ok { background: #d9f0d3; } .missed { background: #fde0dd; text-decoration: line-through; }
.spurious { background: #fee8c8; } mark { background: #fff3a0; }
.sig { font-weight: bold; } .better { color: #1a7f37; } .worse { color: #c62828; }
pre { white-space: pre-wrap; word-break: break-word; background: #f8f8f8; padding: 6px; max-width: 520px; }
.filters { margin: 8px 0; } .filters select, .filters label { margin-right: 12px; }
.legend span { margin-right: 10px; }
"""

_FILTER_SCRIPT = """
function applyFilters() {
  var attr = document.getElementById("f-attr").value;
  var cmp = document.getElementById("f-cmp").value;
  var only = document.getElementById("f-dis").checked;
  var shown = 0;
  var rows = document.querySelectorAll("#records tbody tr");
  for (var i = 0; i < rows.length; i++) {
    var row = rows[i];
    var ok = !only || row.getAttribute("data-disagree") === "1";
    if (ok && attr) { ok = row.getAttribute("data-attrs").split("\\u001f").indexOf(attr) >= 0; }
    if (ok && cmp) {
      var parts = cmp.split(":");
      ok = row.getAttribute("data-cmp" + parts[0]) === parts[1];
    }
    row.hidden = !ok;
    if (ok) { shown++; }
  }
  document.getElementById("f-count").textContent = String(shown);
}
document.addEventListener("DOMContentLoaded", function () {
  ["f-attr", "f-cmp", "f-dis"].forEach(function (id) {
    document.getElementById(id).addEventListener("change", applyFilters);
  });
  applyFilters();
});
"""


def esc(value: Any) -> str:
    """Any value as inert HTML text (quotes escaped too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def _gold_text(tag: GoldTag) -> str:
    return " / ".join(tag) if isinstance(tag, list) else tag


def page_title(name: str) -> str:
    """A report's name as a page title: a file path becomes its file name, so the title (which browsers
    show in tabs, history and bookmarks) names the data, not a directory of the machine that wrote it."""
    return re.split(r"[\\/]", name.rstrip("\\/"))[-1] or name


def _page(title: str, meta: dict[str, str], body: list[str], script: str = "") -> str:
    meta_rows = "".join(f"<div>{esc(k)}: <code>{esc(v)}</code></div>" for k, v in meta.items() if v)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{esc(title)}</h1>", f'<div class="meta">{meta_rows}</div>', *body]
    if script:
        parts.append(f"<script>{script}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(path: str, page: str) -> None:
    """Write `page` to `path` (folders made), and say where it is."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"llmtags: wrote {out} ({len(page.encode('utf-8')) // 1024} KiB)", file=sys.stderr)


def run_meta(command: str = "", source: str = "") -> dict[str, str]:
    return {"data": source, "command": command,
            "made": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _f(x: float) -> str:
    return f"{x:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = (), attrs: str = "") -> str:
    """A table of already-escaped cells (header cells are escaped here)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{c}</td>' if i < len(numeric) and numeric[i] else f"<td>{c}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def highlighted(text: str, spans: Sequence[tuple[int, int] | None]) -> str:
    """`text`, escaped, with each evidence span in <mark> (overlapping spans merged)."""
    out, at = [], 0
    for start, end in merged_spans(spans):
        out += [esc(text[at:start]), "<mark>", esc(text[start:end]), "</mark>"]
        at = end
    out.append(esc(text[at:]))
    return "".join(out)


def tag_spans(tags: Sequence[str], kind: str) -> str:
    return "".join(f'<span class="tag {kind}">{esc(t)}</span>' for t in tags)


def _gold_cell(gold: Sequence[GoldTag], missed: Sequence[GoldTag]) -> str:
    missed_keys = {_gold_text(m) for m in missed}
    return "".join(f'<span class="tag {"missed" if _gold_text(g) in missed_keys else "ok"}">{esc(_gold_text(g))}</span>'
                   for g in gold)


def _missed_cell(missed: Sequence[GoldTag]) -> str:
    return "".join(f'<span class="tag missed">{esc(_gold_text(m))}</span>' for m in missed)


def _predicted_cell(predicted: Sequence[str], spurious: Sequence[str]) -> str:
    wrong = set(spurious)
    return "".join(f'<span class="tag {"spurious" if p in wrong else "ok"}">{esc(p)}</span>' for p in predicted)


_LEGEND = ('<div class="legend"><span class="tag ok">found</span><span class="tag missed">missed (gold)</span>'
           '<span class="tag spurious">spurious (predicted, not gold)</span><mark>evidence in the text</mark></div>')


# --- the evaluation page ----------------------------------------------------------------------------------


def headline_rows(report: Any) -> list[list[str]]:
    """The headline table: every view and scoring with P/R/F1 and the 95% interval, then the peers scored
    on the same records (`EvalReport.add_peer`: the CRF beside the model)."""
    names = {"typed": "strict (Attribute:value)", "values": "values only", "extractgpt": "ExtractGPT protocol"}
    rows = []
    for r in [*report.summary_rows(), *report.peer_rows()]:
        low, high = r["ci95"]
        rows.append([esc(r["predictions"]), esc(names.get(r["scoring"], r["scoring"])), _f(r["precision"]),
                     _f(r["recall"]), f"<b>{_f(r['f1'])}</b>", f"{_f(low)}–{_f(high)}", _f(r["macro_f1"]),
                     str(r["tp"]), str(r["fp"]), str(r["fn"])])
    return rows


def _attribute_section(report: Any) -> list[str]:
    rows = sorted(report.scores(report.final_view, "typed").per_attribute.items(),
                  key=lambda item: (-item[1].support, item[0]))
    if not rows:
        return []
    shown = rows[:MAX_CHART_ATTRIBUTES]
    # Each peer's F1 per attribute beside the model's (the CRF alone: where the model adds to it, where it loses).
    peers = {name: peer.scores("raw", "typed").per_attribute for name, peer in report.peers.items()}
    first = next(iter(peers.items()), None)  # the chart marks one peer; the table lists them all
    chart = attribute_f1_chart([n for n, _ in shown], [p.f1 for _, p in shown], [p.support for _, p in shown],
                               peer=(first[0], [first[1][n].f1 if n in first[1] else None for n, _ in shown])
                               if first else None)

    def peer_cells(name: str, mine: Any) -> list[str]:
        return [cell for per in peers.values()
                for cell in ((_f(per[name].f1), f"{mine.f1 - per[name].f1:+.3f}") if name in per else ("–", "–"))]

    table = _table(["attribute", "P", "R", "F1", "support", "tp", "fp", "fn",
                    *[h for name in peers for h in (f"F1 of {name}", "Δ")]],
                   [[esc(n), _f(p.precision), _f(p.recall), _f(p.f1), str(p.support), str(p.tp), str(p.fp), str(p.fn),
                     *peer_cells(n, p)] for n, p in rows], numeric=[False] + [True] * (7 + 2 * len(peers)))
    note = f" (the {len(shown)} with the most gold tags)" if len(rows) > len(shown) else ""
    return [f"<h2>F1 per attribute{esc(note)}</h2>", f'<div class="chart" id="chart-attributes">{chart}</div>',
            "<details><summary>table</summary>", table, "</details>"]


def _reliability_section(report: Any, confidences: Sequence[Sequence[float | None]] | None) -> list[str]:
    if not confidences or not any(c is not None for row in confidences for c in row):
        return []
    view = "raw"  # confidences belong to the model's own tags
    outcomes, _ = tag_outcomes(report.golds, report.preds[view], confidences)
    bins, ece = reliability(outcomes)
    return ["<h2>Reliability of the confidences</h2>",
            f'<div class="chart" id="chart-reliability">{reliability_chart(bins, ece)}</div>']


def _worst_section(report: Any, worst: int) -> list[str]:
    rows = []
    for r in report.worst_records(worst):
        text = r["text"] or ""
        spans = evidence_spans(text, r["predicted"]) if text else []
        rows.append([esc(r["id"]), _f(r["f1"]), highlighted(text, spans), _gold_cell(r["gold"], r["missed"]),
                     _predicted_cell(r["predicted"], r["spurious"])])
    return [f"<h2>The {len(rows)} worst records ({esc(report.final_view)} predictions)</h2>", _LEGEND,
            _table(["id", "F1", "text", "gold", "predicted"], rows, numeric=[False, True], attrs=' id="worst"')]


def eval_page(report: Any, *, title: str = "", meta: dict[str, str] | None = None,
              confidences: Sequence[Sequence[float | None]] | None = None, worst: int = 50) -> str:
    """The page of one evaluation: headline P/R/F1 with intervals (strict, and the ExtractGPT protocol
    where scored), F1 per attribute, the reliability diagram where `confidences` (parallel to the raw
    predictions) exist, and the `worst` records."""
    body = [f"<p>{len(report.golds)} records; 95% intervals: percentile bootstrap over records "
            f"({report.n_boot} resamples).</p>",
            _table(["predictions", "scoring", "P", "R", "F1", "95% CI", "macro F1", "tp", "fp", "fn"],
                   headline_rows(report), numeric=[False, False] + [True] * 8, attrs=' id="headline"')]
    if report.candidate_recall is not None:
        body.append(f"<p>Candidate recall: {_f(report.candidate_recall)} of gold tags were offered.</p>")
    body += _attribute_section(report) + _reliability_section(report, confidences) + _worst_section(report, worst)
    return _page(title or page_title(report.name or "") or "llmtags eval", meta or {}, body)


# --- the comparison page ----------------------------------------------------------------------------------


def _variant_rows(comparison: Any) -> list[list[str]]:
    paired = {p["b"]: p for p in comparison.paired}
    rows = []
    for i, v in enumerate(comparison.variants):
        row, (low, high) = v.row(), v.intervals["f1"]
        p = paired.get(v.name) if i else None
        delta = "first"
        if p is not None:
            mark = "better" if p["delta_f1"] > 0 else "worse"
            delta = (f'<span class="{mark if p["significant"] else ""}{" sig" if p["significant"] else ""}">'
                     f'{p["delta_f1"]:+.3f} [{p["ci95"][0]:+.3f}, {p["ci95"][1]:+.3f}], p = {p["p_value"]:.3f}'
                     f'{" (significant)" if p["significant"] else ""}</span>')
        rows.append([esc(v.name), esc(v.template_sha256[:12]), f"<b>{_f(row['f1'])}</b> [{_f(low)}, {_f(high)}]",
                     _f(row["precision"]), _f(row["recall"]), delta, f"{v.prompt_tokens:.0f}", f"{v.new_tokens:.1f}",
                     f"{v.seconds_per_product:.2f}"])
    peer = comparison.peer
    if peer:  # the CRF peer on the same records; ΔF1 is the first variant's against it
        d = peer["first_vs_peer"]
        rows.append([esc(peer["name"]), "–", f"<b>{_f(peer['f1'])}</b> [{_f(peer['ci95']['f1'][0])}, "
                     f"{_f(peer['ci95']['f1'][1])}]", _f(peer["precision"]), _f(peer["recall"]),
                     f"{esc(comparison.variants[0].name)} − peer: {d['delta_f1']:+.3f} [{d['ci95'][0]:+.3f}, "
                     f"{d['ci95'][1]:+.3f}]", "–", "–", "–"])
    return rows


def _record_attributes(gold: Sequence[GoldTag], predictions: Sequence[Sequence[str]]) -> list[str]:
    tags = [first_form(g) for g in gold] + [t for p in predictions for t in p]
    return sorted({attribute_label(t) for t in tags})


def _record_rows(comparison: Any, records: Sequence[Any], prompts: Sequence[Sequence[str]]) -> tuple[list[str], set[str]]:
    variants = comparison.variants
    counts = [v.report.views[v.report.final_view]["typed"].counts for v in variants]
    rows, attributes = [], set()
    for i, record in enumerate(records):
        predictions = [v.report.preds[v.report.final_view][i] for v in variants]
        names = _record_attributes(record.tags or [], predictions)
        attributes.update(names)
        disagree = len({tuple(sorted(p)) for p in predictions}) > 1
        data = [f'data-disagree="{int(disagree)}"', f'data-attrs="{esc(SEPARATOR.join(names))}"']
        for j in range(1, len(variants)):
            f1, first = counts[j][i].f1, counts[0][i].f1
            data.append(f'data-cmp{j}="{"better" if f1 > first else "worse" if f1 < first else "same"}"')
        cells = [f"<td>{esc(record.id)}</td><td>{esc(record.text)}</td>",
                 f"<td>{tag_spans([_gold_text(g) for g in record.tags or []], '')}</td>"]
        for j, v in enumerate(variants):
            c = counts[j][i]
            prompt = prompts[j][i] if j < len(prompts) and i < len(prompts[j]) else ""
            cells.append(f"<td>F1 {_f(c.f1)}<br>{_predicted_cell(predictions[j], c.spurious)}"
                         f"<br>missed: {_missed_cell(c.missed) or '–'}"
                         f"<details><summary>prompt</summary><pre>{esc(prompt)}</pre></details></td>")
        rows.append(f"<tr {' '.join(data)}>{''.join(cells)}</tr>")
    return rows, attributes


def compare_page(comparison: Any, records: Sequence[Any], prompts: Sequence[Sequence[str]] = (), *,
                 title: str = "llmtags prompt compare", meta: dict[str, str] | None = None) -> str:
    """The page of one comparison: per variant F1 with intervals and the paired-bootstrap ΔF1 against the
    first, tokens and seconds per product, and every record side by side (`prompts[variant][record]` the
    rendered prompts), filterable by attribute, by disagreement and by better / worse than the first."""
    variants = comparison.variants
    significant = [None] + [p["significant"] for p in comparison.paired]
    chart = variant_f1_chart([v.name for v in variants], [v.row()["f1"] for v in variants],
                             [v.intervals["f1"][0] for v in variants], [v.intervals["f1"][1] for v in variants],
                             significant)
    rows, attributes = _record_rows(comparison, records, prompts)
    cmp_options = ['<option value="">any</option>'] + [
        f'<option value="{j}:{kind}">{esc(v.name)} {kind} than {esc(variants[0].name)}</option>'
        for j, v in enumerate(variants) if j for kind in ("better", "worse")]
    filters = ('<div class="filters"><label>attribute <select id="f-attr"><option value="">any</option>'
               + "".join(f'<option value="{esc(a)}">{esc(a)}</option>' for a in sorted(attributes))
               + '</select></label><label>record F1 <select id="f-cmp">' + "".join(cmp_options) + "</select></label>"
               '<label><input type="checkbox" id="f-dis" checked> only records where the variants disagree</label>'
               f'<span><span id="f-count">{len(comparison.disagreements)}</span> of {len(records)} records shown'
               "</span></div>")
    header = "".join(f"<th>{esc(h)}</th>" for h in ["id", "text", "gold", *[v.name for v in variants]])
    body = [f"<p>{len(records)} labelled records, {len(comparison.disagreements)} where the variants disagree. "
            "ΔF1: paired bootstrap over records against the first variant.</p>",
            _table(["variant", "sha256", "F1 [95% CI]", "P", "R", "ΔF1 vs first [95% CI]", "prompt tokens",
                    "new tokens", "s/product"], _variant_rows(comparison),
                   numeric=[False, False, False, True, True, False, True, True, True], attrs=' id="variants"'),
            f'<div class="chart" id="chart-variants">{chart}</div>',
            "<h2>Records</h2>", _LEGEND, filters,
            f'<table id="records"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>']
    return _page(title, meta or {}, body, script=_FILTER_SCRIPT)

"""Charts for the HTML reports (pages.py), drawn by matplotlib as inline SVG.

Every label can come from data (attribute names, template names), so:
- text is written as SVG `<text>` elements (`svg.fonttype` "none"), which matplotlib XML-escapes, so a
  label is characters, never markup. The browser draws them with its own fonts: Chinese attribute
  names read right on any machine with a CJK font, whatever fonts the machine that wrote the page had;
- mathtext is off for every label, so a `$` in an attribute name is a dollar sign, not a formula;
- the SVG carries no date or other metadata, so the same run draws the same bytes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

from .calibrate import ReliabilityBin

_BAR = "#4c78a8"
_GOOD = "#54a24b"
_BAD = "#e45756"


# Named in the SVG as the font family the browser should try, in order (it falls back to its own sans-serif);
# matplotlib uses them only to lay out the text (a missing CJK font there can only misjudge widths).
FONTS = ["DejaVu Sans", "WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC",
         "Microsoft YaHei", "PingFang SC", "SimHei"]


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported here: only reports need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.family": "sans-serif", "font.sans-serif": FONTS})
    # A missing glyph is drawn as a box (see FONTS); one warning per glyph would flood the terminal.
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"findfont: Font family .* not found", category=UserWarning)
    return plt


def _svg(fig: Any) -> str:
    """The figure as an SVG element (without the XML prologue), and the figure closed."""
    plt = _pyplot()
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "llmtags"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _no_math(ax: Any) -> None:
    for label in [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title, ax.xaxis.label, ax.yaxis.label]:
        label.set_parse_math(False)


def attribute_f1_chart(names: Sequence[str], f1s: Sequence[float], supports: Sequence[int],
                       peer: tuple[str, Sequence[float | None]] | None = None) -> str:
    """Horizontal bars of F1 per attribute, each labelled with its support (gold tags); `peer` (a name and
    its F1 per attribute, None where it has none) is drawn as a marker on each bar."""
    height = max(1.6, 0.32 * len(names) + 0.8)
    fig, ax = _pyplot().subplots(figsize=(7.5, height))
    positions = range(len(names))
    ax.barh(list(positions), list(f1s), color=_BAR, label="this run" if peer else None)
    if peer:
        marked = [(y, f1) for y, f1 in zip(positions, peer[1]) if f1 is not None]
        ax.plot([f1 for _, f1 in marked], [y for y, _ in marked], linestyle="none", marker="|", markersize=14,
                markeredgewidth=2.5, color="black", label=peer[0])
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(list(positions), labels=[f"{n} ({s})" for n, s in zip(names, supports)])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (support: gold tags)")
    for y, f1 in zip(positions, f1s):
        ax.text(min(f1 + 0.01, 0.93), y, f"{f1:.2f}", va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _no_math(ax)
    return _svg(fig)


def reliability_chart(bins: Sequence[ReliabilityBin], ece: float) -> str:
    """Accuracy against mean confidence per bin, beside the diagonal of perfect calibration."""
    fig, ax = _pyplot().subplots(figsize=(4.8, 4.2))
    used = [b for b in bins if b.count]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    ax.bar([(b.low + b.high) / 2 for b in used], [b.accuracy for b in used], width=[b.high - b.low for b in used],
           color=_BAR, alpha=0.75, edgecolor="white", label="share correct")
    ax.plot([b.mean_confidence for b in used], [b.accuracy for b in used], marker="o", color="black", linewidth=1,
            label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("share of tags correct")
    ax.set_title(f"ECE {ece:.3f}, {sum(b.count for b in used)} tags")
    ax.legend(loc="upper left", fontsize=8)
    _no_math(ax)
    return _svg(fig)


def variant_f1_chart(names: Sequence[str], f1s: Sequence[float], lows: Sequence[float], highs: Sequence[float],
                     significant: Sequence[bool | None]) -> str:
    """F1 per variant with its 95% interval; a variant significantly better (worse) than the first is
    green (red)."""
    fig, ax = _pyplot().subplots(figsize=(7.5, max(1.6, 0.45 * len(names) + 0.8)))
    positions = list(range(len(names)))
    errors = [[f - lo for f, lo in zip(f1s, lows)], [hi - f for f, hi in zip(f1s, highs)]]
    colours = [_BAR if s is None or not s else (_GOOD if f >= f1s[0] else _BAD) for f, s in zip(f1s, significant)]
    ax.barh(positions, list(f1s), xerr=errors, color=colours, capsize=4)
    ax.set_yticks(positions, labels=list(names))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("typed micro F1, 95% interval")
    ax.grid(axis="x", alpha=0.3)
    _no_math(ax)
    return _svg(fig)

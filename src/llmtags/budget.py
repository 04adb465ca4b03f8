"""Stage 2d: the prompt budget for long texts (title + description).

A product with a description costs prompt tokens three times over: its own text and each retrieved
neighbour's. Two cuts keep prompts short without hiding what the tags are made of:
- `demo_text`: a neighbour shown by its title (its first line) only, with all its tags, so the model
  still sees the catalogue's attribute names and value style (`--demo-text title`);
- `windowed`: a long text reduced to its title plus the windows around the spans the proposer and the
  vocabulary found in it, so the words around every proposed value stay in view (`--text-budget N`).
eval/long_text.py measures F1 and products/s of each on en-wdc-pave.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

DEMO_VIEWS = ("full", "title")
GAP = " … "  # where `windowed` left text out


def title_of(text: str) -> str:
    """The first line of a product text: its title, as records join title and description."""
    return text.split("\n", 1)[0]


def demo_text(text: str, view: str, max_chars: int) -> str:
    """A neighbour's text as its demonstration shows it: whole ("full") or its title ("title"), cut to
    `max_chars`."""
    if view not in DEMO_VIEWS:
        raise ValueError(f"demo text view {view!r}: expected one of {', '.join(DEMO_VIEWS)}")
    return (title_of(text) if view == "title" else text)[:max_chars]


def value_spans(text: str, values: Iterable[str]) -> list[tuple[int, int]]:
    """The [start, end) of the first occurrence of each value in `text` (case-insensitive); values not
    in it are left out."""
    folded = text.casefold()
    spans = []
    for value in values:
        at = folded.find(value.casefold()) if value else -1
        if at >= 0:
            spans.append((at, at + len(value)))
    return spans


def windowed(text: str, spans: Sequence[tuple[int, int]], budget: int, width: int = 60) -> str:
    """`text` within about `budget` characters: unchanged when it fits; else its title, then the
    description's windows of `width` characters either side of each span (merged where they touch), in
    text order, joined by `GAP`, until the budget is spent. Without spans, the head of the text."""
    if len(text) <= budget:
        return text
    title = title_of(text)
    body_start = len(title) + 1
    windows: list[list[int]] = []
    for start, end in sorted(s for s in spans if s[1] > body_start):
        low, high = max(body_start, start - width), min(len(text), end + width)
        if windows and low <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], high)
        else:
            windows.append([low, high])
    pieces = [title]
    spent = len(title)
    for low, high in windows:
        if spent + len(GAP) >= budget:
            break
        piece = text[low:min(high, low + budget - spent - len(GAP))]
        pieces.append(" ".join(piece.split()))
        spent += len(GAP) + len(piece)
    if len(pieces) == 1:  # nothing found in the description: its head, as a plain cut would keep
        return text[:budget]
    return f"{title}\n{GAP.join(pieces[1:])}"

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

from collections.abc import Sequence

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


def windowed(text: str, spans: Sequence[tuple[int, int]], budget: int, width: int = 60) -> str:
    """`text` within about `budget` characters: unchanged when it fits; else its title, then the
    description's windows of `width` characters either side of each span (merged where they touch), in
    text order, joined by `GAP`, until the budget is spent; the last window shrinks around its first span,
    and one that cannot hold it is left out. Without spans in the description, the head of the text."""
    if len(text) <= budget:
        return text
    title = title_of(text)
    body_start = len(title) + 1
    windows: list[list[int]] = []  # [low, high, start and end of its first span]
    for start, end in sorted(s for s in spans if s[0] >= body_start):
        low, high = max(body_start, start - width), min(len(text), end + width)
        if windows and low <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], high)
        else:
            windows.append([low, high, start, end])
    pieces = []
    spent = len(title)
    for low, high, start, end in windows:
        room = budget - spent - len(GAP)
        if high - low > room:  # the last window that fits: its first span, with what context is left
            if end - start > room:
                break
            low = max(low, start - (room - (end - start)) // 2)
            high = low + room
        pieces.append(" ".join(text[low:high].split()))
        spent += len(GAP) + high - low
    if not pieces:  # nothing found in the description: its head, as a plain cut would keep
        return text[:budget]
    return f"{title}\n{GAP.join(pieces)}"

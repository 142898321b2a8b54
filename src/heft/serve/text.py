"""The text a request's events may carry: where a stop string cuts the generated text, and how much of the text
decoded so far is safe to send (no half UTF-8 character, no tail that could still become a stop string).

The engine decodes a request's whole output after every token and sends only the new, safe part; these two
functions decide where that part ends.
"""

from __future__ import annotations

__all__ = ["first_stop", "safe_end"]


def first_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the earliest stop string starts in `text` (searched from what can still be unsent), or None."""
    found = [i for s in stops if (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(found) if found else None


def safe_end(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent now: not an unfinished UTF-8 character (decoded as U+FFFD at the end), and
    not a tail that could still grow into a stop string."""
    base = len(text)
    while base > 0 and text[base - 1] == "\ufffd":
        base -= 1
    end = base
    for s in stops:
        n = next((n for n in range(min(len(s) - 1, base), 0, -1) if text.endswith(s[:n], 0, base)), 0)
        end = min(end, base - n)  # hold back the longest tail that starts `s`
    return end

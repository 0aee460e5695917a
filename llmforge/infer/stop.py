"""Stop strings over streamed text: release text only when no stop string can still match it.

A stop string may span tokens (``"###"`` from ``"#"``, ``"#"``, ``"#"``), so text that ends with a proper
prefix of any stop string is held back until the next tokens settle it. The first (leftmost) occurrence of any
stop string ends the request; the text before it is the completion (plus the stop string itself with
``include_stop_str_in_output``). Text before the held-back suffix can never become part of a match — a match
starting earlier would make a longer suffix a stop prefix — so only the held text is searched.
"""

from __future__ import annotations


class StopStringMatcher:
    """Filters a request's text deltas; ``feed`` returns (text to release, matched)."""

    def __init__(self, stops: list[str], *, include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        if self.matched is not None:
            return "", True
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        if best is not None:
            i, s = best
            self.matched, self.held = s, ""
            return buf[: i + len(s) if self.include_stop else i], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held text, released when the request ends for another reason (it was not a stop)."""
        out, self.held = self.held, ""
        return out

"""The filter hook: every prompt passes through it before the engine, every output chunk after it.

The gateway calls exactly two things, for both engines and both endpoints:

* ``await chain.check_input(ctx, texts)`` with the request's texts (each chat message's content, or each
  completion prompt) before anything is tokenized; it returns the texts to use (a filter may redact) or raises
  ``ContentFiltered`` (a 400 with ``code: "content_filter"``; nothing reaches the engine).
* ``chain.output(ctx, index)`` once per choice, giving an ``OutputFilter`` that sees the choice's text as the
  engine releases it: ``await push(text)`` returns the text that may go to the client now (a filter may hold
  some back, e.g. the start of a phrase it may yet block), and ``await finish()`` the rest once the engine is
  done. A ``FilterVerdict`` with ``blocked=True`` ends the choice with ``finish_reason: "content_filter"``.

``FilterChain(filters)`` runs ``Filter`` objects (``llmforge.serve.safety`` builds them from ``serve.safety``;
``FilterChain()`` is the identity). Each filter has a direction (input / output / both), an action (block /
redact / flag) and a failure policy. Two kinds:

* **span filters** (blocklist, PII) find spans in a text. On outputs they run on the text as it streams: the
  chain releases text only up to the point where every span filter says nothing later can change its verdict
  (``Filter.hold``: where a match may still begin, e.g. the unfinished last word), and never cuts through a
  match, so a blocked phrase or a PII value split across chunks, even one character per chunk, never reaches
  the client. Every span filter sees the raw answer; overlapping matches go to the earlier filter in the chain.
* **text filters** (classifier, custom callables) judge a whole text and may rewrite it. On outputs they see
  the whole answer (after the span filters' redactions) once the engine is done, so a chain with one holds
  the answer back until then.

Inputs go through every input filter in order, each seeing the previous one's result. A filter that raises or
exceeds its ``timeout_s`` fails closed (its text is blocked) unless its ``on_error`` is ``fail_open``. Every
decision but ``allow`` is logged (the raw text only when ``log_text`` asks) and counted in ``/metrics``
(``llmforge_filter_decisions_total{filter,direction,action}``, failures in
``llmforge_filter_failures_total{filter,direction,reason}``). ``n > 1`` choices each get their own
``OutputFilter``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import console

log = console.get_logger("llmforge.serve.safety")

ACTIONS = ("block", "redact", "flag")
# characters of already-released text a span filter sees again on the next release: the left context its
# detectors look at (word boundaries, `Tel:` / `SSN` labels before a number)
CONTEXT_CHARS = 64


class ContentFiltered(Exception):
    """A prompt a filter blocked: the gateway answers 400 ``content_filter`` and never calls the engine."""

    def __init__(self, message: str, filter_name: str = ""):
        super().__init__(message)
        self.message = message
        self.filter_name = filter_name


@dataclass
class RequestContext:
    """What a filter may know about the request it judges."""

    request_id: str
    endpoint: str  # "chat" | "completions"
    model: str
    user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    direction: str = ""  # "input" | "output", set for each filter call
    index: int | None = None  # the choice an output belongs to; the message / prompt index for inputs


@dataclass
class FilterVerdict:
    text: str  # what may be released to the client now
    blocked: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class Decision:
    """What a filter (or a custom callable) decides about one text."""

    action: str = "allow"  # allow | redact | block | flag
    text: str | None = None  # the new text of a redaction
    reason: str | None = None

    def __post_init__(self):
        if self.action not in ("allow", *ACTIONS):
            raise ValueError(f"unknown filter decision {self.action!r}")
        if self.action == "redact" and not isinstance(self.text, str):
            raise ValueError("a redact decision needs the new text")


@dataclass(frozen=True)
class Hit:
    """A span a span filter matched in a text: ``text[start:end]``, shown as ``replacement`` when redacted."""

    start: int
    end: int
    replacement: str
    label: str  # what matched, for logs (a PII kind, "blocked word"); never the matched text
    final: bool = False  # no later text can change this match (so a streamed answer is blocked at once)


class Filter:
    """One filter of the chain. Span filters implement ``find`` and ``hold``; text filters ``check``."""

    name: str = "filter"
    direction: str = "both"
    action: str = "block"
    on_error: str = "fail_closed"
    timeout_s: float = 5.0
    span = False

    def applies(self, direction: str) -> bool:
        return self.direction in ("both", direction)

    # span filters
    def find(self, text: str) -> list[Hit]:
        raise NotImplementedError

    def hold(self, text: str) -> int:
        """Index of ``text`` from which a streamed text must be held back: a match may still begin there."""
        raise NotImplementedError

    # text filters
    async def check(self, text: str, ctx: RequestContext) -> Decision:
        hits = self.find(text)
        if not hits:
            return Decision()
        labels = ", ".join(sorted({h.label for h in hits}))
        if self.action == "redact":
            return Decision("redact", apply_hits(text, hits), labels)
        return Decision(self.action, reason=labels)

    async def aclose(self) -> None:
        return None


def apply_hits(text: str, hits: list[Hit]) -> str:
    """``text`` with each (non-overlapping) hit replaced."""
    parts, pos = [], 0
    for h in sorted(hits, key=lambda h: h.start):
        if h.start < pos:
            continue
        parts += [text[pos : h.start], h.replacement]
        pos = h.end
    parts.append(text[pos:])
    return "".join(parts)


class _Failed(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


class OutputFilter:
    """One choice's output filter state. The identity releases everything at once."""

    async def push(self, text: str) -> FilterVerdict:
        return FilterVerdict(text)

    async def finish(self) -> FilterVerdict:
        return FilterVerdict("")


class FilterChain:
    """An ordered chain of filters; ``FilterChain()`` is the identity."""

    def __init__(self, filters: list[Any] | None = None, *, log_text: bool = False):
        self.filters = list(filters or [])
        self.log_text = log_text
        self.metrics: Any = None  # GatewayMetrics, bound by the gateway

    @property
    def active(self) -> bool:
        return bool(self.filters)

    @property
    def filters_output(self) -> bool:
        """Whether any filter judges outputs (then raw tokens, e.g. in logprobs, must not be returned)."""
        return bool(self._of("output"))

    def bind(self, metrics: Any) -> None:
        """Count decisions in ``metrics`` (the gateway's ``GatewayMetrics``)."""
        self.metrics = metrics

    def _of(self, direction: str) -> list[Filter]:
        return [f for f in self.filters if isinstance(f, Filter) and f.applies(direction)]

    async def aclose(self) -> None:
        for f in self.filters:
            if isinstance(f, Filter):
                await f.aclose()

    # ---------------------------------------------------------------------------------------- input

    async def check_input(self, ctx: RequestContext, texts: list[str]) -> list[str]:
        filters = self._of("input")
        if not filters:
            return texts
        out = []
        for i, text in enumerate(texts):
            fctx = dataclasses.replace(ctx, direction="input", index=i)
            for f in filters:
                d = await self.run(f, text, fctx)
                if d.action == "block":
                    raise ContentFiltered(
                        f"The prompt was blocked by the safety filter '{f.name}'"
                        + (f" ({d.reason})." if d.reason else "."),
                        f.name,
                    )
                if d.action == "redact" and d.text is not None:
                    text = d.text
            out.append(text)
        return out

    # ---------------------------------------------------------------------------------------- output

    def output(self, ctx: RequestContext, index: int) -> OutputFilter:
        filters = self._of("output")
        if not filters:
            return OutputFilter()
        return _ChainOutput(self, dataclasses.replace(ctx, direction="output", index=index), filters)

    # ---------------------------------------------------------------------------------------- running

    async def run(self, f: Filter, text: str, ctx: RequestContext) -> Decision:
        """``f``'s decision on ``text``, its failure turned into block (fail closed) or allow (fail open);
        recorded."""
        try:
            try:
                if f.span:
                    d = await f.check(text, ctx)  # in-process regexes: fast, nothing to time out
                else:
                    d = await asyncio.wait_for(f.check(text, ctx), f.timeout_s)
            except TimeoutError:
                raise _Failed("timeout", f"no decision within {f.timeout_s:g}s") from None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                raise _Failed("error", f"{type(e).__name__}: {e}") from None
            if not isinstance(d, Decision):
                raise _Failed("error", f"returned {type(d).__name__}, not a Decision")
        except _Failed as e:
            return self.failed(f, ctx, e.reason, e.detail)
        self.record(f, ctx, d, text)
        return d

    def failed(self, f: Filter, ctx: RequestContext, reason: str, detail: str) -> Decision:
        closed = f.on_error != "fail_open"
        log.warning(
            "safety filter %s failed on %s of request %s (%s: %s); %s",
            f.name, ctx.direction, ctx.request_id, reason, detail,
            "blocked (fail_closed)" if closed else "let through (fail_open)",
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.filter_failures.labels(f.name, ctx.direction, reason).inc()
        if not closed:
            return Decision()
        d = Decision("block", reason=f"filter {reason}, failing closed")
        self.record(f, ctx, d, None)
        return d

    def record(self, f: Filter, ctx: RequestContext, d: Decision, text: str | None) -> None:
        if d.action == "allow":
            return
        if self.metrics is not None:
            self.metrics.filter_decisions.labels(f.name, ctx.direction, d.action).inc()
        shown = ""
        if self.log_text and text is not None:
            shown = f": {text!r}" + (f" -> {d.text!r}" if d.action == "redact" else "")
        log.info(
            "safety filter %s: %s %s of request %s (%s, choice/message %s)%s",
            f.name, d.action, ctx.direction, ctx.request_id, d.reason or "-", ctx.index, shown,
        )  # fmt: skip


class _ChainOutput(OutputFilter):
    """One choice's output through the chain: span filters while streaming, text filters at the end."""

    def __init__(self, chain: FilterChain, ctx: RequestContext, filters: list[Filter]):
        self.chain = chain
        self.ctx = ctx
        self.spans = [f for f in filters if f.span]
        self.whole = [f for f in filters if not f.span]
        self.raw = ""  # everything the engine produced
        self.sent = 0  # raw text released (or dropped as redacted) so far
        self.recorded: set[tuple[str, str]] = set()  # (filter, action) counted once per choice
        self.blocked: FilterVerdict | None = None

    async def push(self, text: str) -> FilterVerdict:
        if self.blocked is not None:
            return self.blocked
        self.raw += text
        if self.whole:
            return FilterVerdict("")  # a text filter judges the whole answer: hold it all
        return self._release(final=False)

    async def finish(self) -> FilterVerdict:
        if self.blocked is not None:
            return self.blocked
        v = self._release(final=True)
        if v.blocked or not self.whole:
            return v
        text = v.text
        for f in self.whole:
            d = await self.chain.run(f, text, self.ctx)
            if d.action == "block":
                return self._block(f, d.reason, record=False)
            if d.action == "redact" and d.text is not None:
                text = d.text
        return FilterVerdict(text)

    def _block(self, f: Filter, reason: str | None, record: bool = True) -> FilterVerdict:
        if record:
            self._record(f, Decision("block", reason=reason))
        self.blocked = FilterVerdict("", True, f"blocked by the safety filter '{f.name}'")
        return self.blocked

    def _record(self, f: Filter, d: Decision) -> None:
        key = (f.name, d.action)
        if key in self.recorded:
            return
        self.recorded.add(key)
        self.chain.record(f, self.ctx, d, None)

    def _release(self, final: bool) -> FilterVerdict:
        raw = self.raw
        lo = max(0, self.sent - CONTEXT_CHARS)
        seg = raw[lo:]
        cut = len(raw)
        hits: list[tuple[int, Hit, Filter]] = []
        for order, f in enumerate(self.spans):
            try:
                found = f.find(seg)
                if not final:
                    cut = min(cut, lo + f.hold(seg))
            except Exception as e:  # a span filter that raises: its failure policy decides
                d = self.chain.failed(f, self.ctx, "error", f"{type(e).__name__}: {e}")
                if d.action == "block":
                    return self._block(f, d.reason, record=False)
                continue
            for h in found:
                if lo + h.end <= self.sent or (h.start == 0 and lo > 0):
                    continue  # seen already (or cut off at the context's edge)
                hit = Hit(lo + h.start, lo + h.end, h.replacement, h.label, h.final)
                if f.action == "block" and h.final:
                    return self._block(f, h.label)  # final already: end the answer now, not a window later
                hits.append((order, hit, f))
        # never cut through a match: move the cut back to the start of any match it would split
        moved = True
        while moved:
            moved = False
            for _, h, _ in hits:
                if h.start < cut < h.end:
                    cut, moved = h.start, True
        if cut <= self.sent:
            return FilterVerdict("")
        # matches now released; overlaps go to the earlier filter, then the earlier match
        taken: list[tuple[Hit, Filter]] = []
        for _, h, f in sorted(hits, key=lambda x: (x[0], x[1].start)):
            if h.end > cut or any(h.start < t.end and t.start < h.end for t, _ in taken):
                continue
            taken.append((h, f))
        for h, f in sorted(taken, key=lambda x: x[0].start):
            if f.action == "block":
                return self._block(f, h.label)
        parts, pos = [], self.sent
        for h, f in sorted(taken, key=lambda x: x[0].start):
            self._record(f, Decision(f.action, text=h.replacement, reason=h.label))
            if f.action == "redact":
                parts += [raw[max(pos, self.sent) : h.start] if h.start > pos else "", h.replacement]
                pos = h.end
        parts.append(raw[pos:cut])
        self.sent = cut
        return FilterVerdict("".join(parts))

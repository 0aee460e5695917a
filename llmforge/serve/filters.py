"""The filter hook: every prompt passes through it before the engine, every output chunk after it.

The gateway calls exactly two things, for both engines and both endpoints:

* ``await chain.check_input(ctx, texts)`` with the request's texts (each chat message's content, or each
  completion prompt) before anything is tokenized; it returns the texts to use (a filter may redact) or raises
  ``ContentFiltered`` (a 400 with ``code: "content_filter"``; nothing reaches the engine).
* ``chain.output(ctx, index)`` once per choice, giving an ``OutputFilter`` that sees the choice's text as the
  engine releases it: ``await push(text)`` returns the text that may go to the client now (a filter may hold
  some back, e.g. the start of a phrase it may yet block), and ``await finish()`` the rest once the engine is
  done. A ``FilterVerdict`` with ``blocked=True`` ends the choice with ``finish_reason: "content_filter"``.

Today the chain is the identity (``FilterChain()`` has no filters); the safety issue adds blocklist, PII,
classifier and custom filters behind these same calls, so no route changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass
class FilterVerdict:
    text: str  # what may be released to the client now
    blocked: bool = False
    reason: str | None = None


class OutputFilter:
    """One choice's output filter state. The identity releases everything at once."""

    async def push(self, text: str) -> FilterVerdict:
        return FilterVerdict(text)

    async def finish(self) -> FilterVerdict:
        return FilterVerdict("")


class FilterChain:
    """An ordered chain of filters; empty (the identity) until the safety issue fills it in."""

    def __init__(self, filters: list[Any] | None = None):
        self.filters = list(filters or [])

    @property
    def active(self) -> bool:
        return bool(self.filters)

    async def check_input(self, ctx: RequestContext, texts: list[str]) -> list[str]:
        return texts

    def output(self, ctx: RequestContext, index: int) -> OutputFilter:
        return OutputFilter()

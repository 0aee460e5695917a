"""The gateway's safety filters: built from ``serve.safety`` into the ``filters.FilterChain`` the gateway runs.

* ``build_chain(section.safety)`` — the chain (``FilterChain()``, the identity, when no filter is configured);
* ``allow()`` / ``redact(text)`` / ``block(reason)`` / ``flag(reason)`` — what a custom filter returns;
* ``builtin`` — blocklist, PII, classifier and custom filters; ``normalize`` — the evasion-aware text folding;
* ``redteam`` — the labelled red-team set and the recall / false-positive report per filter.

Semantics (streaming hold-back, failure policy, metrics) are documented in ``llmforge.serve.filters`` and
docs/safety.md.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..filters import Decision, FilterChain, RequestContext
from .builtin import build_filters


def allow() -> Decision:
    return Decision("allow")


def redact(text: str, reason: str | None = None) -> Decision:
    """Use ``text`` instead (the client and the logs see it)."""
    return Decision("redact", text=text, reason=reason)


def block(reason: str | None = None) -> Decision:
    """Refuse the prompt (400 ``content_filter``) or end the answer (``finish_reason: content_filter``)."""
    return Decision("block", reason=reason)


def flag(reason: str | None = None) -> Decision:
    """Let the text through, but log and count it."""
    return Decision("flag", reason=reason)


def build_chain(safety, env: Mapping[str, str] | None = None) -> FilterChain:
    """The chain of a ``SafetyConfig`` (``serve.safety``)."""
    return FilterChain(build_filters(list(safety.filters), env), log_text=safety.log_text)


__all__ = ["Decision", "FilterChain", "RequestContext", "allow", "block", "build_chain", "flag", "redact"]

"""The red-team set of the safety filters and its report: recall on what must be caught, false positives on
benign text, per filter.

``redteam.json`` (written by ``scripts/make_redteam.py``) holds labelled prompts and answers: each names the
filters that must catch it (``catch``; empty for benign text). ``evaluate(filters)`` runs every item through a
chain holding only that filter — prompts through ``check_input``, answers through the streaming output path
(three characters per chunk) — and counts, per filter, the must-catch items it acted on (any action) and the
benign ones it acted on.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..filters import ContentFiltered, FilterChain, RequestContext
from .builtin import build_filters

# the chain the set is labelled for (also the tiny template's): a blocklist of five phrases and every PII kind
REDTEAM_FILTERS: list[dict[str, Any]] = [
    {
        "type": "blocklist",
        "words": ["pipe bomb", "nerve agent", "ransomware payload", "credit card dump", "kill yourself"],
        "action": "block",
    },
    {"type": "pii", "action": "redact"},
]


def load_set() -> list[dict[str, Any]]:
    return json.loads(resources.files(__package__).joinpath("redteam.json").read_text(encoding="utf-8"))


@dataclass
class FilterReport:
    name: str
    must_catch: int = 0
    caught: int = 0
    benign: int = 0
    false_positives: int = 0
    missed: list[int] = field(default_factory=list)  # item ids
    flagged_benign: list[int] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.caught / self.must_catch if self.must_catch else 1.0

    @property
    def false_positive_rate(self) -> float:
        return self.false_positives / self.benign if self.benign else 0.0


async def _acted(chain: FilterChain, item: dict[str, Any]) -> bool:
    ctx = RequestContext(request_id=f"redteam-{item['id']}", endpoint="chat", model="redteam")
    text = item["text"]
    if item["direction"] == "input":
        try:
            return (await chain.check_input(ctx, [text])) != [text]
        except ContentFiltered:
            return True
    out = chain.output(ctx, 0)
    released = []
    for i in range(0, len(text), 3):
        v = await out.push(text[i : i + 3])
        if v.blocked:
            return True
        released.append(v.text)
    v = await out.finish()
    return v.blocked or "".join(released) + v.text != text


def evaluate(filters: list[dict[str, Any]] | None = None, items: list[dict[str, Any]] | None = None):
    """``{filter name: FilterReport}`` for each filter of ``filters`` (default ``REDTEAM_FILTERS``); an item
    counts for a filter when its ``catch`` names the filter's type."""
    from ...manifest.serve import SafetyConfig

    cfg = SafetyConfig.model_validate({"filters": filters if filters is not None else REDTEAM_FILTERS})
    items = load_set() if items is None else items
    reports: dict[str, FilterReport] = {}

    async def run() -> None:
        for spec, f in zip(cfg.filters, build_filters(list(cfg.filters)), strict=True):
            chain = FilterChain([f])
            rep = reports.setdefault(f.name, FilterReport(f.name))
            for item in items:
                must = spec.type in item["catch"]
                benign = not item["catch"]
                if not must and not benign:
                    continue  # another filter's target: not this one's to catch, nor a false positive
                acted = await _acted(chain, item)
                if must:
                    rep.must_catch += 1
                    rep.caught += acted
                    if not acted:
                        rep.missed.append(item["id"])
                else:
                    rep.benign += 1
                    rep.false_positives += acted
                    if acted:
                        rep.flagged_benign.append(item["id"])

    asyncio.run(run())
    return reports


def report_lines(reports: dict[str, FilterReport]) -> list[str]:
    return [
        f"{k}: recall {r.recall:.1%} ({r.caught}/{r.must_catch}), false positives {r.false_positive_rate:.1%} "
        f"({r.false_positives}/{r.benign})"
        for k, r in reports.items()
    ]

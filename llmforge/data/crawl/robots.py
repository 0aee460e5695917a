"""robots.txt (RFC 9309) with the longest-match rule that site owners write their files for.

Why not ``urllib.robotparser``: it applies the *first* rule that matches, in file order, and does not
understand ``*`` / ``$`` wildcards. A file such as::

    User-agent: *
    Disallow: /private/
    Allow: /private/open.html

is meant (and read by Google, Bing and RFC 9309) to allow ``/private/open.html``: the most specific
(longest) matching rule wins, and on a tie ``Allow`` wins. The stdlib parser disallows it.

Group selection: the group whose user-agent name is the longest prefix of our product token (the
User-Agent up to the first ``/``, case-insensitive) wins; otherwise the ``*`` group; otherwise everything is
allowed. Groups naming the same agent are merged, as RFC 9309 §2.2.1 asks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .urls import _PATH_SAFE, _QUERY_SAFE, _normalize_escapes

# A site can ask for any Crawl-delay; beyond this the crawl would effectively stall on that host.
MAX_CRAWL_DELAY_S = 60.0
# RFC 9309 §2.5: crawlers may ignore content past 500 KiB.
MAX_ROBOTS_BYTES = 500 * 1024


@dataclass
class _Rule:
    allow: bool
    pattern: str
    regex: re.Pattern[str]


@dataclass
class _Group:
    agents: list[str] = field(default_factory=list)
    rules: list[_Rule] = field(default_factory=list)
    crawl_delay: float | None = None


def _compile(pattern: str) -> re.Pattern[str]:
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + ("$" if anchored else ""))


def _normalize_pattern(value: str) -> str:
    # Compare like with like: patterns get the same percent-encoding normalisation as crawled URLs.
    value = value.strip()
    if not value.startswith(("/", "*")):
        value = "/" + value
    path, sep, query = value.partition("?")
    return _normalize_escapes(path, _PATH_SAFE | {"*", "$"}) + (
        sep + _normalize_escapes(query, _QUERY_SAFE | {"*", "$"}) if sep else ""
    )


class RobotsRules:
    """Parsed robots.txt for one origin. ``allowed(path)`` and ``crawl_delay`` answer for one user agent."""

    def __init__(self, groups: list[_Group] | None = None, *, default_allow: bool = True, agent: str = "*"):
        self._groups = groups or []
        self._default_allow = default_allow
        self._rules: list[_Rule] = []
        self.crawl_delay: float | None = None
        self._select(agent)

    @classmethod
    def allow_all(cls) -> RobotsRules:
        """No robots.txt (404 and other 4xx): everything may be crawled (RFC 9309 §2.3.1.3)."""
        return cls(default_allow=True)

    @classmethod
    def disallow_all(cls) -> RobotsRules:
        """robots.txt unreachable (5xx after retries): crawl nothing on that origin (RFC 9309 §2.3.1.4)."""
        return cls(default_allow=False)

    @classmethod
    def parse(cls, text: str, user_agent: str) -> RobotsRules:
        groups: list[_Group] = []
        current: _Group | None = None
        in_agents = False  # consecutive user-agent lines share one group
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if ":" not in line:
                continue
            key, _, value = line.partition(":")
            key, value = key.strip().lower(), value.strip()
            if key in ("user-agent", "useragent"):
                if not in_agents:
                    current = _Group()
                    groups.append(current)
                    in_agents = True
                assert current is not None
                current.agents.append(value.lower())
                continue
            in_agents = False
            if current is None:
                continue  # rules before any user-agent line belong to no group
            if key in ("allow", "disallow"):
                if not value:  # "Disallow:" (empty) means "nothing is disallowed": no rule
                    continue
                pattern = _normalize_pattern(value)
                current.rules.append(_Rule(key == "allow", pattern, _compile(pattern)))
            elif key in ("crawl-delay", "crawldelay"):
                try:
                    delay = float(value)
                except ValueError:
                    continue
                if delay >= 0:
                    current.crawl_delay = min(delay, MAX_CRAWL_DELAY_S)
        return cls(groups, agent=user_agent)

    def _select(self, user_agent: str) -> None:
        token = user_agent.split("/", 1)[0].strip().lower()
        best_len, chosen = -1, []
        for g in self._groups:
            for name in g.agents:
                if name == "*":
                    score = 0
                elif name and token.startswith(name):
                    score = len(name)
                else:
                    continue
                if score > best_len:
                    best_len, chosen = score, [g]
                elif score == best_len and g not in chosen:
                    chosen.append(g)
        for g in chosen:
            self._rules.extend(g.rules)
            if g.crawl_delay is not None:
                self.crawl_delay = max(self.crawl_delay or 0.0, g.crawl_delay)

    def allowed(self, path: str) -> bool:
        """May ``path`` (path + query of a normalised URL) be fetched? Longest match wins; Allow wins ties."""
        if path == "/robots.txt":
            return True
        best: _Rule | None = None
        for rule in self._rules:
            if rule.regex.match(path) and (
                best is None
                or len(rule.pattern) > len(best.pattern)
                or (len(rule.pattern) == len(best.pattern) and rule.allow)
            ):
                best = rule
        return self._default_allow if best is None else best.allow

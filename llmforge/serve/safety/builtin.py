"""The built-in filters: blocklist, PII, classifier, custom callable (``serve.safety.filters[].type``)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from ...errors import UserInputError
from ..filters import Decision, Filter, Hit, RequestContext
from .normalize import fold, normalize

# Separators an evasion puts between the letters of a word (`b a d`, `b.a.d`, `b-_-a`): up to 3 non-alphanumeric
# characters. Wider gaps would start joining separate words of ordinary text.
_SEP = r"[\W_]{0,3}"
_SEP_MAX = 3
# Leetspeak digits and signs for a letter (matched in the case-folded text).
_LEET = {
    "a": "a4@", "b": "b8", "e": "e3", "g": "g9", "i": "i1!|", "l": "l1|", "o": "o0", "s": "s5$", "t": "t7+",
}  # fmt: skip


def _hold_at(index, text_len: int, norm_len: int, window: int) -> int:
    """Raw index of the normalised position ``norm_len - window`` (0 when the text is shorter)."""
    p = norm_len - window
    if p <= 0:
        return 0
    return index[p] if p < norm_len else text_len


def word_regex(word: str) -> tuple[str, str]:
    """A regex for ``word`` in the ``full`` normal form, and one for any unfinished start of such a match at
    the end of a text (what a stream must hold back).

    Letters may be separated by up to 3 non-alphanumeric characters (so `pipe bomb`, `pipebomb`, `p-i-p-e b o m
    b` all match) and written in leetspeak; the match must not continue a longer word on either side."""
    letters = [c for c in fold(word) if c.isalnum()]
    if not letters:
        raise UserInputError(f"serve.safety: the blocklist word {word!r} has no letters or digits")
    classes = [f"[{re.escape(_LEET[c])}]" if c in _LEET else re.escape(c) for c in letters]
    full = rf"(?<![^\W_]){_SEP.join(classes)}(?![^\W_])"
    # `a(?:SEP(?:b(?:SEP(?:c)?)?)?)?\Z`: the text ends inside a match (a SEP may be cut short: it is {0,3})
    prefix = classes[-1]
    for c in reversed(classes[:-1]):
        prefix = f"{c}(?:{_SEP}(?:{prefix})?)?"
    return full, rf"(?<![^\W_]){prefix}\Z"


class BlocklistFilter(Filter):
    span = True

    def __init__(self, cfg, name: str):
        self.name, self.direction, self.action = name, cfg.direction, cfg.action
        self.on_error, self.timeout_s, self.replacement = cfg.on_error, cfg.timeout_s, cfg.replacement
        words = sorted(cfg.words, key=lambda w: -len(fold(w)))  # the longest phrase first
        built = [word_regex(w) for w in words]
        self.words = re.compile("|".join(r for r, _ in built)) if built else None
        self.prefixes = re.compile("|".join(f"(?:{p})" for _, p in built)) if built else None
        self.patterns = [re.compile(p, re.I) for p in cfg.patterns]
        self.window = cfg.window_chars  # for patterns: any regex may still grow, so a fixed window
        # a word match is at most this long (normalised): letters plus the widest separators
        self.longest = max((len(fold(w)) * (1 + _SEP_MAX) for w in words), default=0)

    def find(self, text: str) -> list[Hit]:
        norm, index = normalize(text, "full")
        spans = []
        if self.words is not None:  # a word match is final once the (normalised) character after it is known
            spans += [
                (m.start(), m.end(), "blocked word", m.end() < len(norm)) for m in self.words.finditer(norm)
            ]
        for p in self.patterns:  # a regex may still grow (or fail) until the window has passed
            spans += [
                (m.start(), m.end(), "blocked pattern", False)
                for m in p.finditer(norm)
                if m.end() > m.start()
            ]
        return [Hit(index[s], index[e - 1] + 1, self.replacement, label, k) for s, e, label, k in spans]

    def hold(self, text: str) -> int:
        """Words: from the earliest position where the end of the text could be the start of a match (plus the
        character after a complete one, which decides its boundary); patterns: the last `window_chars`."""
        norm, index = normalize(text, "full")
        hold = len(text)
        if self.prefixes is not None:
            m = self.prefixes.search(norm, max(0, len(norm) - self.longest))
            if m is not None:
                hold = index[m.start()]
        if self.patterns:
            hold = min(hold, _hold_at(index, len(text), len(norm), self.window))
        return hold


# Characters of a PII value that has spaces in it (phones, cards, IBANs, SSNs, PEM headers): digits, capitals,
# separators. A trailing run of them may be the start of such a value; lower-case prose ends it.
_PII_RUN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-().,/:#*=' \t\n\u00a0")


class PIIFilter(Filter):
    span = True

    def __init__(self, cfg, name: str):
        from ...data.pii import KINDS, PLACEHOLDERS

        self.name, self.direction, self.action = name, cfg.direction, cfg.action
        self.on_error, self.timeout_s, self.window = cfg.on_error, cfg.timeout_s, cfg.window_chars
        self.kinds = tuple(k for k in KINDS if k in cfg.kinds)  # the data stage's order
        self.placeholders = PLACEHOLDERS

    def find(self, text: str) -> list[Hit]:
        from ...data.pii import find_pii

        # NFKC and no zero-width characters, so `４１５-５５５-０１９９` and `bob\u200b@x.com` are seen too
        norm, index = normalize(text, "light")
        return [
            Hit(index[m.start], index[m.end - 1] + 1, self.placeholders[m.kind], m.kind)
            for m in find_pii(norm, self.kinds)
        ]

    def hold(self, text: str) -> int:
        """From the start of what may still become a value: the last whitespace-free token (e-mails, IPv6,
        keys and tokens have no spaces), a trailing run of digits / capitals / separators (phones, cards,
        IBANs), an unterminated PEM block; never more than the last `window_chars` characters."""
        norm, index = normalize(text, "light")
        n = len(norm)
        start = n
        while start > 0 and not norm[start - 1].isspace():
            start -= 1
        run = n
        while run > 0 and norm[run - 1] in _PII_RUN:
            run -= 1
        start = min(start, run)
        pem = norm.rfind("-----BEGIN", max(0, n - self.window))
        if pem != -1 and "-----END" not in norm[pem:]:
            start = min(start, pem)
        start = max(start, n - self.window)
        return index[start] if start < n else len(text)


def load_callable(spec: str, where: str) -> Callable[..., Any]:
    """``module:function`` imported (dotted attribute paths allowed after the colon)."""
    module, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:
        raise UserInputError(f"{where}: cannot import module {module!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserInputError(f"{where}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserInputError(f"{where}: {spec!r} is not callable")
    return obj


class CustomFilter(Filter):
    """``function(text, ctx) -> Decision | None``; a sync function runs in a worker thread so its timeout
    holds (a thread cannot be killed: a hung one keeps its thread, the request moves on)."""

    def __init__(self, cfg, name: str, where: str):
        self.name, self.direction, self.action = name, cfg.direction, "block"
        self.on_error, self.timeout_s = cfg.on_error, cfg.timeout_s
        self.fn = load_callable(cfg.callable, where)
        self.is_async = inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(
            getattr(self.fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        )

    async def check(self, text: str, ctx: RequestContext) -> Decision:
        if self.is_async:
            d = await self.fn(text, ctx)
        else:
            d = await asyncio.to_thread(self.fn, text, ctx)
            if inspect.isawaitable(d):
                d = await d
        return Decision() if d is None else d


class ClassifierFilter(Filter):
    """One chat completion per text against ``base_url`` (greedy), its reply parsed by the two regexes."""

    def __init__(self, cfg, name: str, env: Mapping[str, str]):
        self.name, self.direction, self.action = name, cfg.direction, cfg.action
        self.on_error, self.timeout_s = cfg.on_error, cfg.timeout_s
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.model, self.prompt, self.max_tokens = cfg.model, cfg.prompt, cfg.max_tokens
        self.unsafe = re.compile(cfg.unsafe_pattern, re.I | re.M)
        self.safe = re.compile(cfg.safe_pattern, re.I | re.M)
        self.headers = {}
        if cfg.api_key_env:
            key = env.get(cfg.api_key_env, "")
            if not key:
                raise UserInputError(
                    f"serve.safety: the classifier filter {name!r} names api_key_env {cfg.api_key_env!r}, "
                    "which is not set; export it or remove api_key_env"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        self._client = None

    def _http(self):
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers)
        return self._client

    async def check(self, text: str, ctx: RequestContext) -> Decision:
        role = "User" if ctx.direction == "input" else "Agent"
        content = self.prompt.replace("{role}", role).replace("{text}", text)
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        r = await self._http().post(self.url, json=body)
        r.raise_for_status()
        reply = r.json()["choices"][0]["message"]["content"] or ""
        if self.unsafe.search(reply):
            verdict = " ".join(reply.split())[:80]
            return Decision(self.action, reason=f"classifier verdict {verdict!r}")
        if self.safe.search(reply):
            return Decision()
        raise ValueError(
            f"the classifier's reply {reply[:80]!r} matches neither safe_pattern nor unsafe_pattern"
        )

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def build_filters(filters: list[Any], env: Mapping[str, str] | None = None) -> list[Filter]:
    """``Filter`` objects for ``serve.safety.filters`` (custom callables imported now: a typo fails at start)."""
    env = os.environ if env is None else env
    counts: dict[str, int] = {}
    for cfg in filters:
        base = cfg.name or cfg.type
        counts[base] = counts.get(base, 0) + 1
    seen: dict[str, int] = {}
    out: list[Filter] = []
    for i, cfg in enumerate(filters):
        base = cfg.name or cfg.type
        seen[base] = seen.get(base, 0) + 1
        name = base if counts[base] == 1 else f"{base}-{seen[base]}"
        where = f"serve.safety.filters[{i}]"
        if cfg.type == "blocklist":
            out.append(BlocklistFilter(cfg, name))
        elif cfg.type == "pii":
            out.append(PIIFilter(cfg, name))
        elif cfg.type == "classifier":
            out.append(ClassifierFilter(cfg, name, env))
        elif cfg.type == "custom":
            out.append(CustomFilter(cfg, name, where + ".callable"))
        else:  # pragma: no cover - the manifest's discriminator allows only these
            raise UserInputError(f"{where}: unknown filter type {cfg.type!r}")
    return out

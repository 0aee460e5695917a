"""Helpers of the safety tests: a scripted engine whose answers the test chooses (released a chosen number of
characters per token, so a phrase can be split at every chunk boundary), and custom filter callables named in
manifests as ``tests.serve.safety_fixtures:NAME``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from llmforge.infer import EngineNotReady, GenerationEvent
from llmforge.serve import safety

SEEN: list[tuple[str, str, int | None, str]] = []  # (text, direction, index, endpoint) the recorder saw


class ScriptedEngine:
    """``reply(prompt_text, choice_index) -> answer``, sent ``chunk`` characters per event (``chunk`` is the
    request's ``seed`` when it has one, else 1: one character per token)."""

    def __init__(self, tokenizer, reply: Callable[[str, int], str], *, model_name: str = "scripted"):
        self.tokenizer = tokenizer
        self.reply = reply
        self.model_name = model_name
        self.max_model_len = 4096
        self.started = False
        self.prompts: list[str] = []  # decoded prompts the engine was asked to continue
        self.cancelled: list[str] = []
        self._cancel: set[str] = set()
        self.token = next(i for i in range(10, tokenizer.info.vocab_size) if tokenizer.decode([i]).strip())

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, timeout: float = 10.0) -> None:
        self.started = False

    def healthy(self) -> bool:
        return self.started

    num_running = 0
    num_waiting = 0

    def cancel(self, request_id: str) -> None:
        self._cancel.add(request_id)

    async def generate(self, prompt_token_ids, params, request_id):
        if not self.started:
            raise EngineNotReady("not started")
        prompt = self.tokenizer.decode(prompt_token_ids)
        self.prompts.append(prompt)
        index = int(request_id.rsplit("-", 1)[1])
        text = self.reply(prompt, index)
        chunk = params.seed or 1
        pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)] or [""]
        n = len(prompt_token_ids)
        try:
            for k, piece in enumerate(pieces):
                await asyncio.sleep(0)
                if request_id in self._cancel:
                    self.cancelled.append(request_id)
                    yield GenerationEvent(request_id, "", [], None, "cancelled", n, k)
                    return
                last = k == len(pieces) - 1 or k + 1 >= params.max_tokens
                finish = ("stop" if k == len(pieces) - 1 else "length") if last else None
                yield GenerationEvent(request_id, piece, [self.token], None, finish, n, k + 1)
                if last:
                    return
        finally:
            if request_id in self._cancel and request_id not in self.cancelled:
                self.cancelled.append(request_id)


# ------------------------------------------------------------------------------------------------ custom filters


def words(text, ctx):
    """Sync: blocks 'forbidden', rewrites 'darn'."""
    if "forbidden" in text.lower():
        return safety.block("custom rule: forbidden")
    if "darn" in text:
        return safety.redact(text.replace("darn", "d*rn"), "custom rule: darn")
    return None


async def async_flag(text, ctx):
    await asyncio.sleep(0)
    return safety.flag("mentions hello") if "hello" in text.lower() else safety.allow()


def recorder(text, ctx):
    SEEN.append((text, ctx.direction, ctx.index, ctx.endpoint))
    return None


def raises(text, ctx):
    raise RuntimeError("boom")


async def slow(text, ctx):
    await asyncio.sleep(5)


def slow_sync(text, ctx):
    time.sleep(1.0)


def not_a_decision(text, ctx):
    return "allow"

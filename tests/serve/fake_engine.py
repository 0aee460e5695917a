"""A pure-Python ``AsyncEngine`` for the gateway tests that need control over time: a slow start, a slow
decode step, a failing start. It keeps the contract's behaviour (overload on the first ``__anext__``,
cancellation on ``aclose``, running/waiting counts) but its "model" is a hash of the prompt, so the gateway's
own logic is tested without torch. Everything about real generation is tested against the real engine."""

from __future__ import annotations

import asyncio
import hashlib

from llmforge.infer import (
    ContextLengthExceeded,
    EngineNotReady,
    EngineOverloaded,
    GenerationEvent,
    TokenLogprob,
)


class FakeEngine:
    def __init__(
        self,
        tokenizer,
        *,
        model_name: str = "fake",
        max_model_len: int = 256,
        max_batch: int = 64,
        max_queue: int = 64,
        step_delay: float = 0.0,
        start_delay: float = 0.0,
        start_error: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.step_delay = step_delay
        self.start_delay = start_delay
        self.start_error = start_error
        self.started = False
        self.active: set[str] = set()
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self._cancel: set[str] = set()
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None
        self._special = set(tokenizer.info.chat_token_ids.values()) | set(tokenizer.info.stop_ids)
        self._special |= {
            i for i in (tokenizer.info.bos_id, tokenizer.info.pad_id, tokenizer.info.unk_id) if i is not None
        }

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        if self.start_error:
            raise RuntimeError(self.start_error)
        self.started = True

    async def shutdown(self, timeout: float = 10.0) -> None:
        self.started = False

    def healthy(self) -> bool:
        return self.started

    @property
    def num_running(self) -> int:
        return len(self.active) - self.waiting

    @property
    def num_waiting(self) -> int:
        return self.waiting

    def cancel(self, request_id: str) -> None:
        if request_id in self.active:
            self._cancel.add(request_id)

    def _token(self, prompt: list[int], seed, temperature: float, k: int) -> int:
        key = f"{prompt}|{k}|{seed if temperature > 0 else 'greedy'}".encode()
        vocab = self.tokenizer.info.vocab_size
        t = int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % vocab
        while t in self._special:
            t = (t + 1) % vocab
        return t

    async def generate(self, prompt_token_ids, params, request_id):
        if not self.started:
            raise EngineNotReady("fake engine not started")
        if len(self.active) >= self.max_batch + self.max_queue:
            raise EngineOverloaded("queue full")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                "too long",
                prompt_tokens=len(prompt_token_ids),
                max_tokens=params.max_tokens,
                max_model_len=self.max_model_len,
            )
        self.active.add(request_id)
        ids: list[int] = []
        text = ""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_batch)
        slot = False
        try:
            self.waiting += 1
            try:
                await self._slots.acquire()  # queued until a batch slot frees, like a real engine
                slot = True
            finally:
                self.waiting -= 1
            for k in range(params.max_tokens):
                await asyncio.sleep(self.step_delay)
                if request_id in self._cancel:
                    self.cancelled.append(request_id)
                    yield GenerationEvent(
                        request_id, "", [], None, "cancelled", len(prompt_token_ids), len(ids)
                    )
                    return
                t = self._token(prompt_token_ids, params.seed, params.temperature, k)
                ids.append(t)
                new = self.tokenizer.decode(ids)
                delta, text = new[len(text) :], new
                finish = "length" if k == params.max_tokens - 1 else None
                for s in params.stop:
                    if s in text:
                        cut = text.index(s)
                        delta = delta[: max(0, len(delta) - (len(text) - cut))]
                        finish = "stop"
                lp = None
                if params.logprobs is not None:
                    tok = self.tokenizer.decode([t])
                    lp = [TokenLogprob(t, tok, -0.5, [(t, tok, -0.5)][: params.logprobs])]
                if finish:  # before the yield: a consumer may close the stream right after the last event
                    self.finished.append(request_id)
                yield GenerationEvent(request_id, delta, [t], lp, finish, len(prompt_token_ids), len(ids))
                if finish:
                    return
        finally:
            if slot:
                self._slots.release()
            if request_id not in self.finished and request_id not in self.cancelled:
                self.cancelled.append(request_id)
            self.active.discard(request_id)

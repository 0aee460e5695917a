"""Who runs each step: continuous batching over a fixed pool of KV slots, with chunked prefill.

Every step decodes one token for every running sequence that has finished its prompt, and spends what is left
of the step's token budget (``max_num_batched_tokens``) on prompt chunks, oldest request first; new requests
are admitted into free slots between steps and leave as soon as they finish, so a long generation never holds
back a short one. Prompts are cut into chunks at fixed multiples of ``prefill_chunk`` whatever else runs, so a
request's arithmetic does not depend on its neighbours (batch invariance). Requests that find every slot busy
wait in a FIFO queue of at most ``max_queue`` (so at most ``max_batch + max_queue`` requests are in flight);
beyond that ``add`` raises ``EngineOverloaded``.

Slots are kept compact: decoding sequences occupy slots ``0..D-1`` and prefilling ones ``D..N-1``, so the
decode step (the hot path) reads its keys and values through a view of the pool. Keeping it so costs a copy of
one sequence's cache when a sequence in the middle finishes or finishes its prompt (``place``).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import EngineOverloaded

if TYPE_CHECKING:
    import torch

    from .detokenize import IncrementalDetokenizer
    from .engine import Request
    from .stop import StopStringMatcher

_order = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request's state inside the engine."""

    request: Request
    all_ids: list[int]  # prompt + generated tokens
    prompt_len: int
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # [V] generated-token counts, only when penalties are on
    detok: IncrementalDetokenizer | None = None
    stopper: StopStringMatcher | None = None
    num_computed: int = 0  # tokens whose K/V are in the slot
    slot: int | None = None
    finish_reason: str | None = None
    order: int = field(default_factory=lambda: next(_order))  # admission order (FCFS)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[self.prompt_len :]

    @property
    def decoding(self) -> bool:
        """The prompt is in the cache: each step feeds the last sampled token."""
        return self.num_computed >= self.prompt_len

    def next_chunk(self, chunk: int) -> int:
        """Tokens of the next prompt chunk: up to the next multiple of ``chunk`` (fixed boundaries)."""
        end = min(self.prompt_len, (self.num_computed // chunk + 1) * chunk)
        return end - self.num_computed


@dataclass
class StepPlan:
    decode: list[Sequence]  # one token each, in slot order
    prefill: list[tuple[Sequence, int]]  # (sequence, tokens of its chunk), in slot order
    moves: list[tuple[int, int, int]]  # KV relocations (src slot, dst slot, positions) to do first

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, *, max_batch: int, max_queue: int, max_num_batched_tokens: int, prefill_chunk: int):
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.running) + len(self.waiting) >= self.max_batch + self.max_queue:
            raise EngineOverloaded(
                f"the engine is at capacity: {len(self.running)} requests running (max_batch={self.max_batch}) "
                f"and {len(self.waiting)} waiting (max_queue={self.max_queue}); retry later or raise "
                "max_batch / max_queue"
            )
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a running or waiting sequence (finished or cancelled); its slot is free from the next step."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot = None

    def schedule(self) -> StepPlan:
        """Admit what fits, pick this step's rows and compact the slots."""
        decode = [s for s in self.running if s.decoding]
        budget = self.max_num_batched_tokens - len(decode)
        prefill: list[tuple[Sequence, int]] = []
        for s in sorted((s for s in self.running if not s.decoding), key=lambda s: s.order):
            n = s.next_chunk(self.prefill_chunk)
            if prefill and n > budget:
                break  # FCFS: a later prompt never overtakes an earlier one
            prefill.append((s, n))
            budget -= n
        # Admit while a slot is free and the budget allows the prompt's first chunk (at least one prompt
        # per step always advances, so prefill cannot starve behind a full decode batch).
        while self.waiting and len(self.running) < self.max_batch:
            s = self.waiting[0]
            n = s.next_chunk(self.prefill_chunk)
            if prefill and n > budget:
                break
            self.waiting.popleft()
            self.running.append(s)
            prefill.append((s, n))
            budget -= n
        moves = self.place()
        decode.sort(key=lambda s: s.slot)
        prefill.sort(key=lambda p: p[0].slot)
        return StepPlan(decode=decode, prefill=prefill, moves=moves)

    def place(self) -> list[tuple[int, int, int]]:
        """Give every running sequence a slot: decoders in ``0..D-1``, prefillers in ``D..N-1``, moving as
        few as possible. Returns the KV copies (src, dst, positions) that realise it."""
        dec = [s for s in self.running if s.decoding]
        pre = sorted((s for s in self.running if not s.decoding), key=lambda s: s.order)
        D, N = len(dec), len(self.running)
        moves: list[tuple[int, int, int]] = []
        for group, lo, hi in ((dec, 0, D), (pre, D, N)):
            kept = {s.slot for s in group if s.slot is not None and lo <= s.slot < hi}
            free = iter(sorted(set(range(lo, hi)) - kept))
            for s in group:
                if s.slot is not None and lo <= s.slot < hi:
                    continue
                dst = next(free)
                if s.slot is not None and s.num_computed > 0:
                    moves.append((s.slot, dst, s.num_computed))
                s.slot = dst
        return moves

"""llmforge's inference engine: continuous batching over per-sequence KV slots, synchronous and thread-safe.

    engine = Engine(model, tokenizer, max_batch=16)
    engine.add_request(Request("r1", prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1)))
    while engine.has_unfinished():
        for event in engine.step():          # GenerationEvents: text deltas, tokens, logprobs, finish
            ...

``step()`` runs one forward for the decoding sequences (one token each, their keys read in place from the
slot pool) and one for this step's prompt chunks, samples every row that needs a token with its own
``SamplingParams``, detokenizes incrementally, applies stop ids / stop strings / max tokens, and frees the
slots of what finished. ``add_request`` and ``abort`` may be called from any thread (``LocalEngine`` runs
``step`` on its own thread); they take effect at the next step. ``run(requests)`` drives it to completion for
offline callers (SFT evaluation, distillation, rollouts). The model is any ``llmforge.model.Llama``: it is
driven through its public ``hidden_states`` with explicit positions, a [B, 1, T, S] mask and a
``SlotKVCache``, so the model file knows nothing about the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..console import get_logger
from ..errors import ModelError
from .detokenize import IncrementalDetokenizer
from .errors import ContextLengthExceeded, RequestError
from .kv_cache import SlotKVCache
from .params import GenerationEvent, SamplingParams, TokenLogprob
from .sampling import make_generator, raw_logprobs, sample_batch
from .scheduler import Scheduler, Sequence, StepPlan
from .stop import StopStringMatcher

log = get_logger(__name__)


@dataclass
class Request:
    """One generation request: a plain value, as in vLLM. ``stop_criterion`` is a Python-side extension
    (``(generated_ids) -> bool``, checked after every token) for callers such as ``generate()``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_criterion: Callable[[list[int]], bool] | None = None
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class RequestOutput:
    """A finished request, for offline callers of ``Engine.run``."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


def _available_ram() -> int | None:
    """Linux's ``MemAvailable`` (free memory plus reclaimable page cache), in bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(model: torch.nn.Module, max_batch: int, max_model_len: int) -> None:
    """Refuse a KV pool that cannot fit, with the knobs to turn, instead of dying of OOM mid-request."""
    weight = model.model.embed_tokens.weight
    need = max_batch * SlotKVCache.bytes_per_slot(model.config, max_model_len, weight.dtype)
    if weight.device.type == "cuda":
        free = torch.cuda.mem_get_info(weight.device)[0]
    else:
        free = _available_ram()
        if free is None:  # not Linux: no cheap answer, don't guess
            return
    if need > 0.9 * free:
        raise ModelError(
            f"the KV cache for max_batch={max_batch} × max_model_len={max_model_len} needs {need / 2**30:.1f} GiB "
            f"but only {free / 2**30:.1f} GiB is free on {weight.device}; lower max_batch or max_model_len"
        )


class Engine:
    """Continuous-batching generation over one model; see the module docstring.

    max_batch: KV slots, i.e. sequences decoding at once (memory: ``max_batch × max_model_len`` positions).
    max_model_len: prompt + completion limit (default the model's ``max_position_embeddings``).
    max_queue: requests allowed to wait for a slot (``max_batch + max_queue`` in flight); beyond it
    ``add_request`` raises ``EngineOverloaded``.
    prefill_chunk: prompts are computed in chunks of this many tokens (fixed boundaries).
    max_num_batched_tokens: tokens per step (decode rows + prompt chunks); bounds a step's latency.
    eos_token_ids: ids that end a request unless ``ignore_eos`` (default: the tokenizer's stop ids, else the
    model config's EOS ids).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        max_batch: int = 16,
        max_model_len: int | None = None,
        max_queue: int = 256,
        prefill_chunk: int = 256,
        max_num_batched_tokens: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
    ):
        cfg = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len or cfg.max_position_embeddings)
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ModelError(
                f"engine sizes must be positive (max_batch={max_batch}, max_queue={max_queue}, "
                f"prefill_chunk={prefill_chunk})"
            )
        budget = max_num_batched_tokens or max(512, max_batch + prefill_chunk)
        if budget < max_batch:
            raise ModelError(
                f"max_num_batched_tokens={budget} is below max_batch={max_batch}: every running sequence needs "
                "a token per step; raise max_num_batched_tokens"
            )
        self.vocab_size = cfg.vocab_size
        if eos_token_ids is None:
            info = getattr(tokenizer, "info", None)
            eos_token_ids = getattr(info, "stop_ids", None) or cfg.eos_token_ids
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        _check_memory(model, max_batch, self.max_model_len)
        self.cache = SlotKVCache.for_model(model, max_batch, self.max_model_len)
        self.scheduler = Scheduler(
            max_batch=max_batch,
            max_queue=max_queue,
            max_num_batched_tokens=budget,
            prefill_chunk=prefill_chunk,
        )
        self.device = self.cache.device
        self._lock = threading.Lock()
        self._by_id: dict[str, Sequence] = {}
        self._aborts: dict[str, str] = {}  # request id -> finish reason
        self._token_text: dict[int, str] = {}
        self.counters = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "aborted": 0}
        log.debug(
            "engine: %d slots × %d positions (%.1f MiB of KV cache, %s, %s)",
            max_batch,
            self.max_model_len,
            self.cache.k.numel() * 2 * self.cache.k.element_size() / 2**20,
            self.cache.k.dtype,
            self.device,
        )

    # -- requests -------------------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._by_id)

    def unfinished_ids(self) -> list[str]:
        with self._lock:
            return list(self._by_id)

    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ``RequestError`` (bad params or prompt), ``ContextLengthExceeded``,
        ``EngineOverloaded`` (queue full) — synchronously, so a server can answer at once."""
        params = request.params.validate()
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise RequestError("the prompt must contain at least one token", "prompt")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise RequestError(
                    f"prompt token id {t!r} is outside the model's vocabulary [0, {self.vocab_size})",
                    "prompt",
                )
        if self.tokenizer is None and (params.stop or params.logprobs is not None):
            raise RequestError(
                "stop strings and logprobs need an engine built with a tokenizer",
                "stop" if params.stop else "logprobs",
            )
        needed = len(prompt) + params.max_tokens
        if needed > self.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{needed} tokens ({len(prompt)} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                prompt_tokens=len(prompt),
                max_tokens=params.max_tokens,
                max_model_len=self.max_model_len,
            )
        seq = Sequence(
            request=request, all_ids=prompt, prompt_len=len(prompt), generator=make_generator(params.seed)
        )
        if self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, prompt)
            seq.stopper = StopStringMatcher(list(params.stop), include_stop=params.include_stop_str_in_output)
        with self._lock:
            if request.request_id in self._by_id:
                raise RequestError(f"request id {request.request_id!r} is already running", "request_id")
            self.scheduler.add(seq)  # raises EngineOverloaded
            self._by_id[request.request_id] = seq
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += len(prompt)

    def abort(self, request_id: str, *, reason: str = "cancelled") -> None:
        """Stop a request at the next step (its last event has ``finish_reason=reason``); unknown ids are
        ignored, so a late cancel after the request finished is harmless."""
        with self._lock:
            if request_id in self._by_id:
                self._aborts[request_id] = reason

    def abort_all(self, reason: str = "abort") -> None:
        with self._lock:
            for rid in self._by_id:
                self._aborts[rid] = reason

    # -- the step -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[GenerationEvent]:
        """Run one scheduling step; return the events it produced (at most one per request)."""
        events: list[GenerationEvent] = []
        with self._lock:
            for rid, reason in self._aborts.items():
                seq = self._by_id.get(rid)
                if seq is not None:
                    self._finish(seq, reason)
                    events.append(self._event(seq, "", [], None))
                    self.counters["aborted"] += 1
            self._aborts.clear()
            plan = self.scheduler.schedule()
        if plan.empty:
            return events
        self.counters["steps"] += 1
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            events += self._run(plan)
        finally:
            if was_training:
                self.model.train()
        return events

    def _run(self, plan: StepPlan) -> list[GenerationEvent]:
        self.cache.move(plan.moves)
        need: list[Sequence] = []
        hidden: list[torch.Tensor] = []
        if plan.decode:
            h = self._forward(plan.decode, [1] * len(plan.decode))
            need += plan.decode
            hidden.append(h)
        if plan.prefill:
            seqs = [s for s, _ in plan.prefill]
            h = self._forward(seqs, [n for _, n in plan.prefill])
            done = [i for i, s in enumerate(seqs) if s.num_computed == len(s.all_ids)]
            if done:
                need += [seqs[i] for i in done]
                hidden.append(h[torch.tensor(done, device=h.device)])
        if not need:
            return []
        logits = self.model.lm_head(hidden[0] if len(hidden) == 1 else torch.cat(hidden)).float()
        return self._sample_and_emit(need, logits)

    def _forward(self, seqs: list[Sequence], lengths: list[int]) -> torch.Tensor:
        """One model forward over ``seqs`` (row b feeds its next ``lengths[b]`` tokens); returns the final
        hidden state of each row's last real token [B, hidden]."""
        starts = [s.num_computed for s in seqs]
        self.cache.bind([s.slot for s in seqs], starts, lengths)
        width = max(lengths)
        rows = [
            s.all_ids[p : p + n] + [0] * (width - n) for s, p, n in zip(seqs, starts, lengths, strict=True)
        ]
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        try:
            h = self.model.hidden_states(
                ids,
                position_ids=self.cache.position_ids(),
                kv_cache=self.cache,
                attention_mask=self.cache.attention_mask(),
            )
        finally:
            self.cache.unbind()
        for s, n in zip(seqs, lengths, strict=True):
            s.num_computed += n
        if width == 1:
            return h[:, 0]
        last = torch.tensor(lengths, device=h.device) - 1
        return h[torch.arange(len(seqs), device=h.device), last]

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[GenerationEvent]:
        params = [s.request.params for s in seqs]
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        counts = None
        if penalized:
            for i in penalized:
                if seqs[i].counts is None:
                    seqs[i].counts = torch.zeros(logits.shape[-1], device=logits.device)
            counts = torch.stack([seqs[i].counts for i in penalized])
        tokens = sample_batch(
            logits, params, counts=counts, penalized=penalized, generators=[s.generator for s in seqs]
        )
        chosen = tokens.tolist()  # the one device sync of the step
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        lps: dict[int, TokenLogprob] = {}
        if want:
            k = max(params[i].logprobs or 0 for i in want)
            idx = torch.tensor(want, device=logits.device)
            chosen_lp, tops = raw_logprobs(logits[idx], tokens[idx], k)
            for j, i in enumerate(want):
                t = chosen[i]
                top = [(tid, self._text_of(tid), lp) for tid, lp in tops[j][: params[i].logprobs]]
                lps[i] = TokenLogprob(token_id=t, token=self._text_of(t), logprob=chosen_lp[j], top=top)
        return [self._append(seq, t, lps.get(i)) for i, (seq, t) in enumerate(zip(seqs, chosen, strict=True))]

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> GenerationEvent:
        """Record a sampled token; decide whether the request finished; return its event."""
        seq.all_ids.append(token)
        self.counters["generation_tokens"] += 1
        if seq.counts is not None:
            seq.counts[token] += 1
        p = seq.request.params
        lp = [logprob] if logprob is not None else None
        stop_ids = self.eos_token_ids if not p.ignore_eos else frozenset()
        if token in stop_ids or token in p.stop_token_ids:
            return self._end(seq, "stop", self._release_rest(seq), [token], lp)
        text, matched = "", False
        if seq.detok is not None and seq.stopper is not None:
            text, matched = seq.stopper.feed(seq.detok.add(token))
        if matched:
            return self._end(seq, "stop", text, [token], lp)
        crit = seq.request.stop_criterion
        if crit is not None and crit(seq.output_ids):
            return self._end(seq, "stop", text + self._release_rest(seq), [token], lp)
        if len(seq.output_ids) >= p.max_tokens or len(seq.all_ids) >= self.max_model_len:
            return self._end(seq, "length", text + self._release_rest(seq), [token], lp)
        return self._event(seq, text, [token], lp)

    def _release_rest(self, seq: Sequence) -> str:
        """Text still held when a request ends for a reason other than a stop string: a partial character
        (flushed) and a held stop-string prefix that, as it turns out, never completed."""
        if seq.detok is None or seq.stopper is None:
            return ""
        text, matched = seq.stopper.feed(seq.detok.flush())
        return text if matched else text + seq.stopper.flush()

    def _end(self, seq, reason, text, token_ids, lp) -> GenerationEvent:
        with self._lock:
            self._finish(seq, reason)
            self._aborts.pop(seq.request_id, None)
        return self._event(seq, text, token_ids, lp)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        self._by_id.pop(seq.request_id, None)

    def _event(self, seq: Sequence, text: str, token_ids: list[int], lp) -> GenerationEvent:
        return GenerationEvent(
            request_id=seq.request_id,
            text=text,
            token_ids=token_ids,
            logprobs=lp,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.all_ids) - seq.prompt_len,
        )

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
            self._token_text[token_id] = text
        return text

    # -- offline use ----------------------------------------------------------------------------------
    def run(
        self, requests: Iterable[Request], on_event: Callable[[GenerationEvent], None] | None = None
    ) -> list[RequestOutput]:
        """Generate every request to completion (queueing past ``max_batch``), in the order given.

        ``on_event`` sees every event as it happens (e.g. to ``abort`` a request early). Requests beyond
        ``max_batch + max_queue`` are fed in as slots free up, so any number may be passed. Requests added
        by others keep running alongside; this returns when the given ones are done.
        """
        pending = list(requests)
        outs = {
            r.request_id: RequestOutput(r.request_id, list(r.prompt_token_ids), [], "", "") for r in pending
        }
        unfinished = set(outs)
        lps: dict[str, list[TokenLogprob]] = {}
        feed = iter(pending)
        nxt = next(feed, None)
        capacity = self.max_batch + self.scheduler.max_queue
        while nxt is not None or unfinished:
            while nxt is not None and self.num_running + self.num_waiting < capacity:
                self.add_request(nxt)
                nxt = next(feed, None)
            for ev in self.step():
                if on_event is not None:
                    on_event(ev)
                o = outs.get(ev.request_id)
                if o is None:  # another caller's request sharing the engine
                    continue
                o.token_ids += ev.token_ids
                o.text += ev.text
                if ev.logprobs is not None:
                    lps.setdefault(ev.request_id, []).extend(ev.logprobs)
                if ev.finish_reason is not None:
                    o.finish_reason = ev.finish_reason
                    unfinished.discard(ev.request_id)
        for rid, lp in lps.items():
            outs[rid].logprobs = lp
        return [outs[r.request_id] for r in pending]

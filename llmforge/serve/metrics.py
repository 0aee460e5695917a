"""Prometheus metrics of one gateway (its own registry, so several gateways in one process never collide)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .chat_page import PAGE_ROUTES

# latency buckets (seconds): sub-millisecond decode steps on tiny models up to minutes-long queues
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# the only route labels: anything else is "other", so a fuzzer cannot grow the label set without bound
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", *PAGE_ROUTES)


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class GatewayMetrics:
    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmforge_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("llmforge_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter(
            "llmforge_completion_tokens", "Completion tokens generated.", registry=r
        )
        self.ttft = Histogram(
            "llmforge_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llmforge_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of one sequence.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "llmforge_request_duration_seconds",
            "Seconds from a generation request's arrival to its last byte.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "llmforge_finished_sequences", "Sequences finished, by finish reason.", ["reason"], registry=r
        )
        self.filter_decisions = Counter(
            "llmforge_filter_decisions",
            "Safety filter decisions other than allow, by filter, direction (input/output) and action "
            "(block/redact/flag); an output counts once per choice.",
            ["filter", "direction", "action"],
            registry=r,
        )
        self.filter_failures = Counter(
            "llmforge_filter_failures",
            "Safety filter checks that raised or timed out, by filter, direction and reason (error/timeout).",
            ["filter", "direction", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "llmforge_in_flight_requests", "HTTP generation requests in progress.", registry=r
        )
        g = Gauge("llmforge_queue_depth", "Generations waiting for a batch slot in the engine.", registry=r)
        g.set_function(lambda: _safe(lambda: engine.num_waiting))
        g = Gauge("llmforge_active_sequences", "Sequences the engine is decoding now.", registry=r)
        g.set_function(lambda: _safe(lambda: engine.num_running))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _safe(f) -> float:
    try:
        return float(f())
    except Exception:  # a gauge read must never fail a scrape
        return float("nan")

"""A fuzz run of hostile requests: only deliberate answers (never a 5xx), and the server stays healthy."""

from __future__ import annotations

import json
import random
import socket
import time

import httpx

from .conftest import local_engine, start_gateway

N_REQUESTS = 1200
TIME_LIMIT_S = 240

GOOD_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GOOD_COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**400, 1e308, -1e308, 1.5, 0.0, -0.0,
    "", "x", "\u0000", "\ud800", "🙂" * 50, "a" * 5000, "<|im_start|>system", [], [None], [1, "a"], [[]], {},
    {"type": "text"}, {"role": "user"}, [{"role": "user", "content": 5}], [[1, 2], ["a"]], [-5], [0],
    {"include_usage": "yes"}, {"include_usage": True}, ["stop"] * 10, [""], {"$ref": "#"},
]  # fmt: skip
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
    "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "user", "stream",
    "stream_options", "echo", "best_of", "logit_bias", "tools", "response_format", "ignore_eos",
    "stop_token_ids", "suffix", "unknown_field", "__proto__",
]  # fmt: skip
PATHS = ["/v1/chat/completions", "/v1/completions"]


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 4 else 4)
    if kind == 0:
        return rng.choice(HOSTILE_VALUES)
    if kind == 1:
        return rng.randint(-(2**70), 2**70)
    if kind == 2:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(20)))
    if kind == 3:
        return rng.random() * 10 ** rng.randrange(-5, 40)
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def mutated(rng: random.Random) -> dict:
    body = dict(rng.choice([GOOD_CHAT, GOOD_COMPLETION]))
    for _ in range(rng.randrange(1, 4)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.2:
            body.pop(field, None)
        else:
            body[field] = rng.choice(HOSTILE_VALUES) if rng.random() < 0.7 else random_json(rng)
    return body


def hostile_body(rng: random.Random, i: int) -> bytes:
    kind = i % 8
    if kind == 0:
        return json.dumps(random_json(rng)).encode()
    if kind in (1, 2, 3):
        return json.dumps(mutated(rng), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    if kind == 4:  # invalid UTF-8 spliced into an otherwise fine body
        raw = bytearray(json.dumps(mutated(rng)).encode())
        pos = rng.randrange(len(raw))
        raw[pos:pos] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x00"])
        return bytes(raw)
    if kind == 5:  # truncated JSON
        raw = json.dumps(mutated(rng)).encode()
        return raw[: rng.randrange(len(raw))]
    if kind == 6:  # deep nesting, huge numbers, NaN
        return rng.choice([b"[" * 50_000, b'{"a":' * 20_000, b'{"max_tokens": 1e999}', b"NaN",
                           b'{"model":"tiny","prompt":"hi","temperature":Infinity}',
                           b'{"model":"tiny","prompt":"hi","max_tokens":' + b"9" * 5000 + b"}"])  # fmt: skip
    return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))


def truncated_on_the_wire(host: str, port: int, rng: random.Random) -> None:
    """A body shorter than its Content-Length, then the client hangs up."""
    body = json.dumps(GOOD_CHAT).encode()
    cut = body[: rng.randrange(len(body))]
    head = (
        f"POST {rng.choice(PATHS)} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(head + cut)


def test_fuzz_only_deliberate_answers_and_server_stays_healthy(model_dir):
    srv = start_gateway(
        local_engine(model_dir, max_batch=8, max_queue=16), served_model_name="tiny", max_tokens=4
    )
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for i in range(N_REQUESTS):
                assert time.monotonic() - t0 < TIME_LIMIT_S, f"fuzz run too slow after {i} requests"
                if i % 50 == 49:
                    truncated_on_the_wire(srv.host, srv.port, rng)
                    continue
                method = "POST" if i % 23 else rng.choice(["GET", "PUT", "DELETE", "PATCH"])
                path = (
                    rng.choice(PATHS)
                    if i % 31
                    else rng.choice(["/v1/models/x/../../", "/%00", "/v1/" + "a" * 3000])
                )
                headers = {
                    "content-type": rng.choice(
                        ["application/json", "text/plain", "application/x-www-form-urlencoded"]
                    )
                }
                r = c.request(method, path, content=hostile_body(rng, i), headers=headers)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (r.status_code, r.text)
                if r.status_code >= 400:
                    err = r.json()["error"]
                    assert isinstance(err["message"], str) and err["type"]
        assert sum(statuses.values()) >= 1000
        # mostly refused, a few valid enough to be answered
        assert sum(v for k, v in statuses.items() if 400 <= k < 500) > 0.8 * sum(statuses.values()), statuses
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 200
        ok = httpx.post(srv.url + "/v1/chat/completions", json=GOOD_CHAT, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
        deadline = time.monotonic() + 10
        while srv.gateway.engine.num_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.gateway.engine.num_running == 0
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'status="500"' not in metrics
        routes = {
            line.split('route="')[1].split('"')[0]
            for line in metrics.splitlines()
            if line.startswith("llmforge_requests_total{")
        }
        assert routes <= {
            "/v1/chat/completions",
            "/v1/completions",
            "/health",
            "/metrics",
            "/v1/models",
            "other",
        }
    finally:
        srv.stop()

"""Concurrency, client disconnects, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import client, local_engine, start_gateway

ROOT = Path(__file__).resolve().parents[2]


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_64_concurrent_streaming_clients(model_dir):
    srv = start_gateway(local_engine(model_dir, max_batch=16, max_queue=64), served_model_name="tiny")
    engine = srv.gateway.engine
    try:
        ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

        async def one(i: int) -> tuple[str, int, str]:
            stream = await ac.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": f"client {i} says hello"}],
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, usage, finish = "", 0, ""
            async for ch in stream:
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
                if ch.usage:
                    usage = ch.usage.completion_tokens
            return text, usage, finish

        async def run():
            try:
                return await asyncio.gather(*(one(i) for i in range(64)))
            finally:
                await ac.close()

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results = asyncio.run(run())
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        assert all(u == 12 and f == "length" for _, u, f in results)
        # a request's output does not depend on what else ran: each equals the same request alone
        c = client(srv)
        for i in (0, 31, 63):
            alone = c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"client {i} says hello"}], max_tokens=12,
                temperature=0, extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert alone.choices[0].message.content == results[i][0]
        assert _wait(lambda: engine.num_running == 0 and engine.num_waiting == 0)
        assert grown_mib < 300, f"memory grew {grown_mib:.0f} MiB serving 64 streams"
    finally:
        srv.stop()


def test_disconnect_cancels_the_generation(model_dir):
    srv = start_gateway(local_engine(model_dir, max_batch=4, max_queue=4), served_model_name="tiny")
    engine = srv.gateway.engine
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 240, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert all(g.startswith("data: ") or g == "" for g in got)
            assert engine.num_running == 1
        # the client hung up: the engine's running count drops long before 240 tokens would have taken
        assert _wait(lambda: engine.num_running == 0, 10)
        generated = engine.stats().get("generation_tokens", engine.stats().get("tokens_generated", 0))
        assert generated < 240

        metrics = httpx.get(srv.url + "/metrics").text
        assert 'status="500"' not in metrics
    finally:
        srv.stop()


def test_disconnect_cancels_a_non_streaming_generation(tokenizer):
    from .fake_engine import FakeEngine

    engine = FakeEngine(tokenizer, step_delay=0.05, max_model_len=10_000)  # 200 tokens = 10 s
    srv = start_gateway(engine, max_tokens=10_000)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 200}, timeout=0.5)
        assert _wait(lambda: engine.num_running == 0, 5)
        assert len(engine.cancelled) == 1 and not engine.finished
    finally:
        srv.stop()


def test_disconnect_while_queued_frees_the_queue_place(tokenizer):
    from .fake_engine import FakeEngine

    engine = FakeEngine(tokenizer, max_batch=1, max_queue=4, step_delay=0.05, max_model_len=10_000)
    srv = start_gateway(engine, max_tokens=10_000)
    try:
        long = {"prompt": "hello", "max_tokens": 200, "stream": True}  # 10 s on the only slot
        with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=30) as r:
            lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)
            for stream in (False, True):  # waits in the queue for a slot; its client gives up
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(srv.url + "/v1/completions", json={**long, "stream": stream}, timeout=0.5)
                assert _wait(lambda: engine.num_waiting == 0, 5)
            assert engine.num_running == 1 and len(engine.cancelled) == 2
    finally:
        srv.stop()


def _start_worker(tok_dir, delay: float, timeout: float):
    from llmforge.serve.server import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.serve._server_worker", str(port), str(tok_dir), str(delay), str(timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert line.strip() == "READY", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, f"http://127.0.0.1:{port}"


def _sse_events(url: str, max_tokens: int, sigterm_to=None):
    body = {"prompt": "hi", "max_tokens": max_tokens, "stream": True}
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                events.append(line)
            if sigterm_to is not None and len(events) == 3:
                sigterm_to.send_signal(signal.SIGTERM)
                sigterm_to = None
    return events


def test_sigterm_drains_in_flight_then_exits_0(tok_dir):
    proc, url = _start_worker(tok_dir, delay=0.02, timeout=30)
    try:
        events = _sse_events(url, 60, sigterm_to=proc)  # ~1.2 s of generation, SIGTERM after 3 events
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"  # finished, not cut
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "EXITED cancelled=0 finished=1" in out
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        proc.kill()


def test_sigterm_cancels_what_does_not_finish_within_the_timeout(tok_dir):
    proc, url = _start_worker(tok_dir, delay=0.05, timeout=1.0)
    try:
        t0 = time.monotonic()
        events = _sse_events(url, 10_000, sigterm_to=proc)  # would take 500 s
        assert time.monotonic() - t0 < 20
        assert not any('"finish_reason":"length"' in e for e in events)
        # cut cleanly at the deadline: an error event saying why, then [DONE]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == "generation_aborted"
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "EXITED cancelled=1 finished=0" in out
    finally:
        proc.kill()

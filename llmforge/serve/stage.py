"""The `serve` stage of `llmforge run`: a deploy check of the final model.

It serves the resolved model exactly as `llmforge serve` would (same engine, same gateway, same limits), on a
free loopback port, sends the manifest's smoke conversation through the official `openai` client (streaming,
greedy), records each answer with its time to first token and decode speed, sends ``serve.safety.probe``
(when set) which the configured filters must block, and stops. The report is
``runs/serve/deploy.json``; the figures also go to the stage's metrics and so to ``lineage.json``. A model that
cannot be served (a broken checkpoint, a template that does not render, an engine that does not start) fails
the pipeline here, not in production.
"""

from __future__ import annotations

import time
from typing import Any

from .. import console
from ..errors import StageError, require
from ..stage import StageContext, StageResult
from ..utils import atomic

log = console.get_logger(__name__)

REPORT = "deploy.json"


def smoke_conversation(
    base_url: str, model: str, turns: list[str], max_tokens: int, api_key: str | None
) -> list[dict[str, Any]]:
    """Send ``turns`` as one growing conversation (streaming, greedy); one record per answer."""
    openai = require("openai", extra="serve", purpose="The serve deploy check")
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key or "none", max_retries=0, timeout=300)
    messages: list[dict[str, str]] = []
    out = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        t0 = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        finish = None
        usage = None
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter()
                    parts.append(choice.delta.content)
                finish = choice.finish_reason or finish
        end = time.perf_counter()
        answer = "".join(parts)
        messages.append({"role": "assistant", "content": answer})
        n = usage.completion_tokens if usage else 0
        decode_s = end - (first or end)
        out.append(
            {
                "user": turn,
                "answer": answer,
                "finish_reason": finish,
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": n,
                "ttft_s": round((first or end) - t0, 4),
                # decode speed after the first token (the first one is TTFT's)
                "tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
            }
        )
    return out


def safety_probe(base_url: str, model: str, probe: str, api_key: str | None) -> dict[str, Any]:
    """Send ``probe`` (greedy, a few tokens): blocked means a 400 ``content_filter`` (an input filter) or an
    answer ending with ``finish_reason: content_filter`` (an output filter)."""
    openai = require("openai", extra="serve", purpose="The serve deploy check")
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key or "none", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": probe}]
    try:
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    except openai.BadRequestError as e:
        code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
        if code == "content_filter":
            return {"blocked": True, "where": "input", "message": str((e.body or {}).get("message", ""))}
        raise
    finish = resp.choices[0].finish_reason if resp.choices else None
    return {"blocked": finish == "content_filter", "where": "output" if finish == "content_filter" else None}


def run_serve(ctx: StageContext) -> StageResult:
    from ..train.recipe import resolve_model
    from .engines import build_engine, require_serving

    require_serving("The serve deploy check", client=True)
    from .gateway import create_app
    from .safety import build_chain
    from .server import BackgroundServer
    from .settings import GatewaySettings

    cfg = ctx.manifest.serve
    resolved = resolve_model(ctx, cfg.model, "serve.model")
    name = cfg.served_model_name or ctx.manifest.project.name
    settings = GatewaySettings.from_section(cfg.model_copy(update={"served_model_name": name}))
    chain = build_chain(cfg.safety)
    engine = build_engine(cfg, resolved.path, model_name=name)
    app = create_app(engine, settings, filters=chain)
    log.info("deploy check: serving %s with the %s engine", resolved.describe(ctx), cfg.engine)
    t0 = time.perf_counter()
    srv = BackgroundServer(
        app, "127.0.0.1", None, startup_timeout_s=cfg.startup_timeout_s, shutdown_timeout_s=5
    )
    try:
        srv.start()
    except StageError as e:
        raise StageError(f"serve: the deploy check could not start the {cfg.engine} engine on "
                         f"{resolved.path}: {e}") from None  # fmt: skip
    startup_s = time.perf_counter() - t0
    probe = None
    try:
        turns = smoke_conversation(srv.url, name, list(cfg.smoke), cfg.smoke_max_tokens, settings.api_key)
        if cfg.safety.probe:
            probe = safety_probe(srv.url, name, cfg.safety.probe, settings.api_key)
    except Exception as e:  # the official client's errors: a deploy check that fails says why
        raise StageError(f"serve: the smoke conversation failed against {srv.url}: {e}") from None
    finally:
        srv.stop()
    if probe is not None and not probe["blocked"]:
        raise StageError(
            f"serve: the safety probe {cfg.safety.probe!r} was not blocked by the filters "
            f"({', '.join(f.name for f in chain.filters) or 'none configured'}); fix serve.safety.filters"
        )
    if any(not t["completion_tokens"] for t in turns):
        raise StageError("serve: the model answered a smoke turn with no tokens at all; check the checkpoint")
    ttfts = [t["ttft_s"] for t in turns]
    speeds = [t["tokens_per_s"] for t in turns if t["tokens_per_s"]]
    report = {
        "engine": cfg.engine,
        "model": str(resolved.path),
        "model_source": resolved.source,
        "served_model_name": name,
        "startup_s": round(startup_s, 3),
        "ttft_s_mean": round(sum(ttfts) / len(ttfts), 4) if ttfts else None,
        "tokens_per_s_mean": round(sum(speeds) / len(speeds), 2) if speeds else None,
        "turns": turns,
        "safety": {
            "filters": [f"{f.name} ({f.direction})" for f in chain.filters],
            "probe": cfg.safety.probe,
            "probe_blocked": probe["blocked"] if probe else None,
            "probe_blocked_at": probe["where"] if probe else None,
        },
    }
    path = ctx.out_dir / REPORT
    atomic.write_json(path, report)
    metrics = {
        "engine": cfg.engine,
        "model": resolved.describe(ctx),
        "startup_s": report["startup_s"],
        "ttft_s": report["ttft_s_mean"],
        "tokens_per_s": report["tokens_per_s_mean"],
        "answers": [t["answer"] for t in turns],
        "safety_filters": len(chain.filters),
        "safety_probe_blocked": probe["blocked"] if probe else None,
    }
    summary = [
        ("model", resolved.describe(ctx)),
        ("engine", cfg.engine),
        ("startup", f"{startup_s:.1f} s"),
        ("time to first token", f"{report['ttft_s_mean']:.3f} s"),
        ("decode", f"{report['tokens_per_s_mean'] or 0:.1f} tokens/s"),
        (
            "safety probe",
            f"blocked ({probe['where']} filter)" if probe else ("no probe" if chain.active else "no filters"),
        ),
        (
            "first answer",
            (turns[0]["answer"][:60] + "…") if len(turns[0]["answer"]) > 60 else turns[0]["answer"],
        ),
    ]
    return StageResult(outputs={"deploy": path}, metrics=metrics, summary=summary)

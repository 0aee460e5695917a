"""`llmforge serve` (the long-running OpenAI-compatible server) and `llmforge chat` (a terminal chat).

``register(app)`` adds both commands to the root typer app. Like every command module, this is the only layer
that prints; heavy imports (torch, uvicorn, openai) happen inside the commands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..cli.common import DEFAULT_MANIFEST, ManifestOpt, OverridesArg, load_manifest, only_overrides
from ..errors import UserInputError

MODEL_STAGES = ("quantize", "distill", "align", "sft", "pretrain")


def register(app: typer.Typer) -> None:
    app.command("serve", help="Serve the model on an OpenAI-compatible endpoint until Ctrl-C / SIGTERM.")(
        serve
    )
    app.command("chat", help="Chat in the terminal with the project's model or any OpenAI-compatible URL.")(
        chat
    )


def resolve_serve_model(loaded, explicit: str | os.PathLike | None):
    """The model `llmforge serve` serves: ``explicit`` (``--model`` / ``serve.model``), else the newest
    upstream stage's ``model`` read from their lineage — the same resolver the stages use."""
    from .. import pipeline
    from ..stage import StageContext
    from ..train.recipe import resolve_model

    upstream = {}
    for spec in pipeline.Pipeline().stages:
        lin = pipeline.read_lineage(loaded, spec.name)
        if lin is not None:
            upstream[spec.name] = {k: loaded.resolve(v["path"]) for k, v in lin.get("outputs", {}).items()}
    ctx = StageContext(name="serve", loaded=loaded, out_dir=loaded.runs_dir / "serve", upstream=upstream)
    field = "--model" if explicit is not None else "serve.model"
    return resolve_model(ctx, explicit if explicit is not None else loaded.manifest.serve.model, field), ctx


def serve(
    overrides: OverridesArg = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    port: Annotated[int | None, typer.Option("--port", "-p", help="Port (default serve.port).")] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Address to listen on (default serve.host).")
    ] = None,
    engine: Annotated[
        str | None, typer.Option("--engine", help="local or vllm (default serve.engine).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model directory (default: the pipeline's final model).")
    ] = None,
) -> None:
    from .engines import build_engine, require_serving

    require_serving("llmforge serve")
    from .gateway import create_app
    from .safety import build_chain
    from .server import serve_forever
    from .settings import GatewaySettings, api_key_state

    ov = only_overrides(overrides)
    for key, value in (("port", port), ("host", host), ("engine", engine)):
        if value is not None:
            ov.append(f"serve.{key}={value}")
    loaded = load_manifest(manifest, ov)
    cfg = loaded.manifest.serve
    resolved, ctx = resolve_serve_model(loaded, model)
    name = cfg.served_model_name or loaded.manifest.project.name
    settings = GatewaySettings.from_section(cfg.model_copy(update={"served_model_name": name}))
    chain = build_chain(cfg.safety)  # before the engine loads: a bad custom filter fails fast
    eng = build_engine(cfg, resolved.path, model_name=name)
    app = create_app(eng, settings, filters=chain)
    url = f"http://{cfg.host}:{cfg.port}/v1"
    typer.echo(f"llmforge serve: {resolved.describe(ctx)} as '{name}' with the {cfg.engine} engine")
    typer.echo(f"loading the model; listening on {url} (answers 503 until ready)")
    typer.echo(api_key_state(settings, cfg.api_key_env))
    if chain.active:
        typer.echo("safety filters: " + ", ".join(f"{f.name} ({f.direction})" for f in chain.filters))

    def ready() -> None:
        typer.echo(f"ready: {url}  (Ctrl-C or SIGTERM drains in-flight requests, then stops)")

    serve_forever(
        app,
        cfg.host,
        cfg.port,
        shutdown_timeout_s=cfg.shutdown_timeout_s,
        startup_timeout_s=cfg.startup_timeout_s,
        on_ready=ready,
    )
    typer.echo("stopped")


def chat(
    overrides: OverridesArg = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help="An OpenAI-compatible base URL (…/v1). Default: serve the project's model here."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Model name at --url (default: its first), or a model directory to serve."
        ),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Longest answer in tokens.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sampling temperature.")] = None,
    api_key_env: Annotated[
        str, typer.Option("--api-key-env", help="Environment variable with the key for --url.")
    ] = "LLMFORGE_API_KEY",
) -> None:
    from ..errors import require
    from .chat import HELP, ChatSession

    openai = require("openai", extra="serve", purpose="llmforge chat")
    server = None
    if url is None:
        server, url, name, key = _local_server(manifest, overrides, model)
    else:
        key = os.environ.get(api_key_env) or os.environ.get("OPENAI_API_KEY") or "none"
        name = model
    try:
        client = openai.OpenAI(base_url=url.rstrip("/"), api_key=key, max_retries=0, timeout=600)
        if name is None:
            try:
                models = client.models.list().data
            except openai.APIError as e:
                raise UserInputError(f"--url {url}: cannot list models ({e}); pass --model NAME") from None
            if not models:
                raise UserInputError(f"--url {url}: the server lists no models; pass --model NAME")
            name = models[0].id
        session = ChatSession(
            client, name, _write, system=system, max_tokens=max_tokens, temperature=temperature
        )
        typer.echo(f"chatting with '{name}' at {url} — {HELP}")
        while True:
            try:
                line = input("you> ")
            except EOFError:
                typer.echo("")
                break
            except KeyboardInterrupt:
                typer.echo("")
                break
            _write("model> ")
            if not session.handle(line):
                _write("\n")
                break
    finally:
        if server is not None:
            server.stop()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _local_server(manifest: Path, overrides, model: str | None):
    """Serve the project's model (or ``model``, a directory) on a private loopback port for the chat."""
    from .engines import build_engine, require_serving

    require_serving("llmforge chat (serving the project's model)")
    from .gateway import create_app
    from .safety import build_chain
    from .server import BackgroundServer
    from .settings import GatewaySettings

    loaded = load_manifest(manifest, only_overrides(overrides))
    cfg = loaded.manifest.serve
    resolved, ctx = resolve_serve_model(loaded, model)
    name = cfg.served_model_name or loaded.manifest.project.name
    settings = GatewaySettings.from_section(cfg.model_copy(update={"served_model_name": name}))
    chain = build_chain(cfg.safety)
    typer.echo(f"loading {resolved.describe(ctx)} ({cfg.engine} engine)…")
    srv = BackgroundServer(
        create_app(build_engine(cfg, resolved.path, model_name=name), settings, filters=chain),
        startup_timeout_s=cfg.startup_timeout_s,
    ).start()
    return srv, srv.url + "/v1", name, settings.api_key or "none"

"""`python -m tests.serve._server_worker PORT TOKENIZER_DIR STEP_DELAY SHUTDOWN_TIMEOUT`: a gateway in the
foreground (the same `serve_forever` as `llmforge serve`) over a slow fake engine, for the SIGTERM tests."""

from __future__ import annotations

import sys

from llmforge.serve.gateway import create_app
from llmforge.serve.server import serve_forever
from llmforge.serve.settings import GatewaySettings
from llmforge.tokenizer.info import load_tokenizer

from .fake_engine import FakeEngine


def main() -> None:
    port, tok_dir, delay, timeout = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    engine = FakeEngine(load_tokenizer(tok_dir), step_delay=delay, max_model_len=100_000)
    app = create_app(engine, GatewaySettings(max_tokens=100_000, shutdown_timeout_s=timeout))
    serve_forever(app, "127.0.0.1", port, shutdown_timeout_s=timeout,
                  on_ready=lambda: print("READY", flush=True))  # fmt: skip
    print(f"EXITED cancelled={len(engine.cancelled)} finished={len(engine.finished)}", flush=True)


if __name__ == "__main__":
    main()

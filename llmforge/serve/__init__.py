"""llmforge.serve — the OpenAI-compatible gateway and its engines.

``protocol`` (the wire format), ``gateway`` (``create_app(engine, settings)``: routes, auth, limits, metrics,
errors, the filter hook), ``filters`` (the hook the safety chain fills), ``server`` (foreground serving with a
graceful SIGTERM drain; a background server for checks and tests), ``vllm_engine`` (vLLM as a managed
subprocess behind the same ``AsyncEngine`` contract as llmforge's own engine in ``llmforge.infer``),
``engines`` (the engine a ``serve:`` section asks for), ``stage`` (the deploy check of ``llmforge run``),
``chat`` and ``cli`` (``llmforge serve``, ``llmforge chat``).

Importing this package (or ``cli``) is cheap: FastAPI, uvicorn, torch and vLLM load inside the commands.
"""

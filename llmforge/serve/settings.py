"""The gateway's settings: the `serve:` manifest section resolved into plain values (the API key read from the
environment), so the gateway never reads the manifest or the environment itself and tests build it directly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UserInputError

DEFAULT_KEY_ENV = "LLMFORGE_API_KEY"


@dataclass(frozen=True)
class GatewaySettings:
    served_model_name: str | None = None  # None: the engine's model_name
    api_key: str | None = None  # None: no authentication
    max_tokens: int = 1024
    max_n: int = 4
    max_body_bytes: int = 1_000_000
    max_stop: int = 4
    shutdown_timeout_s: float = 30.0
    engine_name: str = "local"

    @classmethod
    def from_section(cls, section, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Settings from a ``ServeSection``; ``env`` (default ``os.environ``) supplies the API key."""
        return cls(
            served_model_name=section.served_model_name,
            api_key=resolve_api_key(section.api_key_env, env),
            max_tokens=section.max_tokens,
            max_n=section.max_n,
            max_body_bytes=section.max_body_bytes,
            max_stop=section.max_stop,
            shutdown_timeout_s=section.shutdown_timeout_s,
            engine_name=section.engine,
        )


def resolve_api_key(api_key_env: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The key named by ``serve.api_key_env``, else ``LLMFORGE_API_KEY``, else None (no auth).

    A manifest that names a variable the environment does not set is a mistake that would silently open
    the server, so it is an error rather than a fallback to no key.
    """
    env = os.environ if env is None else env
    if api_key_env:
        key = env.get(api_key_env, "")
        if not key:
            raise UserInputError(
                f"serve.api_key_env names the environment variable {api_key_env!r}, which is not set (or empty); "
                f"export {api_key_env}=... or remove serve.api_key_env to serve without a key"
            )
        return key
    return env.get(DEFAULT_KEY_ENV) or None


def api_key_state(settings: GatewaySettings, api_key_env: str | None) -> str:
    """A line for `llmforge serve` saying whether clients need a key (never the key itself)."""
    if settings.api_key is None:
        return f"no API key required (set {DEFAULT_KEY_ENV} or serve.api_key_env to require one)"
    return f"API key required (from ${api_key_env or DEFAULT_KEY_ENV})"

"""The engine's errors, each mapped to one HTTP status by the gateway.

They are ``LLMForgeError`` subclasses so the CLI shows them cleanly, and distinct classes so the gateway never
has to parse a message: ``EngineOverloaded`` → 429, ``ContextLengthExceeded`` → 400
``context_length_exceeded``, ``EngineNotReady`` → 503. Invalid sampling parameters or prompts raise
``RequestError`` (a ``ValueError`` carrying the offending parameter's name) → 400.
"""

from __future__ import annotations

from ..errors import LLMForgeError


class EngineError(LLMForgeError):
    """Base class of everything the inference engine raises about a request or itself."""


class EngineOverloaded(EngineError):
    """Every slot is busy and the waiting queue is full: retry later (HTTP 429)."""


class ContextLengthExceeded(EngineError):
    """The prompt plus ``max_tokens`` does not fit in the engine's ``max_model_len`` (HTTP 400)."""

    def __init__(self, message: str, *, prompt_tokens: int, max_tokens: int, max_model_len: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class EngineNotReady(EngineError):
    """The engine is still loading its model, or is shutting down (HTTP 503)."""


class RequestError(ValueError):
    """A request the engine cannot run as asked: ``args == (message, param)``, ``str(err) == message``.

    A ``ValueError`` (the contract's ``ValueError(msg, param)``) so callers that validate input generically
    catch it; ``param`` names the field to change (``"top_p"``, ``"prompt"``) for the OpenAI error envelope.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message

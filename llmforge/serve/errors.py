"""The one place where anything a request can raise becomes an OpenAI error envelope and a status code.

``{"error": {"message", "type", "param", "code"}}`` with 400 for invalid requests (``context_length_exceeded``
and ``content_filter`` are 400s with their codes), 401 for a missing or wrong key, 404 for an unknown route,
405 for a wrong method, 413 for an oversized body, 429 when the engine's queue is full, 503 while the engine
starts, after it failed or while the server shuts down. Anything else is a bug in llmforge: it is logged with
its traceback and answered 500 ``internal_error`` (the test suite asserts no request ever gets one).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .. import console
from .filters import ContentFiltered
from .protocol import ProtocolError

log = console.get_logger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed",
    500: "internal_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An answer the gateway gives on purpose; raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode("utf-8")


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_PARAM_PREFIX = re.compile(r"^(?:Value error, )?([A-Za-z_][\w.\[\]]*): (.*)$", re.S)


def _loc(loc: tuple) -> str | None:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("str", "int", "list[int]", "list[str]", "list[list[int]]", "list[TextPart]", "TextPart"):
            continue  # union branch names pydantic adds to a location; OpenAI's `param` has none
        else:
            parts.append(str(p))
    return ".".join(parts) or None


def from_validation_error(err: Any) -> APIError:
    """A pydantic ``ValidationError`` of a request body as OpenAI words it: the first problem, its param."""
    errors = err.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    loc = tuple(first.get("loc", ()))
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "extra_forbidden":
        name = _loc(loc) or "?"
        return invalid(
            f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter"
        )
    if first.get("type") == "missing":
        name = _loc(loc) or "?"
        return invalid(
            f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    m = _PARAM_PREFIX.match(msg)
    if not loc and m:  # a model_validator's "param: message"
        return invalid(f"Invalid '{m.group(1)}': {m.group(2)}", param=m.group(1), code="invalid_value")
    msg = msg.removeprefix("Value error, ")
    name = _loc(loc)
    where = f"Invalid '{name}': " if name else ""
    extra = f" ({len(errors) - 1} more problem(s) in the request)" if len(errors) > 1 else ""
    code = "invalid_type" if str(first.get("type", "")).endswith("_type") else "invalid_value"
    return invalid(f"{where}{msg}.{extra}", param=name, code=code)


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception a request raised to the answer it gets (see the module docstring)."""
    from pydantic import ValidationError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, ProtocolError):
        return invalid(exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, ContentFiltered):
        return invalid(exc.message, code="content_filter")
    engine_error = _engine_error(exc)
    if engine_error is not None:
        return engine_error
    log.error("internal error answering a request", exc_info=exc)
    return APIError(
        500, "The server had an internal error while processing the request.", code="internal_error"
    )


def _engine_error(exc: BaseException) -> APIError | None:
    from ..infer import ContextLengthExceeded, EngineError, EngineNotReady, EngineOverloaded, RequestError

    if isinstance(exc, RequestError):
        return invalid(exc.message, param=exc.param)
    if isinstance(exc, EngineOverloaded):
        return APIError(
            429,
            str(exc) or "The server is busy; retry later.",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, ContextLengthExceeded):
        return invalid(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, EngineNotReady):
        return APIError(
            503,
            str(exc) or "The model is still loading; retry shortly.",
            code="engine_starting",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, EngineError):
        log.error("engine error: %s", exc)
        return APIError(503, f"The inference engine failed: {exc}", code="engine_error")
    return None

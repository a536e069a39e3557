"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and the
mapping from the gRPC server's statuses onto HTTP ones."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from salience_client import SalienceClientError
from salience_client.closing import CLIENT_CLOSED

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""What a 429 or 503 tells the client to wait before retrying."""


class ApiError(Exception):
    """A failed request: its HTTP status and the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def error(self) -> dict[str, Any]:
        """The inner error object (what a mid-stream error event carries)."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        """The HTTP response carrying this error."""
        return JSONResponse({"error": self.error()}, status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


def unsupported(what: str, param: str | None = None) -> ApiError:
    """400 for a feature of the OpenAI API that this server does not offer."""
    return invalid(f"{what} is not supported by this server", param, "unsupported_parameter")


def model_not_found(model: str) -> ApiError:
    """404 for a ``model`` this server does not serve."""
    return ApiError(
        404, f"The model {model!r} does not exist", param="model", code="model_not_found"
    )


_PLAIN_STATUSES: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ABORTED: (409, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
"""HTTP status and OpenAI error type of the gRPC statuses that need no special message."""

_CONFLICTS = frozenset({"SESSION_BUSY", "SESSION_CLOSED"})
"""Reasons of FAILED_PRECONDITION and CANCELLED that mean another call got in the way
(409); the other FAILED_PRECONDITION reasons are the request's own fault (400)."""


_STOP_REASONS = frozenset({"TOO_MANY_STOP_STRINGS", "STOP_STRING_TOO_LONG"})
_FIELD_REASONS = frozenset({"INVALID_SAMPLING", "INVALID_TOKEN"})
"""Reasons whose message begins with the request field at fault."""
_SAMPLING_FIELDS = frozenset(
    {
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "stop_token_ids",
        "min_tokens",
    }
)


def _field_at_fault(reason: str, message: str, param: str | None) -> str | None:
    """The request field a refusal of the server names (where a request's field
    reaches ``Generate`` under its own name), else ``param``."""
    if reason in _STOP_REASONS:
        return "stop"
    name = message.split(" ", 1)[0]
    if reason in _FIELD_REASONS and name in _SAMPLING_FIELDS:
        return name
    return param


def from_client_error(error: SalienceClientError, param: str | None = None) -> ApiError:
    """The HTTP error for a failed gRPC call: INVALID_ARGUMENT and FAILED_PRECONDITION
    400 (``context_length_exceeded`` for a prompt too long), UNAUTHENTICATED 401,
    NOT_FOUND 404, ABORTED and a busy or closed session 409, RESOURCE_EXHAUSTED 429
    (but a request out of memory even alone, or one whose request or answer passes the
    gRPC message limit, 400: it would fail again),
    UNAVAILABLE and a call cut off (CANCELLED without a reason) 503, DEADLINE_EXCEEDED
    504; 500 only for the server's own failures."""
    code, reason, message = error.code, error.reason, error.message
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param = _field_at_fault(reason, message, param)
    if code == grpc.StatusCode.INVALID_ARGUMENT and reason == "CONTEXT_EXCEEDED":
        return invalid(
            f"This model's maximum context length was exceeded: {message}",
            param,
            "context_length_exceeded",
        )
    # CANCELLED without a reason of the server's: the call was cut off (the server
    # stopping at the end of its grace), not refused; the shim cancels only calls nobody
    # awaits. As UNAVAILABLE, a 503.
    # CLIENT_CLOSED: the shim itself is stopping (its grace ran out, ``serving``).
    if (
        code == grpc.StatusCode.UNAVAILABLE
        or (code == grpc.StatusCode.CANCELLED and reason == code.name)
        or reason == CLIENT_CLOSED
    ):
        return ApiError(
            503,
            f"The inference server is unavailable: {message}",
            "server_error",
            code="service_unavailable",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED):
        if reason in _CONFLICTS:
            return ApiError(409, message, param=param, code=reason.lower())
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return invalid(message, param, reason.lower())
        return ApiError(499, f"The call was cancelled: {message}", code=reason.lower())
    if reason in ("OUT_OF_MEMORY", "IMAGE_OUT_OF_MEMORY"):  # SDKs would retry a 429 in vain
        return invalid(
            f"The request needs more memory than the server has: {message}", param, "out_of_memory"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _is_past_message_limit(error):
        return invalid(
            f"The call's request or answer is larger than a gRPC message may be: {message}",
            param,
            "message_too_large",
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(
            429,
            f"The server is overloaded: {message}",
            "rate_limit_error",
            code=reason.lower(),
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ApiError(
            401,
            f"The inference server refused the credentials: {message}",
            "invalid_request_error",
            code="invalid_api_key",
        )
    if reason == "CONSTRAINT_FAILED":  # the grammar's fault, met while decoding
        return invalid(message, param, "invalid_constraint")
    if code in _PLAIN_STATUSES:
        status, kind = _PLAIN_STATUSES[code]
        return ApiError(status, message, kind, param if status < 500 else None, reason.lower())
    log.error("unexpected gRPC error: %s", error)
    return ApiError(500, f"Internal error: {error}", "server_error", code="internal_error")


def _is_past_message_limit(error: SalienceClientError) -> bool:
    """gRPC's own refusal of a message past its size limit (no reason of the server's):
    the same call is refused again, so it is no 429 to retry after a while."""
    return error.reason == error.code.name and "message larger than max" in error.message


@contextlib.contextmanager
def client_errors(param: str | None = None, constraint_param: str | None = None) -> Iterator[None]:
    """Turns a SalienceClientError raised inside into the matching ApiError (a refused
    output constraint names ``constraint_param``, the field that asked for it)."""
    try:
        yield
    except SalienceClientError as error:
        if error.reason in ("INVALID_CONSTRAINT", "CONSTRAINT_FAILED") and constraint_param:
            param = constraint_param
        raise from_client_error(error, param) from None


def as_api_error(error: BaseException) -> ApiError:
    """Any failure as an ApiError (for errors met in the middle of a stream)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, SalienceClientError):
        return from_client_error(error)
    log.exception("unexpected error", exc_info=error)
    with contextlib.suppress(AttributeError):  # an exception without a __dict__
        setattr(error, _LOGGED, True)
    return ApiError(500, f"Internal error: {error}", "server_error", code="internal_error")


_LOGGED = "_salience_logged"
"""Set on an exception whose traceback ``as_api_error`` logged."""


class LoggedOnce(logging.Filter):
    """Drops a record of an exception logged already: Starlette re-raises a handler's
    exception after the 500 is sent, and uvicorn logged its traceback a second time
    ("Exception in ASGI application")."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not getattr(error, _LOGGED, False)


async def handle_api_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI handler: an ApiError as its response."""
    assert isinstance(error, ApiError)
    return error.response()


async def handle_http_exception(request: Request, error: Exception) -> JSONResponse:
    """FastAPI handler: Starlette's 404/405 in OpenAI's shape."""
    assert isinstance(error, HTTPException)
    message = str(error.detail)
    if error.status_code == 404:  # no such route: OpenAI's words
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return ApiError(error.status_code, message, headers=dict(error.headers or {})).response()


async def handle_unexpected(request: Request, error: Exception) -> JSONResponse:
    """FastAPI handler: anything else is a 500 in OpenAI's shape."""
    return as_api_error(error).response()

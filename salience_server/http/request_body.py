"""A request's JSON body: read up to the size limit (413 past it), parsed, and validated
against its schema, any problem a 400 naming the field as OpenAI names it."""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

import pydantic
from fastapi import Request
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from salience_server.http.errors import ApiError, invalid
from salience_server.text_checks import load_json, lone_surrogate_path, non_finite_path

_Model = TypeVar("_Model", bound=BaseModel)

MAX_BODY_BYTES = 64 << 20
"""The largest request body read: the gRPC message limit, which an image in it travels
within too. A larger one is a 413 before it is read (or as soon as it passes this)."""
THREADED_BODY_BYTES = 1 << 20
"""Bodies past this are decoded off the event loop (a thread's hop costs more than a
small body's decoding)."""
BODY_IDLE_S = 30.0
"""How long the body may pause between two of its chunks: a client that sends headers
and then nothing (or never finishes) held its connection and its request forever."""
BODY_TOTAL_S = 300.0
"""How long the whole body may take to arrive (a client trickling a byte at a time)."""


async def parse_body(request: Request, model: type[_Model]) -> _Model:
    """Reads and validates a JSON body; any problem is a 400 invalid_request_error. A
    large body is decoded and checked in a thread: 64 MiB of token ids took a minute,
    and every other request (streams, /health) waited for it."""
    raw = await read_body(request)
    if len(raw) > THREADED_BODY_BYTES:
        return await asyncio.to_thread(_parsed, raw, model)
    return _parsed(raw, model)


def _parsed(raw: bytes, model: type[_Model]) -> _Model:
    """A read body, decoded and validated."""
    try:
        data = load_json(raw)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, JSONTooDeep
        raise invalid(f"The request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object")
    where = lone_surrogate_path(data, raw)
    if where is not None:
        raise invalid(
            f"{where or 'The body'} holds a lone UTF-16 surrogate: not valid Unicode text",
            where or None,
        )
    where = non_finite_path(data, raw)
    if where is not None:
        raise invalid(f"{where or 'The body'} is NaN or infinite: not a JSON number", where or None)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as error:
        raise _refusal(error.errors()) from None


async def read_body(request: Request) -> bytes:
    """The body, read up to MAX_BODY_BYTES (413 past it). A client that leaves before
    sending it all gets a 400 no one reads, instead of an "unexpected error" logged
    with its traceback."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    stream = aiter(request.stream())
    ends = time.monotonic() + BODY_TOTAL_S
    try:
        while True:
            wait_s = min(BODY_IDLE_S, ends - time.monotonic())
            try:
                chunk = await asyncio.wait_for(anext(stream), max(wait_s, 0.0))
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise _too_slow() from None
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _too_large()
            chunks.append(chunk)
    except ClientDisconnect:
        raise invalid("The client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _closing() -> dict[str, str]:
    """Headers of a 408: the connection is closed after it (uvicorn went on reading the
    body for as long as it came, its keep-alive timer stopped at the first byte: a
    client trickling its body held the connection forever)."""
    return {"Connection": "close"}


def _too_slow() -> ApiError:
    return ApiError(
        408,
        f"The request body did not arrive in time (a pause of {BODY_IDLE_S:g} s, or "
        f"{BODY_TOTAL_S:g} s in all)",
        code="request_timeout",
        headers=_closing(),
    )


def _too_large() -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than {MAX_BODY_BYTES >> 20} MiB",
        code="request_too_large",
    )


def _refusal(errors: list[Any]) -> ApiError:
    """The 400 for pydantic's errors: the first one's field, and every type its union
    would have taken (``input: Input should be a valid string, or ... a valid list``)."""

    def field(error: Any) -> str:
        """The field's path as OpenAI writes it: ``messages[0].content``."""
        path = ""
        for part in error["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif not _is_union_member(part):
                path += f".{part}" if path else str(part)
        return path

    param = field(errors[0]) or None
    messages = list(dict.fromkeys(e["msg"] for e in errors if field(e) == (param or "")))
    message = ", or ".join(messages)
    return invalid(f"{param}: {message}" if param else message, param)


def _is_union_member(part: Any) -> bool:
    """How pydantic names the member of a union type in an error's location (``str``,
    ``list[dict[str,any]]``): not a field of the request."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)

"""POST /v1/responses (and GET / DELETE of stored responses): OpenAI's Responses API.

``response_plan`` turns a request into its prompt and the session it continues; here
the reply is decoded, returned whole or streamed as Responses events, and stored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from salience_client import Done
from salience_server.http.backend import Backend
from salience_server.http.errors import ApiError, as_api_error, client_errors
from salience_server.http.generation import (
    ChoiceDone,
    ChoiceToken,
    Generation,
    GenerationEvent,
    collect,
)
from salience_server.http.request_body import parse_body
from salience_server.http.response_plan import ResponsePlan, plan_response
from salience_server.http.responses_schema import ResponsesRequest
from salience_server.http.streaming import Primed, event_stream, start_stream, until_disconnected

router = APIRouter()


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    """OpenAI's Responses."""
    backend: Backend = request.app.state.backend
    plan = await plan_response(backend, await parse_body(request, ResponsesRequest))
    generation = plan.generation(backend)
    keepalive_s = backend.config.keepalive_s
    if plan.body.stream:
        events = await start_stream(
            request, generation.events(), "input", keepalive_s, plan.constraint_param
        )
        return event_stream(_stream(backend, plan, generation, events), keepalive_s)
    with client_errors("input", plan.constraint_param):
        result = await until_disconnected(request, collect(generation))
    choice = result.choices[0]
    stream = plan.reply_stream()
    for token in choice.tokens:
        stream.push(token.text, await plan.logprob(backend, token))
    stream.finish(choice.done)
    decoded_ids = [token.token_id for token in choice.tokens]
    response = plan.finished(stream, choice.done, result.cached_tokens, decoded_ids)
    plan.store(backend, response, stream, decoded_ids)
    return JSONResponse(response)


async def _stream(
    backend: Backend, plan: ResponsePlan, generation: Generation, events: Primed[GenerationEvent]
) -> AsyncIterator[str]:
    """The Responses event family, in OpenAI's order, each event numbered; an error
    midway is an ``error`` event, then ``response.failed``."""
    stream = plan.reply_stream()
    plan.store_unfinished(backend, "in_progress", [])
    done: Done | None = None
    decoded_ids: list[int] = []
    ended = False
    try:
        async with contextlib.aclosing(events):  # closed however the stream ends
            yield stream.event("response.created", response=plan.response("in_progress", []))
            yield stream.event("response.in_progress", response=plan.response("in_progress", []))
            async for event in events:
                if isinstance(event, ChoiceToken):
                    logprob = await plan.logprob(backend, event.token)
                    for sse in stream.push(event.token.text, logprob):
                        yield sse
                elif isinstance(event, ChoiceDone):
                    done, decoded_ids = event.done, event.token_ids
        for sse in stream.finish(done):
            yield sse
        response = plan.finished(stream, done, generation.cached_tokens, decoded_ids)
        plan.store(backend, response, stream, decoded_ids, replacing=True)
        ended = True
        final = "response.completed" if stream.status == "completed" else "response.incomplete"
        yield stream.event(final, response=response)
    except Exception as error:
        api_error = as_api_error(error)
        for sse in stream.fail():
            yield sse
        yield stream.event(
            "error", code=api_error.code, message=api_error.message, param=api_error.param
        )
        failure = {"code": api_error.code or "server_error", "message": api_error.message}
        plan.store_unfinished(backend, "failed", stream.items, failure)
        failed = plan.response("failed", stream.items, error=failure)
        yield stream.event("response.failed", response=failed)
    except (GeneratorExit, asyncio.CancelledError):  # the client went away
        if not ended:
            stream.fail()
            plan.store_unfinished(backend, "cancelled", stream.items)
        raise


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> JSONResponse:
    """A stored response."""
    backend: Backend = request.app.state.backend
    stored = backend.responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    """Forgets a stored response (its session stays in the pool)."""
    backend: Backend = request.app.state.backend
    if not backend.responses.delete(response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


def _not_found(response_id: str) -> ApiError:
    return ApiError(
        404,
        f"Response with id {response_id!r} not found",
        "invalid_request_error",
        param="response_id",
        code="response_not_found",
    )

"""Errors through the shim from a scripted server: every gRPC status is its HTTP status
and OpenAI's error shape, an error mid-stream is an error chunk, and keep-alives flow
while the first token is awaited."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest

from tests.shim_support import HELLO, RunningShim, Script, error_body, start_scripted, start_shim


def test_an_error_mid_stream_is_an_error_chunk() -> None:
    script = Script(text="abcdefgh", fail_after=3)
    server = start_scripted(script)
    running = start_shim(server.target, replay=False)  # else the stream would resume
    try:
        stream = running.client().chat.completions.create(
            model="scripted", messages=HELLO, stream=True
        )
        received = ""
        with pytest.raises(openai.APIError) as error:
            for chunk in stream:
                received += chunk.choices[0].delta.content or ""
        assert received == "abc"
        assert error.value.body["code"] == "service_unavailable"
        raw = httpx.post(
            f"{running.base_url}/chat/completions",
            json={"model": "scripted", "messages": HELLO, "stream": True},
        ).text
        assert raw.rstrip().endswith('"code": "service_unavailable"}}\n\ndata: [DONE]')
    finally:
        running.stop()
        server.stop()


# ----- every gRPC status, on a scripted server --------------------------------------


@pytest.fixture(scope="module")
def failing() -> Iterator[tuple[Script, RunningShim]]:
    script = Script(text="abcdef")
    server = start_scripted(script)
    running = start_shim(server.target, keepalive_s=0.1, replay=False)  # failures reach HTTP
    yield script, running
    running.stop()
    server.stop()


@pytest.mark.parametrize(
    ("code", "reason", "status", "error_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CONSTRAINT", 400, "invalid_constraint"),
        (grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_EXCEEDED", 400, "context_length_exceeded"),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", 401, "invalid_api_key"),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", 403, "permission_denied"),
        (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", 404, "session_not_found"),
        (grpc.StatusCode.ABORTED, "OFFSET_MISMATCH", 409, "offset_mismatch"),
        (grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS", 409, "session_exists"),
        (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_BUSY", 409, "session_busy"),
        (grpc.StatusCode.FAILED_PRECONDITION, "READOUT_DISABLED", 400, "readout_disabled"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", 429, "queue_full"),
        # Not a 429: it fails again on every retry (SDKs retry 429s by themselves).
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY", 400, "out_of_memory"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "IMAGE_OUT_OF_MEMORY", 400, "out_of_memory"),
        (grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED", 501, "unimplemented"),
        (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", 503, "service_unavailable"),
        (grpc.StatusCode.CANCELLED, "CANCELLED", 503, "service_unavailable"),  # cut off
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", 504, "deadline_exceeded"),
        (grpc.StatusCode.INTERNAL, "INTERNAL", 500, "internal_error"),
    ],
)
def test_each_grpc_status_is_its_http_status(
    failing: tuple[Script, RunningShim], code: Any, reason: str, status: int, error_code: str
) -> None:
    script, shim = failing
    script.fail_with = (code, reason)
    try:
        for path, body in [
            ("chat/completions", {"messages": HELLO}),
            ("completions", {"prompt": "x"}),
            ("responses", {"input": "x"}),
        ]:
            response = httpx.post(f"{shim.base_url}/{path}", json={"model": "scripted", **body})
            assert response.status_code == status, path
            assert error_body(response)["code"] == error_code
            if status in (429, 503):
                assert response.headers["retry-after"] == "1"
    finally:
        script.fail_with = None


def test_a_refused_constraint_of_the_tools_names_them(
    failing: tuple[Script, RunningShim],
) -> None:
    """The tools' constraint (``tool_choice`` required) refused by the server names
    "tools". (On the tiny model the tools' description leaves no room in its context.)"""
    script, shim = failing
    script.fail_with = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CONSTRAINT")
    try:
        with pytest.raises(openai.BadRequestError) as error:
            shim.client().chat.completions.create(
                model="scripted",
                messages=HELLO,
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                tool_choice="required",
            )
    finally:
        script.fail_with = None
    assert (error.value.body["param"], error.value.body["code"]) == ("tools", "invalid_constraint")


def test_keep_alives_while_the_first_token_is_awaited(failing: tuple[Script, RunningShim]) -> None:
    script, shim = failing
    script.first_token_delay_s = 0.5
    try:
        body = {"model": "scripted", "messages": HELLO, "stream": True}
        raw = httpx.post(f"{shim.base_url}/chat/completions", json=body).text
        events = raw.split("\n\n")
        # The role chunk waits for the first token; comments come every 0.1 s before it
        # (about 5, with slack for a loaded machine).
        first_data = next(i for i, e in enumerate(events) if e.startswith("data:"))
        assert 2 <= first_data <= 12 and set(events[:first_data]) == {": keep-alive"}
        assert events[-2:] == ["data: [DONE]", ""]
        # The SDK reads through them.
        stream = shim.client().chat.completions.create(
            model="scripted", messages=HELLO, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "abcdef"
        events = list(shim.client().responses.create(model="scripted", input="x", stream=True))
        assert events[-1].response.output_text == "abcdef"
        raw = httpx.post(
            f"{shim.base_url}/completions",
            json={"model": "scripted", "prompt": "x", "stream": True},
        ).text
        assert raw.startswith(": keep-alive\n\n") and raw.endswith("data: [DONE]\n\n")
        # An error after the stream started (after the first keep-alive) is an error
        # event in it; one that comes before is a plain HTTP status.
        script.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
        response = httpx.post(f"{shim.base_url}/chat/completions", json=body)
        assert response.status_code == 200
        events = response.text.split("\n\n")
        assert events[0] == ": keep-alive" and events[-2:] == ["data: [DONE]", ""]
        assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == "queue_full"
        script.first_token_delay_s = 0.0
        assert httpx.post(f"{shim.base_url}/chat/completions", json=body).status_code == 429
    finally:
        script.first_token_delay_s = 0.0
        script.fail_with = None

"""Errors through the shim: OpenAI's shape, the right status, the SDK's matching exception;
bearer auth; and a client that goes away stops the work on the server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from salience_client import SalienceClient
from tests.conftest import default_model_available
from tests.shim_support import RunningShim, Script, start_scripted, start_shim

HELLO = [{"role": "user", "content": "Hello"}]


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_invalid_json_and_fields_are_400(shim: RunningShim, model: str) -> None:
    url = f"{shim.base_url}/chat/completions"
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert _error(response)["type"] == "invalid_request_error"
    response = httpx.post(url, json={"model": model})
    assert response.status_code == 400 and _error(response)["param"] == "messages"
    client = shim.client()
    bad_calls: list[tuple[dict[str, Any], str]] = [
        (dict(temperature=5), "temperature"),
        (dict(n=0), "n"),
        (dict(top_logprobs=3), "top_logprobs"),
        (dict(presence_penalty=1.0), "presence_penalty"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (dict(tools=[{"type": "function"}]), "tools[0].function"),
    ]
    for fields, param in bad_calls:
        arguments = {"model": model, "messages": HELLO, **fields}
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(**arguments)
        assert error.value.body["param"] == param, fields
        assert error.value.body["type"] == "invalid_request_error"


def test_context_overflow_is_context_length_exceeded(shim: RunningShim, model: str) -> None:
    long = [{"role": "user", "content": "x" * 600}]  # one token per byte; the limit is 512
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as error:
            shim.client().chat.completions.create(model=model, messages=long, stream=stream)
        assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:
        shim.client().completions.create(model=model, prompt="x" * 600)
    assert error.value.body["code"] == "context_length_exceeded"


def test_an_unknown_model_is_404(shim: RunningShim) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        shim.client().chat.completions.create(model="gpt-9", messages=HELLO)
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        shim.client().responses.create(model="gpt-9", input="hi")


def test_images_are_refused_while_the_model_takes_none(shim: RunningShim, model: str) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What?"}, image]}]
    with pytest.raises(openai.BadRequestError) as error:
        shim.client().chat.completions.create(model=model, messages=messages)
    assert error.value.body["code"] == "images_unsupported"


def test_readout_manifest_is_404_while_readout_is_off(shim: RunningShim) -> None:
    response = httpx.get(f"{shim.base_url}/readout/manifest")
    assert response.status_code == 404 and _error(response)["code"] == "readout_disabled"


def test_readout_manifest_when_readout_is_on() -> None:
    server = start_scripted(Script(readout=(["honesty", "cats"], [3, 7])))
    running = start_shim(server.target)
    try:
        response = httpx.get(f"{running.base_url}/readout/manifest")
        assert response.json() == {"concepts": ["honesty", "cats"], "layers": [3, 7]}
    finally:
        running.stop()
        server.stop()


def test_a_full_queue_is_429_with_retry_after(server_factory: Any, tiny_llama_dir: Any) -> None:
    server = server_factory(tiny_llama_dir, max_queue=0)
    running = start_shim(server.target)
    try:
        with pytest.raises(openai.RateLimitError) as error:
            running.client().chat.completions.create(model=tiny_llama_dir.name, messages=HELLO)
        assert error.value.response.headers["retry-after"] == "1"
        assert error.value.body["type"] == "rate_limit_error"
    finally:
        running.stop()


def test_an_unreachable_server_is_503() -> None:
    running = start_shim("127.0.0.1:1")
    try:
        with pytest.raises(openai.InternalServerError) as error:
            running.client().chat.completions.create(model="any", messages=HELLO)
        assert error.value.status_code == 503
        assert httpx.get(running.base_url.removesuffix("/v1") + "/health").status_code == 503
    finally:
        running.stop()


def test_bearer_auth(llama_server: Any, tiny_llama_dir: Any) -> None:
    running = start_shim(llama_server.target, api_key="sekret")
    try:
        assert httpx.get(running.base_url.removesuffix("/v1") + "/health").status_code == 200
        response = httpx.get(f"{running.base_url}/models")
        assert response.status_code == 401
        assert _error(response)["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        assert running.client().models.list().data[0].id == tiny_llama_dir.name
    finally:
        running.stop()


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


# ----- disconnects -------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_shim(default_server: Any) -> Iterator[RunningShim]:
    if not default_model_available():
        pytest.skip("the default model is not installed")
    running = start_shim(default_server.target)
    yield running
    running.stop()


def _settled(target: str, shim: RunningShim, timeout_s: float = 10.0) -> list[Any]:
    """The server's sessions once none is busy and the shim has lent none."""
    with SalienceClient(target) as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sessions = client.list_sessions()
            if not any(s.is_busy for s in sessions) and shim.backend.pool.num_leased == 0:
                return sessions
            time.sleep(0.05)
    raise AssertionError("a session stayed busy after the client went away")


def test_a_dropped_stream_stops_the_generation(
    default_shim: RunningShim, default_server: Any
) -> None:
    client = default_shim.client()
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Write a long story about a lighthouse."}]
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=400, temperature=0, stream=True
    )
    for _, _chunk in zip(range(4), stream, strict=False):
        pass
    stream.close()
    sessions = _settled(default_server.target, default_shim)
    prompt_length = len(SalienceClient(default_server.target).tokenize_chat(messages))
    assert max(s.length for s in sessions) < prompt_length + 200  # cut well short of 400


def test_a_dropped_plain_request_stops_the_generation(
    default_shim: RunningShim, default_server: Any
) -> None:
    model = default_shim.client().models.list().data[0].id
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Describe the sea at length."}],
        "max_tokens": 400,
        "temperature": 0,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{default_shim.base_url}/chat/completions", json=body, timeout=1.0)
    sessions = _settled(default_server.target, default_shim)
    assert max(s.length for s in sessions) < 300

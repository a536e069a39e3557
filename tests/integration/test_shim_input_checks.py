"""The shim's checks of text and numbers before anything is tokenized or sent: OpenAI's
400 naming the field (or a cap), never a 500 or a timeout."""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

import httpx
import openai
import pytest

from salience_server.http.request_body import MAX_BODY_BYTES
from salience_server.http.schemas import ChatCompletionRequest
from salience_server.text_checks import MAX_CHARS_PER_TOKEN
from tests.shim_support import HELLO, RunningShim, error_body


def test_a_lone_surrogate_anywhere_is_400_naming_where(shim: RunningShim, model: str) -> None:
    """JSON can escape a lone UTF-16 surrogate, which is no Unicode text: refused before
    it reaches a tokenizer or a protobuf string (it was a 500)."""
    bad = "a\ud800b"
    cases = [
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": bad}]},
            "messages[0].content",
        ),
        ("chat/completions", {"messages": HELLO, "stop": [bad]}, "stop[0]"),
        ("completions", {"prompt": bad}, "prompt"),
        ("responses", {"input": bad}, "input"),
        ("embeddings", {"input": bad}, "input"),
    ]
    headers = {"content-type": "application/json"}
    for path, fields, param in cases:
        body = json.dumps({"model": model, **fields})  # ensure_ascii: "\ud800" stays escaped
        response = httpx.post(f"{shim.base_url}/{path}", content=body, headers=headers)
        assert response.status_code == 400, (path, response.text)
        error = error_body(response)
        assert error["param"] == param and "surrogate" in error["message"], (path, error)
    root = shim.base_url.removesuffix("/v1")
    body = json.dumps({"model": model, "prompt": bad})
    response = httpx.post(f"{root}/tokenize", content=body, headers=headers)
    assert response.status_code == 400 and error_body(response)["param"] == "prompt"


def test_nan_or_infinity_anywhere_is_400_naming_where(
    shim: RunningShim, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Python's JSON reader takes NaN and Infinity, which no JSON has: in a field the
    Responses API echoes back (``reasoning``, ``tools``, ``text``) the reply could not be
    written, a 500 with two tracebacks logged. Refused as read, naming where."""
    cases = [
        ("responses", '"input": "hi", "reasoning": NaN', "reasoning"),
        ("responses", '"input": "hi", "reasoning": {"effort": NaN}', "reasoning.effort"),
        (
            "responses",
            '"input": "hi", "text": {"format": {"type": "text", "x": -Infinity}}',
            "text.format.x",
        ),
        (
            "responses",
            '"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"x": NaN}}]',
            "tools[0].parameters.x",
        ),
        (
            "chat/completions",
            f'"messages": {json.dumps(HELLO)}, "metadata": {{"a": NaN}}',
            "metadata.a",
        ),
    ]
    headers = {"content-type": "application/json"}
    with caplog.at_level(logging.ERROR):
        for path, fields, param in cases:
            length = "max_output_tokens" if path == "responses" else "max_tokens"
            body = f'{{"model": "{model}", "{length}": 1, {fields}}}'
            response = httpx.post(f"{shim.base_url}/{path}", content=body, headers=headers)
            assert response.status_code == 400, (path, response.text)
            assert error_body(response)["param"] == param, (path, response.text)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_json_nested_too_deep_is_400(shim: RunningShim, model: str) -> None:
    """Brackets nested a few hundred deep (a few kilobytes) hit Python's recursion limit
    in the code that walks them: a 500 with a traceback. Refused as read, wherever the
    JSON is: the body, a schema given as text, a tool call's arguments in the history."""
    deep = "[" * 990 + "]" * 990
    deep_schema = '{"type": "array", "items": ' * 150 + "{}" + "}" * 150
    headers = {"content-type": "application/json"}
    for path, fields in [
        ("chat/completions", f'"messages": {json.dumps(HELLO)}, "metadata": {deep}'),
        ("completions", f'"prompt": "hi", "x": {deep}'),
        ("responses", f'"input": "hi", "text": {deep}'),
        ("embeddings", f'"input": {"[" * 5000 + "1" + "]" * 5000}'),
    ]:
        body = f'{{"model": "{model}", "max_tokens": 1, {fields}}}'
        response = httpx.post(f"{shim.base_url}/{path}", content=body, headers=headers)
        assert response.status_code == 400, (path, response.text)
        assert "nested more than 100 levels" in error_body(response)["message"]
    client = shim.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model,
            messages=HELLO,
            max_tokens=1,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "deep", "schema": deep_schema},
            },
        )
    assert "nested more than" in str(caught.value)
    arguments = "[" * 110 + "]" * 110
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    history = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    reply = client.chat.completions.create(model=model, messages=history, max_tokens=1)
    assert reply.choices[0].finish_reason in ("stop", "length")  # the arguments stay text


def test_integers_beyond_the_wire_are_400_or_capped(shim: RunningShim, model: str) -> None:
    """Values a uint32 field cannot carry never reach the wire (they were a 500): a
    reply length beyond the context is capped to it, as an unset one is; top_k and
    min_tokens beyond any vocabulary or context are refused."""
    client = shim.client()
    huge = 10**12
    reply = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=huge, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 512  # the tiny context
    for fields in (dict(max_completion_tokens=huge), dict(max_tokens=huge, stream=True)):
        stream = bool(fields.get("stream"))
        created = client.chat.completions.create(
            model=model, messages=HELLO, temperature=0, **fields
        )
        if stream:
            assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in created)
        else:
            assert created.choices[0].finish_reason in ("stop", "length")
    response = client.responses.create(model=model, input="hi", max_output_tokens=huge)
    assert response.status == "completed" or response.incomplete_details is not None
    for extra, param in ((dict(top_k=2**32), "top_k"), (dict(min_tokens=2**32), "min_tokens")):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=model, messages=HELLO, extra_body=extra)
        assert error.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model=model, prompt="hi", extra_body=extra)
        assert error.value.body["param"] == param


def test_a_prompt_too_long_to_tokenize_in_time_is_refused_at_once(
    shim: RunningShim, model: str
) -> None:
    """Tens of megabytes took the tokenizer past the client's deadline (a 504 after 30
    s): a text of more characters than the context's tokens could span is refused up
    front. Just under that bound, the tokenized prompt is refused as before."""
    over = "a" * (512 * MAX_CHARS_PER_TOKEN + 1)  # the tiny model's context is 512
    client = shim.client()
    calls = [
        lambda text: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}]
        ),
        lambda text: client.completions.create(model=model, prompt=text),
        lambda text: client.responses.create(model=model, input=text),
        lambda text: client.embeddings.create(model=model, input=text),
    ]
    for call in calls:
        for text, fast in ((over, True), (over[:-10], False)):  # "user" counts too
            with pytest.raises(openai.BadRequestError) as error:
                call(text)
            assert error.value.body["code"] == "context_length_exceeded"
            assert ("characters" in error.value.body["message"]) == fast, error.value.body
    root = shim.base_url.removesuffix("/v1")  # counting tokens is not bounded
    messages = [{"role": "user", "content": over}]
    counted = httpx.post(f"{root}/tokenize", json={"model": model, "messages": messages})
    assert counted.status_code == 200 and counted.json()["count"] > len(over)
    # So are tools past that bound, before the template renders them (50,000 tools
    # took 31 s to render before the same 400).
    tool = {"type": "function", "function": {"name": "f", "description": over}}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=HELLO, tools=[tool])
    assert error.value.body["code"] == "context_length_exceeded"
    assert "characters" in error.value.body["message"]


def test_fields_sent_as_null_take_their_defaults(shim: RunningShim, model: str) -> None:
    """OpenAI's optional fields are nullable; clients generated from its OpenAPI spec
    send them as null (``"n": null`` was a 400 naming n)."""
    cases = [
        (
            "/chat/completions",
            {"messages": HELLO, "max_tokens": 4, "temperature": 0},
            ["n", "stream", "stream_options", "logprobs", "top_logprobs", "stop", "tools"],
        ),
        (
            "/completions",
            {"prompt": "Hello", "temperature": 0},
            ["n", "stream", "echo", "logprobs", "max_tokens", "suffix", "best_of"],
        ),
        (
            "/responses",
            {"input": "Hello", "max_output_tokens": 4, "temperature": 0},
            ["stream", "store", "instructions", "tools", "text"],
        ),
    ]
    with httpx.Client(base_url=shim.base_url, timeout=60) as http:
        for path, body, nulls in cases:
            plain = http.post(path, json={"model": model, **body})
            nulled = http.post(path, json={"model": model, **body, **dict.fromkeys(nulls)})
            assert plain.status_code == nulled.status_code == 200, nulled.text
            assert _reply_text(path, nulled.json()) == _reply_text(path, plain.json())
            assert nulled.json()["usage"]["total_tokens"] == plain.json()["usage"]["total_tokens"]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/chat/completions", "max_tokens", "5"),
        ("/chat/completions", "max_tokens", 5.0),
        ("/chat/completions", "max_tokens", True),
        ("/chat/completions", "temperature", "0.5"),
        ("/chat/completions", "temperature", True),
        ("/chat/completions", "stream", "true"),
        ("/chat/completions", "stream", 1),
        ("/chat/completions", "n", "2"),
        ("/chat/completions", "logprobs", 1),
        ("/chat/completions", "seed", "1"),
        ("/chat/completions", "parallel_tool_calls", "no"),
        ("/completions", "logprobs", True),
        ("/completions", "echo", "yes"),
        ("/responses", "max_output_tokens", "5"),
        ("/responses", "store", 0),
    ],
)
def test_a_value_of_the_wrong_json_type_is_refused_naming_its_field(
    shim: RunningShim, model: str, path: str, field: str, value: Any
) -> None:
    """As OpenAI refuses them: "5" for max_tokens was taken as 5, true as 1, "no" for
    parallel_tool_calls as false, "true" for stream as true."""
    bodies = {
        "/chat/completions": {"messages": HELLO, "max_tokens": 2},
        "/completions": {"prompt": "Hello", "max_tokens": 2},
        "/responses": {"input": "Hello", "max_output_tokens": 2},
    }
    response = httpx.post(
        f"{shim.base_url}{path}", json={"model": model, **bodies[path], field: value}, timeout=60
    )
    assert response.status_code == 400, response.text
    assert error_body(response)["param"] == field


def test_a_nested_field_is_named_as_openai_names_it(shim: RunningShim, model: str) -> None:
    """``messages[0]``, as OpenAI writes the path and as the shim's own checks did;
    pydantic's errors said ``messages.0``."""
    for body, param in [
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": HELLO, "stop_token_ids": [1, "a"]}, "stop_token_ids[1]"),
    ]:
        response = httpx.post(
            f"{shim.base_url}/chat/completions", json={"model": model, **body}, timeout=60
        )
        assert response.status_code == 400 and error_body(response)["param"] == param


@pytest.mark.parametrize(
    ("message", "param", "says"),
    [
        ({"role": "user", "content": []}, "messages[0].content", "an empty array"),
        ({"role": "user", "content": ["hi"]}, "messages[0].content[0]", "an object with"),
        ({"role": "user", "content": "hi", "name": 5}, "messages[0].name", "must be a string"),
        ({"role": "assistant", "content": None}, "messages[0].content", "content or tool_calls"),
        ({"role": "tool", "content": "42"}, "messages[0].tool_call_id", "needs the tool_call_id"),
        ({"role": "function", "content": "42"}, "messages[0].name", "the function's name"),
        ({"role": ["user"], "content": "hi"}, "messages[0].role", "unknown role"),  # was a 500
        ({"role": {}, "content": "hi"}, "messages[0].role", "unknown role"),
    ],
)
def test_a_malformed_message_is_refused_as_openai_refuses_it(
    shim: RunningShim, model: str, message: dict[str, Any], param: str, says: str
) -> None:
    """Empty content was taken as empty text, a bare string part was "content part
    None is not supported", a number for a name was dropped, an assistant message with
    neither content nor calls was rendered empty, and a tool result answering no call
    was rendered with an empty id."""
    with pytest.raises(openai.BadRequestError) as error:
        shim.client().chat.completions.create(model=model, messages=[message], max_tokens=2)
    assert error.value.body["param"] == param and says in error.value.body["message"]


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("chat/completions", {"messages": HELLO, "tool_choice": "auto"}, "tool_choice"),
        ("responses", {"input": "Hello", "tool_choice": "required"}, "tool_choice"),
        ("chat/completions", {"messages": HELLO, "response_format": {}}, "response_format.type"),
        ("responses", {"input": "Hello", "text": {"format": {}}}, "text.format.type"),
        (
            "responses",
            {"input": [{"type": "function_call_output", "output": "42"}]},
            "input[0].call_id",
        ),
        ("responses", {"input": [{"role": "user", "content": None}]}, "input[0].content"),
        ("responses", {"input": [{"role": ["user"], "content": "hi"}]}, "input[0].role"),
        (
            "chat/completions",
            {
                "messages": HELLO,
                "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
            },
            "response_format.json_schema.name",
        ),
        (
            "responses",
            {"input": "Hello", "text": {"format": {"type": "json_schema", "schema": {}}}},
            "text.format.name",
        ),
    ],
)
def test_a_request_openai_refuses_is_refused_naming_its_field(
    shim: RunningShim, model: str, path: str, fields: dict[str, Any], param: str
) -> None:
    """Each was taken silently: a tool_choice without tools (nothing to choose from), a
    format without a type (as plain text), a tool result naming no call, a message item
    without content, a JSON schema format without the name OpenAI and vLLM require."""
    body = {"model": model, "max_tokens" if path.startswith("chat") else "max_output_tokens": 2}
    response = httpx.post(f"{shim.base_url}/{path}", json={**body, **fields})
    assert response.status_code == 400, response.text
    assert error_body(response)["param"] == param


@pytest.mark.parametrize("field", ["stop", "n", "max_tokens", "messages"])
def test_a_chat_field_sent_to_the_responses_api_is_refused(
    shim: RunningShim, model: str, field: str
) -> None:
    """A request ported from Chat Completions: its stop, n or max_tokens did nothing
    and said nothing (unknown fields are kept); OpenAI refuses them as unknown."""
    values = {"stop": "there", "n": 2, "max_tokens": 3, "messages": HELLO}
    with pytest.raises(openai.BadRequestError) as error:
        shim.client().responses.create(
            model=model, input="Hello", max_output_tokens=2, extra_body={field: values[field]}
        )
    assert error.value.body["param"] == field
    assert error.value.body["code"] == "unknown_parameter"


def test_an_integer_is_a_number() -> None:
    """JSON has one number type: 1 is a valid temperature (strict types refuse only
    strings, booleans and fractions where they do not belong)."""
    body = {"model": "m", "messages": HELLO, "temperature": 1, "top_p": 1}
    parsed = ChatCompletionRequest.model_validate(body)
    assert (parsed.temperature, parsed.top_p) == (1.0, 1.0)


def _reply_text(path: str, reply: dict) -> str:
    if path == "/responses":
        return str(reply["output"][0]["content"][0]["text"])
    choice = reply["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def test_a_body_past_the_limit_is_413_before_it_is_read(
    shim: RunningShim, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A body declared or sent larger than MAX_BODY_BYTES is a 413 (a 300 MB body was
    read whole, and a declared 10 GB one waited for); a client that leaves mid-body is
    no logged error (it was "unexpected error" with a traceback)."""
    host, port = shim.base_url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 413")
    body = b'{"model": "x", "prompt": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}'
    chunked = httpx.post(
        f"{shim.base_url}/completions", content=iter([body[:1000], body[1000:]]), timeout=60
    )  # sent chunked: no length declared
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    with caplog.at_level(logging.WARNING):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model": '
            )
        time.sleep(0.5)
        reply = shim.client().completions.create(model=model, prompt="Hi", max_tokens=1)
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert not [record for record in caplog.records if record.exc_info], caplog.text

"""Errors through the shim: OpenAI's shape, the right status, the SDK's matching exception,
the field named; an unknown model, an unreachable server; bearer auth."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.shim_support import HELLO, RunningShim, Script, error_body, start_scripted, start_shim


def test_invalid_json_and_fields_are_400(shim: RunningShim, model: str) -> None:
    url = f"{shim.base_url}/chat/completions"
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert error_body(response)["type"] == "invalid_request_error"
    response = httpx.post(url, json={"model": model})
    assert response.status_code == 400 and error_body(response)["param"] == "messages"
    client = shim.client()
    bad_calls: list[tuple[dict[str, Any], str]] = [
        (dict(temperature=5), "temperature"),
        (dict(n=0), "n"),
        (dict(top_logprobs=3), "top_logprobs"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        # Past 64 bits a seed was wrapped silently (vLLM and OpenAI take 64-bit integers).
        (dict(seed=2**63), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(logit_bias={"12": 101}), "logit_bias"),
        (dict(logit_bias={"not-a-token": 1}), "logit_bias"),
        (dict(logit_bias={"999999": 1}), "logit_bias"),
        (dict(max_tokens=4, extra_body={"min_tokens": 5}), "min_tokens"),
        (
            dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format.json_schema",
        ),
        (
            dict(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "thing"}},
                }
            ),
            "response_format.json_schema",
        ),
        (dict(response_format={"type": "yaml"}), "response_format.type"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        # The server's refusals name the request field at fault, not the messages.
        (dict(extra_body={"stop_token_ids": [999999]}), "stop_token_ids"),
        (dict(stop=["x" * 100_000]), "stop"),
        (dict(stop=[f"s{i}" for i in range(1000)]), "stop"),
        (dict(tools=[{"type": "function"}]), "tools[0].function.name"),
        # A tool's schema is checked whether or not a call is forced (it was 200 unless
        # forced, then a 400 naming "messages").
        (dict(tools=[_tool({"type": "bogus"})]), "tools[0].function.parameters"),
        (dict(tools=[_tool("str")]), "tools[0].function.parameters"),
        # Asked for what the server does not do: a 400, not a plain-text answer.
        (dict(functions=[{"name": "f"}], function_call={"name": "f"}), "functions"),
        (dict(modalities=["text", "audio"]), "modalities"),
        (dict(web_search_options={}), "web_search_options"),
        (dict(extra_body={"chat_template": "{{ messages }}"}), "chat_template"),
        # The messages named what was wrong ("content part 'text' is not supported").
        (
            dict(messages=[{"role": "user", "content": [{"type": "text"}]}]),
            "messages[0].content[0]",
        ),
        (
            dict(tools=[_tool({})], tool_choice={"type": "allowed_tools", "mode": "auto"}),
            "tool_choice.type",
        ),
    ]
    for fields, param in bad_calls:
        arguments = {"model": model, "messages": HELLO, **fields}
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(**arguments)
        assert error.value.body["param"] == param, fields
        assert error.value.body["type"] == "invalid_request_error"
    # Python's JSON reader takes Infinity and NaN (the SDK will not send them).
    for field in ("repetition_penalty", "temperature"):
        body = json.dumps({"model": model, "messages": HELLO, field: float("inf")})
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and error_body(response)["param"] == field
    # Past float32's range a value reached the server as infinity: "got inf".
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=model, messages=HELLO, extra_body={"repetition_penalty": 1e300}
        )
    assert error.value.body["param"] == "repetition_penalty"
    assert "inf" not in error.value.body["message"], error.value.body["message"]


def test_too_many_stop_strings_counting_the_shim_s_own_says_so(
    shim: RunningShim, model: str
) -> None:
    """With one tool call allowed, the shim ends the reply with a stop string of its own:
    16 stop strings from the client (the server's limit) were refused as "17 stop
    strings", with nothing to say where the 17th came from. Without it, 16 pass."""
    client, stops = shim.client(), [f"s{i}" for i in range(16)]
    arguments = dict(model=model, messages=HELLO, max_tokens=2, stop=stops, tools=[_tool({})])
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**arguments, parallel_tool_calls=False)
    assert error.value.body["param"] == "stop"
    assert "17 stop strings" in error.value.body["message"]
    assert "'</tool_call>', which the shim adds" in error.value.body["message"]
    assert len(client.chat.completions.create(**arguments).choices) == 1


def _tool(parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


def test_responses_tools_are_checked_naming_their_flat_fields(
    shim: RunningShim, model: str
) -> None:
    response = httpx.post(f"{shim.base_url}/responses", json={"model": model, "input": 5})
    error = error_body(response)  # was "input.str", naming a type of pydantic's
    assert (response.status_code, error["param"]) == (400, "input")
    assert error["message"].endswith("a valid string, or Input should be a valid list")
    for tool, param in [
        ({"type": "function", "parameters": {}}, "tools[0].name"),
        ({"type": "function", "name": "f", "parameters": {"type": 5}}, "tools[0].parameters"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            shim.client().responses.create(model=model, input="hi", tools=[tool])
        assert error.value.body["param"] == param


def test_a_constraint_the_server_refuses_names_the_field_that_asked(
    shim: RunningShim, model: str
) -> None:
    """A schema valid as JSON schema that the grammar engine refuses (a lookaround) is
    refused by the server: the 400 named "messages" (or "prompt", "input")."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=a)b"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    client = shim.client()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(
                model=model, messages=HELLO, response_format=response_format, stream=stream
            )
        assert error.value.body["param"] == "response_format", error.value.body
        assert "look-around" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(
            model=model,
            input="hi",
            text={"format": {"type": "json_schema", "name": "s", "schema": schema}},
        )
    assert error.value.body["param"] == "text.format"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt="hi", extra_body={"guided_regex": "(?=a)b"})
    assert error.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(
            model=model, prompt="hi", extra_body={"structured_outputs": {"regex": "(?=a)b"}}
        )
    assert error.value.body["param"] == "structured_outputs.regex"


def test_context_overflow_is_context_length_exceeded(shim: RunningShim, model: str) -> None:
    long = [{"role": "user", "content": "x" * 600}]  # one token per byte; the limit is 512
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as error:
            shim.client().chat.completions.create(model=model, messages=long, stream=stream)
        assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:
        shim.client().completions.create(model=model, prompt="x" * 600)
    assert error.value.body["code"] == "context_length_exceeded"


def test_a_prompt_that_fills_the_context_is_refused_at_once(shim: RunningShim, model: str) -> None:
    """No room for a reply: 400, as OpenAI answers (the whole prompt was prefilled, then
    a 200 came with an empty reply). Scoring such a prompt (``max_tokens`` 0) stays."""
    client = shim.client()
    full = [3] * 512
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt=full, max_tokens=3)
    assert error.value.body["code"] == "context_length_exceeded"
    assert "the prompt has 512 tokens, which leaves no room" in error.value.body["message"]
    assert error.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as error:  # in a batch: the prompt's place
        client.completions.create(model=model, prompt=[[3, 4], full], max_tokens=3)
    assert error.value.body["param"] == "prompt[1]"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt=[*full, 3], max_tokens=3)
    assert "the prompt has 513 tokens, more than that" in error.value.body["message"]
    scored = client.completions.create(model=model, prompt=full, max_tokens=0, echo=True)
    assert scored.usage.prompt_tokens == 512 and scored.choices[0].finish_reason == "length"
    root = shim.base_url.removesuffix("/v1")
    empty = [{"role": "user", "content": ""}]
    overhead = httpx.post(f"{root}/tokenize", json={"model": model, "messages": empty})
    messages = [{"role": "user", "content": "x" * (512 - overhead.json()["count"])}]
    counted = httpx.post(f"{root}/tokenize", json={"model": model, "messages": messages})
    assert counted.json()["count"] == 512  # with the assistant turn's opening
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=model, messages=messages, stream=stream)
        assert error.value.body["code"] == "context_length_exceeded"
        assert error.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=model, input=messages)
    assert error.value.body["code"] == "context_length_exceeded"
    assert error.value.body["param"] == "input"


def test_min_tokens_past_the_context_left_is_context_length_exceeded(
    shim: RunningShim, model: str
) -> None:
    """A prompt that leaves 2 tokens and min_tokens 5: the server refused the capped
    call as ``invalid_sampling``, "min_tokens 5 is above max_tokens 2", a max_tokens
    nobody asked for. It is the context that is short, and the numbers say so; a
    min_tokens that fits still runs to the end of the context."""
    client = shim.client()
    message = "the prompt has 510 tokens, which leaves room for 2, fewer than min_tokens 5"
    for max_tokens in (None, 10):
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(
                model=model, prompt=[3] * 510, max_tokens=max_tokens, extra_body={"min_tokens": 5}
            )
        assert error.value.body["code"] == "context_length_exceeded"
        assert message in error.value.body["message"]
        assert error.value.body["param"] == "prompt"
    root = shim.base_url.removesuffix("/v1")
    empty = [{"role": "user", "content": ""}]
    overhead = httpx.post(f"{root}/tokenize", json={"model": model, "messages": empty})
    messages = [{"role": "user", "content": "x" * (510 - overhead.json()["count"])}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=messages, extra_body={"min_tokens": 5})
    assert (error.value.body["code"], error.value.body["param"]) == (
        "context_length_exceeded",
        "messages",
    )
    assert message in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=model, input=messages, extra_body={"min_tokens": 5})
    assert (error.value.body["code"], error.value.body["param"]) == (
        "context_length_exceeded",
        "input",
    )
    assert message in error.value.body["message"]
    fits = client.completions.create(model=model, prompt=[3] * 510, extra_body={"min_tokens": 2})
    assert fits.usage.completion_tokens == 2 and fits.choices[0].finish_reason == "length"


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
    # /tokenize too (it counted the image place's text as tokens).
    root = shim.base_url.removesuffix("/v1")
    response = httpx.post(f"{root}/tokenize", json={"model": model, "messages": messages})
    assert response.status_code == 400
    assert error_body(response)["code"] == "images_unsupported"


def test_readout_manifest_is_404_while_readout_is_off(shim: RunningShim) -> None:
    response = httpx.get(f"{shim.base_url}/readout/manifest")
    assert response.status_code == 404 and error_body(response)["code"] == "readout_disabled"


def test_readout_manifest_when_readout_is_on() -> None:
    server = start_scripted(Script(readout=(["honesty", "cats"], [3, 7])))
    running = start_shim(server.target)
    try:
        response = httpx.get(f"{running.base_url}/readout/manifest")
        assert response.json() == {"concepts": ["honesty", "cats"], "layers": [3, 7]}
    finally:
        running.stop()
        server.stop()


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
        assert error_body(response)["type"] == "invalid_request_error"  # as OpenAI says it
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        assert running.client().models.list().data[0].id == tiny_llama_dir.name
    finally:
        running.stop()

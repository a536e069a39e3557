"""Forced and offered tool calls through the shim: what it asks the server for (the
constraint of a forced call, the call's opening in the prompt, the stop string that ends
a reply after one call, each family's call format) and what it makes of the replies.

Oracle: the requests a scripted server recorded, and the replies it was scripted to give.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.shim_support import (
    HELLO,
    TIME,
    WEATHER,
    WEATHER_PARAMETERS,
    RunningShim,
    Script,
    forced_weather_outputs,
    last_decoding_request,
    rendered_chat,
    request_constraint,
)

LLAMA3_TEMPLATE = (
    '{{ messages }}{% if tools %}Respond as {"name": function name, "parameters": '
    "dictionary of argument name and its value}{{ tools }}{% endif %}"
)


def _forced_weather(client: Any) -> Any:
    """A chat offering the weather and time tools, forced to call get_weather."""
    return client.chat.completions.create(
        model="scripted",
        messages=HELLO,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )


def test_forced_tool_calls_are_constrained(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    client = shim.client()
    # A named function: the call's opening is in the prompt, the arguments are constrained.
    script.text = '{"city": "Rome"}'
    reply = _forced_weather(client)
    (call,) = reply.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Rome"}')
    assert reply.choices[0].finish_reason == "tool_calls"
    request = last_decoding_request(script)
    assert request_constraint(request) == ("json_schema", json.dumps(WEATHER_PARAMETERS))
    assert (
        bytes(script.prompts[-1])
        .decode()
        .endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    )
    # required without parallel calls: one call object of any declared function.
    script.text = '{"name": "get_time", "arguments": {}}'
    reply = client.chat.completions.create(
        model="scripted",
        messages=HELLO,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]
    kind, schema = request_constraint(last_decoding_request(script))
    assert kind == "json_schema"
    assert [s["properties"]["name"]["enum"] for s in json.loads(schema)["anyOf"]] == [
        ["get_time"],
        ["get_weather"],
    ]
    assert bytes(script.prompts[-1]).decode().endswith("<tool_call>\n")
    # A function declared without parameters takes none (its arguments were unconstrained).
    assert json.loads(schema)["$defs"]["tool_0"] == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
    # With parallel calls (the default): several calls, each closed and the next opened.
    script.text = (
        '{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    reply = client.chat.completions.create(
        model="scripted", messages=HELLO, tools=[WEATHER, TIME], tool_choice="required"
    )
    calls = reply.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_time", "{}"),
        ("get_weather", '{"city": "Rome"}'),
    ]
    assert reply.choices[0].finish_reason == "tool_calls"
    kind, grammar = request_constraint(last_decoding_request(script))
    assert kind == "lark" and grammar.startswith("start: call (")
    # Responses' form of the same.
    script.text = '{"city": "Bern"}'
    assert forced_weather_outputs(client) == [("function_call", '{"city": "Bern"}')]
    assert request_constraint(last_decoding_request(script)) == (
        "json_schema",
        json.dumps(WEATHER_PARAMETERS),
    )


def test_a_forced_call_that_breaks_its_schema_is_a_500(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    script.text = '{"town": "Rome"}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    with pytest.raises(openai.InternalServerError) as error:
        shim.client().chat.completions.create(
            model="scripted", messages=HELLO, tools=[WEATHER], tool_choice=named
        )
    assert error.value.body["code"] == "constraint_violated"
    chunks = list(
        shim.client().chat.completions.create(
            model="scripted",
            messages=HELLO,
            tools=[WEATHER],
            tool_choice=named,
            stream=True,
            max_tokens=3,
        )
    )  # cut by max_tokens: the arguments are unfinished, not broken
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_forced_call_is_checked_against_patterns_of_json_schemas_dialect(
    scripted: tuple[Script, RunningShim],
) -> None:
    """A parameter's ``pattern`` in JSON Schema's dialect (``\\p{L}``, which Python's
    ``re`` refuses) is checked as the grammar engine reads it: the call comes back (it
    was a 500 internal_error, the check's own failure, after the call was decoded)."""
    script, shim = scripted
    letters = {
        "type": "object",
        "properties": {"city": {"type": "string", "pattern": "^\\p{L}+$"}},
        "required": ["city"],
    }
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": letters}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    client = shim.client()
    script.text = '{"city": "Zürich"}'
    for tool_choice in (named, "required"):
        if tool_choice == "required":
            script.text = '{"name": "get_weather", "arguments": {"city": "Zürich"}}'
        reply = client.chat.completions.create(
            model="scripted", messages=HELLO, tools=[tool], tool_choice=tool_choice
        )
        (call,) = reply.choices[0].message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "Zürich"}
        assert reply.choices[0].finish_reason == "tool_calls"
    script.text = '{"city": "Zürich 8000"}'  # the pattern still holds the arguments to it
    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(
            model="scripted", messages=HELLO, tools=[tool], tool_choice=named
        )
    assert error.value.body["code"] == "constraint_violated"
    assert "does not match" in error.value.body["message"]


def test_a_required_call_cut_short_leaves_no_markup_in_content(
    scripted: tuple[Script, RunningShim],
) -> None:
    """tool_choice "required" cut by max_tokens before the call named its function: the
    reply is an unfinished call, not text (its markup was returned as the content)."""
    script, shim = scripted
    script.text = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    options = dict(model="scripted", messages=HELLO, tools=[WEATHER], tool_choice="required")
    reply = shim.client().chat.completions.create(**options, max_tokens=6)
    message = reply.choices[0].message
    assert (message.content, message.tool_calls) == (None, None)
    assert reply.choices[0].finish_reason == "length"
    chunks = list(shim.client().chat.completions.create(**options, max_tokens=6, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_parallel_tool_calls_off_stops_after_one_call(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    two = (
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    script.text = two
    client = shim.client()
    reply = client.chat.completions.create(model="scripted", messages=HELLO, tools=[WEATHER, TIME])
    assert len(reply.choices[0].message.tool_calls) == 2
    assert list(last_decoding_request(script).stop_strings) == []
    reply = client.chat.completions.create(
        model="scripted",
        messages=HELLO,
        tools=[WEATHER, TIME],
        parallel_tool_calls=False,
        stop="END",
    )
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]
    assert list(last_decoding_request(script).stop_strings) == ["END", "</tool_call>"]
    response = client.responses.create(
        model="scripted",
        input="x",
        tools=[
            {"type": "function", "name": "get_time"},
            {"type": "function", "name": "get_weather"},
        ],
        parallel_tool_calls=False,
    )
    assert [o.name for o in response.output] == ["get_time"]


def test_a_llama3_template_gets_its_own_call_format(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    script.chat_template = LLAMA3_TEMPLATE
    shim.backend._model_info = None  # ask again
    try:
        client = shim.client()
        script.text = '{"city": "Oslo"}'
        reply = _forced_weather(client)
        assert bytes(script.prompts[-1]).decode().endswith('{"name": "get_weather", "parameters": ')
        (call,) = reply.choices[0].message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Oslo"}')
        # The template rendered the tools itself (no Hermes system prompt).
        assert rendered_chat(script.prompts[-1])["tools"] == [WEATHER, TIME]
        script.text = '{"name": "get_time", "parameters": {}}'
        reply = client.chat.completions.create(model="scripted", messages=HELLO, tools=[TIME])
        assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]
        client.chat.completions.create(
            model="scripted", messages=HELLO, tools=[TIME], tool_choice="required"
        )
        schema = json.loads(request_constraint(last_decoding_request(script))[1])
        assert set(schema["properties"]) == {"name", "parameters"}
    finally:
        script.chat_template, script.text = "{{ messages }}", "hello"
        shim.backend._model_info = None


def test_json_looking_text_streams_while_tools_are_offered(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    for text in ['{"city": "Oslo", "temp": 3}', "[1, 2, 3]", "```python\nx = 1\n```"]:
        script.text = text
        stream = shim.client().chat.completions.create(
            model="scripted", messages=HELLO, tools=[WEATHER], stream=True
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices[0].delta.content]
        assert "".join(pieces) == text
        # As it came, not held to the end: only an opening that may still be a call's
        # (up to "```p", "[1", '{"c') waits for its next character.
        assert len(pieces) >= len(text) - 3
    script.text = "hello"

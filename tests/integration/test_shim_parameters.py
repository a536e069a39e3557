"""What the shim asks the server for: every OpenAI and vLLM parameter, structured output and
forced tool calls, as fields of the GenerateRequest (and Tokenize) the server receives.

Oracle: the requests a scripted server recorded. The engine's side of these fields (the
penalties, the grammar) is tested with the engine; here, that the shim maps each one
exactly, and answers OpenAI's 400s for bad values before any call.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pydantic
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.shim_support import TIME, WEATHER, WEATHER_PARAMETERS, RunningShim, Script, rendered_chat

HELLO = [{"role": "user", "content": "Hello"}]


def _last(script: Script) -> pb.GenerateRequest:
    """The last decoding GenerateRequest the server received."""
    return next(r for r in reversed(script.requests) if r.max_tokens > 0)


def _constraint(request: pb.GenerateRequest) -> tuple[str | None, Any]:
    kind = request.constraint.WhichOneof("kind")
    return kind, getattr(request.constraint, kind) if kind else None


SAMPLING = dict(
    temperature=0.5,
    top_p=0.9,
    seed=11,
    frequency_penalty=0.5,
    presence_penalty=-1.25,
    logit_bias={"65": 5.0, "66": -100},
)
VLLM_EXTRAS = dict(
    top_k=7,
    min_p=0.05,
    repetition_penalty=1.3,
    ignore_eos=True,
    stop_token_ids=[3, 4],
    min_tokens=2,
    priority=-5,
)


def _check_sampling(request: pb.GenerateRequest) -> None:
    assert request.temperature == 0.5 and request.top_p == pytest.approx(0.9)
    assert request.seed == 11
    assert request.frequency_penalty == 0.5 and request.presence_penalty == -1.25
    assert dict(request.logit_bias) == {65: 5.0, 66: -100.0}
    assert (request.top_k, request.repetition_penalty) == (7, pytest.approx(1.3))
    assert request.min_p == pytest.approx(0.05)
    assert request.ignore_eos and list(request.stop_token_ids) == [3, 4]
    assert (request.min_tokens, request.priority) == (2, -5)


def test_every_sampling_parameter_reaches_the_server(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    client = shim.client()
    client.chat.completions.create(
        model="scripted", messages=HELLO, max_tokens=5, extra_body=VLLM_EXTRAS, **SAMPLING
    )
    _check_sampling(_last(script))
    assert _last(script).max_tokens == 5 and _constraint(_last(script)) == (None, None)
    client.completions.create(
        model="scripted", prompt="Hi", max_tokens=5, extra_body=VLLM_EXTRAS, **SAMPLING
    )
    _check_sampling(_last(script))
    client.responses.create(
        model="scripted",
        input="Hi",
        max_output_tokens=5,
        temperature=0.5,
        top_p=0.9,
        extra_body={
            **VLLM_EXTRAS,
            **{k: SAMPLING[k] for k in SAMPLING if k not in ("temperature", "top_p")},
        },
    )
    _check_sampling(_last(script))


def test_n_choices_carry_the_parameters_on_every_decoding_call(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    count = len(script.requests)
    shim.client().chat.completions.create(
        model="scripted", messages=HELLO, max_tokens=3, n=2, seed=4, frequency_penalty=1.0
    )
    prefill, *decodes = script.requests[count:]
    assert prefill.max_tokens == 0 and prefill.frequency_penalty == 0  # the shared prompt
    assert [(r.max_tokens, r.frequency_penalty, r.seed) for r in decodes] == [
        (3, 1.0, 4),
        (3, 1.0, 5),
    ]


class Weather(pydantic.BaseModel):
    city: str
    celsius: float


def test_structured_output_becomes_the_constraint(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    client = shim.client()
    script.text = '{"city": "Oslo", "celsius": -3.5}'
    client.chat.completions.create(
        model="scripted", messages=HELLO, response_format={"type": "json_object"}
    )
    assert _constraint(_last(script)) == ("json_object", True)
    # The SDK's parse(): the model's schema goes to the server, the reply parses back.
    parsed = client.chat.completions.parse(
        model="scripted", messages=HELLO, response_format=Weather
    )
    assert parsed.choices[0].message.parsed == Weather(city="Oslo", celsius=-3.5)
    kind, schema = _constraint(_last(script))
    assert kind == "json_schema"
    assert json.loads(schema) == openai.lib._pydantic.to_strict_json_schema(Weather)
    # Responses' text.format, and its parse().
    response = client.responses.parse(model="scripted", input="Weather?", text_format=Weather)
    assert response.output_parsed == Weather(city="Oslo", celsius=-3.5)
    assert json.loads(_constraint(_last(script))[1]) == openai.lib._pydantic.to_strict_json_schema(
        Weather
    )
    assert response.text.format.type == "json_schema"
    # vLLM's fields.
    choices = {"guided_choice": ["yes", "no (maybe)"]}
    client.completions.create(model="scripted", prompt="Q", extra_body=choices)
    assert _constraint(_last(script)) == ("regex", r"(yes)|(no \(maybe\))")
    client.chat.completions.create(
        model="scripted",
        messages=HELLO,
        extra_body={"structured_outputs": {"grammar": 'root ::= "a"'}},
    )
    assert _constraint(_last(script)) == ("ebnf", 'root ::= "a"')
    lark = 'start: "a" item\nitem: %json {"type": "integer"}'
    client.completions.create(model="scripted", prompt="Q", extra_body={"guided_grammar": lark})
    assert _constraint(_last(script)) == ("lark", lark)
    client.chat.completions.create(
        model="scripted", messages=HELLO, extra_body={"guided_json": WEATHER_PARAMETERS}
    )
    assert json.loads(_constraint(_last(script))[1]) == WEATHER_PARAMETERS
    script.text = "hello"


def test_conflicting_or_bad_structured_output_is_400(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    client = shim.client()
    count = len(script.requests)
    bad = [
        (
            dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"}),
            "structured_outputs",
        ),
        (dict(extra_body={"guided_json": {"type": 5}}), "guided_json"),
        (dict(extra_body={"guided_choice": []}), "guided_choice"),
        (dict(extra_body={"structured_outputs": {"regex": "a", "grammar": "b"}}), None),
    ]
    for fields, param in bad:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="scripted", messages=HELLO, **fields)
        assert error.value.body["param"] == param, fields
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(
            model="scripted", input="x", text={"format": {"type": "json_schema", "name": "x"}}
        )
    assert error.value.body["param"] == "text.format.schema"
    assert len(script.requests) == count  # refused before any call


def test_forced_tool_calls_are_constrained(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    client = shim.client()
    # A named function: the call's opening is in the prompt, the arguments are constrained.
    script.text = '{"city": "Rome"}'
    reply = client.chat.completions.create(
        model="scripted",
        messages=HELLO,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    (call,) = reply.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Rome"}')
    assert reply.choices[0].finish_reason == "tool_calls"
    request = _last(script)
    assert _constraint(request) == ("json_schema", json.dumps(WEATHER_PARAMETERS))
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
    kind, schema = _constraint(_last(script))
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
    kind, grammar = _constraint(_last(script))
    assert kind == "lark" and grammar.startswith("start: call (")
    # Responses' form of the same.
    script.text = '{"city": "Bern"}'
    response = client.responses.create(
        model="scripted",
        input="Weather?",
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    assert [(o.type, o.arguments) for o in response.output] == [
        ("function_call", '{"city": "Bern"}')
    ]
    assert _constraint(_last(script)) == ("json_schema", json.dumps(WEATHER_PARAMETERS))


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
    assert list(_last(script).stop_strings) == []
    reply = client.chat.completions.create(
        model="scripted",
        messages=HELLO,
        tools=[WEATHER, TIME],
        parallel_tool_calls=False,
        stop="END",
    )
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]
    assert list(_last(script).stop_strings) == ["END", "</tool_call>"]
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


def test_chat_template_options_reach_the_template(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    client = shim.client()
    kwargs = {"enable_thinking": False}
    client.chat.completions.create(
        model="scripted", messages=HELLO, extra_body={"chat_template_kwargs": kwargs}
    )
    assert rendered_chat(script.prompts[-1])["chat_template_kwargs"] == kwargs
    client.responses.create(
        model="scripted", input="Hi", extra_body={"chat_template_kwargs": kwargs}
    )
    assert rendered_chat(script.prompts[-1])["chat_template_kwargs"] == kwargs
    reply = [*HELLO, {"role": "assistant", "content": "Hel"}]
    client.chat.completions.create(
        model="scripted", messages=reply, extra_body={"continue_final_message": True}
    )
    rendered = rendered_chat(script.prompts[-1])
    assert rendered["continue_final_message"] and not rendered["add_generation_prompt"]
    client.chat.completions.create(
        model="scripted", messages=HELLO, extra_body={"add_generation_prompt": False}
    )
    assert rendered_chat(script.prompts[-1])["add_generation_prompt"] is False
    for extra, param in [
        ({"continue_final_message": True}, "continue_final_message"),  # the last is no reply
        ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="scripted", messages=HELLO, extra_body=extra)
        assert error.value.body["param"] == param


LLAMA3_TEMPLATE = (
    '{{ messages }}{% if tools %}Respond as {"name": function name, "parameters": '
    "dictionary of argument name and its value}{{ tools }}{% endif %}"
)


def test_a_llama3_template_gets_its_own_call_format(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    script.chat_template = LLAMA3_TEMPLATE
    shim.backend._model_info = None  # ask again
    try:
        client = shim.client()
        script.text = '{"city": "Oslo"}'
        reply = client.chat.completions.create(
            model="scripted",
            messages=HELLO,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
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
        schema = json.loads(_constraint(_last(script))[1])
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

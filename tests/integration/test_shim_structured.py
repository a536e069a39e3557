"""Structured output end to end on the default model: the official openai SDK's
``parse`` helpers and LangChain's ``with_structured_output`` through the shim, with
grammar-constrained decoding in the server. Every output validates against its schema."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.shim_support import WEATHER, RunningShim


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=100)
    is_capital: bool


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=10)


def _model_id(shim: RunningShim) -> str:
    return shim.client().models.list().data[0].id


def test_chat_completions_parse_with_pydantic(default_shim: RunningShim) -> None:
    client = default_shim.client()
    completion = client.chat.completions.parse(
        model=_model_id(default_shim),
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        max_tokens=120,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, City)
    jsonschema.validate(json.loads(message.content), City.model_json_schema())
    assert completion.choices[0].finish_reason == "stop"


def test_responses_parse_with_pydantic(default_shim: RunningShim) -> None:
    client = default_shim.client()
    response = client.responses.parse(
        model=_model_id(default_shim),
        input="Is the sky blue? Answer as JSON.",
        text_format=Verdict,
        max_output_tokens=60,
    )
    assert isinstance(response.output_parsed, Verdict)
    jsonschema.validate(json.loads(response.output_text), Verdict.model_json_schema())


def test_json_object_mode_gives_an_object(default_shim: RunningShim) -> None:
    client = default_shim.client()
    reply = client.chat.completions.create(
        model=_model_id(default_shim),
        messages=[{"role": "user", "content": "Give me a JSON object with a key 'a'."}],
        response_format={"type": "json_object"},
        max_tokens=60,
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert reply.choices[0].message.content.startswith("{")


def test_langchain_with_structured_output(default_shim: RunningShim) -> None:
    chat = ChatOpenAI(
        model=_model_id(default_shim),
        base_url=default_shim.base_url,
        api_key="unused",
        max_tokens=120,
        temperature=0,
    )
    result = chat.with_structured_output(City, method="json_schema").invoke(
        "Describe Rome as JSON."
    )
    assert isinstance(result, City)


def test_a_schema_that_does_not_compile_is_400(default_shim: RunningShim) -> None:
    client = default_shim.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=_model_id(default_shim),
            messages=[{"role": "user", "content": "hi"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "pattern": "["}},
            },
            max_tokens=5,
        )
    assert caught.value.status_code == 400


def test_a_schema_the_grammar_engine_fails_on_while_decoding_is_400(
    default_shim: RunningShim,
) -> None:
    """A schema whose ``pattern`` outgrows the grammar engine's limits once decoding
    reaches it: a 400 naming response_format (it was a 500, retried by the SDK)."""
    schema = {"type": "string", "pattern": "(a|b)*" * 5000}
    client = default_shim.client()
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say a or b."}],
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        )
    assert error.value.body["param"] == "response_format"
    assert error.value.body["code"] == "invalid_constraint"
    assert len(error.value.body["message"]) < 600


class Point(BaseModel):
    x: int = Field(ge=0, le=9)
    y: int = Field(ge=0, le=9)


class DrawLine(BaseModel):
    """Draw a line between two points."""

    start: Point
    end: Point


def test_a_required_call_of_a_pydantic_tool_with_nested_models(default_shim: RunningShim) -> None:
    """pydantic's tools refer to their nested models under ``$defs``: with tool_choice
    "required" the call's schema placed them where their references no longer
    resolved (400 invalid_constraint)."""
    tool = openai.pydantic_function_tool(DrawLine)
    assert "$defs" in tool["function"]["parameters"]
    completion = default_shim.client().chat.completions.parse(
        model=_model_id(default_shim),
        messages=[{"role": "user", "content": "Draw a line from (1, 2) to (3, 4)."}],
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,  # one call: this small model would repeat it
        max_tokens=80,
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "DrawLine"
    assert isinstance(call.function.parsed_arguments, DrawLine)
    assert completion.choices[0].finish_reason == "tool_calls"


def _weather_calls(city_a: str, city_b: str) -> list[dict]:
    return [
        {
            "id": f"call_{city}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
        }
        for city in (city_a, city_b)
    ]


def test_a_required_call_may_be_several_parallel_calls(default_shim: RunningShim) -> None:
    """tool_choice "required" with parallel_tool_calls (the default) lets the model make
    several calls, as OpenAI does (its grammar allowed one); with them off, one."""
    history = [
        {"role": "user", "content": "Weather in Rome and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": _weather_calls("Rome", "Oslo")},
        {"role": "tool", "tool_call_id": "call_Rome", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_Oslo", "content": "rain"},
        {"role": "assistant", "content": "Rome is sunny, Oslo has rain."},
        {"role": "user", "content": "Weather in Paris and Berlin?"},
    ]
    client = default_shim.client()
    options = dict(
        model=_model_id(default_shim),
        messages=history,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=80,
        temperature=0,
    )
    for parallel, cities in ((True, ["Paris", "Berlin"]), (False, ["Paris"])):
        reply = client.chat.completions.create(**options, parallel_tool_calls=parallel)
        calls = reply.choices[0].message.tool_calls
        assert [json.loads(c.function.arguments)["city"] for c in calls] == cities
        assert reply.choices[0].finish_reason == "tool_calls"

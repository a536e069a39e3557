"""A reply as it streams, no server: tool calls with their argument deltas, reasoning
apart from the answer, and the Responses output items and events built from them.

Oracles: the whole reply parsed at once equals the same reply pushed one character at a
time; concatenated deltas equal the final values; exact event sequences."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from salience_client import Done
from salience_server.http.errors import ApiError
from salience_server.http.reasoning import ReasoningSplitter, opens_thinking, template_reasons
from salience_server.http.reply import ParsedReply, ReasoningDelta, ReplyParser
from salience_server.http.response_stream import ResponseStream
from salience_server.http.tool_call import (
    ArgumentsDelta,
    CallClosed,
    CallOpened,
    ParsedEvent,
    TextDelta,
)
from salience_server.http.tool_format import LLAMA3_JSON, tool_format
from salience_server.http.tool_parser import ToolCallParser
from salience_server.http.tools import chat_tools, tool_mode
from tests.shim_support import TIME, WEATHER

NAMES = {"get_weather", "get_time"}


def _parse(pieces: list[str], **options: Any) -> tuple[list[ParsedEvent], ToolCallParser]:
    parser = ToolCallParser(NAMES, **options)
    events = [event for piece in pieces for event in parser.push(piece)]
    return events + parser.finish(), parser


def _text(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def _arguments(events: list[Any], index: int) -> str:
    return "".join(e.text for e in events if isinstance(e, ArgumentsDelta) and e.index == index)


TWO_CALLS = (
    "Sure, one moment.<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Pa\\"ris }"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def test_arguments_stream_as_deltas_between_opened_and_closed() -> None:
    events, parser = _parse(list(TWO_CALLS))
    kinds = [type(e).__name__ for e in events]
    first_call = kinds.index("CallOpened")
    assert (
        _text(events[:first_call]) == "Sure, one moment." and "TextDelta" not in kinds[first_call:]
    )
    assert kinds.count("ArgumentsDelta") > 10  # one per character, not one at the end
    opened = [e for e in events if isinstance(e, CallOpened)]
    assert [(e.index, e.call.name) for e in opened] == [(0, "get_weather"), (1, "get_time")]
    closed = [i for i, e in enumerate(events) if isinstance(e, CallClosed)]
    assert kinds[closed[0] + 1] == "CallOpened" and closed[1] == len(events) - 1
    assert _arguments(events, 0) == '{"city": "Pa\\"ris }"}' == parser.calls[0].arguments
    assert json.loads(_arguments(events, 0)) == {"city": 'Pa"ris }'}
    assert _arguments(events, 1) == "{}"
    # Pushed whole or one character at a time: the same calls and text.
    whole, whole_parser = _parse([TWO_CALLS])
    assert _text(whole) == _text(events)
    assert [(c.name, c.arguments) for c in whole_parser.calls] == [
        (c.name, c.arguments) for c in parser.calls
    ]


@pytest.mark.parametrize(
    "reply",
    [
        '{"city": "Oslo", "temperature": 3}',
        "[1, 2, 3] are the first numbers",
        "```python\nprint('hi')\n```",
        '```json\n{"answer": 42}\n```',
        '{"name": "Ada Lovelace", "born": 1815}',
        "<b>bold</b> text",
    ],
)
def test_a_plain_reply_that_looks_like_json_still_streams(reply: str) -> None:
    parser = ToolCallParser(NAMES)
    released = "".join(_text(parser.push(char)) for char in reply)
    assert len(released) >= len(reply) - 2  # held back only while it could open a call
    assert released + _text(parser.finish()) == reply and parser.calls == []


@pytest.mark.parametrize(
    "reply",
    [
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',  # Llama 3 JSON
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]',  # a list of calls
        '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```',
        '<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call>',
    ],
)
def test_every_family_form_is_a_call(reply: str) -> None:
    events, parser = _parse(list(reply))
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
    assert _text(events) == "" and _arguments(events, 0) == parser.calls[0].arguments


def test_llama3_calls_separated_by_semicolons() -> None:
    reply = '{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {}}'
    _, parser = _parse(list(reply))
    assert [c.name for c in parser.calls] == ["get_time", "get_weather"]


def test_one_call_only_when_parallel_calls_are_off() -> None:
    events, parser = _parse(list(TWO_CALLS), max_calls=1)
    assert [c.name for c in parser.calls] == ["get_weather"]
    assert not any(isinstance(e, CallOpened) and e.index > 0 for e in events)


def test_no_bare_calls_under_a_json_output_constraint() -> None:
    reply = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    events, parser = _parse(list(reply), allow_bare=False)
    assert parser.calls == [] and _text(events) == reply


def test_a_cut_call_keeps_what_it_had() -> None:
    events, parser = _parse(['<tool_call>{"name": "get_time", "arguments": {"zone": "U'])
    assert parser.calls[0].arguments == '{"zone": "U' and isinstance(events[-1], CallClosed)


def test_a_forced_opening_starts_the_call() -> None:
    tools = chat_tools([WEATHER, TIME])
    named = tool_mode(tools, {"type": "function", "function": {"name": "get_weather"}})
    parser = named.parser()
    events = parser.push('{"city": "Lima"}') + parser.finish()
    assert [(c.name, c.arguments) for c in parser.calls] == [("get_weather", '{"city": "Lima"}')]
    assert _arguments(events, 0) == '{"city": "Lima"}'  # the opening itself was no delta
    required = tool_mode(tools, "required").parser()
    required.push('{"name": "get_time", "arguments": {}}')
    assert [c.name for c in required.calls] == ["get_time"]


def test_a_required_call_keeps_the_references_of_its_tools_schemas() -> None:
    """Parameters that refer to their own definitions (pydantic's nested models) keep
    them when placed in the call's schema (they pointed at a root without them: the
    schema did not compile, a 400 for every such tool)."""
    point = {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "next": {"$ref": "#/$defs/Point"}},
        "required": ["x"],
    }
    shape = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": {"Point": point},
        "definitions": {"Name": {"type": "string", "maxLength": 3}},
        "type": "object",
        "properties": {"at": {"$ref": "#/$defs/Point"}, "name": {"$ref": "#/definitions/Name"}},
        "required": ["at", "name"],
    }
    tools = chat_tools(
        [WEATHER, {"type": "function", "function": {"name": "draw", "parameters": shape}}]
    )
    kind, schema = tool_mode(tools, "required", parallel_tool_calls=False).constraint() or ("", "")
    validator = jsonschema.Draft202012Validator(json.loads(str(schema)))
    call = {"name": "draw", "arguments": {"at": {"x": 1, "next": {"x": 2}}, "name": "abc"}}
    assert validator.is_valid(call)
    call["arguments"]["at"]["next"] = {"x": "two"}
    assert not validator.is_valid(call)
    call["arguments"] = {"at": {"x": 1}, "name": "abcd"}
    assert not validator.is_valid(call)
    assert validator.is_valid({"name": "get_weather", "arguments": {"city": "Rome"}})


def test_a_required_call_reads_only_schema_positions_of_its_tools() -> None:
    """A property named ``$schema`` and a ``$ref`` inside a ``const`` are data: they were
    dropped and rewritten (a 400 for the one, a 500 for the other)."""
    parameters = {
        "type": "object",
        "properties": {
            "$schema": {"type": "string"},
            "link": {"const": {"$ref": "#/keep"}},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
            "pair": {
                "type": "array",
                "prefixItems": [{"$ref": "#/$defs/Tag"}, {"type": "integer"}],
            },
        },
        "required": ["$schema", "link"],
        "$defs": {"Tag": {"type": "string", "enum": ["a", "b"]}},
    }
    tools = chat_tools([{"type": "function", "function": {"name": "f", "parameters": parameters}}])
    kind, schema = tool_mode(tools, "required", parallel_tool_calls=False).constraint() or ("", "")
    validator = jsonschema.Draft202012Validator(json.loads(str(schema)))
    arguments = {"$schema": "x", "link": {"$ref": "#/keep"}, "tags": ["a"], "pair": ["b", 1]}
    assert validator.is_valid({"name": "f", "arguments": arguments})
    assert not validator.is_valid({"name": "f", "arguments": {**arguments, "tags": ["c"]}})
    placed = json.loads(str(schema))["$defs"]["tool_0"]["properties"]
    assert placed["link"] == {"const": {"$ref": "#/keep"}}
    assert placed["pair"]["prefixItems"][0] == {"$ref": "#/$defs/tool_0/$defs/Tag"}


def test_forced_calls_are_constrained_to_the_tools_schemas() -> None:
    tools = chat_tools([WEATHER, TIME])
    named = tool_mode(tools, {"type": "function", "name": "get_weather"})
    assert named.constraint() == ("json_schema", json.dumps(WEATHER["function"]["parameters"]))
    assert named.prefix_text() == '<tool_call>\n{"name": "get_weather", "arguments": '
    kind, schema = tool_mode(tools, "required", parallel_tool_calls=False).constraint() or ("", "")
    assert kind == "json_schema"
    no_parameters = {"type": "object", "properties": {}, "additionalProperties": False}
    assert json.loads(str(schema)) == {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "arguments": {"$ref": f"#/$defs/tool_{index}"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for index, name in enumerate(["get_time", "get_weather"])
        ],
        # Declared without parameters: it takes none.
        "$defs": {"tool_0": no_parameters, "tool_1": WEATHER["function"]["parameters"]},
    }
    assert tool_mode(tools, "auto").constraint() is None
    # Llama 3's family writes "parameters" and no tags.
    llama = tool_mode(tools, {"type": "function", "name": "get_time"}, LLAMA3_JSON)
    assert llama.prefix_text() == '{"name": "get_time", "parameters": '
    assert tool_mode(tools, "auto", parallel_tool_calls=False).stop_strings() == ("</tool_call>",)
    assert tool_mode(tools, "auto", LLAMA3_JSON, False).stop_strings() == ()


def test_the_family_format_is_read_from_the_template() -> None:
    assert tool_format("{{ '<tool_call>' }}{{ tools }}").name == "hermes"
    llama = 'Respond as {"name": function name, "parameters": dictionary}<|python_tag|>'
    assert tool_format(llama).name == "llama3_json"
    assert tool_format("{{ messages }}").name == "hermes"  # the shim describes tools itself


def test_a_forced_call_that_breaks_its_schema_is_a_server_error() -> None:
    tools = chat_tools([WEATHER])
    named = tool_mode(tools, {"type": "function", "name": "get_weather"})
    good = named.parser()
    good.push('{"city": "Oslo"}')
    named.check_forced(good.calls, "stop")
    for reply in ['{"town": "Oslo"}', '{"city": 3}', "{not json"]:
        bad = named.parser()
        bad.push(reply)
        bad.finish()
        with pytest.raises(ApiError) as error:
            named.check_forced(bad.calls, "stop")
        assert error.value.status == 500 and error.value.code == "constraint_violated"
        named.check_forced(bad.calls, "length")  # cut short: no broken promise
    with pytest.raises(ApiError):
        tool_mode(tools, "required").check_forced([], "stop")
    tool_mode(tools, "auto").check_forced([], "stop")


# ----- reasoning ---------------------------------------------------------------------


def _split(pieces: list[str], is_thinking: bool = False) -> tuple[str, str, list[str]]:
    splitter = ReasoningSplitter(is_thinking)
    reasoning = answer = ""
    for piece in pieces:
        r, a = splitter.push(piece)
        reasoning, answer = reasoning + r, answer + a
    r, a = splitter.finish()
    return reasoning + r, answer + a, [str(splitter.num_reasoning_pushes)]


THOUGHT = "<think>\nThe user greets me.\n</think>\n\nHello!"


def test_thinking_is_split_from_the_answer_however_it_is_cut() -> None:
    for pieces in (
        [THOUGHT],
        list(THOUGHT),
        ["<th", "ink>\nThe user greets me.\n</th", "ink>\n\nHello!"],
    ):
        reasoning, answer, _ = _split(pieces)
        assert (reasoning, answer) == ("The user greets me.\n", "Hello!")
    assert _split(["Hello, no thinking."])[:2] == ("", "Hello, no thinking.")
    # A prompt that opened the thinking: the reply starts inside it.
    assert _split(list("pondering</think>Yes."), is_thinking=True)[:2] == ("pondering", "Yes.")
    assert _split(["<think>cut short"])[:2] == ("cut short", "")


def test_reasoning_tokens_are_counted() -> None:
    tokens = ["<think>", "a", "b", "</think>", "Hi", "!"]
    assert _split(tokens)[2] == ["4"]


def test_reasoning_templates_and_open_prompts() -> None:
    assert template_reasons("{% if enable_thinking %}<think>\n\n</think>{% endif %}")
    assert not template_reasons("{{ messages }}")
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_reasoning_reply_with_a_tool_call() -> None:
    tools = chat_tools([WEATHER])
    reply = '<think>I should call it.</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    parser = ReplyParser(ReasoningSplitter(), tool_mode(tools, "auto").parser())
    parsed = ParsedReply.of(parser, list(reply))
    assert parsed.reasoning == "I should call it." and parsed.content == ""
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", '{"city": "Rome"}')]
    # A call written inside the thinking is no call.
    inside = '<think><tool_call>{"name": "get_weather", "arguments": {}}</tool_call></think>No.'
    parsed = ParsedReply.of(
        ReplyParser(ReasoningSplitter(), tool_mode(tools, "auto").parser()), [inside]
    )
    assert parsed.calls == [] and parsed.content == "No."
    events = ReplyParser(ReasoningSplitter()).push("<think>x</think>y")
    assert events == [ReasoningDelta("x"), TextDelta("y")]


# ----- Responses output items --------------------------------------------------------


def _done(reason: str = "stop") -> Done:
    return Done(prompt_tokens=3, completion_tokens=9, total_tokens=12, finish_reason=reason)


def _events(stream: ResponseStream, pieces: list[str], done: Done) -> list[dict[str, Any]]:
    sses = [sse for piece in pieces for sse in stream.push(piece)] + stream.finish(done)
    return [json.loads(sse.split("data: ", 1)[1]) for sse in sses]


def test_reasoning_text_and_a_call_are_items_in_order() -> None:
    tools = chat_tools([WEATHER])
    parser = ReplyParser(ReasoningSplitter(), tool_mode(tools, "auto").parser())
    stream = ResponseStream(parser, "msg_1")
    reply = '<think>Rain?</think>Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    cut = reply.index("Oslo")
    events = _events(stream, [reply[:20], reply[20:cut], reply[cut:]], _done())
    assert [e["type"] for e in events] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [
        0,
        1,
        2,
    ]
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(deltas) == '{"city": "Oslo"}'
    assert [item["type"] for item in stream.items] == ["reasoning", "message", "function_call"]
    assert stream.items[0]["content"] == [{"type": "reasoning_text", "text": "Rain?"}]
    assert stream.items[1]["id"] == "msg_1" and stream.text == "Let me look."
    assert stream.items[2]["arguments"] == '{"city": "Oslo"}'
    assert stream.status == "completed" and stream.num_reasoning_tokens == 1  # one push


def test_an_empty_reply_is_an_empty_message_and_a_cut_one_is_incomplete() -> None:
    stream = ResponseStream(ReplyParser(), "msg_2")
    events = _events(stream, [], _done())
    assert [e["type"] for e in events][:2] == [
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert stream.items[0]["content"][0]["text"] == ""
    stream = ResponseStream(ReplyParser(), "msg_3")
    _events(stream, ["so far"], _done("length"))
    assert stream.status == "incomplete" and stream.items[0]["status"] == "incomplete"

"""The written forms of tool calls beyond Hermes' and Llama 3's bare JSON, and the
family format read from a chat template, no server: Mistral's ``[TOOL_CALLS]`` list and
its native ``[TOOL_CALLS]NAME[ARGS]{...}`` (tokenizers v11 and later), Llama 3.2's ``<|python_tag|>`` (markers a reply shows with ``skip_special_tokens:
false``), DeepSeek-V3's and R1's calls between their markers (and V3.1's).

Oracles: a reply pushed one character at a time gives the calls and text it gives whole;
exact calls and text; the real templates of ``tests.chat_templates``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from salience_server.http.reasoning import Reasoning
from salience_server.http.reply import ParsedReply, ReplyParser
from salience_server.http.tool_call import TextDelta
from salience_server.http.tool_format import tool_format
from salience_server.http.tool_parser import ToolCallParser, parse_reply
from salience_server.http.tools import chat_tools, tool_mode
from tests.chat_templates import FAMILIES
from tests.shim_support import TIME, WEATHER

NAMES = {"get_weather", "get_time"}


def _parse(pieces: list[str], max_calls: int | None = None) -> tuple[str, list[tuple[str, Any]]]:
    """(the text, the calls as (name, arguments)) of a reply given in ``pieces``."""
    parser = ToolCallParser(NAMES, max_calls)
    events = [event for piece in pieces for event in parser.push(piece)] + parser.finish()
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return text, [(c.name, json.loads(c.arguments)) for c in parser.calls]


@pytest.mark.parametrize(
    "reply, want_text",
    [
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "a1"}]', ""),
        ('[TOOL_CALLS]{"name": "get_weather", "arguments": {"city": "Oslo"}}', ""),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', ""),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', ""),  # Mistral's native form
        ('Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', "Checking."),
        (
            'Checking.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
            "Checking.",
        ),
    ],
)
def test_a_marked_call_is_a_call_wherever_it_stands(reply: str, want_text: str) -> None:
    for pieces in (list(reply), [reply]):
        assert _parse(pieces) == (want_text, [("get_weather", {"city": "Oslo"})])


def test_a_mistral_list_of_calls_is_every_call() -> None:
    reply = '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, '
    reply += '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert _parse(list(reply)) == ("", [("get_time", {}), ("get_weather", {"city": "Oslo"})])


@pytest.mark.parametrize(
    "second",
    [
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        '{"arguments": {"city": "Oslo"}, "name": "get_weather"}',  # another key order
    ],
)
@pytest.mark.parametrize("allow_bare", [True, False])
def test_each_call_of_a_mistral_list_is_a_call(second: str, allow_bare: bool) -> None:
    """The calls after the first in a marked list are calls whether or not a bare call
    may stand alone (not under a structured-output constraint), and in either key
    order, as the first is."""
    reply = f'[TOOL_CALLS] [{{"name": "get_time", "arguments": {{}}}}, {second}] Done.'
    for pieces in (list(reply), [reply]):
        parser = ToolCallParser(NAMES, allow_bare=allow_bare)
        events = [event for piece in pieces for event in parser.push(piece)] + parser.finish()
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        calls = [(c.name, json.loads(c.arguments)) for c in parser.calls]
        assert (text.strip(), calls) == (
            "Done.",
            [("get_time", {}), ("get_weather", {"city": "Oslo"})],
        )


def test_each_call_after_a_python_tag_is_a_call() -> None:
    """Llama's calls after ``<|python_tag|>`` separated by ``;``, under a
    structured-output constraint too."""
    reply = '<|python_tag|>{"name": "get_time", "parameters": {}}; '
    reply += '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    for allow_bare in (True, False):
        for pieces in (list(reply), [reply]):
            parser = ToolCallParser(NAMES, allow_bare=allow_bare)
            events = [e for piece in pieces for e in parser.push(piece)] + parser.finish()
            assert not [e for e in events if isinstance(e, TextDelta)]
            calls = [(c.name, json.loads(c.arguments)) for c in parser.calls]
            assert calls == [("get_time", {}), ("get_weather", {"city": "Oslo"})]


def test_a_list_item_that_is_no_call_ends_the_calls_as_text() -> None:
    reply = '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, {"note": 1}]'
    assert _parse(list(reply)) == ('{"note": 1}]', [("get_time", {})])
    assert _parse([reply]) == ('{"note": 1}]', [("get_time", {})])


def test_calls_after_a_marker_in_another_key_order_are_parsed_whole() -> None:
    """Not the streamable form (the name after the arguments): the calls come once the
    JSON after the marker closes (it was text)."""
    reply = '[TOOL_CALLS] [{"arguments": {}, "name": "get_time"}, '
    reply += '{"arguments": {"city": "Oslo"}, "name": "get_weather"}] Done.'
    want = ("Done.", [("get_time", {}), ("get_weather", {"city": "Oslo"})])
    assert _parse(list(reply)) == want == _parse([reply])
    assert _parse(list(reply), max_calls=1) == ("", want[1][:1])
    tagged = '<|python_tag|>{"parameters": {"city": "Oslo"}, "name": "get_weather"}'
    assert _parse(list(tagged)) == ("", [("get_weather", {"city": "Oslo"})])


@pytest.mark.parametrize(
    "reply",
    [
        "[TOOL_CALLS] no call",
        'Hi <|python_tag|>{"name": "launch"}',
        "a [TOOL_CALL",
        '[TOOL_CALLS] [{"arguments": {}, "name": "get_time"}, 3]',
        '[TOOL_CALLS] [{"arguments": {}, "na',
        '[TOOL_CALLS]launch[ARGS]{"city": "Oslo"}',  # no declared function's name
        "[TOOL_CALLS]get_wea",  # cut before its name is known to end
    ],
)
def test_a_marker_without_a_call_after_it_is_text(reply: str) -> None:
    assert _parse(list(reply)) == (reply, []) == _parse([reply])


@pytest.mark.parametrize(
    "name, format_name",
    [
        ("qwen25", "hermes"),
        ("qwen3", "hermes"),
        ("llama31", "llama3_json"),
        ("mistral_v3", "mistral"),
        ("mistral_v11", "mistral_v11"),
        ("mistral_v13", "mistral_v11"),
        ("gemma", "hermes"),  # no tool support: the shim describes Hermes' format
        ("deepseek_r1", "hermes"),  # renders no tools: the shim describes Hermes' format
        ("deepseek_r1_tools", "deepseek"),
    ],
)
def test_the_family_format_of_a_real_template(name: str, format_name: str) -> None:
    assert tool_format(FAMILIES[name].template).name == format_name


def test_a_forced_mistral_call_opens_its_list() -> None:
    """Calls in Mistral's list are separated by commas: no text stops a reply after its
    first (a call's arguments may hold any)."""
    tools = chat_tools([WEATHER, TIME])
    mistral = tool_format(FAMILIES["mistral_v3"].template)
    named = tool_mode(tools, {"type": "function", "name": "get_weather"}, mistral)
    assert named.prefix_text() == '[TOOL_CALLS] [{"name": "get_weather", "arguments": '
    assert tool_mode(tools, "required", mistral).prefix_text() == "[TOOL_CALLS] ["
    assert tool_mode(tools, "auto", mistral, parallel_tool_calls=False).stop_strings() == ()


def _deepseek_call(name: str, arguments: str) -> str:
    return (
        f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{arguments}\n```"
        "<｜tool▁call▁end｜>"
    )


DEEPSEEK_TWO_CALLS = (
    "<｜tool▁calls▁begin｜>"
    + _deepseek_call("get_weather", '{"city": "Oslo"}')
    + "\n"
    + _deepseek_call("get_time", "{}")
    + "<｜tool▁calls▁end｜>"
)


@pytest.mark.parametrize("before", ["", "Let me look.\n\n"])
def test_deepseek_calls_are_parsed_as_they_stream(before: str) -> None:
    reply = before + DEEPSEEK_TWO_CALLS
    want = (before.strip(), [("get_weather", {"city": "Oslo"}), ("get_time", {})])
    for pieces in (list(reply), [reply]):
        text, calls = _parse(pieces)
        assert (text.strip(), calls) == want
    assert _parse(list(reply), max_calls=1)[1] == want[1][:1]


def test_a_deepseek_v31_call_is_parsed() -> None:
    reply = (
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Oslo"}'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    )
    assert _parse(list(reply)) == ("", [("get_weather", {"city": "Oslo"})]) == _parse([reply])


def test_a_deepseek_reasoning_reply_with_calls() -> None:
    """R1 thinks first, then calls: the thinking is reasoning, the calls no content."""
    tools = tool_mode(chat_tools([WEATHER, TIME]), "auto")
    reply = "<think>\nThe user wants Oslo.\n</think>\n\n" + DEEPSEEK_TWO_CALLS
    for pieces in (list(reply), [reply]):
        parser = ReplyParser.for_request(tools, None, Reasoning(is_reasoning=True))
        parsed = ParsedReply.of(parser, pieces)
        assert (parsed.reasoning, parsed.content) == ("The user wants Oslo.\n", "")
        assert [c.name for c in parsed.calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize(
    "reply",
    [
        "<｜tool▁calls▁begin｜>no call",
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>launch\n```json\n{}\n```",
    ],
)
def test_a_deepseek_marker_without_a_declared_call_is_text(reply: str) -> None:
    assert _parse(list(reply)) == (reply, []) == _parse([reply])


def test_a_forced_deepseek_call_opens_as_the_family_writes_it() -> None:
    tools = chat_tools([WEATHER, TIME])
    deepseek = tool_format(FAMILIES["deepseek_r1_tools"].template)
    named = tool_mode(tools, {"type": "function", "name": "get_weather"}, deepseek)
    opening = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
    assert named.prefix_text() == opening + "get_weather\n```json\n"
    required = tool_mode(tools, "required", deepseek)
    assert required.prefix_text() == opening
    parser = required.parser()
    parser.push("get_time\n```json\n{}")
    parser.finish()
    assert [(c.name, c.arguments, c.is_complete) for c in parser.calls] == [
        ("get_time", "{}", True)
    ]


MISTRAL_NATIVE_CALLS = (
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}'
)


@pytest.mark.parametrize("before", ["", "Let me look.\n\n"])
def test_mistral_native_calls_are_parsed_as_they_stream(before: str) -> None:
    """Mistral's calls from its tokenizer v11 (``[TOOL_CALLS]NAME[ARGS]{...}``, each
    after its own marker, perhaps with an id) were text."""
    reply = before + MISTRAL_NATIVE_CALLS
    want = (before.strip(), [("get_weather", {"city": "Oslo"}), ("get_time", {})])
    for pieces in (list(reply), [reply]):
        text, calls = _parse(pieces)
        assert (text.strip(), calls) == want
    assert _parse(list(reply), max_calls=1)[1] == want[1][:1]


def test_the_id_a_mistral_call_writes_is_its_id_where_openai_carries_it() -> None:
    """The id after ``[CALL_ID]`` is the call's (a conversation sent back shows the
    model its own id); one OpenAI's ids could not be, or an earlier call's, is replaced
    by a fresh ``call_...`` id, as a call written without one gets."""
    assert [c.call_id for c in parse_reply(MISTRAL_NATIVE_CALLS, NAMES)[1]][1] == "a1B2c3D4e"
    for written in ("a b!", "x" * 65, ""):
        reply = f"[TOOL_CALLS]get_time[CALL_ID]{written}[ARGS]{{}}"
        (call,) = parse_reply(reply, NAMES)[1]
        assert call.call_id.startswith("call_") and call.arguments == "{}"
    twice = "[TOOL_CALLS]get_time[CALL_ID]abc[ARGS]{}" * 2
    ids = [c.call_id for c in parse_reply(twice, NAMES)[1]]
    assert ids[0] == "abc" and ids[1].startswith("call_")


@pytest.mark.parametrize(
    "reply, arguments",
    [
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Os', '{"city": "Os'),
        ("[TOOL_CALLS]get_weather[ARGS]", ""),
        ("[TOOL_CALLS]get_weather[CALL_ID]a1B2", ""),
    ],
)
def test_a_mistral_native_call_cut_once_its_name_ended_is_a_cut_call(
    reply: str, arguments: str
) -> None:
    """Cut inside the arguments, or after the name's end (``[ARGS]`` or ``[CALL_ID]``):
    the call as it was cut, not complete, as a cut call of the other forms."""
    for pieces in (list(reply), [reply]):
        parser = ToolCallParser(NAMES)
        events = [e for piece in pieces for e in parser.push(piece)] + parser.finish()
        assert not [e for e in events if isinstance(e, TextDelta)]
        calls = [(c.name, c.arguments, c.is_complete) for c in parser.calls]
        assert calls == [("get_weather", arguments, False)]


def test_after_one_mistral_marker_json_is_v03s_list_and_a_name_the_native_form() -> None:
    old = '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]'
    new = "[TOOL_CALLS]get_time[ARGS]{}"
    for reply in (old, new, old + new, new + old):
        count = reply.count("get_time")
        assert _parse(list(reply)) == ("", [("get_time", {})] * count) == _parse([reply])


def test_a_call_after_an_undeclared_mistral_native_call_is_text() -> None:
    """As an item of a list that is no call: it ends the calls, and it is text."""
    reply = "[TOOL_CALLS]get_time[ARGS]{}[TOOL_CALLS]launch[ARGS]{}"
    want = ("[TOOL_CALLS]launch[ARGS]{}", [("get_time", {})])
    assert _parse(list(reply)) == want == _parse([reply])


def test_a_forced_mistral_native_call_opens_as_the_family_writes_it() -> None:
    """Named: the marker, the name and ``[ARGS]``, the arguments constrained to the
    function's schema. Required: the marker, then one call of a declared function, its
    name and ``[ARGS]`` in the grammar (it opened Hermes' ``<tool_call>``)."""
    tools = chat_tools([WEATHER, TIME])
    native = tool_format(FAMILIES["mistral_v13"].template)
    named = tool_mode(tools, {"type": "function", "name": "get_weather"}, native)
    assert named.prefix_text() == "[TOOL_CALLS]get_weather[ARGS]"
    assert named.constraint() == ("json_schema", json.dumps(WEATHER["function"]["parameters"]))
    required = tool_mode(tools, "required", native)
    assert required.prefix_text() == "[TOOL_CALLS]"
    kind, grammar = required.constraint() or ("", "")
    assert kind == "lark" and grammar.startswith("start: call_0 | call_1\n")
    assert 'call_0: "get_time[ARGS]" %json' in grammar
    assert tool_mode(tools, "auto", native, parallel_tool_calls=False).stop_strings() == ()
    parser = required.parser()
    parser.push("get_time[ARGS]{}")
    parser.finish()
    assert [(c.name, c.arguments, c.is_complete) for c in parser.calls] == [
        ("get_time", "{}", True)
    ]

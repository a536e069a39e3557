"""A reply that ends inside a tool call: cut by a client's stop string, an EOS or the
token limit, it is never handed on as a finished call (``finish_reason: tool_calls``, a
completed ``function_call``) whose arguments an application would then parse."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.shim_support import WEATHER, RunningShim, Script

HELLO = [{"role": "user", "content": "Weather in Rome?"}]
CUT_CALL = '{"name": "get_weather", "arguments": {"city": "Ro'


def _chat(shim: RunningShim, **options: Any) -> tuple[Any, str, str]:
    """The non-streamed message, its finish_reason, and the streamed finish_reason."""
    client = shim.client()
    request = dict(model="scripted", messages=HELLO, tools=[WEATHER], **options)
    reply = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True))
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    return reply.choices[0].message, reply.choices[0].finish_reason, reasons[-1]


def test_a_forced_call_cut_by_the_clients_stop_string_is_no_server_error(
    scripted: tuple[Script, RunningShim],
) -> None:
    """A stop string the client gave that matches inside a forced call's arguments ends
    the reply early: a 200 ending "stop" with the unfinished call (it was a 500
    constraint_violated, which the SDK retried twice)."""
    script, shim = scripted
    script.finish_reason = pb.FINISH_REASON_STOP_STRING
    named = {"type": "function", "function": {"name": "get_weather"}}
    try:
        # A named call's opening, its name included, is the shim's; "required" names none.
        for tool_choice, text in (("required", CUT_CALL), (named, '{"city": "Ro')):
            script.text = text
            message, reason, streamed = _chat(shim, tool_choice=tool_choice, stop=["me"])
            assert (reason, streamed, message.content) == ("stop", "stop", None)
            assert message.tool_calls[0].function.arguments == '{"city": "Ro'
    finally:
        script.finish_reason = None


def test_a_forced_call_cut_by_the_clients_stop_token_is_no_server_error(
    scripted: tuple[Script, RunningShim],
) -> None:
    """A ``stop_token_ids`` token the client gave, decoded inside a forced call's
    arguments (the grammar allows it there), ends the reply as its stop string does: a
    200 with the unfinished call, in chat and in responses, streamed or not (it was a
    500 constraint_violated, blaming the server). The same reply ended by a token the
    client did not list still breaks the server's promise."""
    script, shim = scripted
    script.text = '{"city": "Ro'  # the named call's arguments, cut after "o"
    stop = {"stop_token_ids": [ord("o")]}
    named = {"type": "function", "function": {"name": "get_weather"}}
    message, reason, streamed = _chat(shim, tool_choice=named, extra_body=stop)
    assert (reason, streamed, message.content) == ("stop", "stop", None)
    assert message.tool_calls[0].function.arguments == '{"city": "Ro'
    client = shim.client()
    options = dict(
        model="scripted",
        input="Weather in Rome?",
        tools=[_flat(WEATHER)],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    whole = client.responses.create(**options, extra_body=stop)
    events = list(client.responses.create(**options, extra_body=stop, stream=True))
    for response in (whole, events[-1].response):
        assert response.status == "completed"
        assert [(item.type, item.status, item.arguments) for item in response.output] == [
            ("function_call", "incomplete", '{"city": "Ro')
        ]
    with pytest.raises(openai.InternalServerError):
        client.responses.create(**options, extra_body={"stop_token_ids": [ord("R")]})


def test_a_call_the_model_ended_inside_does_not_finish_as_tool_calls(
    scripted: tuple[Script, RunningShim],
) -> None:
    """An EOS inside a call's arguments (tool_choice auto): the reply ends "stop", not
    "tool_calls" (whose arguments an application parses); a Responses function_call
    item is "incomplete"."""
    script, shim = scripted
    script.text = "<tool_call>\n" + CUT_CALL
    message, reason, streamed = _chat(shim)
    assert (reason, streamed) == ("stop", "stop")
    assert message.tool_calls[0].function.arguments == '{"city": "Ro'
    script.text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    assert _chat(shim)[1:] == ("tool_calls", "tool_calls")
    script.text = "<tool_call>\n" + CUT_CALL
    response = shim.client().responses.create(
        model="scripted", input="Weather in Rome?", tools=[_flat(WEATHER)]
    )
    assert response.status == "completed"
    assert [(item.type, item.status) for item in response.output] == [
        ("function_call", "incomplete")
    ]


def test_a_response_cut_by_max_output_tokens_inside_a_call_is_incomplete(
    scripted: tuple[Script, RunningShim],
) -> None:
    """max_output_tokens inside a call's arguments: the response is "incomplete" for
    max_output_tokens, as a cut message is (it said "completed")."""
    script, shim = scripted
    script.text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    options = dict(model="scripted", input="Weather in Rome?", tools=[_flat(WEATHER)])
    for stream in (False, True):
        if stream:
            events = list(
                shim.client().responses.create(**options, max_output_tokens=50, stream=True)
            )
            response = events[-1].response
        else:
            response = shim.client().responses.create(**options, max_output_tokens=50)
        assert response.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"
        assert [(item.type, item.status) for item in response.output] == [
            ("function_call", "incomplete")
        ]


def _flat(tool: dict[str, Any]) -> dict[str, Any]:
    """A Chat Completions tool in the Responses API's flat form."""
    return {"type": "function", **tool["function"]}


def test_a_call_cut_right_after_its_name_is_kept(scripted: tuple[Script, RunningShim]) -> None:
    """A forced call cut after its name, before its arguments: the call is kept, cut,
    as one cut inside its arguments is (neither call nor text came back)."""
    script, shim = scripted
    script.text = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    cut = len('{"name": "get_weather",')
    message, reason, streamed = _chat(shim, tool_choice="required", max_tokens=cut)
    assert (reason, streamed, message.content) == ("length", "length", None)
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("get_weather", "")
    ]
    response = shim.client().responses.create(
        model="scripted",
        input="Weather in Rome?",
        tools=[_flat(WEATHER)],
        tool_choice="required",
        max_output_tokens=cut,
    )
    assert [(item.type, item.status) for item in response.output] == [
        ("function_call", "incomplete")
    ]


def test_a_stream_failing_inside_a_call_closes_it_with_its_arguments_so_far(
    scripted: tuple[Script, RunningShim],
) -> None:
    """The server fails midway through a call's arguments: the function_call item is
    closed "incomplete" with the arguments streamed so far, and ``response.failed``
    carries it (the item was left open, then closed with empty arguments)."""
    script, shim = scripted
    script.text = "<tool_call>\n" + CUT_CALL + 'me"}}\n</tool_call>'
    script.fail_after = len("<tool_call>\n" + CUT_CALL)
    try:
        events = list(
            shim.client().responses.create(
                model="scripted", input="Weather in Rome?", tools=[_flat(WEATHER)], stream=True
            )
        )
    finally:
        script.fail_after = None
    assert [e.type for e in events][-3:] == [
        "response.output_item.done",
        "error",
        "response.failed",
    ]
    streamed = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    closed = events[-3].item
    assert closed.type == "function_call" and closed.status == "incomplete"
    assert closed.arguments == streamed and streamed.startswith('{"city": "Ro')
    (carried,) = events[-1].response.output
    assert carried.arguments == streamed

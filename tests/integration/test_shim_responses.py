"""The Responses API through the shim, driven by the official ``openai`` SDK.

Oracles: the server's own greedy answer; the event sequence of SPEC 3; a chain of
``previous_response_id`` turns equals the same conversation sent whole (and costs only
the new input); function calls on scripted model output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.responses import Response

from salience_client import SalienceClient
from tests.shim_support import (
    RunningShim,
    Script,
    greedy_reply,
    messages_json,
    start_scripted,
    start_shim,
)

SPEC_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def _collapse(types: list[str]) -> list[str]:
    """The event types with runs of deltas collapsed to one."""
    return [t for i, t in enumerate(types) if i == 0 or t != types[i - 1] or "delta" not in t]


def test_a_response_is_the_servers_greedy_answer(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    text, token_ids, _, prompt_ids = greedy_reply(
        llama_server.target, [{"role": "user", "content": "Hi there"}], 10
    )
    response = shim.client().responses.create(
        model=model, input="Hi there", max_output_tokens=10, temperature=0
    )
    assert response.output_text == text
    assert response.status == "incomplete"  # the tiny model rarely stops by itself
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == len(prompt_ids)
    assert response.usage.output_tokens == len(token_ids)
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert shim.client().responses.retrieve(response.id).output_text == text


def test_instructions_are_a_system_message(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    text, *_ = greedy_reply(llama_server.target, messages, 6)
    response = shim.client().responses.create(
        model=model, instructions="Be terse.", input="Hi", max_output_tokens=6, temperature=0
    )
    assert response.output_text == text


def test_the_stream_is_numbered_and_ends_incomplete_at_the_limit(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    text, *_ = greedy_reply(llama_server.target, [{"role": "user", "content": "Go"}], 8)
    events = list(
        shim.client().responses.create(
            model=model, input="Go", max_output_tokens=8, temperature=0, stream=True
        )
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert _collapse([e.type for e in events]) == SPEC_EVENTS[:-1] + ["response.incomplete"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == text
    assert events[0].response.status == "in_progress" and events[-1].response.output_text == text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text and done.item_id == events[-1].response.output[0].id


def _same_logprobs(got: list[Any], want: list[Any]) -> None:
    got = [entry if isinstance(entry, dict) else entry.model_dump() for entry in got]
    assert [(e["token"], e["bytes"]) for e in got] == [(e["token"], e["bytes"]) for e in want]
    assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in want], abs=1e-5)
    for entry, wanted in zip(got, want, strict=True):
        assert [t["token"] for t in entry["top_logprobs"]] == [
            t["token"] for t in wanted["top_logprobs"]
        ]


def test_output_text_logprobs_are_chats_streamed_or_not(shim: RunningShim, model: str) -> None:
    """``include: ["message.output_text.logprobs"]`` and ``top_logprobs``: the output
    text's tokens with Chat Completions' entries for the same reply; streamed, each
    entry rides on a text delta (the tiny model's byte tokens often print nothing until
    a character is whole, so entries wait for the next delta, the last ones included)."""
    client = shim.client()
    asked = dict(model=model, max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell"}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    want = [entry.model_dump() for entry in chat.choices[0].logprobs.content]
    assert len(want) == 12 and all(len(e["top_logprobs"]) == 2 for e in want)
    logprobs = dict(include=["message.output_text.logprobs"], top_logprobs=2)
    response = client.responses.create(input="Tell", **asked, **logprobs)
    assert response.output_text == chat.choices[0].message.content
    _same_logprobs(response.output[0].content[0].logprobs, want)
    events = list(client.responses.create(input="Tell", stream=True, **asked, **logprobs))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    _same_logprobs([entry for e in deltas for entry in e.logprobs], want)
    done = next(e for e in events if e.type == "response.output_text.done")
    _same_logprobs(done.logprobs, want)
    _same_logprobs(events[-1].response.output[0].content[0].logprobs, want)
    plain = client.responses.create(input="Tell", **asked)  # not asked for: none
    assert plain.output[0].content[0].logprobs == []


def test_a_chained_turn_closes_a_cut_reply_and_appends_only_the_new_input(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    client = shim.client()
    first = client.responses.create(model=model, input="Start.", max_output_tokens=6, temperature=0)
    assert first.status == "incomplete"  # cut short: no end-of-turn token from the model
    second = client.responses.create(
        model=model,
        input="Go on.",
        previous_response_id=first.id,
        max_output_tokens=6,
        temperature=0,
    )
    with SalienceClient(llama_server.target) as grpc_client:
        new_turn = grpc_client.tokenize_chat([{"role": "user", "content": "Go on."}])
        closing = grpc_client.tokenize("<|im_end|>\n")
    session_length = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens == session_length + len(closing) + len(new_turn)
    assert second.usage.input_tokens_details.cached_tokens == session_length - 1
    # The rest was prefilled into the session, cached for the next turn (a field the
    # SDK's ResponseUsage requires: strict parsing failed without it).
    details = second.usage.input_tokens_details
    assert details.cache_write_tokens == second.usage.input_tokens - details.cached_tokens


def test_an_input_message_without_content_is_400_as_in_chat(shim: RunningShim, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        shim.client().responses.create(model=model, input=[{"role": "user"}])
    assert error.value.body["param"] == "input[0].content"


def test_an_unknown_previous_response_is_404(shim: RunningShim, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        shim.client().responses.create(model=model, input="x", previous_response_id="resp_none")
    assert error.value.body["code"] == "previous_response_not_found"
    unstored = shim.client().responses.create(
        model=model, input="x", max_output_tokens=2, store=False
    )
    with pytest.raises(openai.NotFoundError):
        shim.client().responses.create(model=model, input="y", previous_response_id=unstored.id)
    with pytest.raises(openai.NotFoundError):
        shim.client().responses.retrieve(unstored.id)


# ----- the default model: real text, real end of turn --------------------------------


TURNS = ["What is the capital of France?", "And of Italy?", "And of Spain?"]


def test_the_stream_follows_the_spec_exactly(default_shim: RunningShim) -> None:
    model = default_shim.client().models.list().data[0].id
    events = list(
        default_shim.client().responses.create(
            model=model, input=TURNS[0], max_output_tokens=40, temperature=0, stream=True
        )
    )
    assert _collapse([e.type for e in events]) == SPEC_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.status == "completed" and "Paris" in final.output_text


def test_a_chain_of_three_equals_the_conversation_sent_whole(default_shim: RunningShim) -> None:
    client = default_shim.client()
    model = client.models.list().data[0].id
    previous, replies, inputs = None, [], []
    for turn in TURNS:
        response = client.responses.create(
            model=model,
            input=turn,
            previous_response_id=previous.id if previous else None,
            max_output_tokens=40,
            temperature=0,
        )
        if previous is not None:
            # Only the new input was prefilled: the session held the previous turn's
            # prompt and reply (all but the reply's last token were computed).
            usage = previous.usage
            expected = usage.input_tokens + usage.output_tokens - 1
            assert response.usage.input_tokens_details.cached_tokens == expected
        assert response.status == "completed"
        replies.append(response.output_text)
        inputs.append(response.usage.input_tokens)
        previous = response
    conversation: list[Any] = []
    for turn, reply in zip(TURNS[:-1], replies[:-1], strict=True):
        conversation += [
            {"role": "user", "content": turn},
            {"role": "assistant", "content": reply},
        ]
    conversation.append({"role": "user", "content": TURNS[-1]})
    whole = client.responses.create(
        model=model, input=conversation, max_output_tokens=40, temperature=0
    )
    assert whole.output_text == replies[-1]
    assert whole.usage.input_tokens == inputs[-1]
    assert "Madrid" in replies[-1]


# ----- function calls, on scripted model output --------------------------------------


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[Script, RunningShim]]:
    script = Script()
    server = start_scripted(script)
    running = start_shim(server.target, replay=False)  # its failures must reach the client
    yield script, running
    running.stop()
    server.stop()


def test_function_calls_are_output_items_and_results_chain(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    client = shim.client()
    script.text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    response = client.responses.create(model="scripted", input="Weather?", tools=[WEATHER])
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Oslo"} and call.call_id.startswith("call_")
    assert response.status == "completed"

    events = list(
        client.responses.create(model="scripted", input="Weather?", tools=[WEATHER], stream=True)
    )
    assert _collapse([e.type for e in events]) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 5 and "".join(deltas) == '{"city": "Oslo"}'
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == '{"city": "Oslo"}' and done.item_id == events[2].item.id
    assert events[-1].response.output[0].name == "get_weather"

    # The result continues the stored response: its session, only the new input.
    script.text = "Cold."
    follow = client.responses.create(
        model="scripted",
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "-3 C"}],
        tools=[WEATHER],
    )
    assert follow.output_text == "Cold."
    rendered = messages_json(script.prompts[-1])
    assert rendered[-2]["content"].startswith("<tool_call>")  # the call, as Hermes text
    assert rendered[-1] == {
        "role": "tool",
        "tool_call_id": call.call_id,
        "content": "<tool_response>\n-3 C\n</tool_response>",
    }


def test_an_error_midway_is_an_error_event_then_failed(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    script.text, script.fail_after = "abcdefgh", 3
    try:
        events = list(shim.client().responses.create(model="scripted", input="x", stream=True))
    finally:
        script.fail_after = None
    types = [e.type for e in events]
    assert types[-2:] == ["error", "response.failed"]
    assert types.count("response.output_text.delta") == 3
    assert events[-2].code == "service_unavailable"
    assert events[-1].response.status == "failed" and events[-1].response.error.code
    # The message streamed so far is closed, incomplete, and in the failed response
    # (it had no output_item.done, and the failed response's output was empty).
    assert types[-5:-2] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    (item,) = events[-1].response.output
    assert item.status == "incomplete" and item.content[0].text == "abc"
    assert events[-3].item.status == "incomplete"
    # Its id, sent at the start, reads back the failed response (it was a 404), which
    # cannot be continued.
    client = shim.client()
    stored = client.responses.retrieve(events[0].response.id)
    assert stored.status == "failed" and stored.output_text == "abc"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="scripted", input="y", previous_response_id=stored.id)
    assert caught.value.param == "previous_response_id" and "is failed" in caught.value.message


def test_thinking_is_a_reasoning_item(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    script.chat_template = "{{ messages }}<think></think>"
    shim.backend._model_info = None  # ask again
    try:
        script.text = "<think>Short question.</think>Hi!"
        client = shim.client()
        response = client.responses.create(model="scripted", input="Hi")
        reasoning, message = response.output
        assert reasoning.type == "reasoning" and reasoning.content[0].text == "Short question."
        assert message.type == "message" and response.output_text == "Hi!"
        assert response.usage.output_tokens_details.reasoning_tokens == len(
            "<think>Short question.</think>"
        ) - len("<think")
        events = list(client.responses.create(model="scripted", input="Hi", stream=True))
        assert _collapse([e.type for e in events]) == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
            *SPEC_EVENTS[2:],
        ]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        assert text == "Short question."
        assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
    finally:
        script.chat_template, script.text = "{{ messages }}", "hello"
        shim.backend._model_info = None


def test_a_response_parses_as_the_sdks_type_and_echoes_reasoning(
    shim: RunningShim, model: str
) -> None:
    """The raw JSON validates as the SDK's Response, streamed and not (its usage lacked
    ``cache_write_tokens``, which the type requires); ``reasoning`` is echoed as OpenAI
    does; a stored ``prompt`` is a 400 (it was ignored: the answer came without it)."""
    options = dict(model=model, input="Hi", max_output_tokens=3, reasoning={"effort": "low"})
    raw = shim.client().responses.with_raw_response.create(**options)
    response = Response.model_validate(raw.http_response.json())
    assert response.reasoning is not None and response.reasoning.effort == "low"
    events = list(shim.client().responses.create(**options, stream=True))
    Response.model_validate(events[-1].response.model_dump(mode="json", exclude_unset=True))
    with pytest.raises(openai.BadRequestError) as error:
        shim.client().responses.create(model=model, input="Hi", extra_body={"prompt": {"id": "p"}})
    assert error.value.body["param"] == "prompt"

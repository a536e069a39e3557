"""Responses API fields beyond the reply itself: ``truncation``, ``include``,
``metadata``, ``completed_at``, ``tool_choice: "none"`` and what a streamed response's id reads back, through the
openai SDK against the tiny Llama (512 positions, one token per byte) or a scripted
server."""

from __future__ import annotations

import time

import openai
import pytest

from tests.shim_support import RunningShim, Script, messages_json

# Twelve alternating messages of about 60 tokens each: more than the 512 positions.
LONG = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i:02d} " + "xy" * 25}
    for i in range(11)
] + [{"role": "user", "content": "and now the question"}]


def _reply(shim: RunningShim, model: str, conversation: list[dict[str, str]], **fields: object):
    return shim.client().responses.create(
        model=model, input=conversation, max_output_tokens=5, temperature=0, **fields
    )


def test_truncation_auto_drops_the_oldest_items_until_the_input_fits(
    shim: RunningShim, model: str
) -> None:
    """It answered 400 ``context_length_exceeded``, as ``disabled`` does, while saying
    ``truncation: "auto"``. The reply now equals that to the longest tail of the
    conversation that fits (found with truncation disabled)."""
    with pytest.raises(openai.BadRequestError) as caught:
        _reply(shim, model, LONG)
    assert caught.value.code == "context_length_exceeded"
    for start in range(1, len(LONG)):
        try:
            want = _reply(shim, model, LONG[start:])
            break
        except openai.BadRequestError:
            continue
    got = _reply(shim, model, LONG, truncation="auto")
    assert got.truncation == "auto" and got.output_text == want.output_text
    assert got.usage.input_tokens == want.usage.input_tokens < 512
    # Continuing it works from what was kept.
    follow = _reply(shim, model, [{"role": "user", "content": "more"}], previous_response_id=got.id)
    assert follow.status in ("completed", "incomplete")


def test_truncation_auto_keeps_a_new_input_too_long_alone_refused(
    shim: RunningShim, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _reply(shim, model, [{"role": "user", "content": "z" * 600}], truncation="auto")
    assert caught.value.code == "context_length_exceeded"


def test_truncation_auto_drops_items_longer_than_the_context_could_hold(
    shim: RunningShim, model: str
) -> None:
    """An item of more characters than any 512 tokens span (256 each) was refused 400
    before anything was dropped; it is dropped as any item too long is. Oracle: the
    conversation without it, with truncation disabled."""
    tail = [
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and now the question"},
    ]
    conversation = [{"role": "user", "content": "y" * (512 * 256 + 1)}, *tail]
    want = _reply(shim, model, tail)
    got = _reply(shim, model, conversation, truncation="auto")
    assert got.output_text == want.output_text
    assert got.usage.input_tokens == want.usage.input_tokens


def test_an_unknown_include_value_is_refused_and_a_known_one_taken(
    shim: RunningShim, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _reply(shim, model, "Hi", include=["message.output_text.logprobs", "bogus.value"])
    assert caught.value.code == "invalid_value"
    assert caught.value.param == "include[1]"
    assert _reply(shim, model, "Hi", include=["reasoning.encrypted_content"]).output_text


@pytest.mark.parametrize(
    ("metadata", "param", "code"),
    [
        ({f"k{i}": "v" for i in range(17)}, "metadata", "object_above_max_properties"),
        ({"k" * 65: "v"}, "metadata", "string_above_max_length"),
        ({"key": "v" * 513}, "metadata.key", "string_above_max_length"),
    ],
    ids=["17 pairs", "a 65-character key", "a 513-character value"],
)
def test_metadata_past_openais_bounds_is_refused(
    shim: RunningShim, model: str, metadata: dict[str, str], param: str, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _reply(shim, model, "Hi", metadata=metadata)
    assert (caught.value.param, caught.value.code) == (param, code)
    kept = {f"k{i}": "v" * 512 for i in range(16)}
    assert _reply(shim, model, "Hi", metadata=kept).metadata == kept


def test_an_empty_input_is_refused_unless_it_continues_a_response(
    shim: RunningShim, model: str
) -> None:
    """``input: []`` alone rendered an empty conversation and answered it (OpenAI
    refuses it); after a response, it continues that one."""
    with pytest.raises(openai.BadRequestError) as caught:
        _reply(shim, model, [])
    assert (caught.value.param, caught.value.code) == ("input", "empty_array")
    first = _reply(shim, model, "Hi")
    continued = _reply(shim, model, [], previous_response_id=first.id)
    assert continued.status in ("completed", "incomplete") and continued.usage.output_tokens


def test_a_completed_response_has_its_completion_time(
    scripted: tuple[Script, RunningShim],
) -> None:
    """``completed_at`` was always null; a response cut at its limit has none."""
    script, shim = scripted  # a fake server that says "hello" and stops
    client = shim.client()
    done = client.responses.create(model="scripted", input="Hi")
    assert done.status == "completed" and done.output_text == "hello"
    completed_at = done.model_dump()["completed_at"]
    assert completed_at is not None and completed_at >= done.created_at
    cut = client.responses.create(model="scripted", input="Hi", max_output_tokens=2)
    assert cut.status == "incomplete" and cut.model_dump()["completed_at"] is None


def test_a_streamed_response_reads_back_while_it_runs_and_after_its_client_left(
    scripted: tuple[Script, RunningShim],
) -> None:
    """A streamed response's id is sent first, but GET answered 404 until it completed,
    and for good once its client went away midway. It is now ``in_progress``, then
    ``cancelled``; neither can be continued."""
    script, shim = scripted
    client = shim.client()
    script.token_delay_s = 1.0
    try:
        with client.responses.create(model="scripted", input="Hi", stream=True) as stream:
            created = next(iter(stream))
            assert created.type == "response.created"
            response_id = created.response.id
            assert client.responses.retrieve(response_id).status == "in_progress"
    finally:
        script.token_delay_s = 0.0
    deadline = time.monotonic() + 10
    while (status := client.responses.retrieve(response_id).status) == "in_progress":
        assert time.monotonic() < deadline, "the shim did not see its client leave"
        time.sleep(0.05)
    assert status == "cancelled"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="scripted", input="y", previous_response_id=response_id)
    assert "is cancelled" in caught.value.message
    done = client.responses.create(model="scripted", input="Hi", stream=True)
    final = list(done)[-1].response
    assert final.status == "completed" and client.responses.retrieve(final.id).status == "completed"


def test_tool_choice_none_shows_the_tools_and_parses_no_call(
    scripted: tuple[Script, RunningShim],
) -> None:
    """As OpenAI and vLLM: the model still sees the tools; its reply is text."""
    script, shim = scripted
    script.text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    response = shim.client().responses.create(
        model="scripted", input="Weather?", tools=[tool], tool_choice="none"
    )
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text == script.text
    assert '"get_weather"' in messages_json(script.prompts[-1])[0]["content"]

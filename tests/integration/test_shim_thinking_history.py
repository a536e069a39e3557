"""A reasoning model's thinking sent back in the conversation reaches the chat template
(Qwen3's renders the thinking of the turn under way, between its tool calls), as vLLM
passes it: an assistant message's ``reasoning_content`` or ``reasoning``, a Responses
``reasoning`` item before the call or message it led to.

Oracle: the messages the scripted server was asked to render."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.shim_support import WEATHER, RunningShim, Script, messages_json

QUESTION = [{"role": "user", "content": "Weather in Oslo?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.fixture
def thinking(scripted: tuple[Script, RunningShim]) -> Any:
    script, shim = scripted
    script.chat_template = "{{ messages }}{{ tools }}<think></think><tool_call>"
    shim.backend._model_info = None  # ask again
    yield script, shim
    script.chat_template, script.text = "{{ messages }}", "hello"
    shim.backend._model_info = None


def test_a_chat_turns_thinking_sent_back_reaches_the_template(
    thinking: tuple[Script, RunningShim],
) -> None:
    """The SDK's message appended to the conversation, as an agent loop does, carries
    its ``reasoning_content``: the template got the call without it (it was dropped)."""
    script, shim = thinking
    client = shim.client()
    script.text = f"<think>\nI need Oslo's weather.\n</think>\n\n{CALL}"
    reply = client.chat.completions.create(model="scripted", messages=QUESTION, tools=[WEATHER])
    message = reply.choices[0].message
    assert message.reasoning_content == "I need Oslo's weather.\n"
    result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "-3 C"}
    script.text = "Cold."
    client.chat.completions.create(
        model="scripted", messages=[*QUESTION, message, result], tools=[WEATHER]
    )
    assistant = messages_json(script.prompts[-1])[1]
    assert assistant["reasoning_content"] == "I need Oslo's weather.\n"
    assert assistant["reasoning"] == "I need Oslo's weather.\n"  # the name newer templates read
    # vLLM's own field name is taken too; anything but a string is a 400 naming it.
    sent = {"role": "assistant", "content": "Sunny.", "reasoning": "Recall."}
    client.chat.completions.create(model="scripted", messages=[*QUESTION, sent, *QUESTION])
    assert messages_json(script.prompts[-1])[1]["reasoning_content"] == "Recall."
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model="scripted", messages=[*QUESTION, {**sent, "reasoning": ["x"]}]
        )
    assert error.value.body["param"] == "messages[1].reasoning"


RESPONSES_WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": WEATHER["function"]["parameters"],
}


def _thought_then_called(script: Script, client: Any) -> Any:
    """A Responses call whose reply thinks, then calls ``get_weather``."""
    script.text = f"<think>I need Oslo's weather.</think>{CALL}"
    return client.responses.create(
        model="scripted", input="Weather in Oslo?", tools=[RESPONSES_WEATHER]
    )


def test_a_responses_reasoning_item_reaches_the_template_with_its_call(
    thinking: tuple[Script, RunningShim],
) -> None:
    """A stateless Responses client sends the output items back as input: the reasoning
    item's text goes with the function call after it (reasoning items were skipped)."""
    script, shim = thinking
    client = shim.client()
    first = _thought_then_called(script, client)
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    items = [item.model_dump(exclude_none=True) for item in first.output]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "-3 C"}
    script.text = "Cold."
    client.responses.create(
        model="scripted", input=[{"role": "user", "content": "Weather in Oslo?"}, *items, result]
    )
    user, assistant, tool_result = messages_json(script.prompts[-1])
    assert assistant["reasoning_content"] == "I need Oslo's weather."
    assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "reasoning_content" not in tool_result and "reasoning_content" not in user


def test_a_chained_responses_thinking_reaches_the_template_as_if_sent_back(
    thinking: tuple[Script, RunningShim],
) -> None:
    """A response continued by ``previous_response_id`` keeps its reply's thinking: the
    conversation rendered afresh (the scripted template never extends the previous
    rendering, as when the instructions change) holds it as a stateless client's items
    sent back do (it was dropped: the template got the call without its thinking)."""
    script, shim = thinking
    client = shim.client()
    first = _thought_then_called(script, client)
    call = first.output[-1]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "-3 C"}
    script.text = "Cold."
    client.responses.create(
        model="scripted", previous_response_id=first.id, input=[result], tools=[RESPONSES_WEATHER]
    )
    chained = messages_json(script.prompts[-1])
    items = [item.model_dump(exclude_none=True) for item in first.output]
    client.responses.create(
        model="scripted",
        input=[{"role": "user", "content": "Weather in Oslo?"}, *items, result],
        tools=[RESPONSES_WEATHER],
    )
    assert chained == messages_json(script.prompts[-1])
    assert chained[1]["reasoning_content"] == "I need Oslo's weather."


def test_a_reply_cut_inside_its_thinking_is_the_same_turn_chained_or_sent_back(
    thinking: tuple[Script, RunningShim],
) -> None:
    """A response cut while it thought has a reasoning item and nothing after it. Sent
    back as input before the next user message, that item was dropped, while the same
    response chained by ``previous_response_id`` kept its assistant turn with the
    thinking: the two renderings of one conversation differed."""
    script, shim = thinking
    client = shim.client()
    script.text = "<think>Oslo is in Norway, so I should look up"
    first = client.responses.create(
        model="scripted", input="Weather in Oslo?", max_output_tokens=12
    )
    assert [item.type for item in first.output] == ["reasoning"]
    script.text = "Cold."
    client.responses.create(model="scripted", previous_response_id=first.id, input="Well?")
    chained = messages_json(script.prompts[-1])
    items = [item.model_dump(exclude_none=True) for item in first.output]
    client.responses.create(
        model="scripted",
        input=[*QUESTION, *items, {"role": "user", "content": "Well?"}],
    )
    assert messages_json(script.prompts[-1]) == chained
    assert [m["role"] for m in chained] == ["user", "assistant", "user"]
    assert chained[1]["reasoning_content"].startswith("Oslo")


def test_a_call_cut_before_its_arguments_is_the_same_turn_chained_or_sent_back(
    thinking: tuple[Script, RunningShim],
) -> None:
    """A call cut before its arguments has ``arguments: ""``; sent back as an item, it
    became "{}" where the chained response keeps "": two renderings of one
    conversation (the pool's cached prefix lost at the call)."""
    script, shim = thinking
    client = shim.client()
    opening = '<tool_call>\n{"name": "get_weather", "arguments": '
    script.text = opening + '{"city": "Oslo"}}\n</tool_call>'
    first = client.responses.create(
        model="scripted",
        input="Weather in Oslo?",
        tools=[RESPONSES_WEATHER],
        max_output_tokens=len(opening),
    )
    (call,) = first.output
    assert call.type == "function_call" and call.arguments == ""
    script.text = "Cold."
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "-3 C"}
    client.responses.create(
        model="scripted", previous_response_id=first.id, input=[result], tools=[RESPONSES_WEATHER]
    )
    chained = messages_json(script.prompts[-1])
    items = [item.model_dump(exclude_none=True) for item in first.output]
    client.responses.create(
        model="scripted", input=[*QUESTION, *items, result], tools=[RESPONSES_WEATHER]
    )
    assert messages_json(script.prompts[-1]) == chained
    assert chained[1]["tool_calls"][0]["function"]["arguments"] == ""

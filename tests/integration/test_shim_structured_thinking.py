"""Structured output from a reasoning model: it thinks first, the constraint leaving
the thinking free; and one whose prompt already closed the thinking (Qwen3 with
``chat_template_kwargs: {"enable_thinking": false}``: the generation prompt ends
``<think>\\n\\n</think>\\n\\n``): the reply is the answer, so the constraint applies
from its first token (it may not open another thinking), as vLLM's reasoning parsers
have it, and the JSON is all content.

Oracle: the constraint the scripted server was sent."""

from __future__ import annotations

import pytest

from tests.shim_support import RunningShim, Script

QUESTION = [{"role": "user", "content": "Tell me a story."}]
JSON_OBJECT = {"type": "json_object"}


@pytest.mark.parametrize(
    "generation_prompt, thinks",
    [("<think>\n\n</think>\n\n", False), ("", True)],
    ids=["thinking-off", "thinking-on"],
)
def test_a_prompt_that_closed_the_thinking_constrains_the_reply_from_its_start(
    scripted: tuple[Script, RunningShim], generation_prompt: str, thinks: bool
) -> None:
    script, shim = scripted
    script.chat_template = "{{ messages }}<think></think>"
    script.single_tokens = {"<think>": 200, "</think>": 201}
    script.generation_prompt = generation_prompt
    shim.backend._model_info = None
    try:
        script.text = '{"a": 1}'
        client = shim.client()
        reply = client.chat.completions.create(
            model="scripted", messages=QUESTION, response_format=JSON_OBJECT
        )
        sent = script.requests[-1].constraint
        assert sent.json_object
        assert sent.HasField("thinking_end_token") is thinks
        assert sent.HasField("thinking_start_token") is thinks
        assert reply.choices[0].message.content == '{"a": 1}'
        response = client.responses.create(
            model="scripted", input="Hi", text={"format": JSON_OBJECT}
        )
        assert script.requests[-1].constraint.HasField("thinking_end_token") is thinks
        assert response.output_text == '{"a": 1}'
    finally:
        script.chat_template, script.text, script.single_tokens = "{{ messages }}", "hello", {}
        script.generation_prompt = ""
        shim.backend._model_info = None


def test_a_structured_reply_may_think_first(scripted: tuple[Script, RunningShim]) -> None:
    """A reasoning model's structured output: the constraint leaves its thinking free
    (the server is sent the thinking tags' tokens), the thinking goes to
    ``reasoning_content`` and the answer, the JSON, to ``content``, streamed or not, in
    Chat Completions and Responses. Where a tag is not one token, the reply is
    constrained from its first token, all content, as before."""
    script, shim = scripted
    script.chat_template = "{{ messages }}{% if enable_thinking %}<think></think>{% endif %}"
    script.single_tokens = {"<think>": 200, "</think>": 201}
    shim.backend._model_info = None
    json_object = {"type": "json_object"}
    try:
        script.text = '<think>\nLet me see.\n</think>\n\n{"a": 1}'
        client = shim.client()
        reply = client.chat.completions.create(
            model="scripted", messages=QUESTION, response_format=json_object
        )
        message = reply.choices[0].message
        assert (message.reasoning_content, message.content) == ("Let me see.\n", '{"a": 1}')
        sent = script.requests[-1].constraint
        assert sent.json_object and (sent.thinking_start_token, sent.thinking_end_token) == (
            200,
            201,
        )
        asked = len(script.texts_tokenized)
        client.chat.completions.create(
            model="scripted", messages=QUESTION, response_format=json_object
        )
        assert script.requests[-1].constraint.thinking_end_token == 201
        assert len(script.texts_tokenized) == asked  # the tags were asked once, not per request
        chunks = list(
            client.chat.completions.create(
                model="scripted", messages=QUESTION, response_format=json_object, stream=True
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == (
            "Let me see.\n"
        )
        assert "".join(d.content or "" for d in deltas) == '{"a": 1}'
        response = client.responses.create(
            model="scripted", input="Hi", text={"format": json_object}
        )
        assert [item.type for item in response.output] == ["reasoning", "message"]
        assert response.output_text == '{"a": 1}'
        assert script.requests[-1].constraint.thinking_end_token == 201
        script.single_tokens = {}  # the tags are no tokens of their own: no thinking
        shim.backend._model_info = None  # another model (the tags are asked per model)
        plain = client.chat.completions.create(
            model="scripted", messages=QUESTION, response_format=json_object
        )
        assert not script.requests[-1].constraint.HasField("thinking_end_token")
        assert plain.choices[0].message.content == script.text
    finally:
        script.chat_template, script.text, script.single_tokens = "{{ messages }}", "hello", {}
        shim.backend._model_info = None

"""Structured output from a reasoning model whose prompt already closed the thinking
(Qwen3 with ``chat_template_kwargs: {"enable_thinking": false}``: the generation prompt
ends ``<think>\\n\\n</think>\\n\\n``): the reply is the answer, so the constraint applies
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

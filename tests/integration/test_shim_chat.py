"""Chat Completions through the shim, driven by the official ``openai`` SDK.

Oracles: the server's own answer to the same prompt on a fresh gRPC session (the tiny
model's text is random bytes, so the shim must reproduce it, not make sense of it); the
server's logprobs; the token counts the server reports.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from salience_client import END, SalienceClient
from salience_server.http.pooled_session import common_prefix_length
from tests.shim_support import (
    RunningShim,
    Script,
    greedy_reply,
    messages_json,
    rendered_chat,
)

QUESTION = [{"role": "user", "content": "Tell me a story."}]


def test_models_lists_the_served_model(shim: RunningShim, tiny_llama_dir: Any) -> None:
    models = shim.client().models.list().data
    assert [m.id for m in models] == [tiny_llama_dir.name]


def test_greedy_text_and_usage_equal_the_servers(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    text, token_ids, done, prompt_ids = greedy_reply(llama_server.target, QUESTION, 12)
    reply = shim.client().chat.completions.create(
        model=model, messages=QUESTION, max_tokens=12, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("length" if done.finish_reason == "length" else "stop")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(token_ids) == done.completion_tokens
    assert reply.usage.total_tokens == len(prompt_ids) + len(token_ids)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_streaming_equals_non_streaming(shim: RunningShim, llama_server: Any, model: str) -> None:
    text, token_ids, _, prompt_ids = greedy_reply(llama_server.target, QUESTION, 12)
    stream = shim.client().chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(token_ids)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_the_async_client_gets_the_same(shim: RunningShim, llama_server: Any, model: str) -> None:
    text, *_ = greedy_reply(llama_server.target, QUESTION, 10)

    async def run() -> tuple[str, str]:
        async with shim.async_client() as client:
            reply = await client.chat.completions.create(
                model=model, messages=QUESTION, max_tokens=10, temperature=0
            )
            stream = await client.chat.completions.create(
                model=model, messages=QUESTION, max_tokens=10, temperature=0, stream=True
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
            return reply.choices[0].message.content or "", streamed

    assert asyncio.run(run()) == (text, text)


def test_stop_strings_end_the_text_before_them(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    text, *_ = greedy_reply(llama_server.target, QUESTION, 16)
    stop = text[4:6]
    want, *_ = greedy_reply(llama_server.target, QUESTION, 16, stop_strings=[stop])
    assert want == text[: text.index(stop)]
    client = shim.client()
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, temperature=0, stop=[stop, "never"]
    )
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_fork_the_prompt(shim: RunningShim, llama_server: Any, model: str) -> None:
    text, *_ = greedy_reply(llama_server.target, QUESTION, 8)
    client = shim.client()
    greedy = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in greedy.choices] == [0, 1]
    assert [c.message.content for c in greedy.choices] == [text, text]
    assert greedy.usage.completion_tokens == 16

    def sampled() -> list[str | None]:
        reply = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=8, temperature=1.0, n=3, seed=7
        )
        return [c.message.content for c in reply.choices]

    first = sampled()
    assert first == sampled() and len(set(first)) > 1  # seeded, and seed + i per choice
    # Choice i samples with seed + i: choice 0 is the server's own seeded answer.
    want, *_ = greedy_reply(llama_server.target, QUESTION, 8, temperature=1.0, seed=7)
    assert first[0] == want
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=1.0, n=3, seed=7, stream=True
    )
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == first


def test_logprobs_have_openais_shape_and_the_servers_values(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    with SalienceClient(llama_server.target) as grpc_client, grpc_client.open_session() as s:
        prompt_ids = grpc_client.tokenize_chat(QUESTION)
        *tokens, _ = s.generate(
            prompt_ids, max_tokens=6, logprobs_ranges=[(len(prompt_ids), END)], logprob_top_k=3
        )
        raws = grpc_client.token_bytes([t.token_id for t in tokens])
    reply = shim.client().chat.completions.create(
        model=model, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == len(tokens)
    # Each entry carries its token's own bytes (the tiny tokenizer has one token per byte,
    # so most are pieces of a character): the string escapes what does not decode.
    joined = b"".join(raws).decode("utf-8", errors="replace")
    assert joined.startswith(reply.choices[0].message.content or "")
    for entry, token, raw in zip(content, tokens, raws, strict=True):
        assert entry.bytes == list(raw)
        assert entry.token == raw.decode("utf-8", errors="backslashreplace")
        assert "\ufffd" not in entry.token
        assert entry.logprob == pytest.approx(token.logprob, abs=1e-5)
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert tops == pytest.approx([lp for _, lp in token.top_logprobs], abs=1e-5)
    plain = shim.client().chat.completions.create(
        model=model, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True
    )
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert (
        shim.client()
        .chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
        .choices[0]
        .logprobs
        is None
    )


def test_a_second_turn_reuses_the_first_and_answers_the_same(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    client = shim.client()
    history = [{"role": "user", "content": "A fresh conversation about ships."}]
    first = client.chat.completions.create(
        model=model, messages=history, max_tokens=10, temperature=0
    )
    _, first_ids, _, first_prompt = greedy_reply(llama_server.target, history, 10)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = client.chat.completions.create(
        model=model, messages=history, max_tokens=10, temperature=0
    )
    want, _, _, second_prompt = greedy_reply(llama_server.target, history, 10)
    assert second.choices[0].message.content == want  # the same answer as without reuse
    # Reused: the longest common prefix of the session's tokens and the new prompt, less
    # the last decoded token, whose KV the server has not computed yet.
    session_ids = first_prompt + first_ids
    shared = common_prefix_length(session_ids, second_prompt)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == min(shared, len(session_ids) - 1)
    assert cached >= len(first_prompt)


def test_concurrent_requests_never_share_a_session(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    text, *_ = greedy_reply(llama_server.target, QUESTION, 12)

    async def run() -> list[str]:
        async with shim.async_client() as client:
            replies = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=model, messages=QUESTION, max_tokens=12, temperature=0
                    )
                    for _ in range(4)
                )
            )
        return [r.choices[0].message.content or "" for r in replies]

    assert asyncio.run(run()) == [text] * 4
    assert shim.backend.pool.num_leased == 0


# ----- tool calls, on scripted model output ----------------------------------------


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_calls_come_out_as_tool_calls(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    script.text = "Checking. " + CALL_TEXT
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = shim.client().chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking. "  # as the stream's deltas give it
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The template has no tool support: the shim described the tools in a system message.
    rendered = messages_json(script.prompts[-1])
    assert rendered[0]["role"] == "system" and '"get_weather"' in rendered[0]["content"]

    stream = shim.client().chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert text == "Checking. "
    # The call opens with its id and name, then its arguments stream as they come.
    assert (calls[0].index, calls[0].id, calls[0].function.name) == (0, calls[0].id, "get_weather")
    assert calls[0].id.startswith("call_") and calls[0].function.arguments == ""
    assert all(tc.index == 0 and tc.id is None for tc in calls[1:]) and len(calls) > 5
    arguments = "".join(tc.function.arguments for tc in calls)
    assert arguments == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The result goes back through the template as a tool message.
    script.text = "It is sunny."
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"},
    ]
    reply = shim.client().chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL]
    )
    assert reply.choices[0].message.content == "It is sunny."
    assert reply.choices[0].finish_reason == "stop"
    rendered = messages_json(script.prompts[-1])
    assert rendered[2]["content"].startswith("Checking. \n<tool_call>")
    assert rendered[3] == {
        "role": "tool",
        "content": "<tool_response>\nsunny, 24 C\n</tool_response>",
        "tool_call_id": call.id,
    }


def test_tool_choice_none_and_a_named_function(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    script.text = CALL_TEXT
    reply = shim.client().chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert reply.choices[0].message.content == CALL_TEXT and not reply.choices[0].message.tool_calls
    # The tools are in the prompt all the same, as OpenAI and vLLM show them to the model.
    assert "get_weather" in json.dumps(messages_json(script.prompts[-1]))
    # A named function: the shim opens the call, the model writes the arguments.
    script.text = '{"city": "Rome"}}\n</tool_call>'
    reply = shim.client().chat.completions.create(
        model="scripted",
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    (call,) = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Rome"},
    )
    assert bytes(script.prompts[-1]).decode().endswith('{"name": "get_weather", "arguments": ')


def test_a_template_with_tool_support_gets_the_tools(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    script.chat_template = "{{ messages }}{{ tools }}"
    shim.backend._model_info = None  # ask again
    try:
        script.text = "ok"
        shim.client().chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": "hi"}],
            tools=[WEATHER_TOOL],
        )
        rendered = rendered_chat(script.prompts[-1])
        assert rendered["messages"] == [{"role": "user", "content": "hi"}]
        assert rendered["tools"] == [WEATHER_TOOL]
    finally:
        script.chat_template = "{{ messages }}"
        shim.backend._model_info = None


THINKING = "<think>\nThe user says hi.\n</think>\n\nHello!"
NUM_THINKING_TOKENS = len("<think>\nThe user says hi.\n</think>") - len("<think")
"""One token per character: the tokens from the one completing ``<think>`` through ``</think>``."""


def test_thinking_is_reasoning_content(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    script.chat_template = "{{ messages }}{% if enable_thinking %}<think></think>{% endif %}"
    shim.backend._model_info = None  # ask again
    try:
        script.text = THINKING
        client = shim.client()
        reply = client.chat.completions.create(model="scripted", messages=QUESTION)
        message = reply.choices[0].message
        assert (message.reasoning_content, message.content) == ("The user says hi.\n", "Hello!")
        assert reply.usage.completion_tokens_details.reasoning_tokens == NUM_THINKING_TOKENS
        chunks = list(
            client.chat.completions.create(
                model="scripted",
                messages=QUESTION,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        kinds = ["r" if getattr(d, "reasoning_content", None) else "c" for d in deltas[1:-1]]
        assert "".join(kinds) == "r" * kinds.count("r") + "c" * kinds.count("c")  # in order
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        assert reasoning == "The user says hi.\n"
        assert "".join(d.content or "" for d in deltas) == "Hello!"
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == NUM_THINKING_TOKENS
        # Without thinking tags, the reply is all content.
        script.text = "Just hello."
        plain = client.chat.completions.create(model="scripted", messages=QUESTION)
        assert plain.choices[0].message.content == "Just hello."
        assert plain.choices[0].message.reasoning_content is None
        # A reply cut inside its thinking has no content (null, as vLLM's; it was "").
        script.text = "<think>\nStill thinking"
        cut = client.chat.completions.create(model="scripted", messages=QUESTION)
        assert cut.choices[0].message.reasoning_content == "Still thinking"
        assert cut.choices[0].message.content is None
    finally:
        script.chat_template, script.text = "{{ messages }}", "hello"
        shim.backend._model_info = None

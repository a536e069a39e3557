"""Tool-call formats of the families beyond Hermes' and Llama 3's, through the shim:
the opening a forced call is given in the prompt, the constraint of ``required``, and
replies in the family's own markup (as ``skip_special_tokens: false`` shows it),
streamed or not.

Oracle: the requests a scripted server recorded, and the replies it was scripted to give.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tests.chat_templates import DEEPSEEK_R1_TOOLS
from tests.chat_templates_tools import MISTRAL_V13
from tests.shim_support import (
    HELLO,
    TIME,
    WEATHER,
    WEATHER_PARAMETERS,
    RunningShim,
    Script,
    forced_weather_outputs,
    last_decoding_request,
    request_constraint,
)

NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _streamed(chunks: list[Any]) -> tuple[str, list[str], list[str], str | None]:
    """(content, reasoning, the names of the calls, the finish reason) of a stream."""
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    names = [c.function.name for d in deltas for c in d.tool_calls or [] if c.function.name]
    return content, reasoning, names, chunks[-1].choices[0].finish_reason


MISTRAL_TEMPLATE = "{{ messages }}{% if tools %}[AVAILABLE_TOOLS]{{ tools }}{% endif %}[TOOL_CALLS]"


def test_a_mistral_template_gets_its_own_call_format(scripted: tuple[Script, RunningShim]) -> None:
    """Mistral v0.3's calls are ``[TOOL_CALLS]`` and a JSON list: a forced call opens
    the list (it opened Hermes' ``<tool_call>``), in either API, ``required`` takes several calls
    separated by commas, and a reply that shows its marker (``skip_special_tokens:
    false``) is its calls, streamed or not."""
    script, shim = scripted
    with _serving(script, shim, MISTRAL_TEMPLATE):
        client = shim.client()
        options: dict[str, Any] = dict(model="scripted", messages=HELLO, tools=[WEATHER, TIME])
        script.text = '{"city": "Oslo"}'
        reply = client.chat.completions.create(**options, tool_choice=NAMED)
        prompt = bytes(script.prompts[-1]).decode()
        assert prompt.endswith('[TOOL_CALLS] [{"name": "get_weather", "arguments": ')
        (call,) = reply.choices[0].message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Oslo"}')
        assert forced_weather_outputs(client) == [
            ("function_call", '{"city": "Oslo"}')
        ]  # Responses' form of the same
        assert bytes(script.prompts[-1]).decode().endswith(prompt[prompt.rindex("[TOOL_CALLS]") :])
        script.text = two = (
            '{"name": "get_time", "arguments": {}}, '
            '{"name": "get_weather", "arguments": {"city": "Rome"}}]'
        )
        reply = client.chat.completions.create(**options, tool_choice="required")
        names = [c.function.name for c in reply.choices[0].message.tool_calls]
        assert names == ["get_time", "get_weather"]
        assert bytes(script.prompts[-1]).decode().endswith("[TOOL_CALLS] [")
        kind, grammar = request_constraint(last_decoding_request(script))
        assert kind == "lark" and '", "' in grammar and '"]"?' in grammar
        script.text = "[TOOL_CALLS] [" + two
        for stream in (False, True):
            reply = client.chat.completions.create(
                **options, stream=stream, extra_body={"skip_special_tokens": False}
            )
            if stream:
                assert _streamed(list(reply)) == ("", "", names, "tool_calls")
            else:
                message = reply.choices[0].message
                assert message.content is None
                assert [c.function.name for c in message.tool_calls] == names


DEEPSEEK_CALLS = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```"
    "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Rome"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)


def test_a_deepseek_template_gets_its_own_call_format(
    scripted: tuple[Script, RunningShim],
) -> None:
    """DeepSeek-R1's calls (its template given the tools to render): a forced call opens
    with its markers and the function's name (it opened Hermes' ``<tool_call>``), and a
    reply that thinks, then calls, is reasoning and calls, streamed or not (its calls
    were content)."""
    script, shim = scripted
    with _serving(script, shim, DEEPSEEK_R1_TOOLS):
        client = shim.client()
        options: dict[str, Any] = dict(model="scripted", messages=HELLO, tools=[WEATHER, TIME])
        script.text = '{"city": "Oslo"}'
        reply = client.chat.completions.create(**options, tool_choice=NAMED)
        opening = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
        assert bytes(script.prompts[-1]).decode().endswith(opening + "get_weather\n```json\n")
        (call,) = reply.choices[0].message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Oslo"}')
        script.text = "get_time\n```json\n{}"
        reply = client.chat.completions.create(**options, tool_choice="required")
        assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]
        assert bytes(script.prompts[-1]).decode().endswith(opening)
        kind, grammar = request_constraint(last_decoding_request(script))
        assert kind == "lark" and grammar.startswith("start: call_0 | call_1\n")
        script.generation_prompt = "<think>\n"  # R1's: the reply starts in its thinking
        script.text = "Rome, then the time.\n</think>\n\n" + DEEPSEEK_CALLS
        want = ("", "Rome, then the time.\n", ["get_time", "get_weather"], "tool_calls")
        for stream in (False, True):
            reply = client.chat.completions.create(
                **options, stream=stream, extra_body={"skip_special_tokens": False}
            )
            if stream:
                assert _streamed(list(reply)) == want
            else:
                (choice,) = reply.choices
                message = choice.message
                calls = [c.function.name for c in message.tool_calls]
                reasoning = getattr(message, "reasoning_content", None)
                assert (message.content, reasoning, calls, choice.finish_reason) == (
                    None,
                    *want[1:],
                )


def test_markers_after_text_reach_the_parser_unless_the_client_skips_them(
    scripted: tuple[Script, RunningShim],
) -> None:
    """Mistral's ``[TOOL_CALLS]`` is a special token: a reply that wrote text before
    its calls lost the marker to the default ``skip_special_tokens`` and its calls were
    content. Where the reply is read for calls, special tokens' text is kept unless the
    client set the field (as vLLM does), in either API; with ``tool_choice: "none"``, or
    an explicit ``skip_special_tokens: true``, the marker is skipped as before."""
    script, shim = scripted
    script.text = 'Checking.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    with _serving(script, shim, MISTRAL_TEMPLATE, ("[TOOL_CALLS]",)):
        client = shim.client()
        options: dict[str, Any] = dict(model="scripted", messages=HELLO, tools=[WEATHER, TIME])
        for stream in (False, True):
            reply = client.chat.completions.create(**options, stream=stream)
            assert last_decoding_request(script).keep_special_tokens
            if stream:
                assert _streamed(list(reply)) == ("Checking.", "", ["get_weather"], "tool_calls")
            else:
                message = reply.choices[0].message
                assert message.content == "Checking."
                (call,) = message.tool_calls
                assert call.function.arguments == '{"city": "Rome"}'
        response = client.responses.create(
            model="scripted",
            input="Weather?",
            tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}],
        )
        assert [o.type for o in response.output] == ["message", "function_call"]
        bare = script.text.replace("[TOOL_CALLS]", "")
        reply = client.chat.completions.create(**options, tool_choice="none")
        assert not last_decoding_request(script).keep_special_tokens
        assert reply.choices[0].message.content == bare
        reply = client.chat.completions.create(**options, extra_body={"skip_special_tokens": True})
        assert not last_decoding_request(script).keep_special_tokens
        # The stop's text asked for: special tokens kept would show the end-of-turn's.
        client.chat.completions.create(**options, extra_body={"include_stop_str_in_output": True})
        assert not last_decoding_request(script).keep_special_tokens
        assert (reply.choices[0].message.content, reply.choices[0].message.tool_calls) == (
            bare,
            None,
        )


MISTRAL_NATIVE_REPLY = (
    "Checking both.[TOOL_CALLS]get_time[ARGS]{}"
    '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Rome"}'
)


def test_a_mistral_native_template_gets_its_own_call_format(
    scripted: tuple[Script, RunningShim],
) -> None:
    """Mistral's calls from its tokenizer v11 (``[TOOL_CALLS]NAME[ARGS]{...}``, its
    markers special tokens): a forced named call opens with the marker, the name and
    ``[ARGS]`` (it opened Hermes' ``<tool_call>``), in either API; ``required`` with the
    marker, a grammar of one call after it; a reply of text, then two calls, is that
    content and the two calls, streamed or not (they were content), the id it wrote
    the second call's."""
    script, shim = scripted
    with _serving(script, shim, MISTRAL_V13, ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")):
        client = shim.client()
        options: dict[str, Any] = dict(model="scripted", messages=HELLO, tools=[WEATHER, TIME])
        script.text = '{"city": "Oslo"}'
        reply = client.chat.completions.create(**options, tool_choice=NAMED)
        assert bytes(script.prompts[-1]).decode().endswith("[TOOL_CALLS]get_weather[ARGS]")
        (call,) = reply.choices[0].message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Oslo"}')
        assert forced_weather_outputs(client) == [("function_call", '{"city": "Oslo"}')]
        assert bytes(script.prompts[-1]).decode().endswith("[TOOL_CALLS]get_weather[ARGS]")
        script.text = "get_time[ARGS]{}"
        reply = client.chat.completions.create(**options, tool_choice="required")
        assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]
        assert bytes(script.prompts[-1]).decode().endswith("[TOOL_CALLS]")
        kind, grammar = request_constraint(last_decoding_request(script))
        assert kind == "lark" and grammar.startswith("start: call_0 | call_1\n")
        script.text = MISTRAL_NATIVE_REPLY
        names = ["get_time", "get_weather"]
        for stream in (False, True):
            reply = client.chat.completions.create(**options, stream=stream)
            if stream:
                chunks = list(reply)
                assert _streamed(chunks) == ("Checking both.", "", names, "tool_calls")
                deltas = [c.choices[0].delta for c in chunks if c.choices]
                ids = [call.id for d in deltas for call in d.tool_calls or [] if call.id]
                assert ids[1] == "a1B2c3D4e"
            else:
                message = reply.choices[0].message
                assert message.content == "Checking both."
                assert [c.function.name for c in message.tool_calls] == names
                assert message.tool_calls[1].id == "a1B2c3D4e"
        response = client.responses.create(
            model="scripted",
            input="Weather?",
            tools=[
                {"type": "function", "name": "get_time"},
                {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS},
            ],
        )
        output = [(o.type, getattr(o, "call_id", None)) for o in response.output]
        assert output[0][0] == "message" and output[2] == ("function_call", "a1B2c3D4e")
        assert response.output[0].content[0].text == "Checking both."
        assert [getattr(o, "name", None) for o in response.output] == [None, *names]


DEEPSEEK_MARKER_IDS = {
    "<｜tool▁call▁begin｜>": 240,
    "<｜tool▁sep｜>": 241,
    "<｜tool▁call▁end｜>": 242,
    "<｜tool▁calls▁end｜>": 243,
}
MISTRAL_MARKER_IDS = {"[TOOL_CALLS]": 250, "[ARGS]": 251}


def test_required_writes_single_token_markers_by_id_and_takes_several_calls(
    scripted: tuple[Script, RunningShim],
) -> None:
    """Where the family's markers are one token each of the model's (as special tokens
    are), ``required``'s grammar names them by id (``<[id]>``) and lets a second call
    follow in the family's markup (it took one call, its markers as text), in DeepSeek's
    and Mistral v11's formats; the reply's two calls are both the client's. The markers
    are asked of the server once per model info."""
    script, shim = scripted
    formats = [
        (
            DEEPSEEK_R1_TOOLS,
            DEEPSEEK_MARKER_IDS,
            DEEPSEEK_CALLS.split("function<｜tool▁sep｜>", 1)[1],
        ),
        (MISTRAL_V13, MISTRAL_MARKER_IDS, MISTRAL_NATIVE_REPLY.split("[TOOL_CALLS]", 1)[1]),
    ]
    with _serving(script, shim):
        for template, marker_ids, reply_text in formats:
            script.chat_template, script.single_tokens = template, marker_ids
            script.special_texts = tuple(marker_ids)
            shim.backend._model_info = None  # ask again
            client = shim.client()
            script.text = reply_text
            options: dict[str, Any] = dict(model="scripted", messages=HELLO, tools=[WEATHER, TIME])
            reply = client.chat.completions.create(**options, tool_choice="required")
            names = [c.function.name for c in reply.choices[0].message.tool_calls]
            assert names == ["get_time", "get_weather"]
            kind, grammar = request_constraint(last_decoding_request(script))
            assert kind == "lark" and grammar.startswith("start: call (")
            for marker, token_id in marker_ids.items():
                assert f"<[{token_id}]>" in grammar and marker not in grammar
            asked = len(script.texts_tokenized)
            client.responses.create(
                model="scripted", input="Weather?", tools=RESPONSES_TOOLS, tool_choice="required"
            )
            assert request_constraint(last_decoding_request(script)) == (kind, grammar)
            assert len(script.texts_tokenized) == asked + 1  # the opening only


RESPONSES_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "name": "get_time"},
    {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS},
]


@contextlib.contextmanager
def _serving(
    script: Script, shim: RunningShim, template: str | None = None, special: tuple[str, ...] = ()
) -> Iterator[None]:
    """The scripted server with ``template`` (and the markers it reads as special
    tokens), the shim asking its model info again; after, both as the fixture made them."""
    if template is not None:
        script.chat_template, script.special_texts = template, special
        shim.backend._model_info = None  # ask again
    try:
        yield
    finally:
        script.chat_template, script.text, script.special_texts = "{{ messages }}", "hello", ()
        script.generation_prompt, script.single_tokens = "", {}
        shim.backend._model_info = None

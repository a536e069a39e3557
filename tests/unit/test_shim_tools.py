"""The shim's pure parts, no server: tool-call parsing, tool_choice, messages for the chat
template, the Responses chaining arithmetic, logprob shapes."""

from __future__ import annotations

import base64
import json

import pytest

from salience_client import TokenEvent
from salience_server.http.errors import ApiError
from salience_server.http.logprobs import (
    TextOffsets,
    TokenText,
    chat_logprobs,
    completion_logprobs,
)
from salience_server.http.messages import (
    IMAGE_PLACEHOLDER,
    chat_messages,
    parse_image_url,
    response_input_messages,
)
from salience_server.http.pooled_session import common_prefix_length
from salience_server.http.response_plan import continue_session
from salience_server.http.response_store import StoredResponse
from salience_server.http.template_messages import template_messages
from salience_server.http.tool_parser import parse_reply
from salience_server.http.tools import chat_tools, responses_tools, tool_mode

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
NAMES = {"get_weather", "get_time"}


def test_hermes_calls_are_parsed_with_the_text_around_them() -> None:
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    content, calls = parse_reply(text, NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert all(c.call_id.startswith("call_") for c in calls)
    assert len({c.call_id for c in calls}) == 2


def test_an_unclosed_call_at_the_end_still_parses() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'
    _, calls = parse_reply(text, NAMES)
    assert [(c.name, c.arguments) for c in calls] == [("get_time", '{"zone": "UTC"}')]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        '  ```json\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n```  ',
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    ],
)
def test_bare_json_naming_a_tool_is_a_call(text: str) -> None:
    content, calls = parse_reply(text, NAMES)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        '{"name": "launch_missiles", "arguments": {}}',  # not a declared tool
        '{"city": "Oslo"}',  # no name
        "<tool_call>not json</tool_call>",
        '[{"name": "get_weather"}, 3]',
    ],
)
def test_anything_else_is_plain_text(text: str) -> None:
    assert parse_reply(text, NAMES) == (text, [])


def test_string_arguments_pass_through_as_json_text() -> None:
    _, calls = parse_reply('{"name": "get_time", "arguments": "{\\"a\\": 1}"}', NAMES)
    assert calls[0].arguments == '{"a": 1}'


def test_tool_choice_resolves_or_is_refused() -> None:
    tools = chat_tools([WEATHER])
    assert tool_mode(tools, None).choice == "auto" and tool_mode([], None).choice == "none"
    assert not tool_mode(tools, "none").is_enabled
    assert tool_mode(tools, "required").prefix_text() == "<tool_call>\n"
    assert tool_mode(tools, "required").is_forced and not tool_mode(tools, "auto").is_forced
    named = tool_mode(tools, {"type": "function", "name": "get_weather"})  # Responses' form
    assert named.choice == "named" and named.forced_name == "get_weather"
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(ApiError) as error:
            tool_mode(tools, bad)
        assert error.value.status == 400 and error.value.param == "tool_choice"
    with pytest.raises(ApiError):
        tool_mode([], "required")
    with pytest.raises(ApiError):
        chat_tools([{"type": "code_interpreter"}])


def test_responses_tools_become_chat_tools() -> None:
    flat = {"type": "function", "name": "get_weather", "parameters": {}, "strict": True}
    assert responses_tools([flat]) == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    ]


def test_messages_normalise_parts_roles_and_tool_calls() -> None:
    conversation = chat_messages(
        [
            {
                "role": "developer",
                "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief"}],
            },
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
    )
    messages = conversation.messages
    assert messages[0] == {"role": "system", "content": "Be\nbrief"}
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'
    assert messages[3]["tool_call_id"] == "call_1"
    # A template that renders tools gets argument objects and never a None content ...
    rendered = template_messages(messages, [WEATHER], has_tool_template=True)
    assert rendered[2]["content"] == ""
    assert rendered[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    # ... one that does not gets the tools described in the system message, Hermes text.
    plain = template_messages(messages, [WEATHER], has_tool_template=False)
    assert plain[0]["role"] == "system" and "<tools>" in plain[0]["content"]
    assert plain[0]["content"].startswith("Be\nbrief")
    assert plain[2]["content"].startswith("<tool_call>\n") and "tool_calls" not in plain[2]
    assert plain[3]["content"] == "<tool_response>\nsunny\n</tool_response>"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "input_audio"}]}],
        [{"role": "user", "content": 3}],
    ],
)
def test_bad_messages_are_400(messages: list) -> None:
    with pytest.raises(ApiError) as error:
        chat_messages(messages)
    assert error.value.status == 400 and error.value.param.startswith("messages[0]")


def test_images_come_out_of_data_urls_only() -> None:
    conversation = chat_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                ],
            }
        ]
    )
    assert conversation.messages[0]["content"] == "What is this?\n" + IMAGE_PLACEHOLDER
    assert [(i.mime_type, i.data[:4]) for i in conversation.images] == [("image/png", b"\x89PNG")]
    for url in ("data:image/png;base64,@@@", "data:,plain", "data:image/png;base64,iVBOR*w0"):
        with pytest.raises(ApiError):
            parse_image_url(url, "x")
    # Base64 as encoders write it: wrapped in lines, unpadded, URL-safe.
    data = bytes(range(256)) * 2
    wrapped = base64.encodebytes(data).decode()  # 76 columns, as the base64 command
    for text in (
        wrapped,
        base64.b64encode(data).decode().rstrip("="),
        base64.urlsafe_b64encode(data).decode(),
    ):
        assert text != base64.b64encode(data).decode()
        assert parse_image_url(f"data:image/png;base64,{text}", "x").data == data
    remote = parse_image_url("https://example.com/cat.png", "x")
    assert (
        remote.url == "https://example.com/cat.png" and remote.data == b""
    )  # fetched later, if allowed


def test_response_items_become_chat_messages() -> None:
    conversation = response_input_messages(
        [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Rome?"}]},
            {
                "type": "function_call",
                "call_id": "call_9",
                "name": "get_weather",
                "arguments": "{}",
            },
            {"type": "function_call_output", "call_id": "call_9", "output": "sunny"},
            {"type": "reasoning", "summary": []},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Sunny."}],
            },
        ]
    )
    assert conversation.messages == [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    with pytest.raises(ApiError):
        response_input_messages([{"type": "item_reference", "id": "x"}])


def test_a_function_call_output_of_parts_reaches_the_model_as_their_text() -> None:
    """``output`` may be a list of input parts, as OpenAI takes it (it reached the model
    as their JSON); one missing is a 400 naming it."""
    conversation = response_input_messages(
        [
            {
                "type": "function_call_output",
                "call_id": "call_9",
                "output": [
                    {"type": "input_text", "text": "22C"},
                    {"type": "input_text", "text": "sunny"},
                ],
            }
        ]
    )
    assert conversation.messages == [
        {"role": "tool", "tool_call_id": "call_9", "content": "22C\nsunny"}
    ]
    with pytest.raises(ApiError) as caught:
        response_input_messages([{"type": "function_call_output", "call_id": "call_9"}])
    assert caught.value.param == "input[0].output"


EOS = 99


def _stored(rendered: list[int], session: list[int]) -> StoredResponse:
    return StoredResponse({"id": "resp_1"}, [], rendered, session)


def test_a_chained_prompt_continues_the_live_session() -> None:
    # prompt [1, 2, 3]; the model answered [7, 8] then EOS; the template closes a turn
    # with [EOS, 50] and renders the reply's text as [70, 80] (not the model's tokens).
    previous = _stored([1, 2, 3], [1, 2, 3, 7, 8, EOS])
    rendered = [1, 2, 3, 70, 80, EOS, 50, 4, 5]
    assert continue_session(previous, rendered, {EOS}) == [1, 2, 3, 7, 8, EOS, 50, 4, 5]
    # Cut short by max_output_tokens: the template's closing is appended.
    previous = _stored([1, 2, 3], [1, 2, 3, 7, 8])
    assert continue_session(previous, rendered, {EOS}) == [1, 2, 3, 7, 8, EOS, 50, 4, 5]
    # A rendering that does not extend the previous one (other instructions) starts afresh.
    assert continue_session(previous, [9, 2, 3, 70, EOS, 4], {EOS}) == [9, 2, 3, 70, EOS, 4]
    assert continue_session(previous, [1, 2, 3, 70, 4], {EOS}) == [1, 2, 3, 70, 4]


def test_a_chained_prompt_closes_the_turn_as_the_template_does_after_another_eos() -> None:
    """A model with several end-of-sequence tokens (Qwen's ``<|endoftext|>`` beside
    ``<|im_end|>``, Llama 3's ``<|eom_id|>`` beside ``<|eot_id|>``) that ended its reply
    with one the template does not close turns with: the chained prompt kept that token
    in place of the template's closing, which the conversation sent whole has."""
    other_eos = 98
    previous = _stored([1, 2, 3], [1, 2, 3, 7, 8, other_eos])
    rendered = [1, 2, 3, 70, 80, EOS, 50, 4, 5]
    chained = continue_session(previous, rendered, {EOS, other_eos})
    assert chained == [1, 2, 3, 7, 8, EOS, 50, 4, 5]


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


def test_a_byte_fragment_token_prints_its_bytes_escaped() -> None:
    texts = {1: TokenText(b"caf\xc3"), 2: TokenText(b"\xa9!")}
    tokens = [_token(0, 1, -0.5, [(2, -1.0)], False), _token(1, 2, -0.25, [], False)]
    entries = chat_logprobs(tokens, texts, 1)["content"]
    assert [(e["token"], e["bytes"]) for e in entries] == [
        ("caf\\xc3", [99, 97, 102, 0xC3]),
        ("\\xa9!", [0xA9, 33]),
    ]
    assert entries[0]["top_logprobs"] == [{"token": "\\xa9!", "logprob": -1.0, "bytes": [0xA9, 33]}]
    assert bytes(entries[0]["bytes"] + entries[1]["bytes"]).decode() == "café!"
    offsets = TextOffsets()  # "é" is split: "\xa9!" starts inside it, at its offset
    assert completion_logprobs(tokens, texts, 0, offsets)["text_offset"] == [0, 3]
    assert offsets.chars == len("café!")


def _token(position: int, token_id: int, logprob: float, top: list, is_prefill: bool) -> TokenEvent:
    return TokenEvent(position, token_id, is_prefill, logprob, 1, top)


def test_logprob_shapes() -> None:
    texts = {i: TokenText(t.encode()) for i, t in {1: "He", 2: "llo", 3: "!", 4: "?"}.items()}
    tokens = [
        _token(0, 1, 0.0, [], True),
        _token(1, 2, -0.5, [(2, -0.5), (3, -1.5)], True),
        _token(2, 3, -0.25, [(3, -0.25), (4, -2.0)], False),
    ]
    legacy = completion_logprobs(tokens, texts, 2, TextOffsets())
    assert legacy == {
        "tokens": ["He", "llo", "!"],
        "token_logprobs": [None, -0.5, -0.25],
        "top_logprobs": [None, {"llo": -0.5, "!": -1.5}, {"!": -0.25, "?": -2.0}],
        "text_offset": [0, 2, 5],
    }
    # The chosen token is always there, as OpenAI's (it was None with logprobs 0, and
    # missing when outside the top k).
    assert completion_logprobs(tokens, texts, 0, TextOffsets())["top_logprobs"] == [
        None,
        {"llo": -0.5},
        {"!": -0.25},
    ]
    unlikely = [_token(1, 4, -2.0, [(3, -0.25), (4, -2.0)], False)]
    assert completion_logprobs(unlikely, texts, 1, TextOffsets())["top_logprobs"] == [
        {"!": -0.25, "?": -2.0}
    ]
    chat = chat_logprobs(tokens[2:], texts, 1)
    assert chat == {
        "content": [
            {
                "token": "!",
                "logprob": -0.25,
                "bytes": [33],
                "top_logprobs": [{"token": "!", "logprob": -0.25, "bytes": [33]}],
            }
        ],
        "refusal": None,
    }

"""Text past ASCII through the shim: stop strings beside characters a token leaves
incomplete, prompts of token ids that end inside a character, tool names and
descriptions in other scripts, schema patterns of JSON Schema's own dialect, and keys
that must be plain digits.

Oracles: the tokenizer's decode of the same token ids (the default model, byte-level
BPE, whose tokens may hold a space and the first bytes of an emoji), and the requests a
scripted server recorded and the replies it was scripted to give."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from salience_client import SalienceClient
from tests.shim_support import HELLO, RunningShim, Script, last_decoding_request, messages_json

WEATHER_JA = {
    "type": "function",
    "function": {
        "name": "天気",
        "description": "天気を取得",
        "parameters": {
            "type": "object",
            "properties": {"都市": {"type": "string"}},
            "required": ["都市"],
        },
    },
}


def _model_id(shim: RunningShim) -> str:
    return shim.client().models.list().data[0].id


def _complete(shim: RunningShim, **fields: Any) -> dict[str, Any]:
    """One greedy completion's first choice, with its token ids."""
    extra = {"return_token_ids": True, **fields.pop("extra_body", {})}
    reply = shim.client().completions.create(
        model=_model_id(shim), temperature=0, extra_body=extra, **fields
    )
    return dict(reply.choices[0].model_dump())


def test_a_stop_string_before_a_character_left_incomplete_matches_at_once(
    default_shim: RunningShim,
) -> None:
    """ "ok 👍 fine" decodes as ok, " " with the emoji's first bytes, ...: the stop string
    "ok " is whole after the second token. The detokenizer held the space back with the
    emoji's bytes, so the stop matched two tokens late (four tokens committed), or never
    (finish "length" with the stop string in the text) when the call ended first."""
    for max_tokens in (2, 4):
        choice = _complete(
            default_shim,
            prompt="Say:",
            max_tokens=max_tokens,
            extra_body={"guided_regex": "ok 👍 fine"},
            stop=["ok "],
        )
        assert (choice["text"], choice["finish_reason"]) == ("", "stop")
        assert choice["stop_reason"] == "ok " and len(choice["token_ids"]) == 2


def test_a_stop_string_of_a_replacement_character_matches_invalid_bytes(
    default_shim: RunningShim, default_server: Any
) -> None:
    """A token of a lone continuation byte decodes as U+FFFD and stays so: it was held
    back as an unfinished character until the call's end, and a stop on it never
    matched."""
    with SalienceClient(default_server.target) as client:
        pieces = client.token_bytes(list(range(300)))
    lone = next(i for i, piece in enumerate(pieces) if len(piece) == 1 and 0x80 <= piece[0] < 0xC0)
    choice = _complete(
        default_shim,
        prompt="Say x",
        max_tokens=6,
        logit_bias={str(lone): 100},
        stop=["\ufffd"],
    )
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
        "",
        "stop",
        "\ufffd",
    )
    assert choice["token_ids"] == [lone]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_prompt_ids_ending_inside_a_character_echo_as_decoded(
    default_shim: RunningShim, default_server: Any, stream: bool
) -> None:
    """A prompt of ids ending inside 你 (its first two bytes, U+FFFD alone): a completion
    that does not finish the character showed the prompt's U+FFFD as its own (twice
    with ``echo``); one that finishes it echoed U+FFFD before the whole character. The
    echo and the completion now join to the decode of all the ids."""
    with SalienceClient(default_server.target) as client:
        start, finish = client.tokenize("你", add_special_tokens=False)
        prompt_ids = client.tokenize("Hi: ", add_special_tokens=False) + [start]
        plain = client.tokenize("a", add_special_tokens=False)[0]
        for bias, echo in [(plain, False), (plain, True), (finish, True)]:
            fields = dict(prompt=prompt_ids, max_tokens=2, echo=echo, logit_bias={str(bias): 100})
            if stream:
                chunks = default_shim.client().completions.create(
                    model=_model_id(default_shim), temperature=0, stream=True, **fields
                )
                text = "".join(c.choices[0].text for c in chunks if c.choices)
            else:
                text = _complete(default_shim, **fields)["text"]
            decoded = client.detokenize(prompt_ids + [bias, bias])
            want = decoded if echo else decoded[len(client.detokenize(prompt_ids)) :]
            assert text == want, (bias, echo)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_echo_waits_for_the_tokens_completing_its_last_character(
    scripted: tuple[Script, RunningShim], stream: bool
) -> None:
    """Prompt ids ending with 🙂's first byte, a completion of its other three, one
    token each (the text all with the last): a stream decided the echo's U+FFFD on the
    first token alone, and echoed it before the whole character."""
    script, shim = scripted
    script.tokens = [(0x9F, ""), (0x99, ""), (0x82, "\U0001f642"), (ord("x"), "x")]
    try:
        fields: dict[str, Any] = dict(model="scripted", prompt=[ord("a"), 0xF0], echo=True)
        if stream:
            chunks = shim.client().completions.create(**fields, stream=True)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            text = shim.client().completions.create(**fields).choices[0].text
    finally:
        script.tokens = None
    assert text == "a\U0001f642x"


def test_a_tool_named_past_ascii_streams_and_keeps_a_cut_call(
    scripted: tuple[Script, RunningShim],
) -> None:
    """Calls were recognised by their opening written with json.dumps's escapes
    (``"\\u5929\\u6c17"``), which no model writes: a call of 天気 came as one delta at its
    end, and one cut by max_tokens was lost."""
    script, shim = scripted
    script.text = '<tool_call>{"name": "天気", "arguments": {"都市": "東京"}}</tool_call>'
    client = shim.client()
    chunks = list(
        client.chat.completions.create(
            model="scripted", messages=HELLO, tools=[WEATHER_JA], stream=True
        )
    )
    deltas = [
        call.function.arguments
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for call in c.choices[0].delta.tool_calls
        if call.function and call.function.arguments
    ]
    assert len(deltas) > 2 and json.loads("".join(deltas)) == {"都市": "東京"}
    script.text = '{"name": "天気", "arguments": {"都市": "バンコク"}}'
    cut = len('{"name": "天気", "arguments": {"都市": "バ'.encode())
    reply = client.chat.completions.create(
        model="scripted", messages=HELLO, tools=[WEATHER_JA], tool_choice="required", max_tokens=cut
    )
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "天気" and call.function.arguments.startswith('{"都市": "バ')


def test_tools_and_earlier_calls_reach_the_model_as_written(
    scripted: tuple[Script, RunningShim],
) -> None:
    """The tools' description and an earlier call's arguments were rendered with
    json.dumps's escapes: unreadable to the model, and unlike the tokens it wrote."""
    script, shim = scripted
    script.text = "晴れ"
    call = {"id": "c1", "type": "function"}
    call["function"] = {"name": "天気", "arguments": '{"都市": "東京"}'}
    messages = [
        {"role": "user", "content": "東京の天気は?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "晴れ"},
    ]
    shim.client().chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_JA])
    system, _, assistant, _ = messages_json(script.prompts[-1])
    assert '"description": "天気を取得"' in system["content"]
    assert '{"name": "天気", "arguments": {"都市": "東京"}}' in assistant["content"]


def test_schema_patterns_of_json_schemas_own_dialect_are_taken(
    scripted: tuple[Script, RunningShim],
) -> None:
    """``\\p{Han}`` is a JSON Schema pattern (ECMA-262 with Unicode classes) that the
    grammar engine compiles; Python's ``re`` refused it, and so the shim did (400)."""
    script, shim = scripted
    script.text = '{"a": "日本"}'
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "pattern": "^\\p{Han}+$"}},
        "required": ["a"],
    }
    reply = shim.client().chat.completions.create(
        model="scripted",
        messages=HELLO,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert reply.choices[0].message.content == '{"a": "日本"}'
    assert "\\\\p{Han}" in last_decoding_request(script).constraint.json_schema


@pytest.mark.parametrize("key", ["²", "٨١", "８１"])
def test_logit_bias_keys_are_ascii_digits(scripted: tuple[Script, RunningShim], key: str) -> None:
    """``str.isdigit`` took superscripts (then int() failed: a 500) and other scripts'
    digits (silently token 81)."""
    _, shim = scripted
    with pytest.raises(openai.BadRequestError) as refused:
        shim.client().chat.completions.create(model="scripted", messages=HELLO, logit_bias={key: 1})
    assert refused.value.body["param"] == "logit_bias"  # type: ignore[index]

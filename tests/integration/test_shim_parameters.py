"""What the shim asks the server for: every OpenAI and vLLM parameter and structured
output, as fields of the GenerateRequest (and Tokenize) the server receives (forced tool
calls: ``test_shim_forced_calls``).

Oracle: the requests a scripted server recorded. The engine's side of these fields (the
penalties, the grammar) is tested with the engine; here, that the shim maps each one
exactly, and answers OpenAI's 400s for bad values before any call.
"""

from __future__ import annotations

import json

import openai
import pydantic
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.shim_support import (
    HELLO,
    WEATHER_PARAMETERS,
    RunningShim,
    Script,
    last_decoding_request,
    rendered_chat,
    request_constraint,
)

SAMPLING = dict(
    temperature=0.5,
    top_p=0.9,
    seed=11,
    frequency_penalty=0.5,
    presence_penalty=-1.25,
    logit_bias={"65": 5.0, "66": -100},
)
VLLM_EXTRAS = dict(
    top_k=7,
    min_p=0.05,
    repetition_penalty=1.3,
    ignore_eos=True,
    stop_token_ids=[3, 4],
    min_tokens=2,
    priority=-5,
    include_stop_str_in_output=True,
)


def _check_sampling(request: pb.GenerateRequest) -> None:
    assert request.temperature == 0.5 and request.top_p == pytest.approx(0.9)
    assert request.seed == 11
    assert request.frequency_penalty == 0.5 and request.presence_penalty == -1.25
    assert dict(request.logit_bias) == {65: 5.0, 66: -100.0}
    assert (request.top_k, request.repetition_penalty) == (7, pytest.approx(1.3))
    assert request.min_p == pytest.approx(0.05)
    assert request.ignore_eos and list(request.stop_token_ids) == [3, 4]
    assert (request.min_tokens, request.priority) == (2, -5)
    assert request.include_stop_string


def test_every_sampling_parameter_reaches_the_server(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    client = shim.client()
    client.chat.completions.create(
        model="scripted", messages=HELLO, max_tokens=5, extra_body=VLLM_EXTRAS, **SAMPLING
    )
    _check_sampling(last_decoding_request(script))
    assert last_decoding_request(script).max_tokens == 5 and request_constraint(
        last_decoding_request(script)
    ) == (None, None)
    client.completions.create(
        model="scripted", prompt="Hi", max_tokens=5, extra_body=VLLM_EXTRAS, **SAMPLING
    )
    _check_sampling(last_decoding_request(script))
    client.responses.create(
        model="scripted",
        input="Hi",
        max_output_tokens=5,
        temperature=0.5,
        top_p=0.9,
        extra_body={
            **VLLM_EXTRAS,
            **{k: SAMPLING[k] for k in SAMPLING if k not in ("temperature", "top_p")},
        },
    )
    _check_sampling(last_decoding_request(script))


def test_n_choices_carry_the_parameters_on_every_decoding_call(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    count = len(script.requests)
    shim.client().chat.completions.create(
        model="scripted", messages=HELLO, max_tokens=3, n=2, seed=4, frequency_penalty=1.0
    )
    prefill, *decodes = script.requests[count:]
    assert prefill.max_tokens == 0 and prefill.frequency_penalty == 0  # the shared prompt
    # The choices decode at once: their calls reach the server in either order.
    assert sorted((r.max_tokens, r.frequency_penalty, r.seed) for r in decodes) == [
        (3, 1.0, 4),
        (3, 1.0, 5),
    ]


class Weather(pydantic.BaseModel):
    city: str
    celsius: float


def test_structured_output_becomes_therequest_constraint(
    scripted: tuple[Script, RunningShim],
) -> None:
    script, shim = scripted
    client = shim.client()
    script.text = '{"city": "Oslo", "celsius": -3.5}'
    client.chat.completions.create(
        model="scripted", messages=HELLO, response_format={"type": "json_object"}
    )
    assert request_constraint(last_decoding_request(script)) == ("json_object", True)
    # The SDK's parse(): the model's schema goes to the server, the reply parses back.
    parsed = client.chat.completions.parse(
        model="scripted", messages=HELLO, response_format=Weather
    )
    assert parsed.choices[0].message.parsed == Weather(city="Oslo", celsius=-3.5)
    kind, schema = request_constraint(last_decoding_request(script))
    assert kind == "json_schema"
    assert json.loads(schema) == openai.lib._pydantic.to_strict_json_schema(Weather)
    # Responses' text.format, and its parse().
    response = client.responses.parse(model="scripted", input="Weather?", text_format=Weather)
    assert response.output_parsed == Weather(city="Oslo", celsius=-3.5)
    assert json.loads(
        request_constraint(last_decoding_request(script))[1]
    ) == openai.lib._pydantic.to_strict_json_schema(Weather)
    assert response.text.format.type == "json_schema"
    # vLLM's fields.
    choices = {"guided_choice": ["yes", "no (maybe)"]}
    client.completions.create(model="scripted", prompt="Q", extra_body=choices)
    assert request_constraint(last_decoding_request(script)) == ("regex", r"(yes)|(no \(maybe\))")
    client.chat.completions.create(
        model="scripted",
        messages=HELLO,
        extra_body={"structured_outputs": {"grammar": 'root ::= "a"'}},
    )
    assert request_constraint(last_decoding_request(script)) == ("ebnf", 'root ::= "a"')
    lark = 'start: "a" item\nitem: %json {"type": "integer"}'
    client.completions.create(model="scripted", prompt="Q", extra_body={"guided_grammar": lark})
    assert request_constraint(last_decoding_request(script)) == ("lark", lark)
    client.chat.completions.create(
        model="scripted", messages=HELLO, extra_body={"guided_json": WEATHER_PARAMETERS}
    )
    assert json.loads(request_constraint(last_decoding_request(script))[1]) == WEATHER_PARAMETERS
    script.text = "hello"


def test_conflicting_or_bad_structured_output_is_400(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    client = shim.client()
    count = len(script.requests)
    bad = [
        (
            dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"}),
            "guided_regex",  # the field sent (it named structured_outputs)
        ),
        (
            dict(
                response_format={"type": "json_object"},
                extra_body={"structured_outputs": {"regex": "a"}},
            ),
            "structured_outputs.regex",
        ),
        (dict(extra_body={"guided_json": {"type": 5}}), "guided_json"),
        (dict(extra_body={"guided_choice": []}), "guided_choice"),
        (dict(extra_body={"structured_outputs": {"regex": "a", "grammar": "b"}}), None),
        # Refused, not ignored: the reply was unconstrained.
        (
            dict(extra_body={"structured_outputs": {"structural_tag": '{"type": "x"}'}}),
            "structured_outputs.structural_tag",
        ),
    ]
    for fields, param in bad:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="scripted", messages=HELLO, **fields)
        assert error.value.body["param"] == param, fields
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(
            model="scripted", input="x", text={"format": {"type": "json_schema", "name": "x"}}
        )
    assert error.value.body["param"] == "text.format.schema"
    assert len(script.requests) == count  # refused before any call


def test_chat_template_options_reach_the_template(scripted: tuple[Script, RunningShim]) -> None:
    script, shim = scripted
    client = shim.client()
    kwargs = {"enable_thinking": False}
    client.chat.completions.create(
        model="scripted", messages=HELLO, extra_body={"chat_template_kwargs": kwargs}
    )
    assert rendered_chat(script.prompts[-1])["chat_template_kwargs"] == kwargs
    client.responses.create(
        model="scripted", input="Hi", extra_body={"chat_template_kwargs": kwargs}
    )
    assert rendered_chat(script.prompts[-1])["chat_template_kwargs"] == kwargs
    reply = [*HELLO, {"role": "assistant", "content": "Hel"}]
    client.chat.completions.create(
        model="scripted", messages=reply, extra_body={"continue_final_message": True}
    )
    rendered = rendered_chat(script.prompts[-1])
    assert rendered["continue_final_message"] and not rendered["add_generation_prompt"]
    client.chat.completions.create(
        model="scripted", messages=HELLO, extra_body={"add_generation_prompt": False}
    )
    assert rendered_chat(script.prompts[-1])["add_generation_prompt"] is False
    for extra, param in [
        ({"continue_final_message": True}, "continue_final_message"),  # the last is no reply
        ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="scripted", messages=HELLO, extra_body=extra)
        assert error.value.body["param"] == param


def test_chat_echo_opens_the_reply_with_the_message_it_goes_on_from(
    scripted: tuple[Script, RunningShim],
) -> None:
    """vLLM's chat ``echo``: each choice's content opens with the last message's text
    where the reply goes on in its role (it was kept as an unknown field and ignored).
    Oracle: the same request without ``echo``, streamed or not."""
    _, shim = scripted
    client = shim.client()
    opened = [*HELLO, {"role": "assistant", "content": "Hel"}]
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    for messages, extra, echoed in [
        (opened, {"continue_final_message": True}, "Hel"),
        (parts, {"add_generation_prompt": False}, "a\nb"),  # the reply goes on as the user's
        (HELLO, {}, ""),  # the assistant's reply after a user message: nothing to echo
    ]:
        for stream in (False, True):
            texts = []
            for echo in (True, False):
                body = {**extra, "echo": echo}
                if stream:
                    chunks = client.chat.completions.create(
                        model="scripted", messages=messages, n=2, stream=True, extra_body=body
                    )
                    by_choice = ["", ""]
                    for chunk in chunks:
                        for choice in chunk.choices:
                            by_choice[choice.index] += choice.delta.content or ""
                    texts.append(by_choice)
                else:
                    reply = client.chat.completions.create(
                        model="scripted", messages=messages, n=2, extra_body=body
                    )
                    texts.append([choice.message.content for choice in reply.choices])
            with_echo, without = texts
            assert without[0] and with_echo == [echoed + text for text in without]

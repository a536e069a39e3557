"""Real-world chat templates of several families through the shim's rendering: a plain
conversation renders as the template renders it; tools and tool results reach the
templates that render tools (Llama 3.1, Qwen2.5, Qwen3, Mistral v0.3, whose tool call
ids must be 9 characters) as they render them, and those without tool support (Gemma,
Mistral v0.1, Phi-3) through the shim's Hermes fallback, which must neither fail nor
lose the tool results. A call as a template writes it in an assistant turn, decoded
with special tokens skipped or kept, is parsed back into the same call.

Oracle: the tokenizer's own rendering (transformers' ``apply_chat_template``), and the
text of the rendering where the shim adapts the messages."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from typing import Any

import grpc
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from salience_client import SalienceClientError
from salience_server.engine import tokenization
from salience_server.engine.errors import SalienceError
from salience_server.http.backend import Backend
from salience_server.http.config import ShimConfig
from salience_server.http.errors import ApiError
from salience_server.http.messages import chat_messages
from salience_server.http.pooled_session import common_prefix_length
from salience_server.http.reasoning import Reasoning
from salience_server.http.reply import ParsedReply, ReplyParser
from salience_server.http.tool_format import tool_format
from salience_server.http.tools import tool_mode
from tests.chat_templates import FAMILIES, Family

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
TOOL_TURN = [
    {"role": "user", "content": "Weather in Rome and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "snowy"},
]


def _tokenizer(family: Family) -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos
    )
    tokenizer.add_special_tokens({"additional_special_tokens": family.specials})
    tokenizer.add_tokens(family.added)
    tokenizer.chat_template = family.template
    return tokenizer


class _TemplateClient:
    """The server's Tokenize of chat messages, run here on a tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    async def tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **_: Any,
    ) -> list[int]:
        try:
            # No tools travel as none, as the client sends them.
            tools = tools or None
            return tokenization.encode_chat(self.tokenizer, messages, tools, add_generation_prompt)
        except SalienceError as error:
            code = grpc.StatusCode.INVALID_ARGUMENT
            raise SalienceClientError(code, error.reason, error.message) from error


class _Info:
    chat_template: str
    max_context = 1 << 20


def _render(family: Family, messages: list[dict[str, Any]], tools: list[Any]) -> str:
    """The shim's rendering of ``messages`` (Backend.render_chat) as text."""
    tokenizer = _tokenizer(family)
    info = _Info()
    info.chat_template = family.template

    async def model_info() -> Any:
        return info

    async def render() -> list[int]:
        backend = Backend(ShimConfig(target="127.0.0.1:26999"))
        backend.client = _TemplateClient(tokenizer)  # type: ignore[assignment]
        backend.model_info = model_info  # type: ignore[method-assign]
        conversation = chat_messages(messages)
        return await backend.render_chat(conversation.messages, tools, "messages")

    return str(tokenizer.decode(asyncio.run(render())))


@pytest.mark.parametrize("name", ["gemma", "mistral_v1", "phi3"])
def test_tools_reach_a_template_without_system_or_tool_roles(name: str) -> None:
    text = _render(FAMILIES[name], [{"role": "user", "content": "Weather?"}], [WEATHER])
    assert "<tools>" in text and '"get_weather"' in text and "Weather?" in text
    text = _render(FAMILIES[name], TOOL_TURN, [WEATHER])
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert "<tool_response>\nsnowy\n</tool_response>" in text


def test_a_template_that_renders_tool_messages_keeps_them() -> None:
    text = _render(FAMILIES["chatml"], TOOL_TURN, [WEATHER])
    assert "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert text.startswith("<|im_start|>system\n# Tools")


PLAIN = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_plain_conversation_renders_as_the_template_does(name: str) -> None:
    family = FAMILIES[name]
    want = _tokenizer(family).apply_chat_template(PLAIN, tokenize=False, add_generation_prompt=True)
    assert _render(family, PLAIN, []) == want


ONE_CALL = TOOL_TURN[:2] + TOOL_TURN[2:3]
ONE_CALL[1] = {"role": "assistant", "content": None, "tool_calls": [CALL]}
"""A call and its result (Llama 3.1's template takes one call per message)."""


@pytest.mark.parametrize(
    "name, call_id",
    [
        ("llama31", "call_1"),
        ("qwen25", "call_1"),
        ("qwen3", "call_1"),
        ("mistral_v3", "0000call1"),  # its last 9 letters or digits
    ],
)
def test_tools_reach_a_template_that_renders_them_as_it_does(name: str, call_id: str) -> None:
    """Mistral v0.3's template raises on a call id that is not 9 characters (the shim's
    own are ``call_`` and 24 hex digits): they are cut, as vLLM cuts them."""
    family = FAMILIES[name]
    call = {**CALL, "id": call_id, "function": {**CALL["function"], "arguments": {}}}
    as_given = [  # arguments as objects, as vLLM passes them to a template
        ONE_CALL[0],
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {**ONE_CALL[2], "tool_call_id": call_id},
    ]
    want = _tokenizer(family).apply_chat_template(
        as_given, tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )
    assert _render(family, ONE_CALL, [WEATHER]) == want


@pytest.mark.parametrize("name", ["gemma", "mistral_v1", "phi3"])
def test_a_user_message_after_tool_results_reaches_a_template_without_tool_roles(
    name: str,
) -> None:
    """The results become a user message: Gemma's and Mistral v0.1's templates raised
    on the user message after it (roles must alternate), a 400."""
    after = {"role": "user", "content": "And in Paris?"}
    text = _render(FAMILIES[name], [*TOOL_TURN, after], [WEATHER])
    assert "<tool_response>\nsnowy\n</tool_response>" in text and "And in Paris?" in text


@pytest.mark.parametrize("name", ["gemma", "mistral_v1"])
def test_a_system_message_reaches_a_template_without_a_system_role_with_tools(
    name: str,
) -> None:
    """The system message goes into the first user message with the tools' description
    (it went to the template as a system message, which raised: a 400)."""
    system = {"role": "system", "content": "Answer in French."}
    text = _render(FAMILIES[name], [system, *TOOL_TURN], [WEATHER])
    assert text.index("Answer in French.") < text.index("<tools>") < text.index("Weather in")
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_call_ids_cut_for_mistral_v3_stay_distinct() -> None:
    """Two ids with the same last 9 letters or digits were cut to one id: the model
    could not tell which result answers which call. The first keeps vLLM's cut."""
    ids = ["rome-000000001", "oslo-000000001"]
    turn = [
        TOOL_TURN[0],
        {"role": "assistant", "content": None, "tool_calls": [{**CALL, "id": i} for i in ids]},
        {"role": "tool", "tool_call_id": ids[0], "content": "sunny"},
        {"role": "tool", "tool_call_id": ids[1], "content": "snowy"},
    ]
    text = _render(FAMILIES["mistral_v3"], turn, [WEATHER])
    calls = re.findall(r'"id": "(\w+)"', text)
    results = re.findall(r'"call_id": "(\w+)"', text)
    assert calls == results and len(set(calls)) == 2 and calls[0] == "000000001"


def test_the_roles_probe_runs_once_and_a_failed_one_is_a_503_tried_again() -> None:
    """The probe's answer is kept for the model; a server that does not answer it (not
    a template's refusal) is the request's 503, and the next request probes again."""
    family = FAMILIES["gemma"]
    info = _Info()
    info.chat_template = family.template
    calls: list[list[dict[str, Any]]] = []
    fails = [SalienceClientError(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "draining")]

    class Client(_TemplateClient):
        async def tokenize_chat(self, messages: Any, *args: Any, **kwargs: Any) -> list[int]:
            calls.append(messages)
            if fails:
                raise fails.pop()
            return await super().tokenize_chat(messages, *args, **kwargs)

    async def model_info() -> Any:
        return info

    async def run() -> None:
        backend = Backend(ShimConfig(target="127.0.0.1:26999"))
        backend.client = Client(_tokenizer(family))  # type: ignore[assignment]
        backend.model_info = model_info  # type: ignore[method-assign]
        user = [{"role": "user", "content": "Weather?"}]
        with pytest.raises(ApiError) as refused:
            await backend.render_chat(user, [WEATHER], "messages")
        assert refused.value.status == 503
        for num_calls in (3, 1):  # the probes and the prompt; then the prompt alone
            calls.clear()
            await backend.render_chat(user, [WEATHER], "messages")
            assert len(calls) == num_calls

    asyncio.run(run())


PHI3_DROPPING_SYSTEM = (
    "{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\\n' + message['content'] + '<|end|>' + '\\n' + '<|assistant|>' + '\\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\\n'}}"
    "{% endif %}{% endfor %}"
)
"""Phi-3-medium's style: system and ``tool`` messages are dropped without an error."""


def test_tools_reach_a_template_that_drops_system_messages() -> None:
    """The probe took a system message rendered without an error for one the template
    renders: the tools' description went into a system message the template dropped,
    and the model never saw the tools."""
    family = dataclasses.replace(FAMILIES["phi3"], template=PHI3_DROPPING_SYSTEM)
    text = _render(family, TOOL_TURN, [WEATHER])
    assert "<tools>" in text and '"get_weather"' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


ROME = {"city": "Rome"}


def _call_turn_ids(family: Family, tokenizer: Any) -> list[int]:
    """The token ids of an assistant turn calling get_weather(city="Rome") as the
    template writes it: its rendering past the prompt's, less the end of sequence."""
    user = [{"role": "user", "content": "Weather in Rome?"}]
    deepseek = family.name.startswith("deepseek")
    arguments = '{"city": "Rome"}' if deepseek else ROME  # DeepSeek's joins them as text
    function = {"name": "get_weather", "arguments": arguments}
    call = {"id": "abc123def", "type": "function", "function": function}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    options: dict[str, Any] = {"tools": [WEATHER], "return_dict": False}
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, **options)
    whole = tokenizer.apply_chat_template([*user, turn], **options)
    shared = common_prefix_length(prompt, whole)
    return [i for i in whole[shared:] if i != tokenizer.eos_token_id]


def _parsed(family: Family, pieces: list[str]) -> ParsedReply:
    tools = tool_mode([WEATHER], "auto", tool_format(family.template))
    return ParsedReply.of(ReplyParser.for_request(tools, None, Reasoning()), pieces)


@pytest.mark.parametrize(
    "name, skip_special_tokens",
    [
        *[
            (name, skip)
            for name in ("mistral_v3", "llama31", "llama32_python_tag")
            for skip in (True, False)
        ],
        ("deepseek_r1", False),
        ("mistral_v11", False),
        ("mistral_v13", False),
    ],
)
def test_a_call_as_the_template_writes_it_is_parsed_back(
    name: str, skip_special_tokens: bool
) -> None:
    """Mistral's ``[TOOL_CALLS]`` and Llama's ``<|python_tag|>`` are special tokens: a
    reply decoded with ``skip_special_tokens: false`` shows them, and was content with
    no call (it parsed only because they were skipped). DeepSeek's calls, between its
    markers, were never parsed (its markers are special tokens here: skipped, nothing
    tells where a name ends), nor were Mistral's native ones from its tokenizer v11
    (``[TOOL_CALLS]NAME[ARGS]{...}``: skipped, nothing tells where a name ends either).
    Streamed a token at a time or whole, the reply is the call, and nothing of its
    markup is content."""
    family = FAMILIES[name.removesuffix("_python_tag").replace("llama32", "llama31")]
    tokenizer = _tokenizer(family)
    if name == "llama32_python_tag":  # Llama 3.2's own calls open with the tag
        text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}'
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = _call_turn_ids(family, tokenizer)
    pieces = [tokenizer.decode([i], skip_special_tokens=skip_special_tokens) for i in ids]
    whole = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == whole
    for reply in (_parsed(family, pieces), _parsed(family, [whole])):
        assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [("get_weather", ROME)]
        assert reply.content.strip() == "" and all(c.is_complete for c in reply.calls)


def test_the_id_a_mistral_v11_call_is_written_with_is_parsed_back() -> None:
    """Mistral v11's template writes each call's id after ``[CALL_ID]``: the parsed call
    has that id, which the template is given back as it is (it takes 9 characters)."""
    family = FAMILIES["mistral_v11"]
    tokenizer = _tokenizer(family)
    ids = _call_turn_ids(family, tokenizer)
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    for reply in (_parsed(family, pieces), _parsed(family, ["".join(pieces)])):
        assert [c.call_id for c in reply.calls] == ["abc123def"]


@pytest.mark.parametrize("choice", ["named", "required"])
@pytest.mark.parametrize(
    "name", ["llama31", "qwen25", "mistral_v3", "deepseek_r1_tools", "mistral_v13"]
)
def test_a_forced_call_opens_as_the_family_writes_its_calls(name: str, choice: str) -> None:
    """The opening of a forced call is, token for token, how the template writes a call
    in an assistant turn, and the rest of that turn, decoded with special tokens' text
    (as the shim decodes a reply read for calls), parses as the call. Mistral v0.3's,
    its native calls' and DeepSeek's opened with Hermes' ``<tool_call>``, which they
    never write."""
    family = FAMILIES[name]
    tokenizer = _tokenizer(family)
    tool_choice = {"type": "function", "name": "get_weather"} if choice == "named" else choice
    mode = tool_mode([WEATHER], tool_choice, tool_format(family.template))
    opening_ids = tokenizer.encode(mode.prefix_text(), add_special_tokens=False)
    turn_ids = _call_turn_ids(family, tokenizer)
    assert turn_ids[: len(opening_ids)] == opening_ids
    written = [
        tokenizer.decode([i], skip_special_tokens=False) for i in turn_ids[len(opening_ids) :]
    ]
    parser = ReplyParser.for_request(mode, mode.constraint(), Reasoning())
    reply = ParsedReply.of(parser, written)
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [("get_weather", ROME)]
    assert reply.content == ""

"""Hypothesis strategies for odd OpenAI-style HTTP bodies (the shim fuzz tests in
``tests/integration/test_fuzz_shim.py``).

A body starts from a small valid request of its endpoint, then some of its fields
(known ones, and unknown ones) are replaced: by a value of the wrong JSON type, null,
a huge or negative number, deep nesting, an odd string, or a near-valid value of the
field's own kind. Messages get odd roles, content parts and image URLs (bad data URLs,
unreachable hosts, other schemes).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from hypothesis import strategies as st

from tests.fuzz_strategies import odd_text, proto_text

UNREACHABLE = "http://127.0.0.1:29999/cat.png"
"""A URL on a loopback port no one listens on (the fuzz tests' own port range)."""

huge_ints = st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, 10**30, -(2**63) - 1])
odd_json: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | huge_ints
    | st.integers(-10, 300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e308, -1e308, 5e-324, -0.0, 0.5, 2.5])
    | odd_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(proto_text, children, max_size=3)
    ),
    max_leaves=6,
)
deep = st.integers(50, 3000).map(lambda depth: f"__DEEP_{depth}__")
"""A marker ``encode`` writes as arrays nested that deep (too deep for ``json.dumps``)."""


def encode(value: Any) -> bytes:
    """``value`` as JSON, each ``deep`` marker as nested arrays."""
    text = json.dumps(value)
    nested = lambda match: "[" * int(match[1]) + "]" * int(match[1])  # noqa: E731
    return re.sub(r'"__DEEP_(\d+)__"', nested, text).encode()


def tiny_png() -> bytes:
    from tests.vision_support import encode, make_image

    return encode(make_image(0, (20, 20)))


def image_url() -> st.SearchStrategy[Any]:
    png = base64.b64encode(tiny_png()).decode()
    return (
        st.sampled_from(
            [
                f"data:image/png;base64,{png}",
                f"data:image/png;base64,{png[:30]}",
                "data:image/png;base64,!!!!",
                "data:image/png;base64,",
                "data:image/png,rawbytes",
                "data:;base64,AAAA",
                f"data:text/plain;base64,{png}",
                f"data:image/jpeg;base64,{png}",
                "data:",
                UNREACHABLE,
                "file:///etc/passwd",
                "ftp://example.invalid/x.png",
                "",
                "not a url",
            ]
        )
        | odd_json
    )


def content_part() -> st.SearchStrategy[Any]:
    url = image_url()
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": odd_text | odd_json}),
        st.fixed_dictionaries(
            {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": url})}
        ),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": url}),
        st.fixed_dictionaries({"type": st.just("input_text"), "text": odd_text}),
        st.fixed_dictionaries({"type": st.just("input_image"), "image_url": url}),
        st.fixed_dictionaries({"type": odd_text | odd_json}),
        odd_json,
    )


def message() -> st.SearchStrategy[Any]:
    role = st.sampled_from(["user", "assistant", "system", "developer", "tool", "function"])
    content = odd_text | st.none() | st.lists(content_part(), max_size=3) | odd_json
    call = st.fixed_dictionaries(
        {
            "id": odd_text,
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": odd_text, "arguments": st.sampled_from(["{}", "{", "[]", "1"]) | odd_json}
            ),
        }
    )
    plain = st.fixed_dictionaries({"role": role | odd_json, "content": content})
    with_calls = st.fixed_dictionaries(
        {
            "role": st.just("assistant"),
            "content": content,
            "tool_calls": st.lists(call, max_size=2) | odd_json,
        }
    )
    tool = st.fixed_dictionaries(
        {"role": st.just("tool"), "content": content, "tool_call_id": odd_text | odd_json}
    )
    return plain | plain | with_calls | tool | odd_json


def image_message() -> st.SearchStrategy[Any]:
    """A user message of text and image parts (mostly well-formed ones)."""
    png = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    good = st.just({"type": "image_url", "image_url": {"url": png}}) | st.just(
        {"type": "input_image", "image_url": png}
    )
    text = st.just({"type": "text", "text": "Hi"}) | st.just({"type": "input_text", "text": "Hi"})
    parts = st.lists(good | good | text | content_part(), min_size=1, max_size=3)
    return st.fixed_dictionaries({"role": st.just("user"), "content": parts})


def messages() -> st.SearchStrategy[Any]:
    user = st.just({"role": "user", "content": "Hi"})
    return (
        st.lists(message(), max_size=3).map(lambda ms: ms or [{"role": "user", "content": "x"}])
        | (st.lists(message(), max_size=2).map(lambda ms: [*ms, {"role": "user", "content": "Hi"}]))
        | st.lists(user, min_size=1)
        | odd_json
    )


def tool() -> st.SearchStrategy[Any]:
    parameters = (
        st.sampled_from(
            [{"type": "object"}, {"type": "object", "properties": {"a": {"type": "nope"}}}, {}, []]
        )
        | odd_json
    )
    function = st.fixed_dictionaries({"name": odd_text | odd_json, "parameters": parameters})
    return (
        st.fixed_dictionaries({"type": st.just("function"), "function": function})
        | (
            st.fixed_dictionaries(
                {"type": st.just("function"), "name": odd_text, "parameters": parameters}
            )
        )
        | odd_json
    )


SAMPLING = {
    "temperature": st.sampled_from([0, 0.0, 1.0, 2.0, 2.1, -0.1]),
    "top_p": st.sampled_from([0, 1, 0.5, 1.1, -1]),
    "top_k": st.sampled_from([-1, 0, 1, 5, 10**6]),
    "min_p": st.sampled_from([0, 0.1, 1, 1.5]),
    "repetition_penalty": st.sampled_from([0, 1, 1.2, -1]),
    "seed": huge_ints,
    "frequency_penalty": st.sampled_from([-2, 0, 2, 2.5]),
    "presence_penalty": st.sampled_from([-2, 0, 2, -3]),
    "logit_bias": st.dictionaries(
        st.sampled_from(["0", "1", "258", "259", "-1", "x", "1e3", " 1", "99999999999"]),
        st.sampled_from([-100, 0, 100, 101, 5.5]),
        max_size=3,
    ),
    "user": odd_text,
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.sampled_from([0, 1, 258, 259, 2**32]), max_size=3),
    "min_tokens": st.sampled_from([0, 1, 3, 10**6]),
    "priority": st.sampled_from([0, -1, 2**31 - 1, -(2**31), 2**31]),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
}
REPLY = {
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.sampled_from([1, 2, 3, 0, 65]),
    "stop": st.sampled_from(["", "a", ["a", "b"], [], ["a"] * 20, ["x" * 300]]),
    "response_format": st.sampled_from(
        [
            {"type": "json_object"},
            {"type": "text"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            {"type": "json_schema"},
            {"type": "regex"},
        ]
    ),
    "return_tokens_as_token_ids": st.booleans(),
    "prompt_logprobs": st.sampled_from([0, 1, 5, 20, 21]),
    "return_token_ids": st.booleans(),
    "truncate_prompt_tokens": st.sampled_from([-1, 0, 1, 3, 10**6]),
    "guided_json": st.sampled_from([{"type": "object"}, "{", "{}"]),
    "guided_regex": st.sampled_from(["a+", "(", ""]),
    "guided_choice": st.sampled_from([["a", "b"], [], [""]]),
    "guided_grammar": st.sampled_from(['root ::= "a"', "root ::= ", ""]),
}
CHAT = (
    SAMPLING
    | REPLY
    | {
        "messages": messages(),
        "max_tokens": st.sampled_from([1, 3, 0, -1, 10**6]),
        "max_completion_tokens": st.sampled_from([1, 3, 0, 10**6]),
        "logprobs": st.booleans(),
        "top_logprobs": st.sampled_from([0, 1, 5, 20, 21]),
        "tools": st.lists(tool(), max_size=2),
        "tool_choice": st.sampled_from(
            [
                "auto",
                "none",
                "required",
                "bogus",
                {"type": "function", "function": {"name": "f"}},
                {},
            ]
        ),
        "parallel_tool_calls": st.booleans(),
        "chat_template_kwargs": st.sampled_from([{}, {"enable_thinking": False}, {"messages": 1}]),
        "add_generation_prompt": st.booleans(),
        "continue_final_message": st.booleans(),
        "echo": st.booleans(),
    }
)
COMPLETIONS = (
    SAMPLING
    | REPLY
    | {
        "prompt": st.sampled_from(
            ["", "Hi", [], [""], [0, 1], [[]], [[1, 2], [3]], [259], [-1], [2**40]]
        )
        | odd_json,
        "max_tokens": st.sampled_from([0, 1, 3, -1, 10**6]),
        "echo": st.booleans(),
        "logprobs": st.sampled_from([0, 1, 5, 20, 21]),
        "best_of": st.sampled_from([1, 2, 0]),
        "suffix": st.sampled_from(["", "x"]),
    }
)
RESPONSES = SAMPLING | {
    "input": st.sampled_from(["", "Hi"])
    | st.lists(
        message()
        | st.fixed_dictionaries(
            {
                "type": st.just("function_call_output"),
                "call_id": odd_text,
                "output": odd_text | odd_json,
            }
        )
        | st.fixed_dictionaries(
            {
                "type": st.just("function_call"),
                "call_id": odd_text,
                "name": odd_text,
                "arguments": odd_text,
            }
        ),
        max_size=3,
    )
    | odd_json,
    "instructions": odd_text,
    "tools": st.lists(tool(), max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "name": "f"}]),
    "max_output_tokens": st.sampled_from([1, 3, 0, 10**6]),
    "stream": st.booleans(),
    "store": st.booleans(),
    "previous_response_id": st.sampled_from(["", "resp_unknown", "x" * 500]),
    "metadata": st.dictionaries(odd_text, odd_text, max_size=3)
    | st.just({str(i): "v" for i in range(17)}),
    "text": st.sampled_from(
        [
            {"format": {"type": "text"}},
            {"format": {"type": "json_object"}},
            {"format": {"type": "json_schema", "schema": {}, "name": "x"}},
            {"format": {}},
            {},
        ]
    ),
    "truncation": st.sampled_from(["auto", "disabled", "x"]),
    "include": st.sampled_from([[], ["message.output_text.logprobs"], ["x"]]),
    "top_logprobs": st.sampled_from([0, 2, 21]),
}
EMBEDDINGS = {
    "input": st.sampled_from(["", "Hi", [], [""], [1, 2], [[1], [2, 3]], [[]], [259], [-1]])
    | odd_json,
    "encoding_format": st.sampled_from(["float", "base64", "x"]),
    "dimensions": st.sampled_from([1, 64, 0]),
    "pooling": st.sampled_from(["last", "mean", "cls"]),
    "normalize": st.booleans(),
    "add_special_tokens": st.booleans(),
    "truncate_prompt_tokens": st.sampled_from([-1, 0, 1, 10**6]),
}
TOKENIZE = {
    "prompt": odd_text,
    "messages": messages(),
    "add_special_tokens": st.booleans(),
    "add_generation_prompt": st.booleans(),
    "continue_final_message": st.booleans(),
    "chat_template_kwargs": st.sampled_from([{}, {"x": 1}]),
    "tools": st.lists(tool(), max_size=1),
    "return_token_strs": st.booleans(),
}
DETOKENIZE = {"tokens": st.lists(st.sampled_from([0, 1, 258, 259, -1, 2**32]), max_size=4)}

ENDPOINTS: dict[str, tuple[dict[str, Any], dict[str, st.SearchStrategy[Any]]]] = {
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        CHAT,
    ),
    "/v1/completions": ({"prompt": "Hi", "max_tokens": 3}, COMPLETIONS),
    "/v1/responses": ({"input": "Hi", "max_output_tokens": 3}, RESPONSES),
    "/v1/embeddings": ({"input": "Hi"}, EMBEDDINGS),
    "/tokenize": ({"prompt": "Hi"}, TOKENIZE),
    "/detokenize": ({"tokens": [1, 2]}, DETOKENIZE),
}


@st.composite
def body(draw: st.DrawFn, path: str, model: str, images: bool = False) -> dict[str, Any]:
    """A body for ``path``: its valid base with some fields replaced, added or dropped
    (``images``: its messages or input always drawn, with image parts)."""
    base, fields = ENDPOINTS[path]
    odd = draw(st.integers(0, 9), label="odd model?") == 0
    result: dict[str, Any] = {"model": draw(odd_json) if odd else model} | base
    if images:
        name = "input" if path == "/v1/responses" else "messages"
        result.pop("prompt", None)
        result[name] = draw(st.lists(image_message(), min_size=1, max_size=2), label=name)
    names = sorted(fields)
    for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True)):
        kind = draw(st.integers(0, 9), label=f"{name} kind")  # mostly the field's own values
        result[name] = draw(
            odd_json if kind < 2 else deep if kind == 2 else fields[name], label=name
        )
    if draw(st.integers(0, 9)) == 0:
        result[draw(proto_text)] = draw(odd_json)  # a field no API has
    for name in draw(st.lists(st.sampled_from(sorted(result)), max_size=1)):
        if draw(st.integers(0, 4)) == 0:
            del result[name]  # a required field missing, sometimes
    return result

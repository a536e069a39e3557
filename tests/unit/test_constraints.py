"""Constraint masks and grammars on a byte-level tokenizer, against their definitions."""

from __future__ import annotations

import json

import pytest
import torch

from salience_server.engine.constraints import (
    MAX_ERROR_CHARS,
    ConstraintCompiler,
    ConstraintSpec,
    apply_bitmasks,
)
from salience_server.engine.errors import SalienceError
from salience_server.http.tool_format import DEEPSEEK, HERMES, MISTRAL
from salience_server.http.tools import MAX_FORCED_CALLS, chat_tools, tool_mode
from tests.shim_support import TIME, WEATHER
from tests.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def compiler() -> ConstraintCompiler:
    tokenizer = build_tokenizer()
    return ConstraintCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def test_bitmasks_forbid_exactly_the_unset_bits() -> None:
    logits = torch.randn(3, 70)
    allowed = [{0, 5, 31, 32, 69}, None, set(range(64))]
    masks: list[torch.Tensor | None] = []
    for tokens in allowed:
        if tokens is None:
            masks.append(None)
            continue
        words = [0, 0, 0]
        for token in tokens:
            words[token // 32] |= 1 << (token % 32)
        masks.append(torch.tensor(words, dtype=torch.int64).to(torch.int32))  # bit 31: sign
    rows = [row for row, mask in enumerate(masks) if mask is not None]
    words = torch.cat([mask for mask in masks if mask is not None])
    masked = logits.clone()
    assert apply_bitmasks(masked, torch.tensor(rows), words) is masked  # in place
    for row, tokens in enumerate(allowed):
        for token in range(70):
            if tokens is None or token in tokens:
                assert masked[row, token] == logits[row, token]
            else:
                assert masked[row, token] == -torch.inf


def _walk(compiler: ConstraintCompiler, spec: ConstraintSpec, text: str) -> bool:
    """Feeds ``text`` byte by byte, checking each byte is allowed by the mask before it;
    returns whether the grammar is complete at the end."""
    matcher = compiler.matcher(compiler.compile(spec))
    tokenizer = build_tokenizer()
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        mask = matcher.bitmask()
        assert (int(mask[token_id // 32]) >> (token_id % 32)) & 1, f"{token_id} was masked"
        matcher.consume(token_id)
    return matcher.is_complete or bool(
        (int(matcher.bitmask()[tokenizer.eos_token_id // 32]) >> (tokenizer.eos_token_id % 32)) & 1
    )


def test_json_schema_regex_and_ebnf_accept_their_language(compiler) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    assert _walk(compiler, ConstraintSpec("json_schema", json.dumps(schema)), '{"n": 42}')
    assert _walk(compiler, ConstraintSpec("json_object", ""), '{"a": [1, 2]}')
    assert _walk(compiler, ConstraintSpec("regex", "[0-9]{3}-x"), "123-x")
    assert _walk(compiler, ConstraintSpec("ebnf", 'root ::= "yes" | "no"'), "no")
    # Lark, with JSON Schema rules: one object, or several joined by ";".
    lark = 'start: item (";" item)*\nitem: %json ' + json.dumps(schema)
    assert _walk(compiler, ConstraintSpec("lark", lark), '{"n":1};{"n":2}')
    assert not _walk(compiler, ConstraintSpec("lark", lark), '{"n":1};')


def test_a_token_outside_the_grammar_is_refused(compiler) -> None:
    matcher = compiler.matcher(compiler.compile(ConstraintSpec("regex", "[0-9]+")))
    letter = build_tokenizer().encode("a", add_special_tokens=False)[0]
    assert not (int(matcher.bitmask()[letter // 32]) >> (letter % 32)) & 1
    with pytest.raises(RuntimeError):
        matcher.consume(letter)


@pytest.mark.parametrize(
    "spec",
    [
        ConstraintSpec("json_schema", '{"type": "nonsense"}'),
        ConstraintSpec("json_schema", "not json"),
        ConstraintSpec("regex", "[a-"),
        ConstraintSpec("ebnf", "root ::= missing"),
        ConstraintSpec("lark", "start: missing"),
        ConstraintSpec("lark", 'root ::= "gbnf"'),
    ],
    ids=["bad type", "not json", "bad regex", "undefined rule", "undefined lark rule", "not lark"],
)
def test_a_constraint_that_does_not_compile_is_invalid(compiler, spec) -> None:
    with pytest.raises(SalienceError) as caught:
        compiler.compile(spec)
    assert caught.value.reason == "INVALID_CONSTRAINT" and spec.kind in caught.value.message


@pytest.mark.parametrize(
    "spec",
    [
        ConstraintSpec("regex", "[a-" + "b" * 3000),
        ConstraintSpec("lark", "start: " + " ".join(f'"x{i}"' for i in range(400)) + " missing"),
    ],
    ids=["regex", "lark"],
)
def test_a_compile_error_quotes_a_bounded_part_of_the_grammar(compiler, spec) -> None:
    """The grammar engine's message quotes the grammar: 9 KB of a long regex came back."""
    with pytest.raises(SalienceError) as caught:
        compiler.compile(spec)
    assert len(caught.value.message) < MAX_ERROR_CHARS + 100
    assert "at 1(" in caught.value.message  # where the engine found the problem


def test_a_compile_error_is_one_line_naming_the_place(compiler) -> None:
    """The grammar engine quotes the lines around the error with a caret under the
    place: a status message (and a log line) of four lines. Its ``line(column)`` is kept."""
    with pytest.raises(SalienceError) as caught:
        compiler.compile(ConstraintSpec("lark", 'start: foo\nfoo: "a" | bar'))
    message = caught.value.message
    assert "\n" not in message and "^" not in message and "|" not in message
    assert message.endswith('at 2(6): unknown name: "bar"'), message


def test_compilation_is_cached(compiler) -> None:
    spec = ConstraintSpec("regex", "[a-z]{2}")
    assert compiler.compile(spec) is compiler.compile(spec)


@pytest.mark.parametrize("family", [HERMES, MISTRAL], ids=lambda family: family.name)
def test_a_required_tool_call_may_be_several_calls_when_parallel(compiler, family) -> None:
    """tool_choice "required" with parallel calls allowed: one to MAX_FORCED_CALLS calls
    in the family's markup (Hermes' tags, Mistral's list), each of a declared tool (it
    allowed one call only)."""

    tools = chat_tools([WEATHER])
    kind, grammar = tool_mode(tools, "required", family).constraint() or ("", "")
    assert kind == "lark"
    spec = ConstraintSpec(kind, str(grammar))
    call = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    between = family.separator
    for count in (1, 2, MAX_FORCED_CALLS):
        assert _walk(compiler, spec, between.join([call] * count))
        assert _walk(compiler, spec, between.join([call] * count) + family.closing)
    with pytest.raises(AssertionError, match="was masked"):
        _walk(compiler, spec, between.join([call] * (MAX_FORCED_CALLS + 1)))
    with pytest.raises(AssertionError, match="was masked"):
        _walk(compiler, spec, call.replace("get_weather", "get_time"))
    # One call only where parallel calls are off.
    single = tool_mode(tools, "required", parallel_tool_calls=False).constraint()
    assert single is not None and single[0] == "json_schema"


def test_a_required_deepseek_call_is_a_declared_name_and_its_arguments(compiler) -> None:
    """DeepSeek's calls write the name outside the JSON: one call of a declared function,
    its name as the format writes it, then arguments of that function's schema."""
    tools = chat_tools([WEATHER, TIME])
    kind, grammar = tool_mode(tools, "required", DEEPSEEK).constraint() or ("", "")
    assert kind == "lark"
    spec = ConstraintSpec(kind, str(grammar))
    assert _walk(compiler, spec, 'get_weather\n```json\n{"city": "Rome"}')
    assert _walk(compiler, spec, "get_time\n```json\n{}")
    for broken in ('get_weather\n```json\n{"town": "Rome"}', "launch\n```json\n{}"):
        with pytest.raises(AssertionError, match="was masked"):
            _walk(compiler, spec, broken)


def test_a_mask_allows_a_token_below_the_vocabulary_or_not() -> None:
    """Bits past the model's vocabulary (a tokenizer's added tokens) do not count."""
    from salience_server.engine.constraints import _allows_any_below

    def mask(tokens: set[int], words: int = 3) -> bytes:
        values = [0] * words
        for token in tokens:
            values[token // 32] |= 1 << (token % 32)
        return b"".join(value.to_bytes(4, "little") for value in values)

    assert _allows_any_below(mask({0}), 70)
    assert _allows_any_below(mask({31}), 33)  # bit 31: the sign bit
    assert _allows_any_below(mask({69}), 70)
    assert not _allows_any_below(mask({70, 71}), 70)
    assert not _allows_any_below(mask({64}), 64)
    assert not _allows_any_below(mask(set()), 70)

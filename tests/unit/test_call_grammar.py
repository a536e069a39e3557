"""The grammar of a ``required`` reply where the family's markers are special tokens
(DeepSeek's, Mistral v11's): each marker that is one token of the model's is written as
that token (``<[id]>``), and the reply may then hold several calls in the family's own
markup; a marker that is not one token keeps one call, its markers text.

Oracle: the grammar's text, and llguidance (the server's grammar engine) matching
replies token by token against a byte-level tokenizer whose markers are special tokens.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from salience_server.engine.constraints import ConstraintCompiler, ConstraintSpec
from salience_server.http.tool_format import DEEPSEEK, HERMES, MISTRAL_V11, ToolFormat
from salience_server.http.tools import MAX_FORCED_CALLS, ToolMode, chat_tools, tool_mode
from tests.shim_support import TIME, WEATHER
from tests.tiny_models import build_tokenizer

CALLS_BEGIN, CALL_BEGIN, SEP, CALL_END, CALLS_END = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁calls▁end｜>",
)
DEEPSEEK_IDS = {CALL_BEGIN: 300, SEP: 301, CALL_END: 302, CALLS_END: 303}
MISTRAL_IDS = {"[TOOL_CALLS]": 310, "[ARGS]": 311}


def _required(fmt: ToolFormat, marker_ids: dict[str, int], parallel: bool = True) -> ToolMode:
    mode = tool_mode(chat_tools([WEATHER, TIME]), "required", fmt, parallel)
    return ToolMode(mode.tools, mode.choice, None, fmt, mode.is_parallel, marker_ids)


def _grammar(mode: ToolMode) -> str:
    kind, grammar = mode.constraint() or ("", "")
    assert kind == "lark"
    return str(grammar)


def test_the_markers_a_required_grammar_writes_are_the_formats() -> None:
    """What the shim asks the server to tokenize: the markers between and after calls
    and after a name; none unless the call is required."""
    assert tool_mode(chat_tools([WEATHER]), "required", DEEPSEEK).grammar_markers == (
        CALL_BEGIN,
        SEP,
        CALL_END,
        CALLS_END,
    )
    assert tool_mode(chat_tools([WEATHER]), "required", MISTRAL_V11).grammar_markers == (
        "[TOOL_CALLS]",
        "[ARGS]",
    )
    assert tool_mode(chat_tools([WEATHER]), "auto", MISTRAL_V11).grammar_markers == ()


def test_deepseek_markers_that_are_tokens_are_written_by_id_between_several_calls() -> None:
    grammar = _grammar(_required(DEEPSEEK, DEEPSEEK_IDS))
    between = '"\\n```" <[302]> "\\n" <[300]> "function" <[301]>'
    assert grammar.startswith(
        f"start: call ({between} call){{0,{MAX_FORCED_CALLS - 1}}} "
        '("\\n```" <[302]> <[303]>)?\ncall: call_0 | call_1\n'
    )
    assert '\ncall_1: "get_weather\\n```json\\n" %json {"type": "object"' in grammar
    assert "｜" not in grammar  # no marker is left as text


def test_mistral_v11_markers_that_are_tokens_are_written_by_id() -> None:
    grammar = _grammar(_required(MISTRAL_V11, MISTRAL_IDS))
    assert grammar.startswith(f"start: call (<[310]> call){{0,{MAX_FORCED_CALLS - 1}}}\n")
    assert '\ncall_0: "get_time" <[311]> %json {' in grammar
    assert "[ARGS]" not in grammar and "[TOOL_CALLS]" not in grammar


@pytest.mark.parametrize(
    ("fmt", "marker_ids"),
    [
        (DEEPSEEK, {k: v for k, v in DEEPSEEK_IDS.items() if k != SEP}),
        (MISTRAL_V11, {"[ARGS]": 311}),
        (DEEPSEEK, {}),
    ],
    ids=["deepseek sep not one token", "mistral marker not one token", "no tokens"],
)
def test_a_marker_between_calls_that_is_not_one_token_keeps_one_call(
    fmt: ToolFormat, marker_ids: dict[str, int]
) -> None:
    grammar = _grammar(_required(fmt, marker_ids))
    assert grammar.startswith("start: call_0 | call_1\n")
    # The name's marker is still its token where it is one (v11's [ARGS]).
    assert ('"get_time" <[311]> %json' in grammar) == ("[ARGS]" in marker_ids)


def test_one_call_where_parallel_calls_are_off_even_with_token_markers() -> None:
    assert _grammar(_required(DEEPSEEK, DEEPSEEK_IDS, False)).startswith("start: call_0 | call_1")
    grammar = _grammar(_required(MISTRAL_V11, MISTRAL_IDS, False))
    assert grammar.startswith("start: call_0 | call_1\n") and "<[310]>" not in grammar


def test_hermes_tags_that_are_tokens_are_written_by_id_and_text_otherwise() -> None:
    tags = {"<tool_call>": 320, "</tool_call>": 321}
    grammar = _grammar(_required(HERMES, tags))
    assert grammar.startswith('start: call ("\\n" <[321]> "\\n" <[320]> "\\n" call){0,15} ')
    assert '("\\n" <[321]>)?\ncall: %json ' in grammar
    assert _grammar(_required(HERMES, {})).startswith(
        'start: call ("\\n</tool_call>\\n<tool_call>\\n" call){0,15} "\\n</tool_call>"?\n'
    )


# ----- through llguidance, on a tokenizer whose markers are special tokens -------------


@pytest.fixture(scope="module")
def special_markers() -> tuple[Any, ConstraintCompiler]:
    """A byte-level tokenizer with DeepSeek's and Mistral's markers as special tokens,
    and the server's compiler for it."""
    tokenizer = build_tokenizer()
    markers = [CALLS_BEGIN, *DEEPSEEK_IDS, *MISTRAL_IDS]
    tokenizer.add_tokens(markers, special_tokens=True)
    compiler = ConstraintCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    return tokenizer, compiler


def _accepts(tokenizer: Any, compiler: ConstraintCompiler, grammar: str, pieces: list) -> bool:
    """Feeds ``pieces`` (a token id, or text spelled in byte tokens) token by token,
    each allowed by the mask before it; whether the grammar then may end. False at the
    first token the mask refuses."""
    matcher = compiler.matcher(compiler.compile(ConstraintSpec("lark", grammar)))
    for piece in pieces:
        ids = [piece] if isinstance(piece, int) else _spelled(tokenizer, piece)
        for token_id in ids:
            if not (int(matcher.bitmask()[token_id // 32]) >> (token_id % 32)) & 1:
                return False
            matcher.consume(token_id)
    eos = tokenizer.eos_token_id
    return matcher.is_complete or bool((int(matcher.bitmask()[eos // 32]) >> (eos % 32)) & 1)


def _spelled(tokenizer: Any, text: str) -> list[int]:
    """``text`` in byte tokens, a marker's characters too (each character alone is no
    special token)."""
    return [i for char in text for i in tokenizer.encode(char, add_special_tokens=False)]


def test_llguidance_takes_two_deepseek_calls_with_the_markers_as_tokens(special_markers) -> None:
    tokenizer, compiler = special_markers
    ids = {marker: tokenizer.convert_tokens_to_ids(marker) for marker in DEEPSEEK_IDS}
    grammar = _grammar(_required(DEEPSEEK, ids))
    weather = json.dumps({"city": "Rome"})
    two_calls = [
        "get_time\n```json\n{}\n```",
        ids[CALL_END],
        "\n",
        ids[CALL_BEGIN],
        "function",
        ids[SEP],
        f"get_weather\n```json\n{weather}\n```",
        ids[CALL_END],
        ids[CALLS_END],
    ]
    assert _accepts(tokenizer, compiler, grammar, two_calls)
    assert _accepts(tokenizer, compiler, grammar, ["get_time\n```json\n{}"])  # one call
    # The marker's characters are not the marker.
    assert not _accepts(tokenizer, compiler, grammar, ["get_time\n```json\n{}\n```", CALL_END])


def test_llguidance_takes_two_mistral_calls_with_the_markers_as_tokens(special_markers) -> None:
    tokenizer, compiler = special_markers
    ids = {marker: tokenizer.convert_tokens_to_ids(marker) for marker in MISTRAL_IDS}
    grammar = _grammar(_required(MISTRAL_V11, ids))
    two_calls = ["get_time", ids["[ARGS]"], "{}", ids["[TOOL_CALLS]"], "get_weather"]
    two_calls += [ids["[ARGS]"], json.dumps({"city": "Rome"})]
    assert _accepts(tokenizer, compiler, grammar, two_calls)
    assert _accepts(tokenizer, compiler, grammar, two_calls[:3])  # one call
    # The markers' characters are not the markers.
    assert not _accepts(tokenizer, compiler, grammar, ["get_time[ARGS]{}"])
    assert not _accepts(tokenizer, compiler, grammar, ["get_time", ids["[ARGS]"], "{}[TOOL_CALLS]"])


def test_llguidance_takes_two_hermes_calls_with_added_tag_tokens() -> None:
    """Qwen's ``<tool_call>`` tags are added tokens, not special ones: written by id,
    the grammar takes two calls with the tags as those tokens. Spelled as text, as
    before, llguidance let the tag's token through the mask and then refused it."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=False)
    compiler = ConstraintCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    ids = {tag: tokenizer.convert_tokens_to_ids(tag) for tag in ("<tool_call>", "</tool_call>")}
    grammar = _grammar(_required(HERMES, ids))
    first = json.dumps({"name": "get_time", "arguments": {}})
    second = json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})
    two_calls = [first, "\n", ids["</tool_call>"], "\n", ids["<tool_call>"], "\n", second]
    two_calls += ["\n", ids["</tool_call>"]]
    assert _accepts(tokenizer, compiler, grammar, two_calls)
    assert _accepts(tokenizer, compiler, grammar, [first])  # one call

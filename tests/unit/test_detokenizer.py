"""Incremental text never splits a UTF-8 character; stop strings never leak."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from salience_server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from tests.tiny_models import build_tokenizer


def test_multibyte_characters_arrive_whole() -> None:
    tokenizer = build_tokenizer()  # byte-level: "é" is two tokens, "🙂" four
    text = "héllo 🙂 wörld"
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = [detokenizer.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens completed no character


def test_a_character_the_stream_ends_inside_is_flushed_as_decoded() -> None:
    """The deltas and the flush join to the full decode, U+FFFD for a character cut
    short (it was lost: the streamed text and Detokenize disagreed)."""
    tokenizer = build_tokenizer()
    for text, cut in (("ab🙂", 4), ("é", 1), ("abc", 3)):
        ids = tokenizer.encode(text)[:cut]
        detokenizer = IncrementalDetokenizer(tokenizer, [])
        streamed = "".join(detokenizer.push(i) for i in ids) + detokenizer.flush()
        assert streamed == tokenizer.decode(ids), text
        assert detokenizer.flush() == ""


def test_a_character_the_context_ends_inside_comes_with_the_token_completing_it() -> None:
    """A call continuing a session (or a resumed stream) cut inside a character: the
    context's U+FFFD stood for the character, whose completing token then gave no text
    (the character was lost)."""
    tokenizer = build_tokenizer()
    text = "ab🙂cé"
    ids = tokenizer.encode(text)
    for cut in range(1, len(ids)):
        before = tokenizer.decode(ids[:cut]).rstrip("\ufffd")
        detokenizer = IncrementalDetokenizer(tokenizer, ids[:cut])
        deltas = [detokenizer.push(i) for i in ids[cut:]]
        assert "".join(deltas) == text[len(before) :], cut
        assert all("\ufffd" not in d for d in deltas)


def _merging_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level with one merge: a space and the first byte of "ä" are one token."""
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĠÃ"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "Ã")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_a_cut_character_comes_alone_after_whole_ones_in_its_token() -> None:
    """The context's last token holds a space and a character's first byte: the next call
    repeated the space (the whole token was taken as unread)."""
    tokenizer = _merging_tokenizer()
    ids = tokenizer.encode("x ä")
    assert len(ids) == 3  # x, space + first byte, second byte
    detokenizer = IncrementalDetokenizer(tokenizer, ids[:2])
    assert detokenizer.push(ids[2]) == "ä"


def test_a_context_ending_in_a_real_replacement_character_is_read() -> None:
    """U+FFFD written in the text (its three bytes whole) is context like any other
    character: it was sent again with the first token, and matched stop strings."""
    tokenizer = build_tokenizer()
    context = tokenizer.encode("The symbol \ufffd")
    detokenizer = IncrementalDetokenizer(tokenizer, context)
    assert [detokenizer.push(i) for i in tokenizer.encode(" ok")] == [" ", "o", "k"]


@pytest.mark.parametrize(
    ("pieces", "stops", "released", "matched"),
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["ab", "c\nU", "ser: x"], ["\nUser:"], "abc", True),
        (["Hel", "lo"], ["lox"], "Hello", False),  # a partial match is released at the end
        (["no stops here"], [], "no stops here", False),
    ],
)
def test_stop_strings(pieces: list[str], stops: list[str], released: str, matched: bool) -> None:
    matcher = StopStringMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.push(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (released, matched)


def test_text_that_may_begin_a_stop_string_is_held_back() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.push("answer </e") == ("answer ", False)
    assert matcher.push("xtra") == ("</extra", False)


@pytest.mark.parametrize(
    ("pieces", "stops", "released"),
    [
        (["Hello", " wor", "ld and more"], ["world"], "Hello world"),
        (["x ab", "cd"], ["abcd", "ab"], "x ab"),  # of two at one place, the shorter
        (["one. two", "!"], ["!", "two"], "one. two"),  # the earlier one
    ],
)
def test_stop_strings_kept_in_the_text(pieces: list[str], stops: list[str], released: str) -> None:
    """vLLM's ``include_stop_str_in_output``: the text ends just after the match."""
    matcher = StopStringMatcher(stops, include_match=True)
    out = ""
    for piece in pieces:
        text, hit = matcher.push(piece)
        out += text
        if hit:
            break
    assert (out, hit) == (released, True)

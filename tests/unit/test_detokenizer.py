"""Incremental text never splits a UTF-8 character; stop strings never leak."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from salience_server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from salience_server.engine.token_bytes import (
    _byte_level_decoder,
    ends_inside_character,
    pieces_bytes,
)
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


UNITS = [b"a", b" ", "\u00e9".encode(), "\u00e4".encode(), "\u4f60".encode(), "\U0001f642".encode()]
UNITS += ["\ufffd".encode(), b"\x80", b"\xe4\xbd"]
"""Whole characters (``ä`` begins with the byte the merging tokenizer joins to a space),
a written U+FFFD, a lone continuation byte and a character's first two bytes alone."""


def _ids_of(tokenizer: PreTrainedTokenizerFast, data: bytes) -> list[int]:
    """The byte-level tokens of ``data``, a space and 0xC3 merged into one."""
    alphabet = {byte: char for char, byte in _byte_level_decoder().items()}
    ids = []
    for byte in data:
        merged = ids and byte == 0xC3 and ids[-1] == tokenizer.convert_tokens_to_ids("Ġ")
        if merged:
            ids[-1] = tokenizer.convert_tokens_to_ids("ĠÃ")
        else:
            ids.append(tokenizer.convert_tokens_to_ids(alphabet[byte]))
    return ids


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(UNITS), min_size=1, max_size=12), st.data())
def test_text_comes_as_soon_as_its_characters_are_whole(units: list[bytes], data: Any) -> None:
    """After each token the text released is all the text whose characters are whole
    (a stop string is matched as soon as it is there: text before a character a token
    left incomplete waited with it), never more than the full decode shows, and with the
    flush the whole of it; after a context, from the end of the context's text (where
    the context ends inside a character the new tokens complete, with that character)."""
    tokenizer = _merging_tokenizer()
    ids = _ids_of(tokenizer, b"".join(units))
    cut = data.draw(st.integers(0, len(ids) - 1))
    context, new = ids[:cut], ids[cut:]
    read = tokenizer.decode(context)

    def owed(end: int) -> str:
        """The new tokens' text up to ``end`` (the context's U+FFFD theirs where they
        complete its character), less a character they leave incomplete."""
        text = tokenizer.decode(context + new[:end])
        cut_char = ends_inside_character(bytes_of(tokenizer, context))
        start = (
            len(read) - 1 if cut_char and text[len(read) - 1 : len(read)] != "\ufffd" else len(read)
        )
        if ends_inside_character(bytes_of(tokenizer, context + new[:end])):
            text = text.removesuffix("\ufffd")
        return text[start:] if len(text) > start else ""

    detokenizer = IncrementalDetokenizer(tokenizer, context)
    released = ""
    for end in range(1, len(new) + 1):
        released += detokenizer.push(new[end - 1])
        assert released == owed(end), (units, cut, end)
    full = tokenizer.decode(context + new)
    whole = released + detokenizer.flush()
    assert whole == full[len(full) - len(whole) :] and full.startswith(read.removesuffix("\ufffd"))


def bytes_of(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> bytes:
    return b"".join(pieces_bytes(tokenizer, ids))


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

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
    incomplete_tail,
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


def _byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece's shape (Llama 2, Mistral): "a" and the word mark are pieces, every
    other byte a byte-fallback piece ``<0xNN>``, each shown as U+FFFD while it is no
    character."""
    vocab = {"<unk>": 0, "a": 1, "▁": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _ids_of(tokenizer: PreTrainedTokenizerFast, data: bytes, byte_level: bool) -> list[int]:
    """The tokens of ``data``: byte-level, a space and 0xC3 merged into one; or
    SentencePiece's, "a" and the space as pieces and the other bytes as fallbacks."""
    if not byte_level:
        pieces = {ord("a"): "a", ord(" "): "▁"}
        return tokenizer.convert_tokens_to_ids([pieces.get(b, f"<0x{b:02X}>") for b in data])
    alphabet = {byte: char for char, byte in _byte_level_decoder().items()}
    ids: list[int] = []
    for byte in data:
        merged = ids and byte == 0xC3 and ids[-1] == tokenizer.convert_tokens_to_ids("Ġ")
        if merged:
            ids[-1] = tokenizer.convert_tokens_to_ids("ĠÃ")
        else:
            ids.append(tokenizer.convert_tokens_to_ids(alphabet[byte]))
    return ids


def _released_after_each_token(
    tokenizer: PreTrainedTokenizerFast, context: list[int], new: list[int]
) -> tuple[list[str], str]:
    """The text released after each of ``new``'s tokens, summed, and the flush."""
    detokenizer = IncrementalDetokenizer(tokenizer, context)
    released, sums = "", []
    for token_id in new:
        released += detokenizer.push(token_id)
        sums.append(released)
    return sums, detokenizer.flush()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(UNITS), min_size=1, max_size=12), st.data())
def test_byte_level_text_comes_as_soon_as_its_characters_are_whole(
    units: list[bytes], data: Any
) -> None:
    """After each token the text released is all the text whose characters are whole
    (a stop string is matched as soon as it is there: text before a character a token
    left incomplete waited with it, a space in the same token as an emoji's first
    bytes), never more than the full decode shows, and with the flush the whole of it;
    after a context, from the end of the context's text (where the context ends inside
    a character the new tokens complete, with that character)."""
    tokenizer = _merging_tokenizer()
    ids = _ids_of(tokenizer, b"".join(units), byte_level=True)
    cut = data.draw(st.integers(0, len(ids) - 1))
    context, new = ids[:cut], ids[cut:]
    read = tokenizer.decode(context)

    def owed(end: int) -> str:
        """The new tokens' text up to ``end`` (the context's U+FFFD theirs where they
        complete its character), less one U+FFFD for a character they leave incomplete."""
        text = tokenizer.decode(context + new[:end])
        start = len(read)
        if incomplete_tail(bytes_of(tokenizer, context)) and text[start - 1 : start] != "\ufffd":
            start -= 1
        if incomplete_tail(bytes_of(tokenizer, context + new[:end])):
            text = text.removesuffix("\ufffd")
        return text[start:]

    sums, flushed = _released_after_each_token(tokenizer, context, new)
    assert sums == [owed(end) for end in range(1, len(new) + 1)], (units, cut)
    full = tokenizer.decode(context + new)
    whole = sums[-1] + flushed
    assert whole == full[len(full) - len(whole) :] and full.startswith(read.removesuffix("\ufffd"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(UNITS[:6]), min_size=1, max_size=12), st.data())
def test_byte_fallback_text_comes_once_its_byte_pieces_are_whole(
    units: list[bytes], data: Any
) -> None:
    """SentencePiece's byte fallback shows every byte of a run of byte pieces holding an
    incomplete character as U+FFFD, whole characters before it included: the text of
    the pieces before the cut one's comes at once, the run's once it is whole, and a
    context cut inside a character gives it whole with the piece completing it (its
    byte pieces' U+FFFD were taken as read: only one was dropped, for any number)."""
    tokenizer = _byte_fallback_tokenizer()
    ids = _ids_of(tokenizer, b"".join(units), byte_level=False)
    cut = data.draw(st.integers(0, len(ids) - 1))
    context, new = ids[:cut], ids[cut:]

    def whole_text(token_ids: list[int]) -> str:
        """The decode without the byte pieces of a character they end inside."""
        tail = incomplete_tail(bytes_of(tokenizer, token_ids))
        return tokenizer.decode(token_ids[: len(token_ids) - tail])

    read = whole_text(context)
    sums, flushed = _released_after_each_token(tokenizer, context, new)
    for end, released in enumerate(sums, start=1):
        assert released == whole_text(context + new[:end])[len(read) :], (units, cut, end)
    assert sums[-1] + flushed == tokenizer.decode(ids)[len(read) :]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(UNITS[:6]), min_size=1, max_size=10), st.booleans(), st.data())
def test_a_skipped_special_token_adds_no_text_even_inside_a_character(
    units: list[bytes], byte_level: bool, data: Any
) -> None:
    """A special token the text leaves out (a chat marker the model emits) releases
    nothing and changes nothing released after it, wherever it falls, as the full
    decode joins the bytes around it (inside a character, the character came as one
    U+FFFD and the rest of it was lost)."""
    tokenizer = _merging_tokenizer() if byte_level else _byte_fallback_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<sp>"]})
    special = tokenizer.convert_tokens_to_ids("<sp>")
    ids = _ids_of(tokenizer, b"".join(units), byte_level)
    cut = data.draw(st.integers(0, len(ids) - 1))
    at = data.draw(st.integers(cut, len(ids)))
    marked = [*ids[:at], special, *ids[at:]]
    want, want_flushed = _released_after_each_token(tokenizer, ids[:cut], ids[cut:])
    sums, flushed = _released_after_each_token(tokenizer, marked[:cut], marked[cut:])
    before = sums.pop(at - cut)
    assert before == (sums[at - cut - 1] if at > cut else "")
    assert (sums, flushed) == (want, want_flushed), (units, cut, at)
    full = tokenizer.decode(marked, skip_special_tokens=True)
    assert full.endswith(sums[-1] + flushed) and full == tokenizer.decode(ids)


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

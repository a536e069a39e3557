"""Each token's own bytes, and whether bytes end inside a UTF-8 character.

A byte-level BPE piece maps back to raw bytes through the byte-level alphabet, a
SentencePiece byte-fallback piece ``<0xNN>`` is that byte, another SentencePiece piece is
its text with ``▁`` as a space, and an added token (special or not) is its text.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
"""SentencePiece's byte-fallback pieces: ``<0xE2>`` stands for the byte 0xE2."""
_METASPACE = "\u2581"
"""SentencePiece's word-boundary mark, a space in the text."""


def pieces_bytes(tokenizer: Any, token_ids: list[int]) -> list[bytes]:
    """Each token's own bytes (ids the vocabulary holds; an id the tokenizer has no
    piece for has none)."""
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    byte_level = is_byte_level(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(token_ids)
    result = []
    for token_id, piece in zip(token_ids, pieces, strict=True):
        piece = piece or ""
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if token_id in added:
            result.append(added[token_id].encode())
        elif fallback is not None:
            result.append(bytes([int(fallback.group(1), 16)]))
        elif byte_level:
            alphabet = _byte_level_decoder()
            result.append(b"".join(_byte_level_char(char, alphabet) for char in piece))
        else:
            result.append(piece.replace(_METASPACE, " ").encode())
    return result


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` begin a character they do not complete
    (0: none): its last lead byte announces more bytes than follow it."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: the lead is further back
            continue
        length = (
            2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if byte >= 0xF0 else 1
        )
        return back if length > back else 0
    return 0


def incomplete_tail_of(tokenizer: Any, token_ids: list[int]) -> int:
    """``incomplete_tail`` of the tokens' bytes."""
    return incomplete_tail(b"".join(pieces_bytes(tokenizer, token_ids)))


def _byte_level_char(char: str, alphabet: dict[str, int]) -> bytes:
    code = alphabet.get(char)
    return bytes([code]) if code is not None else char.encode()


@functools.lru_cache(maxsize=16)
def skipped_special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids a decode with ``skip_special_tokens`` leaves out: special added tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = {token_id for token_id, token in added.items() if getattr(token, "special", False)}
    return frozenset(special | set(getattr(tokenizer, "all_special_ids", ())))


@functools.lru_cache(maxsize=16)
def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer decodes through the byte-level alphabet (GPT-2's, Llama
    3's, Qwen's): its text of a longer sequence begins with the text of a shorter one
    but for one U+FFFD standing for a character the shorter ends inside. (SentencePiece's
    byte fallback shows every byte of a run of byte pieces holding an incomplete
    character as U+FFFD, whole characters before it included.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    return b'"ByteLevel"' in decoder.__getstate__()


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """The byte-level alphabet's character -> byte: printable bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in printable]
    for offset, byte in enumerate(shifted):
        alphabet[chr(0x100 + offset)] = byte
    return alphabet

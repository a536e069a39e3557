"""Token logprobs in OpenAI's two shapes: Chat Completions' ``logprobs.content`` entries
and the legacy Completions ``{tokens, token_logprobs, top_logprobs, text_offset}``.

Each token's string and bytes come from the server's Detokenize with
``return_token_bytes`` (a vocabulary is finite: they are cached for the life of the
shim). ``bytes`` are the token's own bytes, which may be a piece of a UTF-8 character;
the string is their UTF-8 text, with any byte that does not decode written ``\\xNN``
(as DeepSeek's API writes such tokens), never U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from salience_client import AsyncSalienceClient, TokenEvent


@dataclass(frozen=True)
class TokenText:
    """One token on its own: its bytes and how it prints."""

    raw: bytes

    @property
    def text(self) -> str:
        """The bytes as text; bytes that are no UTF-8 character alone as ``\\xNN``."""
        return self.raw.decode("utf-8", errors="backslashreplace")


class TokenTexts:
    """Token id to the bytes of that token alone (special tokens spelled out)."""

    def __init__(self, client: AsyncSalienceClient) -> None:
        self._client = client
        self._texts: dict[int, TokenText] = {}

    async def load(self, token_ids: Iterable[int]) -> dict[int, TokenText]:
        """Fetches the tokens of ``token_ids`` not yet known; returns the whole cache."""
        missing = sorted(set(token_ids) - self._texts.keys())
        if not missing:
            return self._texts
        pieces = await self._client.token_bytes(missing)
        if len(pieces) != len(missing):  # a server that does not return token bytes
            pieces = [(await self._client.detokenize([i])).encode() for i in missing]
        self._texts.update(zip(missing, map(TokenText, pieces), strict=True))
        return self._texts

    async def for_tokens(self, tokens: Sequence[TokenEvent | None]) -> dict[int, TokenText]:
        """Loads the texts of these tokens and of their top alternatives."""
        ids = [t.token_id for t in tokens if t is not None]
        ids += [i for t in tokens if t is not None for i, _ in t.top_logprobs]
        return await self.load(ids)


def token_string(token_id: int, texts: dict[int, TokenText], as_id: bool = False) -> str:
    """How a token prints in logprobs: its text, or ``token_id:N`` (vLLM's
    ``return_tokens_as_token_ids``, for clients that need the ids themselves: texts do
    not map back to ids one to one)."""
    return f"token_id:{token_id}" if as_id else texts[token_id].text


def chat_logprob_entry(
    token: TokenEvent, texts: dict[int, TokenText], top_k: int, as_ids: bool = False
) -> dict[str, Any]:
    """One ``logprobs.content`` entry: the token, its logprob and its top alternatives
    (``as_ids``: each token written ``token_id:N``; its bytes are still its own)."""
    return {
        "token": token_string(token.token_id, texts, as_ids),
        "logprob": token.logprob,
        "bytes": list(texts[token.token_id].raw),
        "top_logprobs": [
            {"token": token_string(i, texts, as_ids), "logprob": lp, "bytes": list(texts[i].raw)}
            for i, lp in token.top_logprobs[:top_k]
        ],
    }


def chat_logprobs(
    tokens: Sequence[TokenEvent], texts: dict[int, TokenText], top_k: int, as_ids: bool = False
) -> dict[str, Any]:
    """A choice's (or a chunk's) ``logprobs`` object."""
    return {
        "content": [chat_logprob_entry(t, texts, top_k, as_ids) for t in tokens],
        "refusal": None,
    }


class TextOffsets:
    """Where each token of one choice starts in its text, in characters: what the bytes of
    the tokens before it decode to. A token that ends inside a UTF-8 character adds
    nothing until the token that completes it (``\\xf0\\x9f``, ``\\x98``, ``\\x80`` all
    start at the emoji's offset), so the offsets index the choice's text, not the
    tokens' printed strings."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0

    def advance(self, raw: bytes) -> int:
        """The offset of a token of bytes ``raw``; moves past it."""
        offset = self.chars
        self.chars += len(self._decoder.decode(raw))
        return offset


def completion_logprobs(
    tokens: Sequence[TokenEvent],
    texts: dict[int, TokenText],
    top_k: int,
    offsets: TextOffsets,
    as_ids: bool = False,
) -> dict[str, Any]:
    """The legacy shape. A token without a logprob (position 0 of a scored prompt) gets
    None; ``text_offset`` is each token's offset in the choice's text (``offsets`` runs
    on across a stream's chunks). As OpenAI's, each ``top_logprobs`` entry holds the
    chosen token too (up to ``top_k + 1`` entries; ``logprobs: 0``, the chosen one
    alone): harnesses read whether it was the most likely there. ``as_ids``: tokens
    written ``token_id:N``."""
    strings, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token in tokens:
        text = token_string(token.token_id, texts, as_ids)
        is_first = token.is_prefill and token.position == 0
        strings.append(text)
        token_logprobs.append(None if is_first else token.logprob)
        top: dict[str, float] = {}
        for token_id, logprob in token.top_logprobs[:top_k]:
            # Tokens that print alike: keep the best.
            top.setdefault(token_string(token_id, texts, as_ids), logprob)
        top.setdefault(text, token.logprob)
        top_logprobs.append(None if is_first else top)
        text_offset.append(offsets.advance(texts[token.token_id].raw))
    return {
        "tokens": strings,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def prompt_logprobs(
    tokens: Sequence[TokenEvent], texts: dict[int, TokenText], top_k: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: for each prompt position, None at position 0, else
    the prompt token and its ``top_k`` most likely alternatives by token id (as a
    string), each with its logprob, rank and text."""
    entries: list[dict[str, dict[str, Any]] | None] = []
    for token in tokens:
        if token.position == 0:
            entries.append(None)
            continue
        entry = {str(token.token_id): _ranked(token.token_id, token.logprob, token.rank, texts)}
        for rank, (token_id, logprob) in enumerate(token.top_logprobs[:top_k], start=1):
            entry.setdefault(str(token_id), _ranked(token_id, logprob, rank, texts))
        entries.append(entry)
    return entries


def _ranked(
    token_id: int, logprob: float, rank: int, texts: dict[int, TokenText]
) -> dict[str, Any]:
    return {"logprob": logprob, "rank": rank, "decoded_token": texts[token_id].text}

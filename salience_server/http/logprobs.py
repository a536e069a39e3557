"""Token logprobs in OpenAI's two shapes: Chat Completions' ``logprobs.content`` entries
and the legacy Completions ``{tokens, token_logprobs, top_logprobs, text_offset}``.

Token strings come from the server's Detokenize, one id at a time, cached for the life
of the shim (a vocabulary is finite).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from salience_client import AsyncSalienceClient, TokenEvent


class TokenTexts:
    """Token id to the text of that token alone (special tokens spelled out)."""

    def __init__(self, client: AsyncSalienceClient) -> None:
        self._client = client
        self._texts: dict[int, str] = {}

    async def load(self, token_ids: Iterable[int]) -> dict[int, str]:
        """Fetches the texts of ``token_ids`` not yet known; returns the whole cache."""
        missing = sorted(set(token_ids) - self._texts.keys())
        texts = await asyncio.gather(*(self._client.detokenize([i]) for i in missing))
        self._texts.update(zip(missing, texts, strict=True))
        return self._texts

    async def for_tokens(self, tokens: Sequence[TokenEvent | None]) -> dict[int, str]:
        """Loads the texts of these tokens and of their top alternatives."""
        ids = [t.token_id for t in tokens if t is not None]
        ids += [i for t in tokens if t is not None for i, _ in t.top_logprobs]
        return await self.load(ids)


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprob_entry(token: TokenEvent, texts: dict[int, str], top_k: int) -> dict[str, Any]:
    """One ``logprobs.content`` entry: the token, its logprob and its top alternatives."""
    text = texts[token.token_id]
    return {
        "token": text,
        "logprob": token.logprob,
        "bytes": _utf8(text),
        "top_logprobs": [
            {"token": texts[i], "logprob": lp, "bytes": _utf8(texts[i])}
            for i, lp in token.top_logprobs[:top_k]
        ],
    }


def chat_logprobs(
    tokens: Sequence[TokenEvent], texts: dict[int, str], top_k: int
) -> dict[str, Any]:
    """A choice's (or a chunk's) ``logprobs`` object."""
    return {
        "content": [chat_logprob_entry(t, texts, top_k) for t in tokens],
        "refusal": None,
    }


def completion_logprobs(
    tokens: Sequence[TokenEvent], texts: dict[int, str], top_k: int, text_offset: int
) -> dict[str, Any]:
    """The legacy shape. A token without a logprob (position 0 of a scored prompt) gets
    None; ``text_offset`` is each token's offset in the returned text, counted from
    ``text_offset``."""
    strings, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token in tokens:
        text = texts[token.token_id]
        is_first = token.is_prefill and token.position == 0
        strings.append(text)
        token_logprobs.append(None if is_first else token.logprob)
        top: dict[str, float] = {}
        for token_id, logprob in token.top_logprobs[:top_k]:
            top.setdefault(texts[token_id], logprob)  # tokens that print alike: keep the best
        top_logprobs.append(None if is_first or not top_k else top)
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": strings,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }

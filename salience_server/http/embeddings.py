"""POST /v1/embeddings, through the server's Embed RPC.

``input`` is a string, a list of strings, a list of token ids, or a list of token-id
lists, as in OpenAI's API; ``encoding_format`` is ``float`` (the default) or
``base64`` (little-endian float32, as the openai SDK decodes it). Vectors are the final
hidden state of the last token (``pooling``, vLLM's extra field, may say ``mean``),
L2-normalised unless ``normalize`` is false, as embedding endpoints return them.
``dimensions`` is refused: these vectors cannot be shortened meaningfully. vLLM's
``truncate_prompt_tokens`` keeps each input's last k tokens (-1: the model's context).
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from salience_server.http.backend import Backend
from salience_server.http.errors import client_errors, invalid
from salience_server.http.request_body import parse_body
from salience_server.http.schemas import MAX_TOKEN_ID, Body, Each
from salience_server.http.truncation import last_tokens
from salience_server.text_checks import MAX_EMBED_INPUTS

router = APIRouter()

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class EmbeddingsRequest(Body):
    model: str
    input: (
        str
        | Annotated[list[str], Each]
        | Annotated[list[TokenId], Each]
        | Annotated[list[list[TokenId]], Each]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    pooling: Literal["last", "mean"] = "last"
    normalize: bool = True
    add_special_tokens: bool = True
    """vLLM's default: a model's BOS (a Llama 3's) is part of what it embeds."""
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


@router.post("/v1/embeddings")
async def create_embeddings(request: Request) -> dict[str, Any]:
    """One vector per input, in input order."""
    backend: Backend = request.app.state.backend
    body = await parse_body(request, EmbeddingsRequest)
    await backend.check_model(body.model)
    if body.dimensions is not None:
        raise invalid("dimensions is not supported by this model", param="dimensions")
    texts, token_lists = _inputs(body.input)
    if body.truncate_prompt_tokens is not None:
        token_lists = await _truncated(backend, body, texts, token_lists)
        texts = []
    with client_errors("input"):
        result = await backend.client.embed(
            texts=texts,
            token_lists=token_lists,
            pooling=body.pooling,
            normalize=body.normalize,
            add_special_tokens=body.add_special_tokens,
            priority=body.priority,
        )
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _encoded(vector, body)}
            for index, vector in enumerate(result.vectors)
        ],
        "model": body.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


async def _truncated(
    backend: Backend, body: EmbeddingsRequest, texts: list[str], token_lists: list[list[int]]
) -> list[list[int]]:
    """vLLM's ``truncate_prompt_tokens``: each input's last k tokens (texts tokenized
    here, as the server would, keeping the special tokens the tokenizer adds: a BOS), k
    = -1 meaning the model's context (it was ignored)."""
    keep, max_context = body.truncate_prompt_tokens, (await backend.model_info()).max_context
    last_tokens([], keep, max_context)  # 0 is refused before anything is tokenized
    cut = [last_tokens(tokens, keep, max_context) for tokens in token_lists]  # ids as sent
    if texts:
        added = await backend.added_special_tokens() if body.add_special_tokens else ([], [])
        with client_errors("input"):
            for text in texts:
                tokens = await backend.client.tokenize(
                    text, add_special_tokens=body.add_special_tokens
                )
                cut.append(last_tokens(tokens, keep, max_context, added))
    return cut


def _inputs(value: Any) -> tuple[list[str], list[list[int]]]:
    """(texts, token lists) from OpenAI's four input shapes."""
    if isinstance(value, str):
        return [value], []
    if not value:
        raise invalid("input must not be empty", param="input")
    if all(isinstance(item, int) for item in value):
        return [], [list(value)]
    if len(value) > MAX_EMBED_INPUTS:  # before any is tokenized (20,000 texts took 30 s)
        raise invalid(f"{len(value)} inputs; at most {MAX_EMBED_INPUTS} per call", param="input")
    if all(isinstance(item, str) for item in value):
        return list(value), []
    return [], [list(item) for item in value]


def _encoded(vector: list[float], body: EmbeddingsRequest) -> list[float] | str:
    if body.encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

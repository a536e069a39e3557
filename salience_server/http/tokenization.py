"""POST /tokenize, POST /detokenize and GET /tokenizer_info, shaped as vLLM's.

``/tokenize`` takes a ``prompt`` (``add_special_tokens`` defaults to true) or chat
``messages`` (through the chat template, with ``add_generation_prompt``,
``continue_final_message``, ``chat_template_kwargs``, ``tools``; ``add_special_tokens``
defaults to false) and answers ``{count, max_model_len, tokens, token_strs}``;
``token_strs`` (with ``return_token_strs``) are each token's text as in logprobs.
``/detokenize`` turns ``tokens`` into ``{"prompt": text}``. ``/tokenizer_info`` names
the special tokens and the chat template (what lm-eval's remote tokenizer reads).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from salience_server.http.backend import Backend, RenderOptions
from salience_server.http.errors import client_errors, invalid
from salience_server.http.messages import chat_messages
from salience_server.http.request_body import parse_body
from salience_server.http.schemas import MAX_TOKEN_ID, Body
from salience_server.http.tools import chat_tools

router = APIRouter()


class TokenizeRequest(Body):
    """POST /tokenize: exactly one of ``prompt`` and ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    """Default: true for a prompt, false for messages (the template writes them)."""
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        return self


class DetokenizeRequest(Body):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]]


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    """Text or chat messages to token ids, as the server's tokenizer makes them."""
    backend: Backend = request.app.state.backend
    body = await parse_body(request, TokenizeRequest)
    info = await backend.check_model(body.model) if body.model else await backend.model_info()
    if body.prompt is not None:
        add_special = body.add_special_tokens is not False
        with client_errors("prompt"):
            token_ids = await backend.client.tokenize(body.prompt, add_special)
    else:
        token_ids = await _tokenize_chat(backend, body)
    token_strs = None
    if body.return_token_strs:
        texts = await backend.token_texts.load(token_ids)
        token_strs = [texts[token_id].text for token_id in token_ids]
    return {
        "count": len(token_ids),
        "max_model_len": info.max_context,
        "tokens": token_ids,
        "token_strs": token_strs,
    }


async def _tokenize_chat(backend: Backend, body: TokenizeRequest) -> list[int]:
    """The messages through the chat template, each image as many pad tokens as it
    takes (remote images are fetched, or refused, as a chat completion's are)."""
    assert body.messages is not None
    if not body.messages:
        raise invalid("messages must not be empty", "messages")
    conversation = chat_messages(body.messages)
    await backend.check_images(conversation.images, "messages")
    render = RenderOptions(
        add_generation_prompt=(
            not body.continue_final_message
            if body.add_generation_prompt is None
            else body.add_generation_prompt
        ),
        continue_final_message=body.continue_final_message,
        chat_template_kwargs=body.chat_template_kwargs,
    )
    tools = chat_tools(body.tools)
    token_ids = await backend.render_chat(
        conversation.messages, tools, "messages", render, bounded=False, images=conversation.images
    )
    if body.add_special_tokens:
        # What the tokenizer adds around text (a BOS, say), as for a plain prompt; the
        # start's not twice where the template wrote it already.
        front, back = await backend.added_special_tokens()
        if token_ids[: len(front)] != front:
            token_ids = front + token_ids
        token_ids += back
    return token_ids


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    """Token ids to text (special tokens spelled out)."""
    backend: Backend = request.app.state.backend
    body = await parse_body(request, DetokenizeRequest)
    if body.model:
        await backend.check_model(body.model)
    return {"prompt": await backend.detokenize(body.tokens, "tokens")}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    """The special tokens, the chat template and the context limit."""
    backend: Backend = request.app.state.backend
    info = await backend.model_info()
    special = {  # the tokenizer's EOS comes first of the EOS ids
        "eos_token": info.eos_token_ids[0] if info.eos_token_ids else None,
        "bos_token": info.bos_token_id,
    }
    known = [token_id for token_id in special.values() if token_id is not None]
    texts = await backend.token_texts.load(known)
    return {
        **{name: texts[i].text if i is not None else None for name, i in special.items()},
        "pad_token": None,
        "chat_template": info.chat_template or None,
        "model_max_length": info.max_context,
    }

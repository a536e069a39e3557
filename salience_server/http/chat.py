"""POST /v1/chat/completions: chat over pooled sessions, streamed or not.

The messages go through the model's chat template (the server's Tokenize), the pool
lends the session sharing the longest prefix with the result, and the choices decode
there (``n > 1`` through forks). Tool calls are parsed out of the finished text.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from salience_client import ModelInfo, TokenEvent
from salience_server.http.backend import Backend
from salience_server.http.errors import as_api_error, client_errors
from salience_server.http.generation import (
    ChoiceResult,
    ChoiceToken,
    Generation,
    GenerationEvent,
    PromptToken,
    collect,
    finish_reason,
)
from salience_server.http.logprobs import chat_logprobs
from salience_server.http.messages import ImageInput, chat_messages
from salience_server.http.schemas import ChatCompletionRequest, parse_body
from salience_server.http.streaming import (
    Primed,
    event_stream,
    sse_data,
    start_stream,
    until_disconnected,
)
from salience_server.http.tools import (
    ToolCallFilter,
    ToolMode,
    chat_tools,
    parse_tool_calls,
    tool_mode,
)

router = APIRouter()


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """The ``usage`` object; ``cached_tokens`` counts prompt tokens whose KV was reused."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class ChatPlan:
    """What a chat request becomes before anything is decoded."""

    body: ChatCompletionRequest
    model_info: ModelInfo
    prompt_ids: list[int]
    """The rendered conversation, then the forced opening of a tool call if any."""
    tools: ToolMode
    prefix_text: str
    """That forced opening, which belongs to the reply's text."""
    images: dict[int, ImageInput] = field(default_factory=dict)
    """The images of the conversation by their marker in ``prompt_ids``."""

    @property
    def top_logprobs(self) -> int:
        """Alternatives asked for per token (0: none)."""
        return self.body.top_logprobs or 0

    def is_visible(self, token: TokenEvent) -> bool:
        """Whether a token belongs in ``logprobs`` (end-of-sequence tokens do not)."""
        return token.token_id not in self.model_info.eos_token_ids

    def generation(self, backend: Backend) -> Generation:
        """The Generation this request runs (max_tokens defaults to the context left)."""
        body = self.body
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.model_info.max_context - len(self.prompt_ids))
        top_k = self.top_logprobs if body.logprobs else 0
        options = body.decode_options(max_tokens, body.stop, top_k)
        return Generation(
            backend.pool, self.prompt_ids, options, body.n, self.images, backend.image_token_counts
        )


async def plan_chat(backend: Backend, body: ChatCompletionRequest) -> ChatPlan:
    """Checks the request and renders its prompt."""
    body.check()
    info = await backend.check_model(body.model)
    conversation = chat_messages(body.messages)
    await backend.check_images(conversation.images, "messages")
    mode = tool_mode(chat_tools(body.tools), body.tool_choice)
    offered = mode.tools if mode.is_enabled else []
    prompt_ids = await backend.render_chat(conversation.messages, offered, "messages")
    images = backend.mark_images(prompt_ids, conversation.images, "messages")
    prefix = mode.prefix_text()
    prompt_ids += await backend.tokenize(prefix, "tool_choice")
    return ChatPlan(body, info, prompt_ids, mode, prefix, images)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    """OpenAI's Chat Completions."""
    backend: Backend = request.app.state.backend
    plan = await plan_chat(backend, await parse_body(request, ChatCompletionRequest))
    generation = plan.generation(backend)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if plan.body.stream:
        events = await start_stream(generation.events(), "messages")
        return event_stream(ChatStream(backend, plan, generation, completion_id).sse(events))
    with client_errors("messages"):
        result = await until_disconnected(request, collect(generation))
    choices = [await _choice(backend, plan, choice) for choice in result.choices]
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.body.model,
            "choices": choices,
            "usage": usage(len(plan.prompt_ids), result.completion_tokens, result.cached_tokens),
            "system_fingerprint": None,
        }
    )


async def _choice(backend: Backend, plan: ChatPlan, choice: ChoiceResult) -> dict[str, Any]:
    """One finished choice of a non-streamed completion."""
    assert choice.done is not None
    text = plan.prefix_text + choice.text
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    reason = finish_reason(choice.done)
    if plan.tools.is_enabled:
        content, calls = parse_tool_calls(text, plan.tools.names)
        if calls:
            message["content"] = content or None
            message["tool_calls"] = [call.chat_dict() for call in calls]
            reason = "tool_calls"
    logprobs = None
    if plan.body.logprobs:
        tokens = [token for token in choice.tokens if plan.is_visible(token)]
        texts = await backend.token_texts.for_tokens(tokens)
        logprobs = chat_logprobs(tokens, texts, plan.top_logprobs)
    return {
        "index": choice.index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": reason,
    }


class ChatStream:
    """Turns generation events into ``chat.completion.chunk`` events."""

    def __init__(
        self, backend: Backend, plan: ChatPlan, generation: Generation, completion_id: str
    ) -> None:
        self._backend = backend
        self._plan = plan
        self._generation = generation
        self._base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": plan.body.model,
            "system_fingerprint": None,
        }
        options = plan.body.stream_options
        self._include_usage = options is not None and options.include_usage
        self._filters: dict[int, ToolCallFilter] = {}
        self._started: set[int] = set()
        self._num_completion_tokens = 0

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        chunk: dict[str, Any] = {**self._base, "choices": choices}
        if self._include_usage:
            chunk["usage"] = usage
        return sse_data(chunk)

    def _delta(self, index: int, delta: dict[str, Any], logprobs: Any = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        return self._chunk([choice])

    async def sse(self, events: Primed[GenerationEvent]) -> AsyncIterator[str]:
        """Every chunk, then the usage chunk if asked for, then ``[DONE]``; an error
        mid-stream becomes a ``{"error": ...}`` event before ``[DONE]``."""
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    for chunk in await self._on_event(event):
                        yield chunk
            if self._include_usage:
                prompt_tokens = len(self._plan.prompt_ids)
                cached = self._generation.cached_tokens
                totals = usage(prompt_tokens, self._num_completion_tokens, cached)
                yield self._chunk([], totals)
        except Exception as error:
            yield sse_data({"error": as_api_error(error).error()})
        yield sse_data("[DONE]")

    def _filter(self, index: int) -> ToolCallFilter | None:
        """The choice's tool-call filter (None when no tools are offered)."""
        tools = self._plan.tools
        if not tools.is_enabled:
            return None
        if index not in self._filters:
            self._filters[index] = ToolCallFilter(tools.names, self._plan.prefix_text)
        return self._filters[index]

    async def _on_event(self, event: GenerationEvent) -> list[str]:
        chunks: list[str] = []
        if isinstance(event, PromptToken):
            return chunks
        index = event.index
        if index not in self._started:  # each choice opens with the assistant's role
            self._started.add(index)
            chunks.append(self._delta(index, {"role": "assistant", "content": ""}))
        tool_filter = self._filter(index)
        if isinstance(event, ChoiceToken):
            text = event.token.text
            content = tool_filter.push(text) if tool_filter is not None else text
            logprobs = None
            if self._plan.body.logprobs and self._plan.is_visible(event.token):
                texts = await self._backend.token_texts.for_tokens([event.token])
                logprobs = chat_logprobs([event.token], texts, self._plan.top_logprobs)
            if content or logprobs is not None:
                chunks.append(self._delta(index, {"content": content}, logprobs))
            return chunks
        self._num_completion_tokens += event.done.completion_tokens
        reason = finish_reason(event.done)
        if tool_filter is not None:
            rest, calls = tool_filter.finish()
            if rest:
                chunks.append(self._delta(index, {"content": rest}))
            if calls:
                delta = [{"index": k, **call.chat_dict()} for k, call in enumerate(calls)]
                chunks.append(self._delta(index, {"tool_calls": delta}))
                reason = "tool_calls"
        finish = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        chunks.append(self._chunk([finish]))
        return chunks

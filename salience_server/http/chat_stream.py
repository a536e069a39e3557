"""A streamed chat completion: the chunks of every choice as its reply is parsed
(reasoning, content, tool calls), with logprobs and vLLM's token ids where asked for."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from salience_server.http.backend import Backend
from salience_server.http.choice_fields import client_stopped, finish_reason
from salience_server.http.errors import as_api_error
from salience_server.http.generation import (
    ChoiceToken,
    Generation,
    GenerationEvent,
    PromptToken,
)
from salience_server.http.logprobs import chat_logprobs
from salience_server.http.reply import ReasoningDelta, ReplyEvent, ReplyParser
from salience_server.http.streaming import Primed, sse_data
from salience_server.http.tool_call import ArgumentsDelta, CallOpened, TextDelta
from salience_server.http.tools import tool_calls_reason

if TYPE_CHECKING:
    from salience_server.http.chat import ChatPlan


def delta_of(event: ReplyEvent) -> dict[str, Any] | None:
    """The chunk ``delta`` of one parsed piece of a reply (None: nothing to send)."""
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    if isinstance(event, TextDelta):
        return {"content": event.text}
    if isinstance(event, CallOpened):
        opened = {**event.call.chat_dict(), "index": event.index}
        opened["function"] = {"name": event.call.name, "arguments": ""}
        return {"tool_calls": [opened]}
    if isinstance(event, ArgumentsDelta):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
    return None


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
        self._parsers: dict[int, ReplyParser] = {}
        self._num_completion_tokens = 0
        self._num_reasoning_tokens = 0

    def _chunk(
        self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None, **top: Any
    ) -> str:
        chunk: dict[str, Any] = {**self._base, "choices": choices, **top}
        if self._include_usage:
            chunk["usage"] = usage
        return sse_data(chunk)

    def _delta(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: Any = None,
        token_ids: list[int] | None = None,
        top: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        stop_reason: str | int | None = None,
    ) -> str:
        """One choice's chunk (``top``: fields of the chunk itself)."""
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
        if self._plan.body.return_token_ids:
            choice["token_ids"] = token_ids or []
        return self._chunk([choice], **(top or {}))

    async def sse(self, events: Primed[GenerationEvent]) -> AsyncIterator[str]:
        """Every chunk, then the usage chunk if asked for, then ``[DONE]``; an error
        mid-stream becomes a ``{"error": ...}`` event before ``[DONE]``."""
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    for chunk in await self._on_event(event):
                        yield chunk
            if self._include_usage:
                cached = self._generation.cached_tokens
                totals = self._plan.usage(
                    self._num_completion_tokens, cached, self._num_reasoning_tokens
                )
                yield self._chunk([], totals)
        except Exception as error:
            yield sse_data({"error": as_api_error(error).error()})
        yield sse_data("[DONE]")

    async def _on_event(self, event: GenerationEvent) -> list[str]:
        chunks: list[str] = []
        if isinstance(event, PromptToken):
            return chunks
        index = event.index
        body = self._plan.body
        if index not in self._parsers:  # each choice opens with the assistant's role
            self._parsers[index] = self._plan.reply_parser()
            top = {"prompt_token_ids": self._plan.model_prompt_ids} if body.return_token_ids else {}
            chunks.append(self._delta(index, {"role": "assistant", "content": ""}, top=top))
            if self._plan.echoed:
                chunks.append(self._delta(index, {"content": self._plan.echoed}))
        parser = self._parsers[index]
        if isinstance(event, ChoiceToken):
            deltas = [d for d in map(delta_of, parser.push(event.token.text)) if d is not None]
            logprobs = None
            if body.logprobs:
                texts = await self._backend.token_texts.for_tokens([event.token])
                top_k, as_ids = self._plan.top_logprobs, body.return_tokens_as_token_ids
                logprobs = chat_logprobs([event.token], texts, top_k, as_ids)
            if (logprobs is not None or body.return_token_ids) and not deltas:
                deltas = [{"content": ""}]
            for position, delta in enumerate(deltas):
                if position == 0:  # the token's logprobs and id go with its first delta
                    ids = [event.token.token_id]
                    chunks.append(self._delta(index, delta, logprobs, ids))
                else:
                    chunks.append(self._delta(index, delta))
            return chunks
        self._num_completion_tokens += event.done.completion_tokens
        self._num_reasoning_tokens += parser.num_reasoning_tokens
        deltas = [d for d in map(delta_of, parser.finish()) if d is not None]
        chunks += [self._delta(index, delta) for delta in deltas]
        reason = finish_reason(event.done)
        stopped_by = self._plan.stop_reason(event.done, event.token_ids)
        is_client_stop = client_stopped(event.done, self._plan.body.stop, stopped_by)
        self._plan.tools.check_forced(parser.calls, event.done.finish_reason, is_client_stop)
        reason = tool_calls_reason(reason, parser.calls)
        chunks.append(self._delta(index, {}, finish_reason=reason, stop_reason=stopped_by))
        return chunks

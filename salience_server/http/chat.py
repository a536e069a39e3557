"""POST /v1/chat/completions: chat over pooled sessions, streamed or not.

The messages go through the model's chat template (the server's Tokenize), the pool
lends the session sharing the longest prefix with the result, and the choices decode
there (``n > 1`` through forks). Each choice's text is parsed as it streams
(``reply``): reasoning to ``reasoning_content``, tool calls to ``tool_calls`` deltas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from salience_client import Done, ModelInfo
from salience_server.http.backend import Backend, RenderOptions
from salience_server.http.chat_stream import ChatStream
from salience_server.http.choice_fields import (
    client_stopped,
    finish_reason,
    model_token_ids,
    stop_reason,
)
from salience_server.http.constraints import Constraint
from salience_server.http.errors import (
    ApiError,
    client_errors,
    invalid,
    unsupported,
)
from salience_server.http.generation import (
    ChoiceResult,
    Generation,
    collect,
)
from salience_server.http.logprobs import chat_logprobs, prompt_logprobs
from salience_server.http.messages import ImageInput, chat_messages
from salience_server.http.reasoning import Reasoning
from salience_server.http.reply import ParsedReply, ReplyParser
from salience_server.http.request_body import parse_body
from salience_server.http.schemas import ChatCompletionRequest
from salience_server.http.streaming import (
    event_stream,
    start_stream,
    until_disconnected,
)
from salience_server.http.tool_format import tool_format
from salience_server.http.tools import (
    ToolMode,
    chat_tools,
    tool_calls_reason,
    tool_mode,
)
from salience_server.http.truncation import last_tokens, reply_limit

router = APIRouter()


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    reasoning_tokens: int | None = None,
) -> dict[str, Any]:
    """The ``usage`` object; ``cached_tokens`` counts prompt tokens whose KV was reused,
    ``reasoning_tokens`` (reasoning models only) the tokens of the thinking."""
    totals: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:
        totals["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return totals


@dataclass
class ChatPlan:
    """What a chat request becomes before anything is decoded."""

    body: ChatCompletionRequest
    model_info: ModelInfo
    prompt_ids: list[int]
    """The rendered conversation, then the forced opening of a tool call if any."""
    tools: ToolMode
    constraint: Constraint | None = None
    """What the reply must be: a forced tool call, else the structured output asked for."""
    constraint_param: str = "messages"
    """The field the constraint's refusals name."""
    reasoning: Reasoning = Reasoning()
    """How the reply reasons: its thinking is ``reasoning_content``."""
    images: dict[int, ImageInput] = field(default_factory=dict)
    """The images of the conversation by their marker in ``prompt_ids``."""
    prompt_tail: int = 0
    """The prompt's last tokens that open the reply (``SessionPool.acquire``)."""
    echoed: str = ""
    """What each choice's content opens with (``echo``)."""

    @property
    def top_logprobs(self) -> int:
        """Alternatives asked for per token (0: none)."""
        return self.body.top_logprobs or 0

    def stop_reason(self, done: Done, decoded_ids: list[int]) -> str | int | None:
        """vLLM's ``stop_reason`` of a choice (``choice_fields.stop_reason``)."""
        body, eos = self.body, self.model_info.eos_token_ids
        return stop_reason(done, decoded_ids, body.stop, body.stop_token_ids or [], eos)

    @property
    def model_prompt_ids(self) -> list[int]:
        """The prompt's ids as the model read them (once its images are in)."""
        return model_token_ids(self.prompt_ids, self.model_info.image_pad_token_id)

    def reply_parser(self) -> ReplyParser:
        """Splits one choice's text into reasoning, content and tool calls."""
        return ReplyParser.for_request(self.tools, self.constraint, self.reasoning)

    def generation(self, backend: Backend) -> Generation:
        """The Generation this request runs (max_tokens defaults to, and is capped at,
        the context left)."""
        body = self.body
        max_tokens = reply_limit(
            self.model_info.max_context,
            len(self.prompt_ids),
            body.max_reply_tokens,
            "messages",
            body.min_tokens,
        )
        top_k = self.top_logprobs if body.logprobs else 0
        options = body.decode_options(
            max_tokens,
            body.stop,
            max(top_k, body.prompt_logprobs or 0),
            score_prompt=body.prompt_logprobs is not None,
            constraint=self.constraint,
            extra_stops=self.tools.stop_strings(),
            reads_markers=self.tools.is_enabled,
        )
        options = dataclasses.replace(options, thinking=self.reasoning.tags)
        return Generation(
            backend.pool,
            self.prompt_ids,
            options,
            body.n,
            self.images,
            backend.image_token_counts,
            self.prompt_tail,
        )

    def usage(self, completion_tokens: int, cached_tokens: int, reasoning_tokens: int) -> Any:
        """The usage object of this request."""
        reasoning = reasoning_tokens if self.reasoning.is_reasoning else None
        return usage(len(self.prompt_ids), completion_tokens, cached_tokens, reasoning)


async def plan_chat(backend: Backend, body: ChatCompletionRequest) -> ChatPlan:
    """Checks the request and renders its prompt."""
    info = await backend.check_model(body.model)
    body.check(info.vocab_size)
    conversation = chat_messages(body.messages)
    await backend.check_images(conversation.images, "messages")
    if conversation.images and body.prompt_logprobs is not None:
        raise unsupported("prompt_logprobs of a prompt with images", "prompt_logprobs")
    mode = tool_mode(
        chat_tools(body.tools),
        body.tool_choice,
        tool_format(info.chat_template),
        body.parallel_tool_calls,
    )
    mode = dataclasses.replace(mode, marker_ids=await backend.marker_tokens(mode.grammar_markers))
    if mode.is_forced and body.continue_final_message:
        raise invalid("a forced tool call cannot continue the final message", "tool_choice")
    output_constraint = body.constraint()
    offered = mode.tools  # with tool_choice "none" too, as vLLM renders them
    render = RenderOptions(
        add_generation_prompt=(
            not body.continue_final_message
            if body.add_generation_prompt is None
            else body.add_generation_prompt
        ),
        continue_final_message=body.continue_final_message,
        chat_template_kwargs=body.chat_template_kwargs,
    )
    # A prompt to be cut to its last tokens may be longer than the context could hold.
    bounded = body.truncate_prompt_tokens is None
    rendered = await backend.render_chat(
        conversation.messages, offered, "messages", render, bounded=bounded
    )
    if body.truncate_prompt_tokens is not None and conversation.images:
        await backend.learn_image_counts(
            conversation.messages, offered, "messages", render, conversation.images
        )
    images = backend.mark_images(rendered, conversation.images, "messages")
    prefix_ids = await backend.tokenize(mode.prefix_text(), "tool_choice")
    prompt_ids = last_tokens(rendered + prefix_ids, body.truncate_prompt_tokens, info.max_context)
    param, constraint = mode.reply_constraint(output_constraint) or ("messages", None)
    # Counted from the prompt's end: a prompt cut to its last tokens keeps its tail (it
    # was counted from the cut prompt's length less the whole rendering's, below zero).
    tail = await backend.generation_prompt_length(render) + len(prefix_ids)
    tail = min(tail, len(prompt_ids))
    reasoning = await backend.reasoning(
        prompt_ids, info.chat_template, mode.is_forced, constraint is not None
    )
    echoed = _echoed(body.messages[-1], render.add_generation_prompt) if body.echo else ""
    return ChatPlan(
        body, info, prompt_ids, mode, constraint, param, reasoning, images, tail, echoed
    )


def _echoed(last: dict[str, Any], adds_generation_prompt: bool) -> str:
    """vLLM's chat ``echo``: the last message's text where the reply goes on in its role
    (the assistant's after a generation prompt, else the last message's own), else ""."""
    if adds_generation_prompt and last.get("role") != "assistant":
        return ""
    content = last.get("content") or ""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")


@contextlib.contextmanager
def _counting_own_stops(own: tuple[str, ...]) -> Iterator[None]:
    """The server's refusal of too many stop strings counts the shim's ``own`` too: it
    says so, or the client is told of one more than it sent."""
    try:
        yield
    except ApiError as error:
        if own and error.code == "too_many_stop_strings":
            error.message += (
                f"; they include {own[0]!r}, which the shim adds to end the reply after "
                "its one tool call (parallel_tool_calls false)"
            )
        raise


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    """OpenAI's Chat Completions."""
    backend: Backend = request.app.state.backend
    plan = await plan_chat(backend, await parse_body(request, ChatCompletionRequest))
    generation = plan.generation(backend)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    with _counting_own_stops(plan.tools.stop_strings()):
        if plan.body.stream:
            events = await start_stream(
                request,
                generation.events(),
                "messages",
                backend.config.keepalive_s,
                plan.constraint_param,
            )
            stream = ChatStream(backend, plan, generation, completion_id).sse(events)
            return event_stream(stream, backend.config.keepalive_s)
        with client_errors("messages", plan.constraint_param):
            result = await until_disconnected(request, collect(generation))
    choices, reasoning_tokens = [], 0
    for choice in result.choices:
        message, num_reasoning = await _choice(backend, plan, choice)
        choices.append(message)
        reasoning_tokens += num_reasoning
    reply = {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.body.model,
        "choices": choices,
        "usage": plan.usage(result.completion_tokens, result.cached_tokens, reasoning_tokens),
        "system_fingerprint": None,
    }
    if plan.body.return_token_ids:
        reply["prompt_token_ids"] = plan.model_prompt_ids
    if plan.body.prompt_logprobs is not None:
        texts = await backend.token_texts.for_tokens(result.prompt_tokens)
        reply["prompt_logprobs"] = prompt_logprobs(
            result.prompt_tokens, texts, plan.body.prompt_logprobs
        )
    return JSONResponse(reply)


async def _choice(
    backend: Backend, plan: ChatPlan, choice: ChoiceResult
) -> tuple[dict[str, Any], int]:
    """One finished choice of a non-streamed completion, and its reasoning tokens."""
    assert choice.done is not None
    reply = ParsedReply.of(plan.reply_parser(), [token.text for token in choice.tokens])
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if plan.reasoning.is_reasoning:
        message["reasoning_content"] = reply.reasoning or None
    reason = finish_reason(choice.done)
    decoded = [token.token_id for token in choice.tokens]
    stopped_by = plan.stop_reason(choice.done, decoded)
    is_client_stop = client_stopped(choice.done, plan.body.stop, stopped_by)
    plan.tools.check_forced(reply.calls, choice.done.finish_reason, is_client_stop)
    if reply.calls or plan.tools.is_forced or reply.reasoning:
        message["content"] = reply.content or None  # all thinking: none, as vLLM's
    if plan.echoed:
        message["content"] = plan.echoed + (message["content"] or "")
    if reply.calls:
        message["tool_calls"] = [call.chat_dict() for call in reply.calls]
        reason = tool_calls_reason(reason, reply.calls)
    logprobs = None
    if plan.body.logprobs:
        # Every decoded token, the end-of-turn one included (as vLLM's; usage counts it,
        # and a trainer needs the probability of ending there).
        tokens = choice.tokens
        texts = await backend.token_texts.for_tokens(tokens)
        logprobs = chat_logprobs(
            tokens, texts, plan.top_logprobs, plan.body.return_tokens_as_token_ids
        )
    shaped = {"index": choice.index, "message": message, "logprobs": logprobs}
    if plan.body.return_token_ids:
        shaped["token_ids"] = decoded
    return {
        **shaped,
        "finish_reason": reason,
        "stop_reason": stopped_by,
    }, reply.num_reasoning_tokens

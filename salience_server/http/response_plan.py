"""What a Responses request becomes before anything is decoded: the response it
continues, its prompt, its tools and constraint (``ResponsePlan``), and the Response
objects it reports.

A request with ``previous_response_id`` continues the live session of that response:
its prompt is the session's exact tokens, then the end of the assistant turn as the chat
template writes it (in place of the model's own end-of-sequence token), then the new input.
The pool lends that session back (it shares the whole prefix), so only the new input is
prefilled. When the template's rendering of the conversation does not extend the
previous one (other instructions or tools), the whole conversation is rendered afresh.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from salience_client import Done, ModelInfo, TokenEvent
from salience_server import text_checks
from salience_server.http.backend import Backend, RenderOptions
from salience_server.http.choice_fields import stop_reason
from salience_server.http.constraints import Constraint
from salience_server.http.errors import ApiError
from salience_server.http.generation import Generation
from salience_server.http.logprobs import chat_logprob_entry
from salience_server.http.messages import ImageInput, response_input_messages
from salience_server.http.reasoning import Reasoning
from salience_server.http.reply import ReplyParser
from salience_server.http.response_store import StoredResponse
from salience_server.http.response_stream import ResponseStream
from salience_server.http.responses_schema import ResponsesRequest
from salience_server.http.tool_format import tool_format
from salience_server.http.tools import ToolMode, responses_tools, tool_mode
from salience_server.http.truncation import reply_limit, without_oldest


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def continue_session(previous: StoredResponse, rendered: list[int], eos_ids: set[int]) -> list[int]:
    """The prompt continuing ``previous``'s session: its tokens (less the end-of-sequence
    token the model ended with, if any), the turn's closing as the template writes it,
    and the rest of ``rendered``; ``rendered`` itself when the rendering does not extend
    the previous one, or the session does not hold the reply as the conversation has it
    (no ``session_ids``)."""
    base = previous.rendered_ids
    if not previous.session_ids or rendered[: len(base)] != base:
        return rendered
    tail = rendered[len(base) :]
    # The assistant's reply as rendered ends at the first end-of-turn token.
    end = next((i for i, token_id in enumerate(tail) if token_id in eos_ids), None)
    if end is None:
        return rendered
    if previous.session_ids[-1] in eos_ids:
        # The model ended its turn: the template's closing stands for its end token,
        # which may be another than the one the template closes turns with.
        return previous.session_ids[:-1] + tail[end:]
    return previous.session_ids + tail[end:]


def with_image_lengths(token_ids: list[int], counts: dict[int, int]) -> list[int]:
    """``token_ids`` with each image's run of markers as long as the image took once it
    went in (``counts``): a rendering holds one marker for an image not seen before, so
    the next turn's rendering, with them all, would not extend it."""
    resized: list[int] = []
    for token_id, run in itertools.groupby(token_ids):
        length = len(list(run))
        resized += [token_id] * (counts.get(token_id, length) if token_id < 0 else length)
    return resized


@dataclass
class ResponsePlan:
    """What a Responses request becomes before anything is decoded."""

    body: ResponsesRequest
    model_info: ModelInfo
    tools: ToolMode
    conversation: list[dict[str, Any]]
    """Chat messages so far (without instructions), the new input last."""
    rendered_ids: list[int]
    prompt_ids: list[int]
    """What the session must hold before decoding, a forced tool-call opening included."""
    constraint: Constraint | None = None
    """What the reply must be: a forced call, else the ``text.format`` asked for."""
    constraint_param: str = "input"
    """The field the constraint's refusals name."""
    reasoning: Reasoning = Reasoning()
    """How the reply reasons: its thinking becomes a reasoning item."""
    images: dict[int, ImageInput] = field(default_factory=dict)
    """Images by their marker in ``prompt_ids``."""
    all_images: list[ImageInput] = field(default_factory=list)
    """Every image of the conversation, in order (kept for chained requests)."""
    prompt_tail: int = 0
    """The prompt's last tokens that open the reply (``SessionPool.acquire``)."""
    response_id: str = field(default_factory=lambda: _new_id("resp"))
    message_id: str = field(default_factory=lambda: _new_id("msg"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def generation(self, backend: Backend) -> Generation:
        """The Generation this request runs (max_output_tokens defaults to, and is capped
        at, the context left)."""
        body = self.body
        max_tokens = reply_limit(
            self.model_info.max_context,
            len(self.prompt_ids),
            body.max_output_tokens,
            "input",
            body.min_tokens,
        )
        options = body.decode_options(
            max_tokens,
            logprob_top_k=body.top_logprobs or 0,
            constraint=self.constraint,
            extra_stops=self.tools.stop_strings(),
            reads_markers=self.tools.is_enabled,
        )
        options = dataclasses.replace(options, thinking=self.reasoning.tags)
        return Generation(
            backend.pool,
            self.prompt_ids,
            options,
            images=self.images,
            image_token_counts=backend.image_token_counts,
            prompt_tail=self.prompt_tail,
        )

    async def logprob(self, backend: Backend, token: TokenEvent) -> dict[str, Any] | None:
        """A decoded token's entry in the output text's logprobs (None: not asked for,
        or an end-of-sequence token)."""
        if not self.body.wants_logprobs or token.token_id in self.model_info.eos_token_ids:
            return None
        texts = await backend.token_texts.for_tokens([token])
        return chat_logprob_entry(token, texts, self.body.top_logprobs or 0)

    def reply_stream(self) -> ResponseStream:
        """Builds the output items of one reply (reasoning, text, function calls)."""
        parser = ReplyParser.for_request(self.tools, self.constraint, self.reasoning)
        return ResponseStream(parser, self.message_id)

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The Response object in ``status``."""
        body = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "store": body.store,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "top_logprobs": body.top_logprobs,
            "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "truncation": body.truncation or "disabled",
            "reasoning": (body.model_extra or {}).get("reasoning"),
            "usage": usage,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def usage(
        self, done: Done | None, cached_tokens: int, reasoning_tokens: int = 0
    ) -> dict[str, Any]:
        """The Responses ``usage`` object."""
        output_tokens = done.completion_tokens if done is not None else 0
        return {
            "input_tokens": len(self.prompt_ids),
            # Every prompt token not read from the cache was written to it (the session
            # that holds it is kept for the next request to continue).
            "input_tokens_details": {
                "cached_tokens": cached_tokens,
                "cache_write_tokens": len(self.prompt_ids) - cached_tokens,
            },
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": len(self.prompt_ids) + output_tokens,
        }

    def finished(
        self, stream: ResponseStream, done: Done | None, cached: int, decoded_ids: list[int]
    ) -> dict[str, Any]:
        """The finished Response, once ``stream`` has seen the whole reply (its tokens,
        ``decoded_ids``); a forced call that broke its constraint is a server error (not
        one the client's ``stop_token_ids`` cut)."""
        if done is not None:
            stop_ids, eos = self.body.stop_token_ids or [], self.model_info.eos_token_ids
            stopped_by = stop_reason(done, decoded_ids, None, stop_ids, eos)
            self.tools.check_forced(stream.calls, done.finish_reason, stopped_by is not None)
        usage = self.usage(done, cached, stream.num_reasoning_tokens)
        return self.response(stream.status, stream.items, usage)

    def store(
        self,
        backend: Backend,
        response: dict[str, Any],
        stream: ResponseStream,
        decoded_ids: list[int],
        replacing: bool = False,
    ) -> None:
        """Keeps the finished response for ``previous_response_id`` (if ``store``);
        ``replacing``: in place of the one its stream stored at its start. Its reply
        keeps its thinking, as its reasoning item sent back would (a conversation
        rendered afresh, as when the instructions change, lost it)."""
        if not self.body.store:
            return
        reply: dict[str, Any] = {"role": "assistant", "content": stream.text or None}
        if stream.calls:
            reply["tool_calls"] = [call.chat_dict() for call in stream.calls]
        if stream.reasoning:
            reply["reasoning_content"] = stream.reasoning
        # A forced call's session holds the opening the shim wrote and the arguments the
        # grammar allowed, not the call's closing (``}``, ``</tool_call>``): a chained
        # request renders the call as the template writes it, the pool still lending
        # this session for the prefix they share.
        session_ids = [] if self.tools.is_forced else self.prompt_ids + decoded_ids
        backend.responses.put(
            StoredResponse(
                response=response,
                conversation=[*self.conversation, reply],
                rendered_ids=with_image_lengths(self.rendered_ids, backend.image_token_counts),
                session_ids=session_ids,
                images=self.all_images,
            ),
            replacing,
        )

    def store_unfinished(
        self,
        backend: Backend,
        status: str,
        items: list[dict[str, Any]],
        error: dict[str, Any] | None = None,
    ) -> None:
        """Keeps a streamed response that has not finished (``in_progress``, as its
        stream starts), or never will (``failed``, ``cancelled``: in place of that one),
        to be read back by its id, not continued."""
        if self.body.store:
            stored = StoredResponse(self.response(status, items, error=error))
            backend.responses.put(stored, replacing=status != "in_progress")


async def plan_response(backend: Backend, body: ResponsesRequest) -> ResponsePlan:
    """Checks the request, finds the response it continues, renders its prompt."""
    info = await backend.check_model(body.model)
    body.check(info.vocab_size)
    new_input = response_input_messages(body.input)
    await backend.check_images(new_input.images, "input")
    mode = tool_mode(
        responses_tools(body.tools),
        body.tool_choice,
        tool_format(info.chat_template),
        body.parallel_tool_calls,
    )
    mode = dataclasses.replace(mode, marker_ids=await backend.marker_tokens(mode.grammar_markers))
    output_constraint = body.constraint()
    previous = None
    if body.previous_response_id is not None:
        previous = backend.responses.get(body.previous_response_id)
        if previous is None:
            raise ApiError(
                404,
                f"Previous response with id {body.previous_response_id!r} not found",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if not previous.can_continue:
            status = previous.response["status"]
            raise ApiError(
                400,
                f"Previous response with id {body.previous_response_id!r} is {status}: only "
                "a completed or incomplete response can be continued",
                param="previous_response_id",
                code="invalid_value",
            )
    conversation = (previous.conversation if previous else []) + new_input.messages
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    offered = mode.tools  # with tool_choice "none" too, as vLLM renders them
    render = RenderOptions(chat_template_kwargs=body.chat_template_kwargs)
    all_images = (previous.images if previous else []) + new_input.images
    prefix_ids = await backend.tokenize(mode.prefix_text(), "tool_choice")
    while True:  # with truncation "auto", until what is sent fits the context
        shorter = without_oldest(conversation) if body.truncation == "auto" else None
        # One too long to fit whatever its tokens is dropped before it is tokenized.
        num_chars = text_checks.text_length([system, conversation, offered])
        if shorter is None or not text_checks.cannot_fit(num_chars, info.max_context):
            rendered = await backend.render_chat(system + conversation, offered, "input", render)
            images = backend.mark_images(rendered, all_images, "input")  # their known lengths
            prompt_ids = list(rendered)
            if previous is not None:
                prompt_ids = continue_session(previous, rendered, set(info.eos_token_ids))
            prompt_ids = prompt_ids + prefix_ids
            if len(prompt_ids) < info.max_context or shorter is None:
                break  # it fits, or the new input alone does not: context_length_exceeded
        conversation, num_images = shorter
        all_images = all_images[num_images:]
    param, constraint = mode.reply_constraint(output_constraint) or ("input", None)
    reasoning = await backend.reasoning(
        prompt_ids, info.chat_template, mode.is_forced, constraint is not None
    )
    return ResponsePlan(
        body,
        info,
        mode,
        conversation,
        rendered,
        prompt_ids,
        constraint,
        param,
        reasoning,
        images,
        all_images,
        prompt_tail=await backend.generation_prompt_length(render) + len(prefix_ids),
    )

"""POST /v1/completions: the legacy text completion API, as evaluation harnesses use it.

``prompt`` is text or token ids (or a list of either: one batch, choice ``i * n + j``).
``echo`` returns the prompt before the completion; with ``logprobs`` the prompt's
positions are scored too (the first gets None), which is log-likelihood scoring;
``max_tokens: 0`` scores without decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from salience_client import Done, ModelInfo, TokenEvent
from salience_server.http.backend import Backend
from salience_server.http.chat import usage
from salience_server.http.choice_fields import finish_reason, stop_reason
from salience_server.http.constraints import Constraint
from salience_server.http.decode_options import DecodeOptions
from salience_server.http.errors import as_api_error, client_errors, invalid
from salience_server.http.generation import (
    ChoiceDone,
    ChoiceToken,
    Generation,
    GenerationEvent,
    GenerationResult,
    PromptToken,
    collect,
)
from salience_server.http.logprobs import TextOffsets, completion_logprobs, prompt_logprobs
from salience_server.http.request_body import parse_body
from salience_server.http.schemas import MAX_TOKEN_ID, CompletionRequest
from salience_server.http.streaming import (
    Primed,
    event_stream,
    sse_data,
    start_stream,
    until_disconnected,
)
from salience_server.http.truncation import last_tokens, reply_limit

router = APIRouter()


@dataclass
class Prompt:
    """One prompt of the batch."""

    token_ids: list[int]
    text: str
    """What ``echo`` returns: the prompt as sent, or its ids decoded."""
    is_ids: bool = False
    """Sent as token ids, which may end inside a character (their text then ends in
    U+FFFD)."""


async def _prompts(backend: Backend, body: CompletionRequest) -> list[Prompt]:
    """The batch: every prompt as token ids and text, each cut to its last
    ``truncate_prompt_tokens`` (``echo`` then returns what is left)."""
    prompts = await _whole_prompts(backend, body)
    if body.truncate_prompt_tokens is None:
        return prompts
    max_context = (await backend.model_info()).max_context
    cut = []
    for prompt in prompts:
        # A text keeps the special tokens its tokenizing added (a BOS), as vLLM's does.
        added = ([], []) if prompt.is_ids else await backend.added_special_tokens()
        ids = last_tokens(prompt.token_ids, body.truncate_prompt_tokens, max_context, added)
        if len(ids) == len(prompt.token_ids):
            cut.append(prompt)
            continue
        text = await backend.detokenize(ids, "prompt") if body.echo else ""
        cut.append(Prompt(ids, text, is_ids=True))
    return cut


def _param(index: int, num_prompts: int) -> str:
    """A prompt's name in errors: ``prompt``, or ``prompt[i]`` in a batch."""
    return "prompt" if num_prompts == 1 else f"prompt[{index}]"


async def _whole_prompts(backend: Backend, body: CompletionRequest) -> list[Prompt]:
    """The batch: every prompt as token ids and text."""
    raw = body.prompt
    items: list[Any]
    items = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else list(raw)
    prompts = []
    for index, item in enumerate(items):
        param = _param(index, len(items))
        if isinstance(item, str):
            bounded = body.truncate_prompt_tokens is None  # else cut to fit
            ids = await backend.tokenize(item, param, add_special_tokens=True, bounded=bounded)
            prompts.append(Prompt(ids, item))
            continue
        if not item or not all(0 <= i <= MAX_TOKEN_ID for i in item):
            raise invalid("token ids must be a non-empty list of non-negative integers", param)
        text = await backend.detokenize(item, param) if body.echo else ""
        prompts.append(Prompt(list(item), text, is_ids=True))
    return prompts


class _Choices:
    """Builds the legacy choice objects of one prompt's generation. Its logprobs cover
    every token, end-of-sequence tokens included (as vLLM's do): scoring harnesses slice
    them by position (lm-eval drops the last, the one decoded token)."""

    def __init__(
        self, backend: Backend, body: CompletionRequest, prompt: Prompt, info: ModelInfo
    ) -> None:
        self._backend = backend
        self._body = body
        self._eos_token_ids = info.eos_token_ids
        self.prompt = prompt
        self.prompt_tokens: list[TokenEvent] = []
        self._offsets: dict[int, TextOffsets] = {}

    async def logprobs(self, index: int, tokens: list[TokenEvent]) -> dict[str, Any] | None:
        """Legacy logprobs of ``tokens`` for choice ``index``, its text offsets running on."""
        body = self._body
        if body.logprobs is None:
            return None
        texts = await self._backend.token_texts.for_tokens(tokens)
        offsets = self._offsets.setdefault(index, TextOffsets())
        as_ids = body.return_tokens_as_token_ids
        return completion_logprobs(tokens, texts, body.logprobs, offsets, as_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self._body.prompt_logprobs is not None

    def stop_reason(self, done: Done, decoded_ids: list[int]) -> str | int | None:
        """vLLM's ``stop_reason`` of a choice (``choice_fields.stop_reason``)."""
        body, eos = self._body, self._eos_token_ids
        return stop_reason(done, decoded_ids, body.stop, body.stop_token_ids or [], eos)

    @property
    def wants_token_ids(self) -> bool:
        """vLLM's ``return_token_ids``: the prompt's and each choice's token ids."""
        return self._body.return_token_ids

    async def prompt_logprobs(self) -> list[dict[str, dict[str, Any]] | None] | None:
        """vLLM's ``prompt_logprobs`` of the prompt (None: not asked for)."""
        if self._body.prompt_logprobs is None:
            return None
        texts = await self._backend.token_texts.for_tokens(self.prompt_tokens)
        return prompt_logprobs(self.prompt_tokens, texts, self._body.prompt_logprobs)

    @property
    def echo_may_be_cut(self) -> bool:
        """Whether the echo's last character may be one the completion completes (its
        U+FFFD then left out): prompt ids whose text ends in U+FFFD."""
        return self._body.echo and self.prompt.is_ids and self.prompt.text.endswith("\ufffd")

    async def echo(self, completion_ids: list[int]) -> tuple[str, list[TokenEvent]]:
        """The echoed text and scored prompt tokens (empty without ``echo``). Prompt ids
        that end inside a character show it as U+FFFD; where the completion's first
        tokens (``completion_ids``: up to its first text) complete it, the completion's
        text holds it whole, and the echo leaves its U+FFFD out, so that the two join to
        the decoded text."""
        if not self._body.echo:
            return "", []
        text = self.prompt.text
        if self.echo_may_be_cut and completion_ids:
            ids = self.prompt.token_ids + completion_ids
            joined = await self._backend.detokenize(ids, "prompt")
            if joined[len(text) - 1 : len(text)] != "\ufffd":
                text = text[:-1]
        return text, self.prompt_tokens


def _options(
    body: CompletionRequest,
    info: ModelInfo,
    num_prompt_tokens: int,
    constraint: Constraint | None,
    param: str,
) -> DecodeOptions:
    """The prompt's decoding options (``param``: the prompt's name, in errors)."""
    max_tokens = reply_limit(
        info.max_context, num_prompt_tokens, body.max_tokens, param, body.min_tokens
    )
    wants_prompt_logprobs = body.prompt_logprobs is not None
    score_prompt = body.echo and body.logprobs is not None or wants_prompt_logprobs
    top_k = max(body.logprobs or 0, body.prompt_logprobs or 0)
    return body.decode_options(max_tokens, body.stop, top_k, score_prompt, constraint)


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    """OpenAI's (legacy) Completions."""
    backend: Backend = request.app.state.backend
    body = await parse_body(request, CompletionRequest)
    info = await backend.check_model(body.model)
    body.check(info.vocab_size)
    constraint_param, constraint = body.constraint() or ("prompt", None)
    prompts = await _prompts(backend, body)
    generations = [
        Generation(
            backend.pool,
            p.token_ids,
            _options(body, info, len(p.token_ids), constraint, _param(index, len(prompts))),
            body.n,
        )
        for index, p in enumerate(prompts)
    ]
    builders = [_Choices(backend, body, prompt, info) for prompt in prompts]
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    keepalive_s = backend.config.keepalive_s
    if body.stream:
        first = await start_stream(
            request, generations[0].events(), "prompt", keepalive_s, constraint_param
        )
        stream = _stream(body, completion_id, generations, builders, first)
        return event_stream(stream, keepalive_s)
    with client_errors("prompt", constraint_param):
        work = _collect_all(generations, backend.pool.fork_min_shared, constraint_param)
        results = await until_disconnected(request, work)
    choices = []
    for prompt_index, (builder, result) in enumerate(zip(builders, results, strict=True)):
        builder.prompt_tokens = result.prompt_tokens
        choices += await _finished_choices(builder, result, prompt_index * body.n)
    num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(r.completion_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": choices,
            "usage": usage(num_prompt_tokens, completion_tokens, cached),
            "system_fingerprint": None,
        }
    )


async def _collect_all(
    generations: list[Generation], min_shared: int, constraint_param: str
) -> list[GenerationResult]:
    """The batch's generations run side by side, until one fails: its error names its
    prompt (``prompt[i]`` in a batch). With echo scoring, a prompt whose first
    ``min_shared`` tokens an earlier one's are waits for that one to end, and is then
    scored past the scores its session keeps (multiple choice in one request: each
    continuation of one context); the others of its group then run side by side."""
    groups: dict[tuple[int, ...], list[Generation]] = {}
    for generation in generations:
        ids = generation.prompt_ids
        if generation.keeps_scores and len(ids) > min_shared:
            groups.setdefault(tuple(ids[:min_shared]), []).append(generation)
    leaders: dict[tuple[int, ...], asyncio.Event] = {}

    async def run(index: int, generation: Generation) -> GenerationResult:
        with client_errors(_param(index, len(generations)), constraint_param):
            return await run_in_group(generation)

    async def run_in_group(generation: Generation) -> GenerationResult:
        key = tuple(generation.prompt_ids[:min_shared])
        group = groups.get(key, [])
        if len(group) < 2:
            return await collect(generation)
        if generation is not group[0]:
            generation.has_siblings = len(group) > 2  # the followers start together
            await leaders[key].wait()
            return await collect(generation)
        leaders[key] = ended = asyncio.Event()
        try:
            return await collect(generation)
        finally:
            ended.set()

    failure: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:  # a failed prompt cancels the others
            tasks = [group.create_task(run(i, g)) for i, g in enumerate(generations)]
    except* Exception as failures:
        failure = failures.exceptions[0]
    if failure is not None:
        raise failure
    return [task.result() for task in tasks]


async def _finished_choices(
    builder: _Choices, result: GenerationResult, first_index: int
) -> list[dict[str, Any]]:
    choices = []
    for choice in result.choices:
        assert choice.done is not None
        echo_text, echo_tokens = await builder.echo([t.token_id for t in choice.tokens])
        tokens = echo_tokens + choice.tokens
        shaped = {
            "index": first_index + choice.index,
            "text": echo_text + choice.text,
            "logprobs": await builder.logprobs(choice.index, tokens),
            "finish_reason": finish_reason(choice.done),
            "stop_reason": builder.stop_reason(choice.done, [t.token_id for t in choice.tokens]),
        }
        if builder.wants_prompt_logprobs:
            shaped["prompt_logprobs"] = await builder.prompt_logprobs()
        if builder.wants_token_ids:
            shaped["prompt_token_ids"] = builder.prompt.token_ids
            shaped["token_ids"] = [token.token_id for token in choice.tokens]
        choices.append(shaped)
    return choices


async def _stream(
    body: CompletionRequest,
    completion_id: str,
    generations: list[Generation],
    builders: list[_Choices],
    first: Primed[GenerationEvent],
) -> AsyncIterator[str]:
    """The prompts one after another, their choices interleaved; then usage; ``[DONE]``."""
    base = {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
    }
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(choices: list[dict[str, Any]], totals: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {**base, "choices": choices}
        if include_usage:
            payload["usage"] = totals
        return sse_data(payload)

    completion_tokens = 0
    try:
        for prompt_index, (generation, builder) in enumerate(
            zip(generations, builders, strict=True)
        ):
            events = first if prompt_index == 0 else Primed(generation.events())
            started: set[int] = set()
            # A choice's first tokens, while they have no text and the echo waits to
            # know whether they complete the prompt's last character.
            waiting: dict[int, list[TokenEvent]] = {}
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, PromptToken):
                        builder.prompt_tokens.append(event.token)
                        continue
                    index, text, tokens = event.index, "", list[TokenEvent]()
                    is_first = index not in started
                    held = waiting.setdefault(index, [])
                    if is_first and builder.echo_may_be_cut and isinstance(event, ChoiceToken):
                        if not event.token.text:
                            held.append(event.token)
                            continue
                    if is_first:
                        started.add(index)
                        opening = [*held, event.token] if isinstance(event, ChoiceToken) else held
                        text, tokens = await builder.echo([t.token_id for t in opening])
                        text += "".join(t.text for t in held)
                        tokens = [*tokens, *held]
                    reason, stopped_by, decoded = None, None, [t.token_id for t in held]
                    waiting[index] = []
                    if isinstance(event, ChoiceToken):
                        text += event.token.text
                        tokens = [*tokens, event.token]
                        decoded = [*decoded, event.token.token_id]
                    elif isinstance(event, ChoiceDone):
                        completion_tokens += event.done.completion_tokens
                        reason = finish_reason(event.done)
                        stopped_by = builder.stop_reason(event.done, event.token_ids)
                    if text or tokens or reason or builder.wants_token_ids and is_first:
                        choice = {
                            "index": prompt_index * body.n + index,
                            "text": text,
                            "logprobs": await builder.logprobs(index, tokens),
                            "finish_reason": reason,
                            "stop_reason": stopped_by,
                        }
                        if builder.wants_token_ids:
                            if is_first:
                                choice["prompt_token_ids"] = builder.prompt.token_ids
                            choice["token_ids"] = decoded
                        yield chunk([choice])
        if include_usage:
            prompt_tokens = sum(len(b.prompt.token_ids) for b in builders)
            cached = sum(g.cached_tokens for g in generations)
            yield chunk([], usage(prompt_tokens, completion_tokens, cached))
    except Exception as error:
        yield sse_data({"error": as_api_error(error).error()})
    yield sse_data("[DONE]")

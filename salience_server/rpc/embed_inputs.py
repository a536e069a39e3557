"""An Embed call's inputs: their token lists, checked, and the vectors' normalisation."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

from salience_client.pb import salience_pb2 as pb
from salience_server import text_checks
from salience_server.config import EngineConfig
from salience_server.engine import tokenization
from salience_server.engine.engine import Engine
from salience_server.engine.errors import SalienceError, invalid
from salience_server.engine.validation import check_token_ids

WINDOW = 32
"""Inputs of one Embed call queued in the engine at once (the rest wait their turn), so
that one large call cannot fill the engine's queue; at most half of what the engine
takes at once (``window``)."""

_Vector = TypeVar("_Vector")
_FIRST_RETRY_PAUSE_S = 0.01
_MAX_RETRY_PAUSE_S = 0.2


def window(config: EngineConfig) -> int:
    """How many inputs of one Embed call are queued in the engine at once: ``WINDOW``,
    or half the requests an idle engine takes (``--max-running`` + ``--max-queue``)
    where that is fewer, so that one call is never refused for its own inputs (with 4
    and 4, a call of 9 inputs was, on an idle server) and leaves others room."""
    return max(1, min(WINDOW, (config.max_running + config.max_queue) // 2))


class InputWindow:
    """How one Embed call's inputs enter the engine: ``size`` at most at once. Once the
    call is admitted (one of its inputs was taken), an input the engine's queue refuses
    (QUEUE_FULL: other calls' inputs took the room) waits and tries again: until one of
    the call's own inputs ends, or a short pause where none is in the engine (concurrent
    calls failed halfway, vectors made for nothing). An input refused before any of its
    call's was taken refuses the call, before any work."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._num_in_engine = 0
        self._num_ended = 0
        self._an_input_ended = asyncio.Event()
        """Set when an input of the call ends, then replaced by a fresh one."""
        self._refusal: SalienceError | None = None
        """Why the call was refused (its first input was): no other input is tried."""

    async def run(self, embed: Callable[[], Awaitable[_Vector]]) -> _Vector:
        """``embed()``'s vector, once a slot is free and the queue takes the input.
        (A refusal comes as ``embed`` submits, before it first waits: an input counted
        in the engine when another is tried was taken.)"""
        async with self._slots:
            pause_s = _FIRST_RETRY_PAUSE_S
            while True:
                if self._refusal is not None:  # inputs not yet cancelled submit nothing
                    raise self._refusal
                ended = self._an_input_ended
                is_admitted = self._num_in_engine > 0 or self._num_ended > 0
                self._num_in_engine += 1
                is_refused = False
                try:
                    return await embed()
                except SalienceError as error:
                    is_refused = error.reason == "QUEUE_FULL"
                    if is_refused and not is_admitted:
                        self._refusal = error
                    if not (is_refused and is_admitted):
                        raise
                finally:
                    self._num_in_engine -= 1
                    if not is_refused:
                        self._num_ended += 1
                        current, self._an_input_ended = self._an_input_ended, asyncio.Event()
                        current.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), pause_s)
                pause_s = min(2 * pause_s, _MAX_RETRY_PAUSE_S)


def check_answer_size(request: pb.EmbedRequest, engine: Engine, max_bytes: int) -> None:
    """INVALID_ARGUMENT (INVALID_INPUT) for a call whose vectors could not travel in one
    answer of at most ``max_bytes``: gRPC refused it once every input was computed."""
    count = len(request.texts) + len(request.token_lists)
    width = engine.loaded.model.config.get_text_config().hidden_size
    per_vector = 4 * width + 16  # packed floats, and each message's few tags and lengths
    if count * per_vector > max_bytes:
        raise invalid(
            "INVALID_INPUT",
            f"{count} vectors of {width} floats pass the {max_bytes:,}-byte message limit; "
            f"send at most {max_bytes // per_vector} inputs per call",
        )


def token_lists(engine: Engine, request: pb.EmbedRequest) -> list[list[int]]:
    """The token lists of an Embed call (texts tokenized here); INVALID_ARGUMENT when
    it has none, both kinds, too many or an empty one."""
    if request.texts and request.token_lists:
        raise invalid("INVALID_INPUT", "give texts or token_lists, not both")
    count = len(request.texts) + len(request.token_lists)
    if count == 0:
        raise invalid("INVALID_INPUT", "nothing to embed: give texts or token_lists")
    if count > text_checks.MAX_EMBED_INPUTS:
        raise invalid(
            "INVALID_INPUT", f"{count} inputs; at most {text_checks.MAX_EMBED_INPUTS} per call"
        )
    if request.pooling not in (pb.POOLING_UNSPECIFIED, pb.POOLING_LAST, pb.POOLING_MEAN):
        raise invalid("INVALID_INPUT", f"unknown pooling {request.pooling}")
    for index, text in enumerate(request.texts):
        if text_checks.cannot_fit(len(text), engine.max_context):
            raise invalid(
                "CONTEXT_EXCEEDED",
                f"input {index} ({len(text)} characters) is more tokens than the context "
                f"limit of {engine.max_context}"
                + engine.intake.limits.context_note(engine.max_context),
            )
    tokenizer = engine.loaded.tokenizer
    inputs = [
        tokenization.encode_text(tokenizer, text, request.add_special_tokens)
        for text in request.texts
    ] + [list(tokens.token_ids) for tokens in request.token_lists]
    for index, token_ids in enumerate(inputs):
        if not token_ids:
            raise invalid("INVALID_INPUT", f"input {index} has no tokens")
        check_token_ids(token_ids, engine.vocab_size, f"input {index}")
        if len(token_ids) > engine.max_context:
            raise invalid(
                "CONTEXT_EXCEEDED",
                f"input {index} has {len(token_ids)} tokens, past the context limit of "
                f"{engine.max_context}" + engine.intake.limits.context_note(engine.max_context),
            )
    return inputs


def l2_normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in vector)) or 1.0
    return [value / norm for value in vector]

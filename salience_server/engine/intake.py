"""Taking a Generate call in: its checks against the session (nothing changes when one
fails), then its effect, committed at once. The call's tokens (and image) join the
session now; their KV is computed by the steps that feed them. Not thread-safe: the
engine calls it under its lock."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from salience_server.engine import sampler
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.constraints import ConstraintCompiler, ThinkingMatcher
from salience_server.engine.detokenizer import CONTEXT_TAIL, IncrementalDetokenizer
from salience_server.engine.errors import Code, SalienceError, invalid
from salience_server.engine.evictor import Evictor
from salience_server.engine.images import ImageStore, embeds_bytes
from salience_server.engine.model_runner import ModelRunner
from salience_server.engine.request import (
    EventSink,
    FinishReason,
    GenerateParams,
    Request,
    TokenEvent,
)
from salience_server.engine.session import Session
from salience_server.engine.session_table import SessionTable
from salience_server.engine.validation import Limits, check_generate
from salience_server.engine.vision import EncodedImage

log = logging.getLogger(__name__)

RESUME_TAIL_BYTES = 2
"""Tokens read again per byte of the longest stop string (``_resume_stop_strings``),
beyond the detokenizer's context: a token other than a skipped special one holds a byte
at least, and a skipped one may stand between."""


class Intake:
    def __init__(
        self,
        constraints: ConstraintCompiler,
        session_table: SessionTable,
        runner: ModelRunner,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: set[int],
        has_readout: bool,
        limits: Limits,
        image_token_id: int | None = None,
    ) -> None:
        self.constraints = constraints
        self.session_table = session_table
        self.block_manager: BlockManager = session_table.block_manager
        self.evictor: Evictor = session_table.evictor
        self.images: ImageStore = session_table.images
        self.runner = runner
        self.device: torch.device = runner.device
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.has_readout = has_readout
        self.limits = limits
        self.image_token_id = image_token_id
        """The vision model's image pad token: AppendImage's placeholders, never text."""
        self._request_ids = itertools.count()

    def check(self, params: GenerateParams, session: Session, image: EncodedImage | None) -> None:
        """Raises the SalienceError a call deserves; changes nothing."""
        # No session outgrows the KV pool: its context limit is at most the pool's size.
        check_generate(params, session, self.vocab_size, self.has_readout, self.limits)
        if image is not None:
            self._check_room_for(image, session, params.offset)
        elif self.image_token_id is not None and self.image_token_id in params.append_tokens:
            at = params.append_tokens.index(self.image_token_id)
            raise invalid(
                "INVALID_TOKEN",
                f"the tokens hold the image pad token {self.image_token_id} at {at}: it "
                "stands for an image's embeddings, which only AppendImage puts there (append "
                "the tokens before the image, the image, then the tokens after it)",
            )

    def _check_room_for(self, image: EncodedImage, session: Session, offset: int) -> None:
        """An image whose embeddings exceed the whole host budget is refused as too
        large (INVALID_ARGUMENT: no retry or room made elsewhere can take it); one that
        does not fit beside the other images is HOST_MEMORY_FULL. Images the call
        rewinds past are not among them (``accept`` drops them first)."""
        num_bytes, budget = embeds_bytes(image), self.evictor.host_kv_bytes
        if num_bytes > budget:
            where = f"{budget} bytes" if budget else "the server keeps none: --host-kv-memory is 0"
            raise invalid(
                "IMAGE_TOO_LARGE",
                f"the image's embeddings ({num_bytes} bytes) exceed the whole host memory "
                f"budget ({where}); send a smaller image or raise --host-kv-memory",
            )
        rewound = [span for span in session.images if span.start >= offset]
        freed = self.images.bytes_freed_by_dropping(rewound)
        if not self.evictor.can_hold_image(num_bytes - freed):
            raise SalienceError(
                Code.RESOURCE_EXHAUSTED,
                "HOST_MEMORY_FULL",
                f"the image's embeddings ({num_bytes} bytes) do not fit in the host memory "
                "budget beside the other images; raise --host-kv-memory",
            )

    def accept(
        self, params: GenerateParams, session: Session, sink: EventSink, image: EncodedImage | None
    ) -> Request:
        """Commits the call's effect on the session and makes its Request."""
        if params.offset < session.length:
            self.images.drop(session.rewind(params.offset))
            self.block_manager.truncate(session.block_table, params.offset)
        if image is not None:
            session.images.append(self.images.add(session, image))
            for session_id in self.evictor.take_discarded():  # made room for the image
                self.runner.discard_host_kv(session_id)
        session.token_ids.extend(params.append_tokens)
        session.touch()
        detokenizer = None
        prompt_end, decode_start = params.prompt_end, params.decoding_from
        # A resumed stream's stop strings read its tokens since the break's call began
        # decoding again: as many as the longest stop string may span, the rest could not
        # hold what they match.
        longest = max((len(s.encode()) for s in params.stop_strings), default=0)
        read_from = max(decode_start, prompt_end - RESUME_TAIL_BYTES * longest)
        if params.stop_strings:  # they end decoding, so the engine reads the text
            context = session.token_ids[max(0, read_from - CONTEXT_TAIL) : read_from]
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, context, params.keep_special_tokens
            )
        request = Request(
            next(self._request_ids), params, session, sink, self.eos_token_ids, detokenizer
        )
        if detokenizer is not None and read_from < prompt_end:
            tail = session.token_ids[read_from:prompt_end]
            _resume_stop_strings(request, tail, read_from - decode_start)
        if params.constraint is not None:
            request.matcher = self.constraints.matcher(params.constraint)
            if params.thinking is not None:  # the thinking is free, its answer constrained
                request.matcher = ThinkingMatcher(request.matcher, *params.thinking)
            # A resumed stream: the grammar reads every token the broken call decoded
            # (its state depends on each), and one they complete ends the call at once,
            # as a stop string they hold does (before the KV to feed again is decided:
            # an ended call decodes nothing).
            request.matcher.catch_up(session.token_ids[decode_start:prompt_end])
            if request.matcher.is_complete and request.finish_reason is None:
                request.finish_reason = FinishReason.STOP
        session.owner = request
        first_fed = request.first_fed_needing_logits()
        if first_fed is not None:
            # Distributions are not kept between calls: the positions scored (the
            # first appended one, or committed ones in a range before offset) are fed
            # again, their KV rewritten with the same values: not a recomputation, also
            # where an eviction took that KV (then only the positions before count).
            session.num_computed = min(session.num_computed, first_fed)
            session.num_ever_computed = min(session.num_ever_computed, first_fed)
        self.session_table.release_rewound_host_kv(session)
        request.num_cached = session.num_computed
        if request.next_event_position == 0 and request.wants_event(0) and session.length > 0:
            sink(TokenEvent(position=0, token_id=session.token_ids[0], is_prefill=True))
            request.next_event_position = 1
        request.generator = sampler.make_generator(params.sampling, self.device)
        if request.generator is not None:
            # A resumed stream: the broken call drew one uniform per token it decoded;
            # the seed goes on from there, as the call would have without the break.
            sampler.spend_uniforms(request.generator, prompt_end - decode_start)
        log.debug(
            "request %d on session %s: %d appended at %d, max_tokens %d",
            request.request_id,
            session.session_id,
            len(params.append_tokens),
            params.offset,
            params.max_tokens,
        )
        return request


def _resume_stop_strings(request: Request, decoded: list[int], num_before: int) -> None:
    """A resumed stream: its stop strings read the broken call's decoded tokens again,
    their text dropped (the client has what was released; ``num_before`` tokens decoded
    before them are not read: too far back to matter), so that the text held back
    for a stop string it may begin goes on; one they already hold ends the call at once
    (the broken call ended there: its Done was lost). Before ``min_tokens``, which counts
    from ``decode_start``, nothing matches, as in the broken call."""
    assert request.detokenizer is not None
    for count, token_id in enumerate(decoded, start=num_before + 1):
        may_match = count >= request.params.min_tokens
        _, matched = request.stop_matcher.push(request.detokenizer.push(token_id), may_match)
        if matched:
            request.finish_reason = FinishReason.STOP_STRING
            return

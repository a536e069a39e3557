"""Turns one row of a step's logprobs into a token event: scored, or sampled and committed."""

from __future__ import annotations

import time

import torch

from salience_server.engine import sampler
from salience_server.engine.request import FinishReason, Request, TokenEvent


def prefill_token(
    request: Request, position: int, logprobs: torch.Tensor, readout: list[float]
) -> TokenEvent:
    """The event for committed token ``position``, scored by the row that predicted it."""
    token_id = request.session.token_ids[position]
    top_k = request.params.logprob_top_k if request.wants_top_logprobs(position) else 0
    scored = sampler.score(logprobs, token_id, top_k)
    return TokenEvent(
        position, token_id, True, scored.logprob, scored.rank, scored.top_logprobs, readout=readout
    )


def decode_token(request: Request, logprobs: torch.Tensor, readout: list[float]) -> TokenEvent:
    """Samples the next token, commits it to the session, checks the stops."""
    session = request.session
    if request.prefill_done_time is None:
        request.prefill_done_time = time.monotonic()
    position = session.length
    token_id = sampler.sample(
        logprobs, request.params.sampling, request.generator, session.token_ids
    )
    session.token_ids.append(token_id)
    request.num_decoded += 1
    top_k = request.params.logprob_top_k if request.wants_top_logprobs(position) else 0
    scored = sampler.score(logprobs, token_id, top_k)
    if token_id in request.stop_token_ids:
        request.finish_reason = FinishReason.STOP
    text = ""
    if request.detokenizer is not None:
        text, matched = request.stop_matcher.push(request.detokenizer.push(token_id))
        if matched:
            request.finish_reason = FinishReason.STOP_STRING
        elif not request.wants_decode:
            text += request.stop_matcher.flush()  # the call ends: release held-back text
    return TokenEvent(
        position,
        token_id,
        False,
        scored.logprob,
        scored.rank,
        scored.top_logprobs,
        text if request.params.return_text else "",
        readout,
    )

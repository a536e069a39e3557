"""What each logits row of a step is for, and the token event it becomes: a scored
committed token, or a sampled one that is committed now."""

from __future__ import annotations

import time

from salience_server.engine import sampler
from salience_server.engine.request import FinishReason, Request, TokenEvent


def pick(request: Request, position: int) -> int | sampler.Draw:
    """What the logits row predicting ``position`` is for: scoring the committed token
    there, or drawing the next one."""
    session = request.session
    if position < session.length:
        return session.token_ids[position]
    return sampler.Draw(request.params.sampling, request.generator, session.token_ids)


def top_k(request: Request, position: int) -> int:
    """How many top logprobs the event for ``position`` carries."""
    return request.params.logprob_top_k if request.wants_top_logprobs(position) else 0


def prefill_token(
    request: Request, position: int, scored: sampler.TokenLogprob, readout: list[float]
) -> TokenEvent:
    """The event for committed token ``position``, scored by the row that predicted it."""
    token_id = request.session.token_ids[position]
    return TokenEvent(
        position, token_id, True, scored.logprob, scored.rank, scored.top_logprobs, readout=readout
    )


def decode_token(
    request: Request, token_id: int, scored: sampler.TokenLogprob, readout: list[float]
) -> TokenEvent:
    """Commits the sampled ``token_id`` to the session and checks the stops."""
    session = request.session
    if request.prefill_done_time is None:
        request.prefill_done_time = time.monotonic()
    position = session.length
    session.token_ids.append(token_id)
    request.num_decoded += 1
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

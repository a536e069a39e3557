"""What each logits row of a step is for, and the token events a fed chunk owes its
stream: scored committed tokens, and a sampled one that is committed now.

A stream's events follow its high-water mark (``Request.next_event_position``): every
position at or past it that the call asked for gets one event, in position order, and
the mark moves past it. Positions fed again (after a preemption, an offload or a drop)
lie below the mark and produce nothing.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from salience_server.engine import constraints, filters, penalties, sampler, scoring
from salience_server.engine.batch_builder import LogitsRow, ReadoutRow
from salience_server.engine.errors import device_lost
from salience_server.engine.request import FinishReason, Request, TokenEvent
from salience_server.engine.scheduler import ScheduledChunk
from salience_server.engine.uploads import Uploads, planned


@dataclass
class RowResult:
    """One row after sampling and scoring (a logits row), or reading out only."""

    token_id: int
    scored: scoring.TokenLogprob | None
    """None for a row read out only."""
    readout: list[float]
    """[n_layers * n_concepts], or empty."""


RowResults = dict[Request, dict[int, RowResult]]
"""Per request, its rows' results by fed position."""


@dataclass
class RowsPlan:
    """A step's logits rows, planned on the host before its forward pass (their
    indices and parameters travel in the step's one upload)."""

    rows: list[LogitsRow]
    readouts: list[ReadoutRow]
    """The rows read out with no logits."""
    picks: sampler.PickPlan
    verifications: dict[Request, sampler.Verification]
    top_ks: list[int]
    errors: dict[Request, Exception]
    """Requests whose rows could not be planned (a constraint's matcher failed)."""


def plan_rows(
    rows: list[LogitsRow],
    readouts: list[ReadoutRow],
    drafts: dict[Request, list[int]],
    vocab_size: int,
    uploads: Uploads,
) -> RowsPlan:
    """``drafts``: the draft tokens each speculating request fed; its rows from the
    last committed token on verify them, and only the rows of the tokens it emits (the
    accepted drafts and one more) get results."""
    targets = [row.fed_position + 1 for row in rows]  # the positions the rows predict
    verifying: dict[Request, list[int]] = {}  # a speculating request's verification rows
    picks: list[int | sampler.Draw] = []
    errors: dict[Request, Exception] = {}
    for index, (row, target) in enumerate(zip(rows, targets, strict=True)):
        request = row.request
        if request in drafts and target >= request.session.length:
            verifying.setdefault(request, []).append(index)
            picks.append(0)
            continue
        try:
            picks.append(pick(request, target, vocab_size))
        except Exception as error:
            errors[request] = error
            picks.append(0)
    try:
        picked = _plan_picks(picks, verifying, drafts, vocab_size, uploads)
    except Exception:  # find the requests that cannot be planned; plan the others
        for request in dict.fromkeys(row.request for row in rows):
            own = [i for i, row in enumerate(rows) if row.request is request]
            local = [own.index(i) for i in verifying.get(request, [])]
            alone = {request: local} if local else {}
            try:
                _plan_picks(
                    [picks[i] for i in own], alone, drafts, vocab_size, Uploads(uploads.device)
                )
            except Exception as error:
                errors[request] = error
        picks = [0 if row.request in errors else p for row, p in zip(rows, picks, strict=True)]
        verifying = {r: indices for r, indices in verifying.items() if r not in errors}
        picked = _plan_picks(picks, verifying, drafts, vocab_size, uploads)
    return RowsPlan(
        rows,
        readouts,
        picked,
        dict(zip(verifying, picked.verifications, strict=True)),
        [top_k(row.request, t) for row, t in zip(rows, targets, strict=True)],
        errors,
    )


def _plan_picks(
    picks: list[int | sampler.Draw],
    verifying: dict[Request, list[int]],
    drafts: dict[Request, list[int]],
    vocab_size: int,
    uploads: Uploads,
) -> sampler.PickPlan:
    verifications = [
        (indices, drafts[request], sampler.Draw(request.params.sampling, request.generator))
        for request, indices in verifying.items()
    ]
    return sampler.plan_picks(picks, verifications, vocab_size, uploads)


def row_results(
    plan: RowsPlan, logits: torch.Tensor, readout: torch.Tensor | None
) -> tuple[RowResults, dict[Request, Exception]]:
    """Samples and scores every logits row of a step together ([K, V] raw logits,
    [R, n_layers, n_concepts] readout): tokens, scores and readout reach the host in
    one copy, not a few per row (each one a device sync on CUDA). A failure fails only
    the requests whose rows cause it: after one, each request's rows are retried alone
    (planned again, each with its own upload)."""
    try:
        return _row_results(plan, logits, readout)
    except Exception as error:
        if device_lost(error):  # the device's context is gone: no request can go on
            raise
        results: RowResults = {}
        errors: dict[Request, Exception] = dict(plan.errors)
        by_request: dict[Request, list[int]] = {row.request: [] for row in plan.readouts}
        for row_index, row in enumerate(plan.rows):
            by_request.setdefault(row.request, []).append(row_index)
        drafts = {request: v.drafts for request, v in plan.verifications.items()}
        for request, indices in by_request.items():
            if request in errors:
                continue
            own_rows = torch.tensor(indices, dtype=torch.long, device=logits.device)
            own = [plan.rows[i] for i in indices]
            own_readouts = [row for row in plan.readouts if row.request is request]
            try:
                make = functools.partial(plan_rows, own, own_readouts, drafts, logits.shape[1])
                alone = planned(make, logits.device)
                part, part_errors = _row_results(alone, logits[own_rows], readout)
            except Exception as error:
                if device_lost(error):
                    raise
                errors[request] = error
                continue
            results.update(part)
            errors.update(part_errors)
        return results, errors


def _row_results(
    plan: RowsPlan, logits: torch.Tensor, readout: torch.Tensor | None
) -> tuple[RowResults, dict[Request, Exception]]:
    rows = plan.rows
    readout_rows = (  # [R, L * C]
        readout.flatten(1) if readout is not None else torch.empty(0, 0, device=logits.device)
    )
    results: RowResults = {}
    if not rows:  # none, or rows read out only
        if plan.readouts:
            (readout_values,) = scoring.to_host([readout_rows])
            _add_readouts(plan.readouts, readout_values, results)
        return results, dict(plan.errors)
    logprobs = scoring.log_softmax(logits)  # [K, V]
    picked = sampler.pick_tokens(logits, logprobs, plan.picks)
    on_device = scoring.score_on_device(logprobs, picked.token_ids, plan.top_ks, picked.argmax_rows)
    token_ids, valid, *scored_lists, readout_values = scoring.to_host(
        [picked.token_ids, picked.valid, *on_device, readout_rows]
    )
    errors = dict(plan.errors)
    for index, error in picked.failed_rows(valid).items():
        errors.setdefault(rows[index].request, error)
    unused: set[int] = set()  # verification rows past the first rejected draft
    for request, verification in plan.verifications.items():
        indices = verification.rows
        if request in errors:
            continue
        try:
            emitted = sampler.emitted(
                verification, [token_ids[i] for i in indices], [valid[i] for i in indices]
            )
        except Exception as error:
            if device_lost(error):
                raise
            errors[request] = error
            continue
        unused.update(indices[len(emitted) :])
    scores = scoring.scored_rows(plan.top_ks, *scored_lists)
    for index, (row, token_id, scored) in enumerate(zip(rows, token_ids, scores, strict=True)):
        if index in unused:
            continue
        if math.isnan(scored.logprob):  # a greedy pick read NaNs as the largest logit
            errors.setdefault(row.request, _nan_logits(row.fed_position + 1))
        values: list[float] = []
        if row.readout_index is not None and readout_values:
            values = readout_values[row.readout_index]
        results.setdefault(row.request, {})[row.fed_position] = RowResult(token_id, scored, values)
    _add_readouts(plan.readouts, readout_values, results)
    return results, errors


def _add_readouts(
    readouts: list[ReadoutRow], readout_values: list[list[float]], results: RowResults
) -> None:
    """The results of the rows read out only: the committed token, no score."""
    for read in readouts:
        token_id = read.request.session.token_ids[read.fed_position + 1]
        values = readout_values[read.readout_index] if readout_values else []
        results.setdefault(read.request, {})[read.fed_position] = RowResult(token_id, None, values)


def _nan_logits(position: int) -> filters.InvalidDistribution:
    """A row whose logits hold NaN (an overflow in the model's dtype, say) fails its
    request, whatever it was for: a sampled row has nothing to draw, a greedy one would
    pick a meaningless token and a scored one report a NaN logprob."""
    return filters.InvalidDistribution(
        f"the model's logits predicting position {position} are NaN (an overflow in the "
        "model's dtype?)"
    )


def pick(request: Request, position: int, vocab_size: int) -> int | sampler.Draw:
    """What the logits row predicting ``position`` is for: scoring the committed token
    there, or drawing the next one. A constraint that allows next only the stop tokens
    ``min_tokens`` holds back leaves nothing to draw: the call fails, as a constraint
    that cannot go on (greedy, it took token 0; sampled, it failed as the server's
    fault)."""
    session = request.session
    if position < session.length:
        return session.token_ids[position]
    params = request.params
    banned = [] if request.is_stoppable else sorted(request.stop_token_ids)
    # None also while a reasoning model thinks under its constraint: the plain path.
    mask = request.matcher.bitmask() if request.matcher is not None else None
    if mask is not None and banned and not constraints.allows_any_but(mask, banned, vocab_size):
        raise constraints.ConstraintFailed(
            f"it allows only stop tokens next, which min_tokens ({params.min_tokens}) holds back"
        )
    shaping = None
    if params.sampling.shapes_logits or banned or mask is not None:
        if request.penalty_state is None:
            request.penalty_state = penalties.PenaltyState()
        shaping = penalties.Shaping(
            params.sampling,
            session.token_ids,
            request.decode_start,
            banned,
            request.penalty_state,
            mask,
        )
    return sampler.Draw(params.sampling, request.generator, shaping)


def top_k(request: Request, position: int) -> int:
    """How many top logprobs the event for ``position`` carries."""
    return request.params.logprob_top_k if request.wants_top_logprobs(position) else 0


def chunk_events(
    request: Request, chunk: ScheduledChunk, rows: dict[int, RowResult]
) -> list[TokenEvent]:
    """The events owed for the targets a fed chunk predicts (positions ``start + 1 ..
    start + num_tokens``): ``rows`` maps a fed position to its row's result. A decoded
    token is committed here."""
    session = request.session
    end = chunk.start + chunk.num_tokens
    events = []
    for target in range(max(request.next_event_position, chunk.start + 1), end + 1):
        if target == session.length:  # the row fed at target - 1 drew the next token
            if target - 1 in rows:
                events.append(decode_token(request, rows[target - 1]))
                if chunk.draft_token_ids and request.wants_decode:
                    continue  # an accepted draft: the next row emits the next token
            break
        if request.wants_event(target):
            events.append(prefill_token(request, target, rows.get(target - 1)))
    if chunk.draft_token_ids:  # the step emitted 1 + accepted tokens, not all it fed
        request.next_event_position = max(request.next_event_position, session.length)
    else:
        request.next_event_position = max(request.next_event_position, end + 1)
    return events


def prefill_token(request: Request, position: int, row: RowResult | None) -> TokenEvent:
    """The event for committed token ``position``, scored by the row that predicted
    it; one read out only, or an image placeholder, carries no logprob."""
    token_id = request.session.token_ids[position]
    readout = row.readout if row is not None else []
    scored = row.scored if row is not None else None
    if scored is None or request.session.is_image_position(position):
        return TokenEvent(position, token_id, True, readout=readout)
    return TokenEvent(
        position, token_id, True, scored.logprob, scored.rank, scored.top_logprobs, readout=readout
    )


def _held_back_text(request: Request, stoppable: bool) -> str:
    """At the call's end, the text held back: the detokenizer's (a character left
    incomplete, as the full decode shows it) through the stop strings, then what they
    held. A stop string matched there ends the call as one (a stop token's end stays)."""
    assert request.detokenizer is not None
    text, matched = request.stop_matcher.push(request.detokenizer.flush(), may_match=stoppable)
    if not matched:
        return text + request.stop_matcher.flush()
    if request.finish_reason is not FinishReason.STOP:
        request.finish_reason = FinishReason.STOP_STRING
    return text


def decode_token(request: Request, row: RowResult) -> TokenEvent:
    """Commits the drawn token to the session and checks the stops."""
    session = request.session
    if request.prefill_done_time is None:
        request.prefill_done_time = time.monotonic()
    token_id = row.token_id
    position = session.length
    session.token_ids.append(token_id)
    request.num_decoded += 1
    stoppable = request.is_stoppable
    is_stop_token = stoppable and token_id in request.stop_token_ids
    if is_stop_token:
        request.finish_reason = FinishReason.STOP
    if request.matcher is not None:
        request.matcher.consume(token_id)
        if request.matcher.is_complete:  # the output is whole: decoding ends
            request.finish_reason = FinishReason.STOP
    text = ""
    hides_text = is_stop_token and not request.params.include_stop_string
    if request.detokenizer is not None and hides_text:
        # The stop token's own text is left out, as a stop string's is (and as vLLM
        # does); what was held back before it comes out.
        text = _held_back_text(request, stoppable)
    elif request.detokenizer is not None:
        delta = request.detokenizer.push(token_id)
        text, matched = request.stop_matcher.push(delta, may_match=stoppable)
        if matched:
            request.finish_reason = FinishReason.STOP_STRING
        elif not request.wants_decode:  # the call ends: release held-back text
            text += _held_back_text(request, stoppable)
    scored = row.scored
    assert scored is not None  # a decode row is a logits row
    return TokenEvent(
        position,
        token_id,
        False,
        scored.logprob,
        scored.rank,
        scored.top_logprobs,
        text if request.params.return_text else "",
        row.readout,
        is_last=not request.wants_decode,
        hides_text=hides_text,
    )

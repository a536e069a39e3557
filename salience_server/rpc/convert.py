"""Conversions between protobuf messages and the engine's dataclasses."""

from __future__ import annotations

from salience_client.pb import salience_pb2 as pb
from salience_server.engine.constraints import ConstraintSpec
from salience_server.engine.errors import invalid
from salience_server.engine.request import (
    DoneEvent,
    FinishReason,
    GenerateParams,
    SamplingParams,
    TokenEvent,
)
from salience_server.engine.session import Residency
from salience_server.engine.session_table import SessionInfo

_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CONTEXT: pb.FINISH_REASON_CONTEXT,
    FinishReason.PREFILL: pb.FINISH_REASON_PREFILL,
}

_RESIDENCIES = {
    Residency.RESIDENT: pb.RESIDENCY_RESIDENT,
    Residency.OFFLOADED: pb.RESIDENCY_OFFLOADED,
    Residency.DROPPED: pb.RESIDENCY_DROPPED,
}


def generate_params(
    request: pb.GenerateRequest, arrival_time: float | None = None
) -> GenerateParams:
    """A Generate call's parameters; ``arrival_time``: when the call came
    (``GenerateParams.arrival_time``)."""
    return GenerateParams(
        session_id=request.session_id,
        append_tokens=list(request.append_tokens),
        offset=request.offset,
        truncating=request.truncating,
        max_tokens=request.max_tokens,
        logprobs_ranges=[(r.start, r.end) for r in request.logprobs_ranges],
        logprob_top_k=request.logprob_top_k,
        readout_ranges=[(r.start, r.end) for r in request.readout_ranges],
        sampling=SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            top_k=request.top_k,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty or 1.0,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            logit_bias=dict(request.logit_bias),
            seed=request.seed if request.HasField("seed") else None,
        ),
        stop_token_ids=list(dict.fromkeys(request.stop_token_ids)),
        stop_strings=list(request.stop_strings),
        include_stop_string=request.include_stop_string,
        keep_special_tokens=request.keep_special_tokens,
        return_text=request.return_text,
        priority=request.priority,
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        decode_start=request.decode_start if request.HasField("decode_start") else None,
        thinking=_thinking(request),
        arrival_time=arrival_time,
    )


def _thinking(request: pb.GenerateRequest) -> tuple[int | None, int] | None:
    """The constraint's thinking tokens (``GenerateParams.thinking``; a start token
    without an end is refused by ``constraint_spec``)."""
    constraint = request.constraint
    if not request.HasField("constraint") or not constraint.HasField("thinking_end_token"):
        return None
    start = constraint.thinking_start_token if constraint.HasField("thinking_start_token") else None
    return start, constraint.thinking_end_token


def constraint_spec(request: pb.GenerateRequest) -> ConstraintSpec | None:
    """The request's constraint, if it has one (compiled by the engine, off the loop);
    INVALID_CONSTRAINT for one that asks for nothing (a client's mistake, which
    decoding unconstrained would hide)."""
    if not request.HasField("constraint"):
        return None
    kind = request.constraint.WhichOneof("kind")
    if kind is None:
        raise invalid(
            "INVALID_CONSTRAINT",
            "the constraint sets none of json_schema, json_object, regex, ebnf, lark "
            "(leave it unset for none)",
        )
    value = getattr(request.constraint, kind)
    if value is False:
        raise invalid("INVALID_CONSTRAINT", "json_object must be true (leave it unset for none)")
    thinking = request.constraint
    if thinking.HasField("thinking_start_token") and not thinking.HasField("thinking_end_token"):
        raise invalid(
            "INVALID_CONSTRAINT", "the constraint's thinking_start_token needs a thinking_end_token"
        )
    return ConstraintSpec(kind, value if isinstance(value, str) else "")


def token_event(event: TokenEvent) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        token=pb.Token(
            id=event.token_id,
            is_prefill=event.is_prefill,
            sampled_logprob=event.logprob,
            readout=event.readout,
            position=event.position,
            top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in event.top_logprobs],
            rank=event.rank,
            text=event.text,
        )
    )


def done_event(event: DoneEvent) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        done=pb.Done(
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            total_tokens=event.total_tokens,
            finish_reason=_FINISH_REASONS[event.finish_reason],
            cached_tokens=event.cached_tokens,
            recomputed_tokens=event.recomputed_tokens,
            drafted_tokens=event.drafted_tokens,
            accepted_tokens=event.accepted_tokens,
            stop_string=event.stop_string,
            queue_ms=event.queue_ms,
            prefill_ms=event.prefill_ms,
            decode_ms=event.decode_ms,
        )
    )


def session_info(info: SessionInfo) -> pb.SessionInfo:
    return pb.SessionInfo(
        session_id=info.session_id,
        length=info.length,
        max_context=info.max_context,
        residency=_RESIDENCIES[info.residency],
        num_blocks=info.num_blocks,
        kv_bytes=info.kv_bytes,
        idle_seconds=info.idle_seconds,
        busy=info.is_busy,
    )

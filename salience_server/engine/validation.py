"""Checks a Generate call against its session before anything changes."""

from __future__ import annotations

import math

from salience_server.engine.errors import Code, SalienceError, invalid
from salience_server.engine.request import GenerateParams, SamplingParams
from salience_server.engine.session import Session


def offset_mismatch(session: Session, offset: int, truncating: bool) -> SalienceError | None:
    """ABORTED/OFFSET_MISMATCH unless ``offset`` appends, or rewinds with ``truncating``."""
    if offset == session.length or (truncating and offset < session.length):
        return None
    why = "is past the end" if offset > session.length else "rewinds without truncating"
    return SalienceError(
        Code.ABORTED,
        "OFFSET_MISMATCH",
        f"offset {offset} {why}: the session holds {session.length} tokens",
        {"session_length": str(session.length)},
    )


def check_token_ids(token_ids: list[int], vocab_size: int, what: str) -> None:
    for token_id in token_ids:
        if token_id >= vocab_size:
            raise invalid(
                "INVALID_TOKEN",
                f"{what} holds token id {token_id}; the vocabulary has {vocab_size}",
            )


def check_sampling(sampling: SamplingParams) -> None:
    values = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "repetition_penalty": sampling.repetition_penalty,
    }
    for name, value in values.items():
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise invalid("INVALID_SAMPLING", f"{name} must be a finite value >= 0, got {value}")
    if sampling.top_p > 1:
        raise invalid("INVALID_SAMPLING", f"top_p must be in [0, 1], got {sampling.top_p}")
    if sampling.min_p > 1:
        raise invalid("INVALID_SAMPLING", f"min_p must be in [0, 1], got {sampling.min_p}")


def check_ranges(ranges: list[tuple[int, int]], offset: int, what: str) -> None:
    for start, end in ranges:
        if start < offset:
            raise invalid(
                "INVALID_RANGE",
                f"{what} [{start}, {end}) starts before offset {offset}: those positions are committed",
            )
        if end < start:
            raise invalid("INVALID_RANGE", f"{what} [{start}, {end}) ends before it starts")


def check_generate(
    params: GenerateParams, session: Session, vocab_size: int, has_readout: bool
) -> None:
    """Raises the SalienceError a bad call deserves; changes nothing."""
    mismatch = offset_mismatch(session, params.offset, params.truncating)
    if mismatch is not None:
        raise mismatch
    cut = session.image_cut_by(params.offset)
    if cut is not None:
        raise invalid(
            "TRUNCATES_IMAGE",
            f"offset {params.offset} falls inside the image at positions {cut.start}..{cut.end - 1}",
        )
    check_token_ids(params.append_tokens, vocab_size, "append_tokens")
    check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")
    check_sampling(params.sampling)
    new_length = params.offset + len(params.append_tokens)
    if new_length > session.max_context:
        raise invalid(
            "CONTEXT_EXCEEDED",
            f"{new_length} tokens exceed the session's context limit of {session.max_context}",
        )
    if params.max_tokens > 0 and new_length == 0:
        raise invalid("EMPTY_SESSION", "decoding needs at least one token in the session")
    check_ranges(params.logprobs_ranges, params.offset, "logprobs range")
    check_ranges(params.readout_ranges, params.offset, "readout range")
    if params.readout_ranges and not has_readout:
        raise SalienceError(
            Code.FAILED_PRECONDITION,
            "READOUT_DISABLED",
            "readout_ranges need a readout file: start the server with --readout FILE",
        )

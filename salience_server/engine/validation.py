"""Checks a Generate call against its session before anything changes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from salience_server.config import EngineConfig
from salience_server.engine.errors import Code, SalienceError, invalid
from salience_server.engine.request import GenerateParams, SamplingParams
from salience_server.engine.session import Session


@dataclass(frozen=True)
class Limits:
    """Per-call limits (SPEC 2.1): beyond them a call is INVALID_ARGUMENT, so that no
    request can slow its batch mates down."""

    max_logprobs: int = 20
    max_ranges: int = 64
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_context: int = 0
    """The server's context limit (0: none known here), which a session's may be below."""
    max_context_source: str = ""
    """What sets ``max_context`` (``session_table.context_limit``)."""

    @classmethod
    def from_config(cls, config: EngineConfig, max_context: int = 0, source: str = "") -> Limits:
        return cls(
            config.max_logprobs,
            config.max_ranges,
            config.max_stop_strings,
            config.max_stop_string_bytes,
            max_context,
            source,
        )

    def context_note(self, session_limit: int) -> str:
        """Why a session's context limit is what it is, for CONTEXT_EXCEEDED."""
        if session_limit < self.max_context:
            return " (the max_context it was opened with)"
        if self.max_context_source and session_limit == self.max_context:
            return f" (set by {self.max_context_source})"
        return ""


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


def check_sampling(sampling: SamplingParams, vocab_size: int) -> None:
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
    for name, value in (
        ("frequency_penalty", sampling.frequency_penalty),
        ("presence_penalty", sampling.presence_penalty),
    ):
        if not -2.0 <= value <= 2.0:  # NaN fails too
            raise invalid("INVALID_SAMPLING", f"{name} must be in [-2, 2], got {value}")
    for token_id, bias in sampling.logit_bias.items():
        if token_id >= vocab_size:
            raise invalid(
                "INVALID_TOKEN",
                f"logit_bias holds token id {token_id}; the vocabulary has {vocab_size}",
            )
        if not -100.0 <= bias <= 100.0:
            raise invalid(
                "INVALID_SAMPLING", f"logit_bias values must be in [-100, 100], got {bias}"
            )


def check_ranges(ranges: list[tuple[int, int]], what: str, limits: Limits) -> None:
    if len(ranges) > limits.max_ranges:
        raise invalid(
            "TOO_MANY_RANGES",
            f"{len(ranges)} {what}s; at most {limits.max_ranges} (--max-ranges)",
        )
    for start, end in ranges:
        if end < start:
            raise invalid("INVALID_RANGE", f"{what} [{start}, {end}) ends before it starts")


def check_limits(params: GenerateParams, limits: Limits) -> None:
    if params.logprob_top_k > limits.max_logprobs:
        raise invalid(
            "TOO_MANY_LOGPROBS",
            f"logprob_top_k {params.logprob_top_k} is above {limits.max_logprobs} (--max-logprobs)",
        )
    check_ranges(params.logprobs_ranges, "logprobs range", limits)
    check_ranges(params.readout_ranges, "readout range", limits)
    if len(params.stop_strings) > limits.max_stop_strings:
        raise invalid(
            "TOO_MANY_STOP_STRINGS",
            f"{len(params.stop_strings)} stop strings; at most {limits.max_stop_strings} "
            "(--max-stop-strings)",
        )
    for stop in params.stop_strings:
        if not stop:  # it would match before every token (vLLM refuses it too)
            raise invalid("EMPTY_STOP_STRING", "a stop string is empty")
        if len(stop.encode()) > limits.max_stop_string_bytes:
            raise invalid(
                "STOP_STRING_TOO_LONG",
                f"a stop string has {len(stop.encode())} bytes; at most "
                f"{limits.max_stop_string_bytes} (--max-stop-string-bytes)",
            )
    if params.min_tokens > params.max_tokens:  # max_tokens 0 (prefill only) included
        raise invalid(
            "INVALID_SAMPLING",
            f"min_tokens {params.min_tokens} is above max_tokens {params.max_tokens}",
        )


def check_generate(
    params: GenerateParams, session: Session, vocab_size: int, has_readout: bool, limits: Limits
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
    if params.thinking is not None:
        start, end = params.thinking
        thinking = [end] if start is None else [start, end]
        check_token_ids(thinking, vocab_size, "the constraint's thinking tokens")
    if params.decoding_from > params.prompt_end:
        raise invalid(
            "INVALID_RANGE",
            f"decode_start {params.decode_start} is past the prompt's end at {params.prompt_end}",
        )
    check_sampling(params.sampling, vocab_size)
    check_limits(params, limits)
    new_length = params.prompt_end
    if new_length > session.max_context:
        raise invalid(
            "CONTEXT_EXCEEDED",
            f"{new_length} tokens exceed the session's context limit of {session.max_context}"
            + limits.context_note(session.max_context),
        )
    if params.max_tokens > 0 and new_length == 0:
        raise invalid("EMPTY_SESSION", "decoding needs at least one token in the session")
    if params.readout_ranges and not has_readout:
        raise SalienceError(
            Code.FAILED_PRECONDITION,
            "READOUT_DISABLED",
            "readout_ranges need a readout file: start the server with --readout FILE",
        )

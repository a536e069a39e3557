"""The Generate request both sessions send, and what they read from its stream: the
request built from ``generate``'s options, the stream's ``Done`` and range sums."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import grpc

from salience_client.pb import salience_pb2 as pb
from salience_client.types import Done, SalienceClientError, TokenEvent

END = 2**32 - 1
"""A range end meaning "through the end of this call"."""

DEFAULT_MAX_TOKENS = 256


class GenerateOptions(TypedDict, total=False):
    """Keyword options of ``generate``; omitted ones take the server's defaults."""

    max_tokens: int
    """0: prefill only. Otherwise decode up to this many tokens (default 256)."""
    temperature: float
    """0 is greedy (the default)."""
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int | None
    stop_token_ids: Sequence[int]
    stop_strings: str | Sequence[str]
    """One stop string, or several."""
    include_stop_string: bool
    """The text ends just after the stop string (or stop token) that matched, not just
    before it."""
    keep_special_tokens: bool
    """Special tokens' text is written (by default they have none)."""
    return_text: bool
    """Fill ``TokenEvent.text`` for decoded tokens (default True)."""
    logprobs_ranges: Sequence[tuple[int, int]]
    """Half-open absolute position ranges whose prefill tokens are scored."""
    logprob_top_k: int
    readout_ranges: Sequence[tuple[int, int]]
    priority: int
    """Lower runs first."""
    ignore_eos: bool
    """Decode past the model's EOS tokens (stop_token_ids still stop)."""
    frequency_penalty: float
    """OpenAI's, in [-2, 2]: times each token's count among the tokens decoded in this call."""
    presence_penalty: float
    """OpenAI's, in [-2, 2]: once for each token decoded in this call."""
    logit_bias: Mapping[int, float]
    """Token id -> value in [-100, 100] added to its logit."""
    min_tokens: int
    """EOS and stop_token_ids cannot end the call before this many decoded tokens."""
    constraint: Mapping[str, str | bool | int]
    """One of ``{"json_schema": SCHEMA_JSON}``, ``{"json_object": True}``,
    ``{"regex": ...}``, ``{"ebnf": ...}`` (GBNF) or ``{"lark": ...}`` (llguidance's Lark):
    the language the decoded text must be in."""


_UINT32_OPTIONS = ("max_tokens", "top_k", "logprob_top_k", "min_tokens")
_FLOAT_OPTIONS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)


def checked_call(
    options: dict[str, Any], append_tokens: Iterable[int], truncate_to: int | None
) -> tuple[list[int], GenerateOptions]:
    """``generate``'s arguments as its request takes them: iterables (a generator too)
    read once into lists, a lone stop string as one. Raises TypeError for a keyword
    ``generate`` does not know, and ValueError naming the argument for a value its
    request field cannot carry, as ``generate`` is called (not at the first ``next()``,
    from the protobuf encoder, without the field's name)."""
    unknown = sorted(set(options) - set(GenerateOptions.__optional_keys__))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)}")
    tokens = list(append_tokens)
    for name in ("stop_token_ids", "logprobs_ranges", "readout_ranges"):
        if name in options:
            options[name] = list(options[name])
    stops = options.get("stop_strings", ())
    options["stop_strings"] = [stops] if isinstance(stops, str) else list(stops)
    if not all(isinstance(stop, str) for stop in options["stop_strings"]):
        raise ValueError(f"generate(): stop_strings takes strings, got {stops!r}")
    for name in _FLOAT_OPTIONS:
        value = options.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's too
            raise ValueError(f"generate(): {name} takes a number, got {value!r}")
    values: list[tuple[str, Any, int, int]] = [
        (name, options.get(name, 0), 0, END) for name in _UINT32_OPTIONS
    ]
    values.append(("priority", options.get("priority", 0), -(2**31), 2**31 - 1))
    if options.get("seed") is not None:
        values.append(("seed", options["seed"], 0, 2**64 - 1))
    if truncate_to is not None:
        values.append(("truncate_to", truncate_to, 0, END))
    values += [("append_tokens", token_id, 0, END) for token_id in tokens]
    values += [
        ("stop_token_ids", token_id, 0, END) for token_id in options.get("stop_token_ids", ())
    ]
    for name in ("logprobs_ranges", "readout_ranges"):
        pairs = []
        for pair in options.get(name, ()):
            try:
                start, end = pair  # a tuple, a list, a numpy row
            except (TypeError, ValueError):
                raise ValueError(
                    f"generate(): {name} takes (start, end) pairs, got {pair!r}"
                ) from None
            values += [(name, start, 0, END), (name, end, 0, END)]
            pairs.append((start, end))
        if name in options:
            options[name] = pairs
    for name, value, low, high in values:
        try:
            fits = not isinstance(value, bool) and low <= operator.index(value) <= high
        except TypeError:  # numpy integers pass operator.index
            fits = False
        if not fits:
            raise ValueError(f"generate(): {name} takes integers in [{low}, {high}], got {value!r}")
    return tokens, options  # type: ignore[return-value]


def generate_request(
    session_id: str,
    append_tokens: Sequence[int],
    offset: int,
    truncating: bool,
    options: GenerateOptions,
) -> pb.GenerateRequest:
    """The ``GenerateRequest`` for these tokens and options."""

    def ranges(key: str) -> list[pb.PositionRange]:
        return [pb.PositionRange(start=s, end=e) for s, e in options.get(key, ())]  # type: ignore[attr-defined]

    request = pb.GenerateRequest(
        session_id=session_id,
        append_tokens=list(append_tokens),
        offset=offset,
        truncating=truncating,
        max_tokens=options.get("max_tokens", DEFAULT_MAX_TOKENS),
        logprobs_ranges=ranges("logprobs_ranges"),
        logprob_top_k=options.get("logprob_top_k", 0),
        readout_ranges=ranges("readout_ranges"),
        temperature=options.get("temperature", 0.0),
        top_p=options.get("top_p", 0.0),
        top_k=options.get("top_k", 0),
        min_p=options.get("min_p", 0.0),
        repetition_penalty=options.get("repetition_penalty", 0.0),
        stop_token_ids=list(options.get("stop_token_ids", ())),
        stop_strings=list(options.get("stop_strings", ())),
        include_stop_string=options.get("include_stop_string", False),
        keep_special_tokens=options.get("keep_special_tokens", False),
        return_text=options.get("return_text", True),
        priority=options.get("priority", 0),
        ignore_eos=options.get("ignore_eos", False),
        frequency_penalty=options.get("frequency_penalty", 0.0),
        presence_penalty=options.get("presence_penalty", 0.0),
        logit_bias=dict(options.get("logit_bias", {})),
        min_tokens=options.get("min_tokens", 0),
    )
    constraint = options.get("constraint")
    if constraint:
        request.constraint.CopyFrom(pb.Constraint(**dict(constraint)))  # type: ignore[arg-type]
    seed = options.get("seed")
    if seed is not None:
        request.seed = seed
    return request


def sum_ranges(
    events: Sequence[TokenEvent | Done], ranges: Sequence[tuple[int, int]]
) -> list[float]:
    """Per range, the sum of the scored tokens' logprobs whose position lies in it."""
    logprobs = {e.position: e.logprob for e in events if isinstance(e, TokenEvent)}
    return [sum(lp for p, lp in logprobs.items() if start <= p < end) for start, end in ranges]


def no_done() -> SalienceClientError:
    """The error of a stream that ended without its Done."""
    return SalienceClientError(grpc.StatusCode.INTERNAL, "NO_DONE", "the stream ended without Done")


def last_done(events: Sequence[TokenEvent | Done]) -> Done:
    """The stream's Done (a finished stream always ends with one)."""
    if not events or not isinstance(events[-1], Done):
        raise no_done()
    return events[-1]

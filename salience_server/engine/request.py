"""One Generate call: what it asks for, where it stands, and the events it produces."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from salience_server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from salience_server.engine.errors import SalienceError
from salience_server.engine.session import Session

RANGE_END_MAX = 0xFFFFFFFF
GREEDY_BELOW = 1e-5
"""A temperature below this samples greedily (as in vLLM): dividing by it would
overflow the logits."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling controls; the zero values mean "off" as in the proto."""

    temperature: float = 0.0
    """Below ``GREEDY_BELOW`` (0 included) is greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 is no top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """transformers' (CTRL's): on the logits of tokens already in the session."""
    frequency_penalty: float = 0.0
    """OpenAI's: times each token's count among the tokens decoded in this call."""
    presence_penalty: float = 0.0
    """OpenAI's: once for each token decoded in this call."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of these token ids."""
    seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalizes(self) -> bool:
        """Whether a penalty counts the session's tokens (repetition, frequency, presence)."""
        return (
            self.repetition_penalty not in (0.0, 1.0)
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    @property
    def shapes_logits(self) -> bool:
        """Whether anything changes the logits before the draw (penalties or bias)."""
        return self.penalizes or bool(self.logit_bias)


@dataclass(frozen=True)
class GenerateParams:
    """A Generate call as the engine sees it (already converted from protobuf)."""

    session_id: str
    append_tokens: list[int] = field(default_factory=list)
    offset: int = 0
    truncating: bool = False
    max_tokens: int = 0
    logprobs_ranges: list[tuple[int, int]] = field(default_factory=list)
    logprob_top_k: int = 0
    readout_ranges: list[tuple[int, int]] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    include_stop_string: bool = False
    """The text released ends after the stop string that matched, not before it, and a
    stop token's own text is kept."""
    keep_special_tokens: bool = False
    """Special tokens' text is written (by default they have none)."""
    return_text: bool = False
    priority: int = 0
    ignore_eos: bool = False
    min_tokens: int = 0
    """EOS and stop tokens cannot end the call before this many decoded tokens."""
    constraint: Any = None
    """A constraints.CompiledConstraint the decoded tokens must follow, or None."""
    thinking: tuple[int | None, int] | None = None
    """The constraint leaves a reasoning model's thinking free: (the token that may open
    the reply's thinking, None when the reply starts inside it; the token that ends it).
    None: the constraint applies from the first decoded token."""
    pooling: str = ""
    """An Embed input: "last" or "mean" pooling of the final hidden states (nothing is
    decoded or streamed); empty for a Generate call."""
    decode_start: int | None = None
    """A resumed stream's: where the broken call began decoding (the tokens since count
    as this call's for the penalties and the stop strings); None: the prompt's end."""
    arrival_time: float | None = None
    """When the call arrived (``time.monotonic()``), where work came before the engine
    took it (a constraint's compilation): TTFT and ``queue_ms`` count from it. None:
    when the engine takes it."""

    @property
    def prompt_end(self) -> int:
        """The session's length once the append is in."""
        return self.offset + len(self.append_tokens)

    @property
    def decoding_from(self) -> int:
        """Where this call's decoded tokens begin: ``decode_start``, else the prompt's end."""
        return self.prompt_end if self.decode_start is None else self.decode_start


class FinishReason(enum.Enum):
    STOP = "stop"
    STOP_STRING = "stop_string"
    LENGTH = "length"
    CONTEXT = "context"
    PREFILL = "prefill"


@dataclass
class TokenEvent:
    position: int
    token_id: int
    is_prefill: bool
    logprob: float = 0.0
    rank: int = 0
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    text: str = ""
    readout: list[float] = field(default_factory=list)
    made_at: float = field(default_factory=time.monotonic, compare=False, repr=False)
    """When the engine made it: the end of its step (for the delivery latency metric)."""
    is_last: bool = False
    """The call's last decoded token: text held back (an incomplete character) goes with it."""
    hides_text: bool = False
    """A stop token that ended the call: its own text is left out (unless the call asked
    for ``include_stop_string``), as a stop string's is."""


@dataclass
class DoneEvent:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    finish_reason: FinishReason
    cached_tokens: int
    recomputed_tokens: int
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    embedding: list[float] | None = None
    """An Embed input's pooled vector."""
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    stop_string: str = ""
    """The stop string that ended the call, if one did."""


Event = TokenEvent | DoneEvent | SalienceError
EventSink = Callable[[Event], None]


def in_ranges(position: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in ranges)


def first_in_ranges(low: int, high: int, ranges: list[tuple[int, int]]) -> int | None:
    """The smallest position in ``low .. high - 1`` inside one of ``ranges``, if any."""
    starts = [max(start, low) for start, end in ranges if max(start, low) < min(end, high)]
    return min(starts, default=None)


class Request:
    """The state of one Generate call while the engine works on it."""

    def __init__(
        self,
        request_id: int,
        params: GenerateParams,
        session: Session,
        sink: EventSink,
        eos_token_ids: set[int],
        detokenizer: IncrementalDetokenizer | None,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.session = session
        self.sink = sink
        self.prompt_len = params.prompt_end
        self.decode_start = params.decoding_from
        """Where this call's decoded tokens begin, for the penalties and the stop strings
        (before the prompt's end where the call resumes a broken stream)."""
        eos = set() if params.ignore_eos else eos_token_ids
        self.stop_token_ids = eos | set(params.stop_token_ids)
        self.detokenizer = detokenizer
        self.stop_matcher = StopStringMatcher(params.stop_strings, params.include_stop_string)
        self.num_decoded = 0
        self.next_event_position = min(
            [params.offset] + [start for start, _ in params.logprobs_ranges + params.readout_ranges]
        )
        """The stream's high-water mark: events for positions below it were sent (or
        need none). Recomputing those positions after a preemption, an offload or a
        drop never sends them again."""
        self.num_drafted = 0
        """Speculative draft tokens verified for this call, and how many were accepted."""
        self.num_accepted = 0
        self.num_pooled = 0
        """An Embed input's positions pooled so far (fed again, they are not again)."""
        self.pooled: Any = None
        """The running sum (mean pooling) or last final hidden state, a [H] tensor."""
        self.error: SalienceError | None = None
        """Set when this request failed on its own (a bad row); the engine ends it."""
        self.num_cached = 0
        self.num_recomputed = 0
        self.finish_reason: FinishReason | None = None
        self.is_cancelled = False
        self.generator: Any = None
        """A seeded torch.Generator, or None for the global one."""
        self.matcher: Any = None
        """The constraint's matcher (constraints.Matcher), for a constrained call."""
        self.penalty_state: Any = None
        """The sampler's running token counts (penalties.PenaltyState), made on the
        first draw that needs them."""
        self.arrival_time = time.monotonic() if params.arrival_time is None else params.arrival_time
        self.first_scheduled_time: float | None = None
        self.prefill_done_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def priority(self) -> int:
        return self.params.priority

    @property
    def order_key(self) -> tuple[int, int]:
        """Lower priority value first, then arrival order."""
        return (self.params.priority, self.request_id)

    @property
    def num_tokens_to_feed(self) -> int:
        """Tokens whose KV is still missing (1 while decoding)."""
        return self.session.length - self.session.num_computed

    @property
    def may_speculate(self) -> bool:
        """Whether drafts may be verified for this call: a plain decode, whose token
        distribution does not depend on the tokens drawn before in the step (no
        penalties, bias, grammar or stop tokens held back by min_tokens: every row of
        a verification step, the first included, draws from the raw logits)."""
        return (
            not self.params.sampling.shapes_logits
            and self.params.constraint is None
            and not self.params.pooling
            and self.is_stoppable
        )

    def room_to_decode(self) -> int:
        """Tokens this call may still decode (max_tokens and the context limit)."""
        return max(
            0,
            min(
                self.params.max_tokens - self.num_decoded,
                self.session.max_context - self.session.length,
            ),
        )

    @property
    def is_stoppable(self) -> bool:
        """Whether stop tokens and stop strings may end the call yet (min_tokens, which
        counts from ``decode_start``: a resumed stream's tokens before the break too)."""
        return self.num_decoded + self.prompt_len - self.decode_start >= self.params.min_tokens

    @property
    def wants_decode(self) -> bool:
        return (
            self.finish_reason is None
            and self.num_decoded < self.params.max_tokens
            and self.session.length < self.session.max_context
        )

    def wants_event(self, position: int) -> bool:
        """Whether committed ``position`` still owes the stream a (prefill) event."""
        return position >= self.next_event_position and (
            in_ranges(position, self.params.logprobs_ranges)
            or in_ranges(position, self.params.readout_ranges)
        )

    def wants_embedding_at(self, position: int) -> bool:
        """Whether the final hidden state at fed ``position`` is pooled."""
        if not self.params.pooling or position < self.num_pooled:
            return False
        return self.params.pooling == "mean" or position == self.session.length - 1

    def needs_logits_at(self, fed_position: int) -> bool:
        """Whether the distribution computed at ``fed_position`` is used: it samples
        the next token, or scores position ``fed_position + 1``, whose event is still
        owed. Image placeholders carry no logprob; a position read out only is not
        scored either (no logits for a whole prompt read out)."""
        target = fed_position + 1
        if target == self.session.length:
            return self.wants_decode
        if target < self.next_event_position:
            return False
        return in_ranges(target, self.params.logprobs_ranges) and not (
            self.session.is_image_position(target)
        )

    def needs_readout_at(self, fed_position: int) -> bool:
        """Whether the hidden states at ``fed_position`` are read out: for the token it
        draws (or a draft it verifies), or for position ``fed_position + 1``, whose
        event is still owed."""
        target = fed_position + 1
        if target >= self.session.length:
            return self.wants_decode and self.wants_readout(target)
        return target >= self.next_event_position and self.wants_readout(target)

    def first_fed_needing_logits(self) -> int | None:
        """The lowest fed position whose logits (or readout) this request needs (the
        session's KV must be recomputed from there), or None."""
        session = self.session
        owed = first_in_ranges(
            max(self.next_event_position, 1),
            session.length,
            self.params.logprobs_ranges + self.params.readout_ranges,
        )
        candidates = [owed - 1] if owed is not None else []
        if self.wants_decode and session.length > 0:
            candidates.append(session.length - 1)
        return min(candidates, default=None)

    def wants_top_logprobs(self, position: int) -> bool:
        return self.params.logprob_top_k > 0 and in_ranges(position, self.params.logprobs_ranges)

    def wants_readout(self, position: int) -> bool:
        return in_ranges(position, self.params.readout_ranges)

    @property
    def is_finished(self) -> bool:
        """The prompt is in the KV and nothing more is to be decoded. The last decoded
        token's KV is left for the next call, which feeds it with its own tokens."""
        return self.session.num_computed >= self.prompt_len and not self.wants_decode

    def final_reason(self) -> FinishReason:
        if self.finish_reason is not None:
            return self.finish_reason
        if self.params.max_tokens == 0:
            return FinishReason.PREFILL
        if self.num_decoded >= self.params.max_tokens:
            return FinishReason.LENGTH
        return FinishReason.CONTEXT

    def done_event(self) -> DoneEvent:
        now = time.monotonic()
        started = self.first_scheduled_time or now
        prefilled = self.prefill_done_time or now
        reason = self.final_reason()
        # A stop token's end stays its own even where the text it released matched a
        # stop string (a U+FFFD the stop token's flush wrote): no stop string ended it.
        stop_string = self.stop_matcher.matched if reason is FinishReason.STOP_STRING else ""
        return DoneEvent(
            prompt_tokens=self.prompt_len,
            completion_tokens=self.num_decoded,
            total_tokens=self.session.length,
            finish_reason=reason,
            cached_tokens=self.num_cached,
            recomputed_tokens=self.num_recomputed,
            drafted_tokens=self.num_drafted,
            accepted_tokens=self.num_accepted,
            stop_string=stop_string,
            queue_ms=(started - self.arrival_time) * 1e3,
            prefill_ms=(prefilled - started) * 1e3,
            decode_ms=(now - prefilled) * 1e3,
        )

"""Surviving a lost replica (SPEC 2.7): which failures a session recovers from, within what
budget, and how a broken Generate stream resumes.

A session is sticky to the replica that holds its KV. When that replica is gone the proxy
sends the next call elsewhere, which answers NOT_FOUND: the session is re-created there
under the same id by replaying its ``History``, and the call is retried. A stream that
broke mid-way (UNAVAILABLE, or reset by the proxy) resumes: the next call asks only for
what was not received yet. The caller sees one session and one stream.

Everything here is plain logic; ``Session`` and ``AsyncSession`` do the calls.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass

import grpc

from salience_client.pb import salience_pb2 as pb
from salience_client.types import Done, SalienceClientError, TokenEvent

log = logging.getLogger("salience_client")

SESSION_ID_METADATA = "x-session-id"
"""Metadata on every session call naming the session, so that a proxy routes by it."""
REPLICA_METADATA = "salience-replica"
"""Initial metadata of every response naming the replica that answered."""

_BROKEN_WITHOUT_REASON = (
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
)
_REFUSALS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
)


@dataclass(frozen=True)
class Failover:
    """How a client's sessions survive a lost replica. ``Failover(replay=False)`` (or
    ``replay=False`` on the client) turns it off: failures then reach the caller as they
    come."""

    replay: bool = True
    """Re-create a session lost with its replica (NOT_FOUND) by replaying its tokens and
    images, and resume broken streams."""
    max_replays: int = 2
    """Replays one call may try; when they have all failed the call ends REPLAY_FAILED."""
    retry_budget_s: float = 10.0
    """How long one call keeps retrying while no replica answers (UNAVAILABLE) or the
    session is still busy with the broken call; then the last error is raised. It covers
    a proxy's health checks noticing a draining replica."""
    first_retry_wait_s: float = 0.05
    """The first retry goes at once (a proxy redispatches a refused connection by itself);
    later ones wait this long, doubling each time."""

    def __post_init__(self) -> None:
        if self.max_replays < 1 or self.retry_budget_s < 0 or self.first_retry_wait_s <= 0:
            raise ValueError("max_replays must be positive, the waits not negative")


@dataclass
class FailoverStats:
    """What the failover did, over every session of one client."""

    num_replays: int = 0
    """Sessions re-created by replaying their history."""
    num_replayed_tokens: int = 0
    """Positions those replays prefilled (image placeholders included)."""
    num_resumes: int = 0
    """Broken streams resumed."""
    is_server_reached: bool = False
    """A server answered a call of this client. Until one has, a call no server answered
    fails at once rather than retrying: nothing listens at the address (a wrong one, or
    a server not started), which no retry within the budget mends."""


SESSION_ID_PATTERN = re.compile(r"[!-~]{1,128}")
"""A session id a caller may choose: 1 to 128 visible ASCII characters (every call
carries it as ``x-session-id`` metadata, which takes no other)."""


def check_session_id(session_id: str) -> None:
    """Raises ValueError for an id no server takes (``SESSION_ID_PATTERN``)."""
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise ValueError(f"session ids are 1 to 128 visible ASCII characters, got {session_id!r}")


def new_session_id() -> str:
    """A fresh session id, chosen by the client so that a proxy can route the OpenSession
    call itself and a lost session can be re-created under the same id."""
    return uuid.uuid4().hex


def routing_metadata(routing_key: str) -> tuple[tuple[str, str], ...]:
    """The metadata every call of a session carries (ValueError for a key it cannot
    carry, rather than grpc's INTERNAL "Invalid metadata")."""
    check_session_id(routing_key)
    return ((SESSION_ID_METADATA, routing_key),)


def replica_of(metadata: object, default: str | None) -> str | None:
    """The ``salience-replica`` entry of initial metadata, or ``default``."""
    return dict(metadata or ()).get(REPLICA_METADATA, default)  # type: ignore[call-overload,no-any-return]


def is_session_lost(error: SalienceClientError) -> bool:
    """The server does not know the session (its replica is gone, or its TTL expired)."""
    return error.code == grpc.StatusCode.NOT_FOUND and error.reason == "SESSION_NOT_FOUND"


def is_behind(error: SalienceClientError, needed: int) -> bool:
    """The server holds fewer than the ``needed`` positions this client saw committed
    (OFFSET_MISMATCH naming a shorter length): a stale copy on a replica the proxy came
    back to, or a replay cut short (a refused step left the session part-built)."""
    return (
        error.reason == "OFFSET_MISMATCH"
        and error.session_length is not None
        and error.session_length < needed
    )


def is_broken(error: SalienceClientError) -> bool:
    """The call was cut off rather than answered: no replica reachable, the server
    stopping, or a stream reset by the transport or a proxy (a status the server itself
    never sends without an ErrorInfo reason)."""
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return True
    return error.code in _BROKEN_WITHOUT_REASON and is_unanswered(error)


def is_unanswered(error: SalienceClientError) -> bool:
    """No server answered the call: the transport failed it (every status a server sends
    carries an ErrorInfo reason)."""
    return error.reason == error.code.name


def is_busy(error: SalienceClientError) -> bool:
    """The session is still running another call (the broken one, winding down)."""
    return error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "SESSION_BUSY"


_REFUSED_FOR_ROOM = ("HOST_MEMORY_FULL", "QUEUE_FULL", "TOO_MANY_SESSIONS", "IMAGE_OUT_OF_MEMORY")
"""RESOURCE_EXHAUSTED reasons the server answers before accepting a call (others, such
as OUT_OF_MEMORY, come after the call's append or rewind was committed)."""


def is_refusal(error: SalienceClientError) -> bool:
    """The server refused the call before changing anything (SPEC 2.1, 2.5)."""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error.reason in _REFUSED_FOR_ROOM
    return error.code in _REFUSALS


def replay_failed(
    session_id: str, error: SalienceClientError, attempts: int
) -> SalienceClientError:
    """The clear error of a session that could not be re-created."""
    return SalienceClientError(
        error.code,
        "REPLAY_FAILED",
        f"session {session_id!r} is gone from the server (its replica lost, or its TTL "
        f"passed) and re-creating it failed {attempts} times; last error: {error}",
        error.metadata,
    )


def session_lost(session_id: str, needed: int, known: int) -> SalienceClientError:
    """The error of a lost session this client cannot replay."""
    return SalienceClientError(
        grpc.StatusCode.NOT_FOUND,
        "SESSION_LOST",
        f"session {session_id!r} is gone from the server (its replica lost, or its TTL "
        f"passed) and cannot be re-created: the call needs its first {needed} positions "
        f"and this client knows {known} (a handle on a session it did not open, or a call "
        "that ended before its Done)",
    )


class Attempts:
    """The recovery budget of one call: replays tried, and retries within a time budget."""

    def __init__(self, policy: Failover, replays_seen: int = 0) -> None:
        self.policy = policy
        self.num_replays = 0
        self.num_retries = 0
        self._deadline: float | None = None
        self.replays_seen = replays_seen
        """The session's replays when the call began, or when it last recovered: one
        more since means another call of the session re-created it meanwhile."""

    def begin_replay(self, session_id: str, error: SalienceClientError) -> None:
        """Counts a replay about to start; raises REPLAY_FAILED when none are left."""
        if self.num_replays >= self.policy.max_replays:
            raise replay_failed(session_id, error, self.num_replays)
        self.num_replays += 1

    def retry_wait_s(self, error: SalienceClientError) -> float:
        """How long to wait before retrying after ``error``: doubling waits, the last cut
        to end at the budget's end, so that a replica back before then is found (the
        client gave up as soon as a doubled wait would pass it: 6.4 s into a 10 s
        budget). Raises ``error`` once the budget is spent."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.policy.retry_budget_s
        if self.num_retries and now >= self._deadline:
            raise error.noted(
                f"still so after retrying for {self.policy.retry_budget_s:g} s"
            ) from error
        wait = (
            0.0
            if self.num_retries == 0
            else self.policy.first_retry_wait_s * 2 ** min(self.num_retries - 1, 10)
        )
        self.num_retries += 1
        return min(wait, self._deadline - now)


class StreamProgress:
    """What one Generate call has streamed so far, so that a broken stream can resume
    asking only for the rest.

    Once a token was decoded, the resuming call continues from the last one received;
    before that (only scored prompt positions arrived, or nothing) the call is made
    again and the events already delivered are dropped. Exact for greedy decoding, its
    penalties and stop strings included (``decode_start``: the server counts the tokens
    decoded before the break as the call's, and its stop strings' held-back text goes
    on); a sampled continuation is a fresh draw; a call under a ``constraint`` cannot
    resume once it decoded (its grammar state lived on the lost replica).
    """

    def __init__(self, request: pb.GenerateRequest) -> None:
        self.request = request
        """The call as the caller made it."""
        self.is_accepted = False
        """The server applied the append: an event arrived."""
        self.is_resumed = False
        """The stream continues from decoded tokens received before a break."""
        self.decoded_ids: list[int] = []
        self.next_position = 0
        """Positions below this have delivered their events."""
        self.is_replayed = False
        """The session was re-created during the call: what the server then held of the
        prompt, the replay had just put in."""
        self.is_break_counted = False
        """The current break was counted (its resuming calls may fail again and again
        while no replica answers: one break, one resume); an event starts afresh."""

    @property
    def base_length(self) -> int:
        """The session's length once the append is in."""
        return self.request.offset + len(self.request.append_tokens)

    @property
    def replay_length(self) -> int:
        """Positions a replay must restore before the next try."""
        if self.decoded_ids:
            return self.base_length + len(self.decoded_ids)
        return self.request.offset

    @property
    def is_resumable(self) -> bool:
        return not (self.decoded_ids and self.request.HasField("constraint"))

    def unresumable(self, error: SalienceClientError) -> SalienceClientError:
        """``error``, which broke a stream that cannot resume, saying why: the state of
        a constraint's grammar after the tokens decoded was the lost call's."""
        return error.noted(
            f"the stream broke after {len(self.decoded_ids)} decoded tokens, and a "
            "constrained call cannot resume where it broke: the session keeps what was "
            "received; call again to decode under the constraint anew"
        )

    def observe(self, event: TokenEvent | Done) -> bool:
        """Notes an event; False for one delivered before (a call made again)."""
        self.is_accepted = True
        self.is_break_counted = False
        if isinstance(event, Done):
            return True
        if event.position < self.next_position:
            return False
        self.next_position = event.position + 1
        if not event.is_prefill:
            self.decoded_ids.append(event.token_id)
        return True

    def committed_ids(self) -> list[int]:
        """What the call put after ``request.offset`` as far as the client saw."""
        return [*self.request.append_tokens, *self.decoded_ids] if self.is_accepted else []

    def next_request(self, eos_token_ids: Collection[int]) -> tuple[pb.GenerateRequest, str]:
        """The call that continues this one, and the finish reason to report when it
        only settles the session (nothing is left to decode); "" otherwise."""
        request = pb.GenerateRequest()
        request.CopyFrom(self.request)
        request.truncating = True  # whatever the broken call left on a live replica goes
        if not self.decoded_ids:
            return request, ""
        self.is_resumed = True
        num_decoded = len(self.decoded_ids)
        del request.append_tokens[:]
        request.offset = self.base_length + num_decoded
        request.decode_start = self.base_length  # penalties and stop strings go on
        request.max_tokens = max(0, self.request.max_tokens - num_decoded)
        # min_tokens stays the call's: the server counts it from decode_start.
        for ranges in (request.logprobs_ranges, request.readout_ranges):
            kept = [
                pb.PositionRange(start=max(r.start, request.offset), end=r.end)
                for r in ranges
                if max(r.start, request.offset) < r.end
            ]
            del ranges[:]
            ranges.extend(kept)
        finish_reason = ""
        if self._has_stopped(eos_token_ids):
            finish_reason = "stop"
        elif request.max_tokens == 0:
            finish_reason = "length"
        if finish_reason:
            request.max_tokens = 0
        return request, finish_reason

    def needs_eos_ids(self) -> bool:
        """Whether ``next_request`` must know the model's EOS ids (the last decoded token
        may have ended the call just before its Done was lost)."""
        return bool(self.decoded_ids and not self.request.ignore_eos)

    def _has_stopped(self, eos_token_ids: Collection[int]) -> bool:
        last = self.decoded_ids[-1]
        if last in self.request.stop_token_ids:
            return True
        is_min_met = len(self.decoded_ids) >= self.request.min_tokens
        return not self.request.ignore_eos and is_min_met and last in eos_token_ids

    def merged_done(self, done: Done, finish_reason: str) -> Done:
        """The Done the caller sees: the whole call's counts, whatever resumed it. After
        a replay nothing of the prompt was cached: the positions before the call's
        offset were recomputed."""
        if self.is_resumed:
            base = self.base_length
            done = dataclasses.replace(
                done,
                prompt_tokens=base,
                completion_tokens=len(self.decoded_ids),
                finish_reason=finish_reason or done.finish_reason,
                cached_tokens=min(done.cached_tokens, base),
            )
        if self.is_replayed:
            replayed = min(done.cached_tokens, self.request.offset)
            done = dataclasses.replace(
                done, cached_tokens=0, recomputed_tokens=done.recomputed_tokens + replayed
            )
        return done


def log_replay(
    session_id: str, cause: SalienceClientError, length: int, replica: str | None
) -> None:
    why = (
        f"held {cause.session_length} of them: a stale copy, or a replay cut short"
        if cause.reason == "OFFSET_MISMATCH"
        else f"{cause.reason}: its replica lost, or its TTL passed"
    )
    log.warning(
        "session %s was gone from the server (%s); replayed %d positions on replica %s",
        session_id,
        why,
        length,
        replica or "?",
    )


def log_resume(session_id: str, cause: SalienceClientError, progress: StreamProgress) -> None:
    log.warning(
        "session %s: the stream broke after %d decoded tokens (%s); resuming",
        session_id,
        len(progress.decoded_ids),
        cause.code.name,
    )

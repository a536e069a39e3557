"""Surviving a lost replica (SPEC 2.7): which failures a session recovers from, within what
budget (a broken Generate stream resumes through ``StreamProgress``).

A session is sticky to the replica that holds its KV. When that replica is gone the proxy
sends the next call elsewhere, which answers NOT_FOUND: the session is re-created there
under the same id by replaying its ``History``, and the call is retried. A stream that
broke mid-way (UNAVAILABLE, or reset by the proxy) resumes: the next call asks only for
what was not received yet. The caller sees one session and one stream.

Everything here is plain logic; ``Session`` and ``AsyncSession`` do the calls.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass

import grpc

from salience_client.stream_progress import StreamProgress
from salience_client.types import SalienceClientError

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


OUTCOME_UNKNOWN = (
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
)
"""A call that failed so may still have been carried out on the server."""


@dataclass(frozen=True)
class Recovery:
    """What to do before retrying a failed call."""

    replay_length: int | None
    """Re-create the session holding this many positions first; None: do not."""
    wait_s: float = 0.0
    """Wait this long first (no replica answered, or the session was still busy)."""


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


def stale_copy(session_id: str, metadata: object, holder: str | None) -> SalienceClientError | None:
    """The error to recover from when the replica that answered (``metadata``: the
    answer's) is not ``holder``, the one this client's copy of the session is on: the
    session moved (its replica was lost, and it was replayed elsewhere) and the proxy
    came back to a replica that still holds an old copy, which may be long enough for
    the call and yet differ. The answer is not taken: that copy is closed, the session
    replayed there, and the call made again. None where either replica is unknown."""
    replica = replica_of(metadata, None)
    if replica is None or holder in (None, replica):
        return None
    return SalienceClientError(
        grpc.StatusCode.NOT_FOUND,
        "STALE_COPY",
        f"replica {replica} answered for session {session_id!r} from an old copy of it "
        f"(the session moved to replica {holder} since)",
    )


def stale_refusal(
    session_id: str, failure: SalienceClientError, metadata: object, holder: str | None
) -> SalienceClientError:
    """``failure``, or ``stale_copy``'s error where it is an OFFSET_MISMATCH from another
    replica than ``holder``: an old copy there, whatever its length (one longer than the
    session is no copy cut short, and was the caller's error)."""
    if failure.reason != "OFFSET_MISMATCH":
        return failure
    return stale_copy(session_id, metadata, holder) or failure


def is_stale(error: SalienceClientError) -> bool:
    """A replica answered from an old copy of the session (``stale_copy``)."""
    return error.code == grpc.StatusCode.NOT_FOUND and error.reason == "STALE_COPY"


def is_copy_lost(error: SalienceClientError) -> bool:
    """The session must be re-created: the replica that answered knows it not, or only
    an old copy of it."""
    return is_session_lost(error) or is_stale(error)


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


def fork_fell_short(session_id: str, copied: int, holds: int) -> SalienceClientError | None:
    """The error to recover from when a fork copied fewer positions than the session
    holds (no replay of it under way): the server's copy is part-built, a replay cut off
    after it opened the session (its caller cancelled), or stale. None when it copied
    them all. The fork is closed, the session rebuilt from its history (as
    OFFSET_MISMATCH naming a shorter length has it) and forked again: a child taken to
    hold what was copied failed its next call past that length."""
    if copied >= holds:
        return None
    return SalienceClientError(
        grpc.StatusCode.ABORTED,
        "OFFSET_MISMATCH",
        f"a fork of session {session_id!r} copied {copied} positions; it holds {holds}",
        session_length=copied,
    )


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


def session_lost(session_id: str, needed: int, known: int, cause: str) -> SalienceClientError:
    """The error of a lost session this client cannot replay: it held positions the
    client never received (``cause``: how)."""
    return SalienceClientError(
        grpc.StatusCode.NOT_FOUND,
        "SESSION_LOST",
        f"session {session_id!r} is gone from the server (its replica lost, or its TTL "
        f"passed) and cannot be re-created: the call needs its first {needed} positions "
        f"and this client knows {known}; the session held tokens this client never "
        f"received ({cause}), which no replay can restore. A call that rewinds it to at "
        f"most {known} positions (truncate_to) re-creates it",
    )


def time_left_s(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (``time.monotonic()``), not below 0; None for none."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def replay_timed_out(
    session_id: str, error: SalienceClientError, timeout_s: float
) -> SalienceClientError:
    """The error of a call whose replay did not end within the call's timeout."""
    return error.noted(
        f"session {session_id!r} was gone from the server (its replica lost, or its TTL "
        f"passed) and re-creating it did not end within the call's timeout of {timeout_s:g} s"
    )


def replay_outwaited(
    session_id: str, error: SalienceClientError, timeout_s: float | None
) -> SalienceClientError:
    """The error of a call whose timeout ended while it waited for another call's
    re-creation of the session (``error``: what the call met)."""
    return SalienceClientError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DEADLINE_EXCEEDED.name,
        f"session {session_id!r} ({error.reason}) is being re-created by another call, "
        f"which did not end within this call's timeout of {timeout_s or 0:g} s",
    )


class Attempts:
    """The recovery budget of one call: replays tried, and retries within a time budget."""

    def __init__(
        self,
        policy: Failover,
        replays_seen: int = 0,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> None:
        self.policy = policy
        self.num_replays = 0
        self.num_retries = 0
        self._deadline: float | None = None
        self.replays_seen = replays_seen
        """The session's replays when the call began, or when it last recovered: one
        more since means another call of the session re-created it meanwhile."""
        self.priority = priority
        """The call's priority: a replay it makes runs at it (an urgent call does not
        wait for its replay behind background work)."""
        self.timeout_s = timeout_s
        """The call's timeout: a replay it makes ends within it, all its steps together
        (None: unbounded)."""
        self._replay_deadline: float | None = None

    def replay_deadline(self) -> float | None:
        """When this call's replays must be done (``time.monotonic()``), or None: its
        timeout from the first of them, shared by the tries after it (each try had a
        whole timeout of its own: two tries took twice it)."""
        if self.timeout_s is None:
            return None
        if self._replay_deadline is None:
            self._replay_deadline = time.monotonic() + self.timeout_s
        return self._replay_deadline

    def replay_done(self) -> None:
        """A recovery ended (a replay went through, or another call's did, waited for):
        a later replay of this call (its stream broke again) has the call's timeout
        anew."""
        self._replay_deadline = None

    def begin_replay(self, session_id: str, error: SalienceClientError) -> None:
        """Counts a replay about to start; raises REPLAY_FAILED when none are left."""
        if self.num_replays >= self.policy.max_replays:
            raise replay_failed(session_id, error, self.num_replays)
        self.num_replays += 1

    def retry_wait_s(self, error: SalienceClientError) -> float:
        """How long to wait before retrying after ``error``: doubling waits, the last cut
        to end at the budget's end, so that a replica back before then is found (the
        client gave up as soon as a doubled wait would pass it: 6.4 s into a 10 s
        budget). Raises ``error`` once the budget is spent, and at once with none (the
        shim beside its own server: no other replica to go to, and a retry it logged as
        resuming only failed again, "after retrying for 0 s")."""
        if self.policy.retry_budget_s == 0:
            raise error
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


def log_replay(
    session_id: str, cause: SalienceClientError, length: int, replica: str | None
) -> None:
    why = f"{cause.reason}: its replica lost, or its TTL passed"
    if cause.reason == "OFFSET_MISMATCH":
        why = f"held {cause.session_length} of them: a stale copy, or a replay cut short"
    elif is_stale(cause):
        why = "STALE_COPY: the replica held an old copy, the session having moved since"
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

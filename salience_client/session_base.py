"""``SessionBase``: what a session knows about itself, with or without asyncio: its length,
its history (for a replay), the replica that served it, and the recovery decisions that
``Session`` and ``AsyncSession`` act on (SPEC 2.7)."""

from __future__ import annotations

import weakref
from typing import Any, Self

import grpc

from salience_client.closing import client_closed, is_refusing
from salience_client.failover import (
    Attempts,
    Failover,
    FailoverStats,
    Recovery,
    check_session_id,
    is_behind,
    is_broken,
    is_busy,
    is_copy_lost,
    is_refusal,
    is_unanswered,
    log_replay,
    log_resume,
    replay_timed_out,
    replica_of,
    routing_metadata,
    session_lost,
    stale_copy,
    stale_refusal,
)
from salience_client.history import History
from salience_client.pb import salience_pb2 as pb
from salience_client.stream_progress import StreamProgress
from salience_client.types import Done, ReadoutManifest, SalienceClientError, TokenEvent

SETTLE_WAIT_S = 30.0
"""How long a session waits for a call its caller left to end on the server (it ends at
the server's next step, which a long prefill on a slow device may take seconds to reach)."""


class SessionBase:
    """A session's state and decisions; the subclasses make the calls."""

    def __init__(
        self,
        stub: Any,
        session_id: str,
        max_context: int,
        length: int = 0,
        timeout: float | None = None,
        *,
        routing_key: str = "",
        history: History | None = None,
        failover: Failover | None = None,
        stats: FailoverStats | None = None,
    ) -> None:
        """``history``: what the session holds (empty for a handle on a session opened
        elsewhere, which therefore cannot be replayed past position 0); ``routing_key``:
        the ``x-session-id`` value, the session id unless it is a fork (which travels with
        its family's root, to stay beside the KV it shares). An id no server takes is a
        ValueError here, before any call."""
        check_session_id(session_id)
        self._stub = stub
        self._timeout = timeout
        self.session_id = session_id
        self.max_context = max_context
        """Tokens this session may hold, image placeholders included."""
        self.length = length
        """The session's length as its caller has received it, following each event of a
        call as it is delivered; the next call's ``offset``."""
        self.is_closed = False
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()
        """The ``generate()`` streams not yet collected: one its caller left open (a
        ``break`` keeping a reference, an async one not yet finalized) is closed by the
        next call, which supersedes it."""
        self._num_live_streams = 0
        """Async ``generate()`` streams whose call has begun and not yet ended: one the
        event loop is still closing is no longer in ``_streams``."""
        self._abandoned = False
        """A call ended before its Done (its caller left it, or it failed midway): the
        server may hold more than ``length`` (what that call committed past what its
        caller received) and may still be running it. The next call waits for it to end
        (``_settle``), then rewinds the session to ``length``; ``sync()`` instead takes
        the server's length."""
        self.routing_key = routing_key or session_id
        """Sent as ``x-session-id`` metadata on every call of this session."""
        self.replica: str | None = None
        """The replica that answered this session's last call (``salience-replica``)."""
        self._holder: str | None = None
        """The replica that opened or last re-created it (None: unknown; the next to answer)."""
        self.num_replays = 0
        """Times this session was re-created on another replica."""
        self.num_resumes = 0
        """Broken streams of this session that resumed."""
        self._is_replay_unbilled = False
        """A replay restored this session's KV since a call last counted one (``fork``,
        ``info`` or ``sync`` may replay): the next call counts what it finds cached
        as recomputed, as a call that replays does."""
        self._history = history if history is not None else History()
        self._unknown_cause = "a handle on a session this client did not open"
        """Why the history stops short of what the session holds, when it does: the
        session holds tokens this client never received (no RPC returns a session's
        tokens), which no replay can restore."""
        self._failover = failover or Failover()
        self._stats = stats or FailoverStats()
        self._replay_lock = self._new_replay_lock()
        """Held while the session is re-created: calls that found it lost together (forks
        of one parent) replay it once, not each over the others' replay."""
        self._metadata = routing_metadata(self.routing_key)
        self._manifest: ReadoutManifest | None = None
        self._eos_token_ids: list[int] | None = None

    @property
    def history(self) -> History:
        """The tokens and images this client knows the session holds (a replay's source)."""
        return self._history

    def _set_manifest(self, info: pb.GetModelInfoResponse) -> ReadoutManifest:
        manifest = info.readout_manifest
        self._manifest = ReadoutManifest(list(manifest.layers), list(manifest.concepts))
        return self._manifest

    def _offset(self, truncate_to: int | None) -> tuple[int, bool]:
        """(offset, truncating) for the next call. After a call its caller left, a
        ``truncate_to`` past ``length`` would keep tokens the caller never received (and
        the history cannot replay): a ValueError, ``sync()`` being the way to keep them."""
        if truncate_to is None:
            return self.length, self._abandoned
        if self._abandoned and truncate_to > self.length:
            raise ValueError(
                f"truncate_to {truncate_to} is past the {self.length} positions this session "
                "holds as its caller received them (a call was left early); sync() takes "
                "the server's length"
            )
        return truncate_to, True

    def _opened(self, response: pb.OpenSessionResponse) -> None:
        """Takes OpenSession's answer; a server ignoring the client's id (an old one) is
        followed, though a proxy then cannot route by it."""
        self.max_context = response.max_context
        self._holder = self.replica
        if response.session_id and response.session_id != self.session_id:
            self.session_id = self.routing_key = response.session_id
            self._metadata = routing_metadata(self.routing_key)

    def _note_replica(self, metadata: object) -> None:
        """Takes the initial metadata of a call a server answered."""
        self.replica = replica_of(metadata, self.replica)
        self._stats.is_server_reached = True

    def _stale_answer(self, metadata: object) -> SalienceClientError | None:
        """``stale_copy`` for the answer (``metadata``) of a call reading or changing it."""
        self._holder = self._holder or replica_of(metadata, None)
        return stale_copy(self.session_id, metadata, self._holder)

    def _failure(self, error: grpc.RpcError) -> SalienceClientError:
        """A failed call as the caller sees it, noting the replica that refused it."""
        metadata = error.initial_metadata()  # type: ignore[attr-defined]
        self.replica = replica_of(metadata, self.replica)
        failure = SalienceClientError.from_rpc_error(error)
        failure = stale_refusal(self.session_id, failure, metadata, self._holder)
        self._stats.is_server_reached |= not is_unanswered(failure)
        return failure

    def _event(
        self,
        event: pb.GenerateEvent,
        manifest: ReadoutManifest | None,
        progress: StreamProgress,
        finish_reason: str,
    ) -> TokenEvent | Done | None:
        """Converts one streamed event and notes it; a Done also commits the call. None
        for an event delivered before (a call made again after a break)."""
        if event.HasField("done"):
            self._abandoned = False  # the call was applied, rewinding if it had to
            done = progress.merged_done(Done.from_pb(event.done), finish_reason)
            progress.observe(done)
            self._commit(progress)
            self.length = done.total_tokens
            self._history.truncate(done.total_tokens)
            return done
        token = TokenEvent.from_pb(event.token, manifest)
        if not progress.observe(token):
            return None
        self._received(progress, token)
        return token

    def _received(self, progress: StreamProgress, token: TokenEvent) -> None:
        """The caller receives ``token`` of a call not yet done: from here on the session
        holds what the caller has received, as after a call it left (``_abandon``), so
        that ``length`` and ``history`` are right however it leaves the stream (a
        ``break`` out of ``async for`` leaves it to the event loop to finalize, later).
        Its next call rewinds what the server committed beyond that, unless this one's
        Done comes first."""
        length = progress.base_length + len(progress.decoded_ids)
        recorded = self._history.length if progress.is_recorded else -1
        if recorded == length - 1 and not token.is_prefill:
            self._history.extend([token.token_id])  # one more decoded token: no rewrite
        elif recorded != length:  # (a scored prompt position: written with the append)
            self._commit(progress)
        self.length = length
        self._abandoned = True

    def _commit(self, progress: StreamProgress) -> None:
        """Writes what an accepted call put in the session into the history (again if
        need be: it rewrites from the call's offset)."""
        offset = progress.request.offset
        progress.is_recorded = progress.is_accepted and self._history.length >= offset
        if progress.is_recorded:
            self._history.truncate(offset)
            self._history.extend(progress.committed_ids())

    def _abandon(self, progress: StreamProgress, error: SalienceClientError | None) -> None:
        """After a call that ended without its Done: the session holds what its caller
        received (the append once any event of the call came, and every token that
        came), and the next call rewinds it there. The server may hold more (the append
        with no event received yet, tokens in flight): SPEC 2.1 commits them, but a
        caller that stopped reading at a token of its choosing continues from there, and
        a replay can restore what the history holds. Once an event came, nothing is
        changed when the session has moved on since (``sync()`` took the server's length,
        a later call ended: a stream the event loop finalized late)."""
        if progress.is_accepted:
            if not self._abandoned:
                return
            self._commit(progress)
            self._abandon_at(progress.request.offset + len(progress.committed_ids()), None)
        else:
            self._abandon_at(progress.request.offset, error)

    def _abandon_at(self, length: int, error: SalienceClientError | None) -> None:
        """A call that may have changed the session ended early: it is taken to hold
        ``length`` positions from here on. Nothing changes when the server refused it
        (but a stale length it names, OFFSET_MISMATCH's, is taken)."""
        if error is not None and is_refusal(error):
            if error.session_length is not None:
                cause = f"{error.reason} named a length this client had not seen"
                self._synced(error.session_length, cause)
            return
        self._history.truncate(min(self._history.length, length))
        self.length = length
        self._abandoned = True

    def _image_appended(
        self, offset: int, data: bytes, mime_type: str, response: pb.AppendImageResponse
    ) -> None:
        if self._history.length >= offset:
            self._history.truncate(offset)
            self._history.add_image(data, mime_type, response.placeholder_count)
        self.length = response.total_length
        self._abandoned = False

    def _child(self, child_id: str, server_length: int) -> Self:
        """A handle on a fork holding ``server_length`` positions, of this handle's class;
        the fork of a session left by a caller is rewound as it would be (``_abandoned``).
        It inherits its routing, its history, the failover."""
        length = self.length if self._abandoned else server_length
        history = self._history.copy()
        history.truncate(min(history.length, length))
        child = type(self)(
            self._stub,
            child_id,
            self.max_context,
            length,
            self._timeout,
            routing_key=self.routing_key,
            history=history,
            failover=self._failover,
            stats=self._stats,
        )
        child._abandoned = self._abandoned
        child._unknown_cause = self._unknown_cause
        child._is_replay_unbilled = self._is_replay_unbilled  # the KV it shares
        child._holder = self._holder
        return child

    def _kept(self, length: int) -> None:
        """``sync()``: the session holds ``length`` positions, as the server says."""
        known = self._history.length
        self._synced(length, f"sync() kept {length - known} positions past the {known} it knew")

    def _synced(self, length: int, cause: str) -> None:
        """The server says the session holds ``length`` positions; ``cause``: how it came
        to hold positions this client never received, should it hold more than the
        history."""
        if length > self._history.length:
            self._unknown_cause = cause
        self._abandoned = False
        self.length = length
        self._history.truncate(min(self._history.length, length))

    def _new_replay_lock(self) -> Any:
        raise NotImplementedError

    def _attempts(self, priority: int = 0, timeout: float | None = None) -> Attempts:
        """A call's recovery budget, knowing the session's replays so far; a replay it
        makes runs at its ``priority`` and within its ``timeout`` (the client's when the
        call gives none)."""
        timeout_s = self._timeout if timeout is None else timeout
        return Attempts(self._failover, self.num_replays, priority, timeout_s)

    def _forked_mid_replay(self, length: int, attempts: Attempts) -> bool:
        """Whether a fork answered with ``length`` copied this session while another call
        was re-creating it (partly replayed: fewer positions than it holds); the fork is
        then closed and made again once the replay is done."""
        return self._is_replaying(attempts) and length != self.length

    def _replay_under_way(self, error: SalienceClientError, attempts: Attempts) -> bool:
        """Whether a call failed busy or lost while another call of the session re-creates
        it (or since it did): it then waits for that replay rather than spend one of its
        own, and goes on from what it restored (a fork meeting the replay's prefill was
        refused SESSION_BUSY)."""
        return self._is_replaying(attempts) and (is_busy(error) or is_copy_lost(error))

    def _is_replaying(self, attempts: Attempts) -> bool:
        """Whether another call re-creates the session now, or did since this one began."""
        return self._replay_lock.locked() or self.num_replays != attempts.replays_seen

    def _replayed_meanwhile(self, attempts: Attempts, needed: int | None) -> bool:
        """Under the replay lock: whether another call re-created the session since this
        one began (or last recovered), with the ``needed`` positions; this one then
        retries on it."""
        replayed = self.num_replays != attempts.replays_seen
        attempts.replays_seen = self.num_replays
        return replayed and (needed is None or self.length >= needed)

    def _recovery(
        self, error: SalienceClientError, attempts: Attempts, replay_length: int | None
    ) -> Recovery:
        """What to do about a failed call before retrying it; raises the error when the
        failover is off or cannot help. ``replay_length``: the positions a re-created
        session needs for this call (None: never re-create it for this call)."""
        if is_refusing(self._stub):  # the caller closed the client: nothing broke
            raise client_closed() from error
        if not self._failover.replay or self.is_closed:
            raise error
        if is_copy_lost(error) and replay_length is not None:
            if self._history.length < replay_length:
                known = self._history.length
                lost = session_lost(self.session_id, replay_length, known, self._unknown_cause)
                raise lost from error
            attempts.begin_replay(self.session_id, error)
            return Recovery(replay_length)
        if replay_length is not None and is_behind(error, replay_length):
            if self._history.length < replay_length:
                raise error  # a handle without the history: the server's length is taken
            attempts.begin_replay(self.session_id, error)
            return Recovery(replay_length)  # rewritten from position 0: the copy may differ
        if is_unanswered(error) and not self._stats.is_server_reached:
            raise error  # no server ever answered: a wrong address, not a lost replica
        if is_broken(error) or (is_busy(error) and attempts.num_retries > 0):
            return Recovery(None, attempts.retry_wait_s(error))
        raise error

    def _resumed(self, error: SalienceClientError, progress: StreamProgress) -> None:
        """Counts a broken stream that resumes, once per break (not again for each of its
        resuming calls that fails, nor for the lost session the first one may meet)."""
        if progress.is_accepted and is_broken(error) and not progress.is_break_counted:
            progress.is_break_counted = True
            self.num_resumes += 1
            self._stats.num_resumes += 1
            log_resume(self.session_id, error, progress)

    def _takes_replay(self) -> bool:
        """Whether a replay since the last call's is this call's to count (it then is)."""
        is_unbilled, self._is_replay_unbilled = self._is_replay_unbilled, False
        return is_unbilled

    def _replay_failed(self, attempts: Attempts, error: SalienceClientError) -> None:
        """A replay failed with ``error``: counts the next try, or raises when none is
        left, or CLIENT_CLOSED when the client was closed meanwhile (its calls fail: no
        replay can succeed, and the session was not lost again), or DEADLINE_EXCEEDED
        when it ran out of the call's timeout."""
        if is_refusing(self._stub):
            raise client_closed() from error
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and attempts.timeout_s is not None:
            # The call's time is spent: another try would only end later. A step may
            # still wind down on the server: the next call waits for it, then finds the
            # copy part-built (fewer positions than ``length``) and replays it anew.
            self._abandoned = True
            raise replay_timed_out(self.session_id, error, attempts.timeout_s) from error
        attempts.begin_replay(self.session_id, error)

    def _replayed(self, cause: SalienceClientError, length: int) -> None:
        """Counts and logs a replay that restored ``length`` positions."""
        self.length = length
        self._holder = self.replica
        self.num_replays += 1
        self._is_replay_unbilled = True
        self._stats.num_replays += 1
        self._stats.num_replayed_tokens += length
        log_replay(self.session_id, cause, length, self.replica)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.session_id!r}, length={self.length})"

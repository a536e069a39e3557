"""``Session``: one server session, tracking its committed length and sending ``offset``.

It shares the request building and range arithmetic (``generation``) and
``SessionBase`` (its state and the failover decisions) with ``AsyncSession``; its calls
to the server, and their recovery, are ``SessionCalls``'.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterable, Sequence
from typing import Unpack

import grpc

from salience_client.closing import CLIENT_CLOSED
from salience_client.failover import Attempts, fork_fell_short, is_stale, time_left_s
from salience_client.failover import new_session_id as fresh_session_id
from salience_client.generation import (
    GenerateOptions,
    checked_call,
    generate_request,
    last_done,
    no_done,
    sum_ranges,
)
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_client.session_base import SETTLE_WAIT_S
from salience_client.session_calls import SessionCalls
from salience_client.stream_progress import StreamProgress
from salience_client.streams import (
    STILL_READ,
    STILL_RUNNING,
    CallCut,
    GenerateStream,
    settle_timed_out,
    settle_wait_s,
)
from salience_client.types import Done, SalienceClientError, SessionInfo, TokenEvent


class Session(SessionCalls):
    """A server session (sync). Use as a context manager to close it on exit.

    Every call carries the session's ``x-session-id``; behind a proxy with several
    replicas the session survives the loss of its replica (SPEC 2.7): a NOT_FOUND is
    answered by re-creating it from its history, a broken stream resumes (see
    ``salience_client.failover``).
    """

    _stub: salience_pb2_grpc.SalienceStub

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(
        self,
        append_tokens: Iterable[int] = (),
        *,
        truncate_to: int | None = None,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> GenerateStream:
        """Appends ``append_tokens`` and decodes; yields TokenEvents, then one Done.

        ``truncate_to`` rewinds the session to that length first. ``timeout`` (seconds)
        bounds the stream (DEADLINE_EXCEEDED; a resumed stream gets it again). A replay
        that must first re-create the session (its replica lost, its TTL passed) runs at
        the call's ``priority`` and within its ``timeout`` (the client's when None), and
        the call then gets its ``timeout`` again. The call starts at the first ``next()``.

        ``length`` and ``history`` follow the events as they are delivered: the session
        holds what the caller received (the append, once any event came, and the tokens
        that came). Leaving the iterator before Done cancels the call; the session's next
        call waits for the server to wind it down, then rewinds what the server committed
        beyond what the caller received. ``sync()`` keeps it instead.

        One call at a time: a later call on the session supersedes this stream while it
        is open; its next iteration then raises ``SUPERSEDED`` (``streams``).
        """
        tokens, checked = checked_call(dict(options), append_tokens, truncate_to)
        cut = CallCut()
        stream = GenerateStream(
            self._stream(tokens, truncate_to, checked, timeout, cut), self.session_id, cut
        )
        self._streams.add(stream)
        return stream

    def _stream(
        self,
        append_tokens: Sequence[int],
        truncate_to: int | None,
        options: GenerateOptions,
        timeout: float | None,
        cut: CallCut,
    ) -> Generator[TokenEvent | Done, None, None]:
        deadline = self._settle("generate()", timeout)
        call_timeout = timeout if timeout is None else time_left_s(deadline)  # what is left
        offset, truncating = self._offset(truncate_to)
        request = generate_request(self.session_id, append_tokens, offset, truncating, options)
        manifest = self._manifest
        if request.readout_ranges and manifest is None:
            manifest = self._set_manifest(self._model_info())
        progress = StreamProgress(request)
        progress.is_replayed = self._takes_replay()
        attempts = self._attempts(request.priority, timeout)
        finish_reason = ""
        call = None
        failure: SalienceClientError | None = None
        is_done = False
        try:
            while not is_done and not cut.is_cut:
                call = self._stub.Generate(request, timeout=call_timeout, metadata=self._metadata)
                call_timeout = timeout  # a resuming call has it again
                cut.follow(call)
                try:
                    for index, event in enumerate(call):
                        if index == 0:
                            self._note_replica(call.initial_metadata())
                            failure = self._stale_answer(call.initial_metadata())
                            if failure is not None:  # an old copy's: nothing of it is taken
                                call.cancel()
                                break
                        converted = self._event(event, manifest, progress, finish_reason)
                        if converted is not None:
                            is_done = isinstance(converted, Done)
                            yield converted
                except grpc.RpcError as rpc_error:
                    if cut.is_cut:  # closed or superseded mid-read: left
                        return
                    failure = self._failure(rpc_error)
                if failure is None and not is_done:
                    failure = no_done()
                    raise failure
                if failure is not None:
                    request, finish_reason = self._recover_stream(failure, progress, attempts)
                    failure = None
        finally:
            if not is_done:
                if call is not None:
                    call.cancel()
                self._abandon(progress, failure)

    def _recover_stream(
        self, error: SalienceClientError, progress: StreamProgress, attempts: Attempts
    ) -> tuple[pb.GenerateRequest, str]:
        """Re-creates the session or waits, as the failure asks; the call that resumes
        the stream, and the finish reason it settles on when nothing is left."""
        self._commit(progress)  # a replay restores what has streamed too
        self._recover(error, attempts, progress.replay_length)
        progress.is_replayed = self._takes_replay() or progress.is_replayed
        self._resumed(error, progress)
        eos_token_ids = self._eos_ids() if progress.needs_eos_ids() else []
        return progress.next_request(eos_token_ids)

    def _settle(self, call: str, timeout: float | None = None) -> float | None:
        """Before ``call``: closes a stream left open, which it supersedes (the session
        holds what that delivered), then, after a call its caller left, waits while the
        server still runs that one (the call then rewinds the session to ``length``).
        It waits within the call's ``timeout`` (the client's when None), DEADLINE_EXCEEDED
        after, and returns when that ends (``time.monotonic()``; None for none)."""
        timeout_s = self._timeout if timeout is None else timeout
        deadline = self._supersede(call, timeout_s)
        if self._abandoned:
            try:
                info = self._idle_info(settle_wait_s(deadline, SETTLE_WAIT_S), recovers=False)
            except SalienceClientError:
                return deadline  # the call itself will say
            if info.is_busy and time_left_s(deadline) == 0:
                raise settle_timed_out(self.session_id, call, timeout_s, STILL_RUNNING)
        return deadline

    def _supersede(self, call: str, timeout_s: float | None) -> float | None:
        """Closes the streams ``call`` supersedes, waiting ``timeout_s`` at most (None: no
        bound) for one that another thread reads (DEADLINE_EXCEEDED after); the call's
        deadline (``time.monotonic()``), None for none."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for stream in list(self._streams):  # the running one is this call's own
            if not stream.supersede(call, time_left_s(deadline)):
                raise settle_timed_out(self.session_id, call, timeout_s, STILL_READ)
        return deadline

    def sync(self, wait_s: float = SETTLE_WAIT_S) -> SessionInfo:
        """Takes the server's length as this session's, waiting up to ``wait_s`` while it
        is busy. After a call its caller left, it keeps what that call committed beyond
        what the caller received (the next call would otherwise rewind it).

        Those tokens are unknown to this client (no RPC returns a session's tokens), and
        its ``history`` stops before them: should the session be lost (its replica gone,
        its TTL passed), it cannot be re-created, and a call that needs them fails
        SESSION_LOST saying so. A call that rewinds the session to within its history
        (``truncate_to`` at most ``history.length``) still re-creates it.

        A stream of the session still open is superseded first, as by any later call."""
        self._supersede("sync()", self._timeout)
        info = self._idle_info(wait_s)
        self._kept(info.length)
        return info

    def _idle_info(self, wait_s: float, recovers: bool = True) -> SessionInfo:
        """The server's view of this session once it is not busy, or after ``wait_s``.
        Without ``recovers``, each look is one call, neither replaying nor retrying (a
        call that settles first would spend its retry budget twice)."""
        deadline = time.monotonic() + wait_s
        pause = 0.01
        info = self._looked_up(recovers)
        while info.is_busy and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(2 * pause, 0.2)
            info = self._looked_up(recovers)
        return info

    def _looked_up(self, recovers: bool) -> SessionInfo:
        if recovers:
            return self.info()
        request = pb.GetSessionRequest(session_id=self.session_id)
        return SessionInfo.from_pb((self._unary(self._stub.GetSession, request)).session)

    def prefill(
        self, tokens: Sequence[int], *, priority: int = 0, timeout: float | None = None
    ) -> Done:
        """Appends ``tokens`` without decoding (``priority``, ``timeout``: as
        ``generate``'s)."""
        events = self.generate(
            tokens, max_tokens=0, return_text=False, priority=priority, timeout=timeout
        )
        return last_done(list(events))

    def rewind(self, offset: int, *, priority: int = 0, timeout: float | None = None) -> Done:
        """Truncates the session (and its KV) to ``offset`` tokens (``priority``,
        ``timeout``: as ``generate``'s)."""
        events = self.generate(
            (), truncate_to=offset, max_tokens=0, priority=priority, timeout=timeout
        )
        return last_done(list(events))

    def score(
        self,
        tokens: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        *,
        priority: int = 0,
        timeout: float | None = None,
    ) -> list[float]:
        """Appends ``tokens``; returns, per absolute position range, the summed logprob of
        the tokens in it (each under the model, given every token before it).
        ``priority``, ``timeout``: as ``generate``'s."""
        events = self.generate(
            tokens,
            max_tokens=0,
            logprobs_ranges=ranges,
            return_text=False,
            priority=priority,
            timeout=timeout,
        )
        return sum_ranges(list(events), ranges)

    def fork(self, new_session_id: str = "") -> Session:
        """A new session sharing this one's committed tokens (copy-on-write KV). It routes
        with this session's ``x-session-id``, so it stays on the replica holding the KV."""
        self._settle("fork()")
        child_id = new_session_id or fresh_session_id()
        request = pb.ForkSessionRequest(session_id=self.session_id, new_session_id=child_id)
        attempts = self._attempts()
        closed_partial = False  # a fork made mid-replay, closed: its id is no success
        while True:
            try:
                response = self._unary(self._stub.ForkSession, request, checks_copy=True)
                made = response.session_id or child_id
                short = None
                if not self._forked_mid_replay(response.length, attempts):
                    short = fork_fell_short(self.session_id, response.length, self.length)
                    if short is None:
                        return self._child(made, response.length)
                with contextlib.suppress(SalienceClientError):
                    self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=made))
                closed_partial = True
                if short is None:
                    with self._replay_lock:  # until the replay is done
                        attempts.replays_seen = self.num_replays
                    continue
                failure = short
            except SalienceClientError as error:
                if is_stale(error):  # a fork of an old copy: it goes too
                    with contextlib.suppress(SalienceClientError):
                        close = pb.CloseSessionRequest(session_id=child_id)
                        self._unary(self._stub.CloseSession, close)
                    closed_partial = True
                is_taken = error.code == grpc.StatusCode.ALREADY_EXISTS
                if is_taken and attempts.num_retries and not closed_partial:
                    return self._child(child_id, self.length)  # an earlier try went through
                failure = error
            self._recover(failure, attempts, self.length)

    def append_image(
        self, data: bytes, mime_type: str, truncate_to: int | None = None, *, priority: int = 0
    ) -> int:
        """Appends one image; returns how many placeholder tokens it became (``priority``:
        as ``generate``'s)."""
        self._settle("append_image()")
        offset, truncating = self._offset(truncate_to)
        request = pb.AppendImageRequest(
            session_id=self.session_id,
            image=data,
            mime_type=mime_type,
            offset=offset,
            truncating=truncating,
            priority=priority,
        )
        attempts = self._attempts(priority)
        while True:
            try:
                response = self._unary(self._stub.AppendImage, request, checks_copy=True)
                break
            except SalienceClientError as error:
                failure = error
            except BaseException:  # cancelled or interrupted: the image may have gone in
                self._abandon_at(offset, None)
                raise
            try:
                self._recover(failure, attempts, offset)
            except SalienceClientError:
                self._abandon_at(offset, failure)
                raise
            request.truncating = True  # whatever a broken try left goes
        self._image_appended(offset, data, mime_type, response)
        return response.placeholder_count

    def info(self) -> SessionInfo:
        """The server's view of this session."""
        request = pb.GetSessionRequest(session_id=self.session_id)
        return SessionInfo.from_pb(self._call(self._stub.GetSession, request, self.length).session)

    def close(self) -> None:
        """Frees the session on the server; closing twice, or an expired one, is fine. A
        stream of the session still open is superseded, without waiting for a read under
        way in another thread (its call is cancelled)."""
        if self.is_closed:
            return
        self.is_closed = True
        for stream in list(self._streams):
            stream.supersede("close()", 0)
        request = pb.CloseSessionRequest(session_id=self.session_id)
        try:
            self._unary(self._stub.CloseSession, request)
        except SalienceClientError as error:
            # Gone already, or its client closed (the server's TTL frees it then).
            if error.code != grpc.StatusCode.NOT_FOUND and error.reason != CLIENT_CLOSED:
                raise

    def _open(self) -> None:
        """Creates this session on the server under its id (retrying while no replica
        answers)."""
        request = pb.OpenSessionRequest(session_id=self.session_id, max_context=self.max_context)
        attempts = self._attempts()
        while True:
            try:
                self._opened(self._unary(self._stub.OpenSession, request))
                return
            except SalienceClientError as error:
                if error.code == grpc.StatusCode.ALREADY_EXISTS and attempts.num_retries:
                    self.max_context = self._read_info().max_context  # an earlier try went through
                    return
                failure = error
            self._recover(failure, attempts, None)

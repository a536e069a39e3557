"""``AsyncSession``: one server session over ``grpc.aio``; ``Session`` method for method,
with every call awaited and ``generate`` an async iterator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Unpack

import grpc

from salience_client.aio_session_calls import AsyncSessionCalls
from salience_client.closing import CLIENT_CLOSED, closed_client_calls
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
from salience_client.stream_progress import StreamProgress
from salience_client.streams import (
    STILL_RUNNING,
    AsyncGenerateStream,
    settle_timed_out,
    settle_wait_s,
)
from salience_client.types import Done, SalienceClientError, SessionInfo, TokenEvent
from salience_client.unary import close_in_background

FINALIZE_WAIT_S = 5.0
"""How long a call waits for the event loop to close a stream its caller dropped."""


class AsyncSession(AsyncSessionCalls):
    """A server session (asyncio). Use ``async with`` to close it on exit. It survives
    the loss of its replica as ``Session`` does (SPEC 2.7)."""

    _stub: salience_pb2_grpc.SalienceStub

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def generate(
        self,
        append_tokens: Iterable[int] = (),
        *,
        truncate_to: int | None = None,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncGenerateStream:
        """Appends ``append_tokens`` and decodes; yields TokenEvents, then one Done.

        As ``Session.generate`` (``truncate_to``, ``timeout``, a replay first; ``length``
        and ``history`` following the events as they are delivered, so they are right
        as soon as a ``break`` leaves ``async for``, though the event loop finalizes the
        stream later). Closing the iterator (or cancelling its task) before Done cancels
        the call at once; the session's next call waits for the server to wind it down,
        then rewinds what the server committed beyond what the caller received.
        ``sync()`` keeps it instead. A later call supersedes the stream as it does
        ``Session.generate``'s.
        """
        tokens, checked = checked_call(dict(options), append_tokens, truncate_to)
        events = self._stream(tokens, truncate_to, checked, timeout)
        stream = AsyncGenerateStream(events, self.session_id)
        self._streams.add(stream)
        return stream

    async def _stream(
        self,
        append_tokens: Sequence[int],
        truncate_to: int | None,
        options: GenerateOptions,
        timeout: float | None,
    ) -> AsyncGenerator[TokenEvent | Done, None]:
        deadline = await self._settle("generate()", timeout)
        call_timeout = timeout if timeout is None else time_left_s(deadline)  # what is left
        offset, truncating = self._offset(truncate_to)
        request = generate_request(self.session_id, append_tokens, offset, truncating, options)
        progress = StreamProgress(request)
        progress.is_replayed = self._takes_replay()
        attempts = self._attempts(request.priority, timeout)
        finish_reason = ""
        call = None
        failure: SalienceClientError | None = None
        is_done = False
        self._num_live_streams += 1
        self._no_live_streams.clear()
        try:
            manifest = self._manifest
            if request.readout_ranges and manifest is None:
                manifest = self._set_manifest(await self._model_info())
            while not is_done:
                call = self._stub.Generate(request, timeout=call_timeout, metadata=self._metadata)
                call_timeout = timeout  # a resuming call has it again
                try:
                    is_first = True
                    with closed_client_calls(self._stub):
                        async for event in call:
                            if is_first:
                                metadata = await call.initial_metadata()
                                self._note_replica(metadata)
                                is_first = False
                                failure = self._stale_answer(metadata)
                                if failure is not None:  # an old copy's: nothing is taken
                                    call.cancel()
                                    break
                            converted = self._event(event, manifest, progress, finish_reason)
                            if converted is not None:
                                is_done = isinstance(converted, Done)
                                yield converted
                except grpc.RpcError as rpc_error:
                    failure = self._failure(rpc_error)
                if failure is None and not is_done:
                    failure = no_done()
                    raise failure
                if failure is not None:
                    request, finish_reason = await self._recover_stream(failure, progress, attempts)
                    failure = None
        finally:
            self._num_live_streams -= 1
            if not self._num_live_streams:
                self._no_live_streams.set()
            if not is_done:
                if call is not None:
                    call.cancel()
                self._abandon(progress, failure)

    async def _recover_stream(
        self, error: SalienceClientError, progress: StreamProgress, attempts: Attempts
    ) -> tuple[pb.GenerateRequest, str]:
        """As ``Session._recover_stream``."""
        self._commit(progress)
        await self._recover(error, attempts, progress.replay_length)
        progress.is_replayed = self._takes_replay() or progress.is_replayed
        self._resumed(error, progress)
        eos_token_ids = await self._eos_ids() if progress.needs_eos_ids() else []
        return progress.next_request(eos_token_ids)

    async def _settle(self, call: str, timeout: float | None = None) -> float | None:
        """As ``Session._settle`` (``break`` does not close an async generator: the event
        loop finalizes it later)."""
        timeout_s = self._timeout if timeout is None else timeout
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        await self._supersede(call)
        # A stream no one refers to any more (a ``break`` out of ``async for`` over
        # ``generate()`` itself) left the weak set, and the event loop closes it in a
        # task of its own: the next call, made at once, found the server still busy.
        # (So does a stream another task still reads, which is left to end.)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settle_wait_s(deadline, FINALIZE_WAIT_S)):
                await self._no_live_streams.wait()
        if self._abandoned:
            try:
                wait_s = settle_wait_s(deadline, SETTLE_WAIT_S)
                info = await self._idle_info(wait_s, recovers=False)
            except SalienceClientError:
                return deadline  # the call itself will say
            if info.is_busy and time_left_s(deadline) == 0:
                raise settle_timed_out(self.session_id, call, timeout_s, STILL_RUNNING)
        return deadline

    async def _supersede(self, call: str) -> None:
        for stream in list(self._streams):  # the running one is this call's own
            await stream.supersede(call)

    async def sync(self, wait_s: float = SETTLE_WAIT_S) -> SessionInfo:
        """As ``Session.sync`` (the session then cannot be re-created past its
        ``history``, as the tokens kept are unknown to this client)."""
        await self._supersede("sync()")
        info = await self._idle_info(wait_s)
        self._kept(info.length)
        return info

    async def _idle_info(self, wait_s: float, recovers: bool = True) -> SessionInfo:
        """The server's view of this session once it is not busy, or after ``wait_s``.
        Without ``recovers``, each look is one call, neither replaying nor retrying (a
        call that settles first would spend its retry budget twice)."""
        deadline = time.monotonic() + wait_s
        pause = 0.01
        info = await self._looked_up(recovers)
        while info.is_busy and time.monotonic() < deadline:
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.2)
            info = await self._looked_up(recovers)
        return info

    async def _looked_up(self, recovers: bool) -> SessionInfo:
        if recovers:
            return await self.info()
        request = pb.GetSessionRequest(session_id=self.session_id)
        return SessionInfo.from_pb((await self._unary(self._stub.GetSession, request)).session)

    async def _collect(self, events: AsyncIterator[TokenEvent | Done]) -> list[TokenEvent | Done]:
        return [event async for event in events]

    async def prefill(
        self, tokens: Sequence[int], *, priority: int = 0, timeout: float | None = None
    ) -> Done:
        """As ``Session.prefill``."""
        events = self.generate(
            tokens, max_tokens=0, return_text=False, priority=priority, timeout=timeout
        )
        return last_done(await self._collect(events))

    async def rewind(self, offset: int, *, priority: int = 0, timeout: float | None = None) -> Done:
        """As ``Session.rewind``."""
        events = self.generate(
            (), truncate_to=offset, max_tokens=0, priority=priority, timeout=timeout
        )
        return last_done(await self._collect(events))

    async def score(
        self,
        tokens: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        *,
        priority: int = 0,
        timeout: float | None = None,
    ) -> list[float]:
        """As ``Session.score``."""
        events = self.generate(
            tokens,
            max_tokens=0,
            logprobs_ranges=ranges,
            return_text=False,
            priority=priority,
            timeout=timeout,
        )
        return sum_ranges(await self._collect(events), ranges)

    async def fork(self, new_session_id: str = "") -> AsyncSession:
        """A new session sharing this one's committed tokens (copy-on-write KV). It routes
        with this session's ``x-session-id``, so it stays on the replica holding the KV."""
        child_id = new_session_id or fresh_session_id()
        try:
            return await self._fork(child_id)
        except asyncio.CancelledError:
            if not new_session_id:  # the server may have made it, and only we know its id
                self.close_in_background(child_id)
            raise

    async def _fork(self, child_id: str) -> AsyncSession:
        await self._settle("fork()")
        request = pb.ForkSessionRequest(session_id=self.session_id, new_session_id=child_id)
        attempts = self._attempts()
        closed_partial = False  # a fork made mid-replay, closed: its id is no success
        while True:
            try:
                response = await self._unary(self._stub.ForkSession, request, checks_copy=True)
                made = response.session_id or child_id
                short = None
                if not self._forked_mid_replay(response.length, attempts):
                    short = fork_fell_short(self.session_id, response.length, self.length)
                    if short is None:
                        return self._child(made, response.length)
                with contextlib.suppress(SalienceClientError):
                    close = pb.CloseSessionRequest(session_id=made)
                    await self._unary(self._stub.CloseSession, close)
                closed_partial = True
                if short is None:
                    async with self._replay_lock:  # until the replay is done
                        attempts.replays_seen = self.num_replays
                    continue
                failure = short
            except SalienceClientError as error:
                if is_stale(error):  # a fork of an old copy: it goes too
                    with contextlib.suppress(SalienceClientError):
                        close = pb.CloseSessionRequest(session_id=child_id)
                        await self._unary(self._stub.CloseSession, close)
                    closed_partial = True
                is_taken = error.code == grpc.StatusCode.ALREADY_EXISTS
                if is_taken and attempts.num_retries and not closed_partial:
                    return self._child(child_id, self.length)  # an earlier try went through
                failure = error
            await self._recover(failure, attempts, self.length)

    def close_in_background(self, session_id: str) -> None:
        """Closes ``session_id`` (this session or one of its family: it routes with this
        session's key) in a task of its own, ignoring failures: a call that was to make
        it was cancelled after the server may have made it."""
        close_in_background(self._stub, session_id, self._metadata, self._timeout)

    async def append_image(
        self, data: bytes, mime_type: str, truncate_to: int | None = None, *, priority: int = 0
    ) -> int:
        """Appends one image; returns how many placeholder tokens it became (``priority``:
        as ``generate``'s)."""
        await self._settle("append_image()")
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
                response = await self._unary(self._stub.AppendImage, request, checks_copy=True)
                break
            except SalienceClientError as error:
                failure = error
            except BaseException:  # cancelled or interrupted: the image may have gone in
                self._abandon_at(offset, None)
                raise
            try:
                await self._recover(failure, attempts, offset)
            except SalienceClientError:
                self._abandon_at(offset, failure)
                raise
            request.truncating = True  # whatever a broken try left goes
        self._image_appended(offset, data, mime_type, response)
        return int(response.placeholder_count)

    async def info(self) -> SessionInfo:
        """The server's view of this session."""
        request = pb.GetSessionRequest(session_id=self.session_id)
        response = await self._call(self._stub.GetSession, request, self.length)
        return SessionInfo.from_pb(response.session)

    async def close(self) -> None:
        """Frees the session on the server; closing twice, or an expired one, is fine. As
        ``Session.close``, it supersedes a stream of the session left open (one another
        task reads ends with the server's answer to the close)."""
        if self.is_closed:
            return
        self.is_closed = True
        await self._supersede("close()")
        request = pb.CloseSessionRequest(session_id=self.session_id)
        try:
            await self._unary(self._stub.CloseSession, request)
        except SalienceClientError as error:
            # Gone already, or its client closed (the server's TTL frees it then).
            if error.code != grpc.StatusCode.NOT_FOUND and error.reason != CLIENT_CLOSED:
                raise

    async def _open(self) -> None:
        """Creates this session on the server under its id (retrying while no replica
        answers)."""
        request = pb.OpenSessionRequest(session_id=self.session_id, max_context=self.max_context)
        attempts = self._attempts()
        while True:
            try:
                self._opened(await self._unary(self._stub.OpenSession, request))
                return
            except SalienceClientError as error:
                if error.code == grpc.StatusCode.ALREADY_EXISTS and attempts.num_retries:
                    info = await self._unary(
                        self._stub.GetSession, pb.GetSessionRequest(session_id=self.session_id)
                    )
                    self.max_context = info.session.max_context  # an earlier try went through
                    return
                failure = error
            await self._recover(failure, attempts, None)

"""The streams ``generate()`` returns: ``GenerateStream`` (``Session``) and
``AsyncGenerateStream`` (``AsyncSession``), iterators over one Generate call's events.

A session runs one call at a time. A later call on it supersedes a stream still open
and paused between events (its caller left it with a ``break`` that kept a reference, or
another task or thread is still reading it): it closes the stream, cancelling its call,
and the session holds what the stream delivered. Closing is quiet; but should the
stream be read again, its next iteration raises ``SUPERSEDED`` (a consumer in another
task or thread would otherwise see its loop end as if the call had, with no Done).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import AsyncGenerator, Generator
from typing import Any

import grpc

from salience_client.types import Done, SalienceClientError, TokenEvent

SUPERSEDED = "SUPERSEDED"

Event = TokenEvent | Done


def settle_wait_s(deadline: float | None, most_s: float) -> float:
    """How long a call may wait before it starts for what came before it to end: at most
    ``most_s``, and no later than its ``deadline`` (``time.monotonic()``; None: none)."""
    return most_s if deadline is None else max(0.0, min(most_s, deadline - time.monotonic()))


STILL_READ = "another thread still reads the stream it supersedes (re-creating the session)"
STILL_RUNNING = "the server still runs the call its caller left before it"


def settle_timed_out(
    session_id: str, call: str, timeout_s: float | None, cause: str
) -> SalienceClientError:
    """The error of a call whose timeout ended before it could start, for ``cause``
    (``STILL_READ``, ``STILL_RUNNING``)."""
    return SalienceClientError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DEADLINE_EXCEEDED.name,
        f"{call} on session {session_id!r} did not start within its timeout of "
        f"{timeout_s or 0:g} s: {cause}",
    )


def superseded(session_id: str, call: str) -> SalienceClientError:
    """The error of a stream that a later call on its session closed before its Done."""
    return SalienceClientError(
        grpc.StatusCode.CANCELLED,
        SUPERSEDED,
        f"this stream of session {session_id!r} was closed before its Done by a later call "
        f"on the session ({call}), which superseded it: a session runs one call at a time. "
        "The session holds what this stream delivered",
    )


class CallCut:
    """A stream's gRPC call in flight, which ``cut`` cancels from outside the thread
    reading it (``close()`` from another thread or a signal handler, a later call on the
    session): the stream then ends as one its caller left (``Session._stream``)."""

    def __init__(self) -> None:
        self.call: Any = None
        self.is_cut = False

    def cut(self) -> None:
        self.is_cut = True
        call = self.call
        if call is not None:
            call.cancel()

    def follow(self, call: Any) -> None:
        """``call`` is now the stream's (cancelled at once if the stream was cut)."""
        self.call = call
        if self.is_cut:
            call.cancel()


class GenerateStream(Generator[Event, None, None]):
    """``Session.generate``'s events: TokenEvents, then one Done. ``close()`` leaves the
    call (cancelling it at once if it has not ended, even mid-read)."""

    def __init__(self, events: Generator[Event, None, None], session_id: str, cut: CallCut) -> None:
        self._events = events
        self._session_id = session_id
        self._cut = cut
        self._lock = threading.RLock()
        """Held while an event is read, so that a later call on the session, in another
        thread, never closes the stream mid-read (re-entrant: a signal handler in the
        reading thread may close it)."""
        self._superseded_by = ""
        """The later call that closed or cut this stream, until its next iteration says so."""
        self._is_done = False
        """Its Done was delivered: nothing is left to supersede."""

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> Event:
        with self._lock:
            if not self._superseded_by:
                try:
                    event = next(self._events)
                except StopIteration:
                    if not self._superseded_by:  # else cut mid-read by a later call
                        raise
                else:
                    self._is_done = isinstance(event, Done)
                    return event
            call, self._superseded_by = self._superseded_by, ""
            raise superseded(self._session_id, call)

    def send(self, value: None) -> Event:
        """As a generator's: ``send(None)`` is ``next()`` (a stream takes no values)."""
        if value is not None:
            raise TypeError("a GenerateStream takes no values: send None")
        return self.__next__()

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Event:
        """As a generator's: raises the exception where the stream is paused, which leaves
        its call (cancelled, as ``close()``), and it propagates."""
        with self._lock:
            if val is None and tb is None:
                return self._events.throw(typ)
            return self._events.throw(typ, val, tb)

    def close(self) -> None:
        """Leaves the stream: cancels its call if it has not ended. Never waits: a read
        under way (another thread's, or this thread's from a signal handler) has its call
        cancelled, and ends the stream."""
        if self._lock.acquire(blocking=False):
            try:
                if inspect.getgeneratorstate(self._events) != inspect.GEN_RUNNING:
                    self._superseded_by = ""
                    self._events.close()
                    return
            finally:
                self._lock.release()
        self._cut.cut()

    def supersede(self, call: str, wait_s: float | None = None) -> bool:
        """Closes the stream for a later ``call`` on its session if it is open. One paused
        between events is closed; one being read in another thread has its call cut, and
        the later call waits for that read to end, so that the session holds what the
        stream delivered before it goes on (it went on, and the stream's late Done then
        overwrote its length). The read ends promptly, its call cancelled, unless it is
        re-creating the session; False when it has not ended within ``wait_s`` (None:
        no bound; 0: the later call does not wait, as ``close()``)."""
        if self._lock.acquire(blocking=False):
            try:
                if inspect.getgeneratorstate(self._events) == inspect.GEN_SUSPENDED:
                    self._superseded_by = "" if self._is_done else call
                    self._events.close()
                return True  # GEN_RUNNING here: this thread reads it (a signal handler)
            finally:
                self._lock.release()
        if not self._is_done:
            self._superseded_by = call
        self._cut.cut()
        if not self._lock.acquire(timeout=-1 if wait_s is None else wait_s):
            return False
        self._lock.release()
        return True


class AsyncGenerateStream(AsyncGenerator[Event, None]):
    """``AsyncSession.generate``'s events: TokenEvents, then one Done. ``aclose()``
    leaves the call (cancelling it if it has not ended)."""

    def __init__(self, events: AsyncGenerator[Event, None], session_id: str) -> None:
        self._events = events
        self._session_id = session_id
        self._is_started = False
        self._is_reading = False
        """An ``__anext__`` awaits an event (in this task or another)."""
        self._is_ended = False
        """Its call ended, or it was closed."""
        self._is_done = False
        """Its Done was delivered: nothing is left to supersede."""
        self._superseded_by = ""
        """The later call that closed this stream, until its next iteration says so."""

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> Event:
        if self._superseded_by:
            call, self._superseded_by = self._superseded_by, ""
            raise superseded(self._session_id, call)
        self._is_started = self._is_reading = True
        try:
            event = await self._events.__anext__()
        except BaseException:  # its end, or its failure: either ends an async generator
            self._is_ended = True
            raise
        finally:
            self._is_reading = False
        self._is_done = isinstance(event, Done)
        return event

    async def asend(self, value: None) -> Event:
        """As an async generator's: ``asend(None)`` is ``anext()``."""
        if value is not None:
            raise TypeError("an AsyncGenerateStream takes no values: send None")
        return await self.__anext__()

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None) -> Event:
        """As an async generator's: raises the exception where the stream is paused, which
        leaves its call (cancelled, as ``aclose()``), and it propagates."""
        self._is_ended = True
        if val is None and tb is None:
            return await self._events.athrow(typ)
        return await self._events.athrow(typ, val, tb)

    async def aclose(self) -> None:
        """Leaves the stream: cancels its call at once if it has not ended."""
        self._superseded_by = ""
        self._is_ended = True
        await self._events.aclose()

    async def supersede(self, call: str) -> None:
        """As ``GenerateStream.supersede``: a stream another task is reading is left to
        end."""
        if self._is_started and not (self._is_ended or self._is_reading):
            self._is_ended = True
            self._superseded_by = "" if self._is_done else call
            await self._events.aclose()

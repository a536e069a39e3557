"""Maps engine errors onto gRPC statuses with a google.rpc.ErrorInfo reason."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from salience_server.engine.errors import Code, SalienceError

try:  # gRPC core's error for a write to a call that has ended (not public API)
    from grpc._cython.cygrpc import ExecuteBatchError as _CallEnded
except ImportError:  # another gRPC: such a write fails as before, logged as unexpected
    _CallEnded = ()  # type: ignore[assignment,misc]

ERROR_DOMAIN = "salience.v1"
SESSION_LENGTH_METADATA = "salience-session-length"
# The message travels twice in the trailers (grpc-message, percent-encoded, and inside
# grpc-status-details-bin), which gRPC caps at 8 KiB by default: a message quoting a
# long input would replace the answer with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 1024


def to_status(error: SalienceError) -> grpc.Status:
    """A rich status: code, message, and ErrorInfo(reason, metadata) in the details."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.value),
        message=_bounded(error.message),
        details=[detail],
    )
    return rpc_status.to_status(status)


def _bounded(message: str) -> str:
    encoded = message.encode("utf-8", "replace")
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message
    kept = encoded[: MAX_MESSAGE_BYTES - 32].decode("utf-8", "ignore")
    return f"{kept}... ({len(encoded)} bytes, cut)"


log = logging.getLogger("salience.rpc")

REFUSAL_LOG_INTERVAL_S = 10.0


def _call_later(delay_s: float, callback: Callable[[], None]) -> None:
    """Runs ``callback`` on the running event loop after ``delay_s`` (none outside one)."""
    try:
        asyncio.get_running_loop().call_later(delay_s, callback)
    except RuntimeError:
        pass


class RefusalLog:
    """Calls refused for room (RESOURCE_EXHAUSTED: a full queue, too many sessions, a slow
    reader) as warnings, each reason at most once per interval with how many came since
    it was last logged: an operator sees them in the log (only the metrics counted them),
    and an overload's thousands do not flood it. Those held back are counted in a line of
    their own once the interval ends, should no refusal come then to carry the count (a
    burst's tail was never logged)."""

    def __init__(
        self,
        interval_s: float = REFUSAL_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], None] = _call_later,
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._call_later = call_later
        self._last: dict[str, tuple[float, int]] = {}
        """By reason: when it was last logged, and how many came since."""

    def note(self, error: SalienceError) -> None:
        if error.code != Code.RESOURCE_EXHAUSTED:
            return
        now = self._clock()
        reason = error.reason
        logged_at, unlogged = self._last.get(reason, (-math.inf, 0))
        if now - logged_at < self.interval_s:
            self._last[reason] = (logged_at, unlogged + 1)
            if not unlogged:  # the first held back: its count is logged at the latest then
                self._call_later(logged_at + self.interval_s - now, lambda: self._tail(reason))
            return
        self._last[reason] = (now, 0)
        since = f" ({unlogged} more since the last)" if unlogged else ""
        log.warning("refused a call, %s%s: %s", reason, since, error.message)

    def _tail(self, reason: str) -> None:
        """The interval after ``reason`` was last logged has ended: the refusals held back
        since, unless one that came since logged them."""
        logged_at, unlogged = self._last[reason]
        if unlogged and self._clock() - logged_at >= self.interval_s:
            self._last[reason] = (self._clock(), 0)
            log.warning("refused %d more calls, %s, since the last", unlogged, reason)


async def abort(context: grpc.aio.ServicerContext, error: SalienceError) -> None:
    """Ends the call with ``error`` (raises, as context.abort does)."""
    status = to_status(error)
    metadata = tuple(status.trailing_metadata)
    if "session_length" in error.metadata:
        metadata += ((SESSION_LENGTH_METADATA, error.metadata["session_length"]),)
    with client_gone_is_cancelled():
        await context.abort(status.code, status.details, metadata)


@contextlib.contextmanager
def client_gone_is_cancelled() -> Iterator[None]:
    """Writing to a call whose client has gone (it cancelled, its deadline passed) fails
    in gRPC's core (``ExecuteBatchError``): the call ends as cancelled, quietly, rather
    than as a handler's unexpected failure logged with its traceback (and aborted a
    second time: "Abort already called!")."""
    try:
        yield
    except _CallEnded:
        raise asyncio.CancelledError("the client has gone") from None


def slow_reader(limit: int) -> SalienceError:
    """A stream whose client left ``limit`` events unread: it alone is cancelled."""
    return SalienceError(
        Code.RESOURCE_EXHAUSTED,
        "SLOW_READER",
        f"the client left {limit} events unread; the call was cancelled "
        "(raise --stream-buffer-events, or read faster)",
    )

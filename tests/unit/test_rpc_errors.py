"""The status an engine error becomes stays within gRPC's metadata limits; the client's
reading of a status no server sent; refusals for room reach the log, boundedly."""

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from salience_client import SalienceClientError
from salience_server.engine.errors import Code, SalienceError, invalid, session_not_found
from salience_server.rpc.errors import MAX_MESSAGE_BYTES, RefusalLog, to_status


def _trailer_bytes(status) -> int:
    return sum(len(key) + len(value) for key, value in status.trailing_metadata)


def test_a_long_message_is_cut_within_the_trailers_limit() -> None:
    """grpc-message (percent-encoded) and grpc-status-details-bin both carry the message;
    past gRPC's 8 KiB the client got RESOURCE_EXHAUSTED instead of the answer."""
    error = SalienceError(Code.INVALID_ARGUMENT, "BAD_STOP", "stop string " + "é" * 50_000)
    status = to_status(error)
    assert status.code.name == "INVALID_ARGUMENT"
    assert status.details.startswith("stop string éé")
    assert status.details.endswith(f"({len(error.message.encode())} bytes, cut)")
    assert len(status.details.encode()) <= MAX_MESSAGE_BYTES
    assert 3 * len(status.details.encode()) + _trailer_bytes(status) < 8 * 1024
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(details).details[0].Unpack(info)
    assert info.reason == "BAD_STOP"  # the reason survives whole


def test_a_short_message_and_a_long_id_read_whole_or_quoted_short() -> None:
    assert to_status(session_not_found("agent-1")).details == (
        "no session 'agent-1' (unknown, closed or expired)"
    )
    quoted = to_status(session_not_found("z" * 5000)).details
    assert quoted.startswith("no session 'zzz") and "(5000 characters)" in quoted
    assert len(quoted) < 200


class _TransportError(grpc.RpcError):
    """A call failed by the transport, not a server: no ErrorInfo, no trailers."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


def test_a_proxys_http_503_says_what_it_means() -> None:
    """A proxy other than the shipped HAProxy config (which answers UNAVAILABLE itself)
    answers HTTP 503 with no replica in service; gRPC says only that it got the header."""
    error = SalienceClientError.from_rpc_error(
        _TransportError(grpc.StatusCode.UNAVAILABLE, "Received http2 header with status: 503")
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
    assert error.message == (
        "Received http2 header with status: 503 "
        "(a proxy answers 503 when no replica behind it is in service)"
    )
    plain = SalienceClientError.from_rpc_error(
        _TransportError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    )
    assert plain.message == "failed to connect to all addresses"


def test_refusals_for_room_are_logged_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """QUEUE_FULL, TOO_MANY_SESSIONS, SLOW_READER reached no log (metrics alone counted
    them); under overload they come by the thousand, so each reason is logged at most
    once per interval, saying how many came since. Those held back are logged once the
    interval ends (a burst's tail was never logged), unless a refusal then logs them.
    Other errors are the caller's. A fake clock and timer stand for the event loop's."""
    now = [0.0]
    timers: list[tuple[float, Any]] = []

    def advance(to: float) -> None:
        while due := sorted((t for t in timers if t[0] <= to), key=lambda t: t[0]):
            timers.remove(due[0])
            now[0] = due[0][0]
            due[0][1]()
        now[0] = to

    refusals = RefusalLog(
        interval_s=10.0,
        clock=lambda: now[0],
        call_later=lambda delay, callback: timers.append((now[0] + delay, callback)),
    )
    full = SalienceError(Code.RESOURCE_EXHAUSTED, "QUEUE_FULL", "the queue holds 256 calls")
    with caplog.at_level("WARNING", logger="salience.rpc"):
        for at in (0.0, 1.0, 2.0, 9.9, 10.5, 11.0):
            advance(at)
            refusals.note(full)
        refusals.note(SalienceError(Code.RESOURCE_EXHAUSTED, "SLOW_READER", "unread"))
        refusals.note(invalid("INVALID_TOKEN", "bad"))
        advance(35.0)  # the burst is over
        refusals.note(full)  # a refusal long after: logged at once, with no count
        advance(50.0)
    assert [r.getMessage() for r in caplog.records] == [
        "refused a call, QUEUE_FULL: the queue holds 256 calls",
        "refused 3 more calls, QUEUE_FULL, since the last",  # at 10.0
        "refused a call, SLOW_READER: unread",
        "refused 2 more calls, QUEUE_FULL, since the last",  # at 20.0
        "refused a call, QUEUE_FULL: the queue holds 256 calls",
    ]
    assert not timers


def test_a_refusal_after_its_interval_carries_the_count_before_the_timer_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A timer that fires late (a busy loop) finds the count already logged: once."""
    now = [0.0]
    timers: list[Any] = []
    refusals = RefusalLog(
        interval_s=10.0,
        clock=lambda: now[0],
        call_later=lambda _, callback: timers.append(callback),
    )
    full = SalienceError(Code.RESOURCE_EXHAUSTED, "QUEUE_FULL", "full")
    with caplog.at_level("WARNING", logger="salience.rpc"):
        for at in (0.0, 5.0, 12.0):
            now[0] = at
            refusals.note(full)
        now[0] = 12.5
        for callback in timers:
            callback()
    assert [r.getMessage() for r in caplog.records] == [
        "refused a call, QUEUE_FULL: full",
        "refused a call, QUEUE_FULL (1 more since the last): full",
    ]

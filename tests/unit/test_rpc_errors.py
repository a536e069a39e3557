"""The status an engine error becomes stays within gRPC's metadata limits; the client's
reading of a status no server sent."""

import grpc
from google.rpc import error_details_pb2, status_pb2

from salience_client import SalienceClientError
from salience_server.engine.errors import Code, SalienceError, session_not_found
from salience_server.rpc.errors import MAX_MESSAGE_BYTES, to_status


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

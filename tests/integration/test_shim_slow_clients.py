"""A client that sends its request's body slowly, or never finishes it, gets a 408 and
its connection closed, instead of holding them forever; one that never finishes its
request's headers, or sends none, has its connection closed."""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

from salience_server.http import connections, request_body


def _answer(port: int, head: bytes, body_parts: list[bytes], pause_s: float) -> bytes:
    """What the shim answers a request sent as ``head`` then ``body_parts``, one every
    ``pause_s`` (while no answer came), read whole (waiting at most 20 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head)
        for part in body_parts:
            time.sleep(pause_s)
            if select.select([connection], [], [], 0)[0]:
                break  # answered already
            connection.sendall(part)
        received = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
            head, _, content = received.partition(b"\r\n\r\n")
            length = [line for line in head.lower().split(b"\r\n") if b"content-length:" in line]
            if length and len(content) >= int(length[0].split(b":")[1]):
                break  # the whole answer
        return received


def _head(length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )


@pytest.mark.parametrize("trickles", [False, True], ids=["stalls", "trickles"])
def test_a_body_that_does_not_arrive_in_time_is_a_408(
    shim, monkeypatch: pytest.MonkeyPatch, trickles: bool
) -> None:
    monkeypatch.setattr(request_body, "BODY_IDLE_S", 0.5, raising=False)
    monkeypatch.setattr(request_body, "BODY_TOTAL_S", 2.0, raising=False)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    if trickles:  # a byte every 0.2 s: never idle for long, too slow in all
        parts, pause_s = [body[i : i + 1] for i in range(20)], 0.2
    else:  # part of the body, then nothing
        parts, pause_s = [body[:10]], 0.0
    started = time.monotonic()
    answer = _answer(shim.server.port, _head(len(body)), parts, pause_s)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 10
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout"


def _closed_within(connection: socket.socket, limit_s: float) -> float | None:
    """Seconds until the shim closed ``connection`` (reading it to its end), or None."""
    started = time.monotonic()
    connection.settimeout(limit_s)
    try:
        while connection.recv(65536):
            pass
    except TimeoutError:
        return None
    return time.monotonic() - started


@pytest.mark.parametrize("sends", ["nothing", "part of its headers", "a request, then part"])
def test_a_connection_whose_headers_do_not_come_is_closed(
    shim, monkeypatch: pytest.MonkeyPatch, sends: str
) -> None:
    """uvicorn bounded only a keep-alive connection's idle wait, and stopped that bound at
    the first byte: these connections were held forever. A request that came whole, and
    the keep-alive wait after it, are as they were."""
    monkeypatch.setattr(connections, "HEADERS_TIMEOUT_S", 0.5)
    partial = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    with socket.create_connection(("127.0.0.1", shim.server.port), timeout=20) as connection:
        if sends == "part of its headers":
            connection.sendall(partial)
        elif sends == "a request, then part":
            connection.sendall(partial + b"\r\n")
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(1.0)  # idle past the bound: the keep-alive wait (5 s) is uvicorn's
            connection.sendall(partial)
        closed_after = _closed_within(connection, 10)
    assert closed_after is not None, "the connection was held"
    assert closed_after < 5


def test_a_connection_is_closed_after_its_408(shim, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 408 closes the connection: uvicorn read the rest of the body for as long as it
    trickled (its keep-alive timer stopped at each byte), holding the connection forever."""
    monkeypatch.setattr(request_body, "BODY_IDLE_S", 0.5, raising=False)
    monkeypatch.setattr(request_body, "BODY_TOTAL_S", 1.0, raising=False)
    with socket.create_connection(("127.0.0.1", shim.server.port), timeout=20) as connection:
        connection.sendall(_head(100_000) + b"{")
        answer = b""
        while b"request_timeout" not in answer:
            chunk = connection.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < 8:  # past the keep-alive's 5 s
            try:
                connection.sendall(b" ")
                if select.select([connection], [], [], 0.3)[0]:
                    closed = connection.recv(65536) == b""
            except OSError:  # reset: closed with the trickle unread
                closed = True
    assert closed, "the connection was held after its 408, its body still trickling"

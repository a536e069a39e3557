"""A client that sends its request's body slowly, or never finishes it, gets a 408 and
its connection closed, instead of holding them forever."""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

from salience_server.http import request_body


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

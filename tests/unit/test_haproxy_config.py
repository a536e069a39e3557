"""deploy/haproxy/haproxy.cfg: HAProxy accepts it, and its health check, written out as
HTTP/2 bytes, is the grpc.health.v1 call it claims to be: rebuilt here from the protocol,
and answered by a real gRPC server as SERVING or not."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from salience_server.cluster import HAPROXY_CONFIG, haproxy_binary, render_config

CONFIG = HAPROXY_CONFIG.read_text()


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame (RFC 9113 section 4.1)."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name_index: int, value: bytes) -> bytes:
    """An HPACK literal header without indexing, its name from the static table."""
    prefix = bytes([name_index]) if name_index < 15 else bytes([15, name_index - 15])
    return prefix + bytes([len(value)]) + value


def _grpc_message(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def _health_check_call() -> bytes:
    """The client side of one grpc.health.v1.Health/Check call on a new connection."""
    headers = (
        b"\x83"  # :method POST (static index 3)
        + b"\x86"  # :scheme http (6)
        + _literal(4, b"/grpc.health.v1.Health/Check")  # :path
        + _literal(1, b"localhost")  # :authority
        + _literal(31, b"application/grpc")  # content-type
        + b"\x00\x02te\x08trailers"  # te, a new name
    )
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + _frame(0x4, 0, 0, b"")  # SETTINGS
        + _frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + _frame(0x0, 0x1, 1, _grpc_message(request))  # DATA, END_STREAM
    )


def _config_value(directive: str) -> str:
    match = re.search(rf"^\s*{directive} (\S+)$", CONFIG, re.MULTILINE)
    assert match, directive
    return match.group(1)


def _status_frame(status: int) -> bytes:
    answer = health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
    return _grpc_message(answer.SerializeToString())


def test_the_check_bytes_are_a_health_check_call() -> None:
    assert _config_value("tcp-check send-binary") == _health_check_call().hex()
    statuses = health_pb2.HealthCheckResponse
    frames = [
        _status_frame(s) for s in (statuses.SERVING, statuses.NOT_SERVING, statuses.SERVICE_UNKNOWN)
    ]
    common = frames[0][:-1].hex()
    assert all(frame.hex().startswith(common) for frame in frames)
    endings = "|".join(frame[-1:].hex() for frame in frames)
    assert _config_value("tcp-check expect rbinary") == f"{common}({endings})"
    assert _config_value("tcp-check expect min-recv 0 binary") == frames[0].hex()


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.aio.HealthServicer, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()

    async def boot() -> tuple[aio.Server, int, health.aio.HealthServicer]:
        server = aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port, servicer

    server, port, servicer = loop.run_until_complete(boot())
    yield port, servicer, loop
    loop.run_until_complete(server.stop(0))
    loop.close()


def _answer(port: int, loop: asyncio.AbstractEventLoop) -> bytes:
    """What the server sends back to the check within half a second."""

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(_health_check_call())
            sock.settimeout(0.5)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except TimeoutError:
                pass
            return received

    return loop.run_until_complete(asyncio.to_thread(exchange))


def test_a_server_answers_the_check_as_expected_only_when_serving(health_server) -> None:  # type: ignore[no-untyped-def]
    port, servicer, loop = health_server
    serving = _status_frame(health_pb2.HealthCheckResponse.SERVING)
    not_serving = _status_frame(health_pb2.HealthCheckResponse.NOT_SERVING)
    loop.run_until_complete(servicer.set("", health_pb2.HealthCheckResponse.SERVING))
    answer = _answer(port, loop)
    assert serving in answer and not_serving not in answer
    loop.run_until_complete(servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    answer = _answer(port, loop)
    assert not_serving in answer and serving not in answer


def test_haproxy_accepts_the_config_as_shipped_and_as_rendered(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rendered = tmp_path / "haproxy.cfg"
    rendered.write_text(render_config(CONFIG, [("r0", "127.0.0.1:1"), ("r1", "127.0.0.1:2")]))
    assert re.findall(r"^    server .*$", rendered.read_text(), re.MULTILINE) == [
        "    server r0 127.0.0.1:1",
        "    server r1 127.0.0.1:2",
    ]
    binary = haproxy_binary()
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True)
    assert re.match(r"HAProxy version 2\.8\.", version.stdout), version.stdout
    env = {**os.environ, "SALIENCE_PROXY_ADMIN": str(tmp_path / "admin.sock")}
    for path in (HAPROXY_CONFIG, rendered):
        result = subprocess.run(
            [binary, "-c", "-f", str(path)], capture_output=True, text=True, env=env, timeout=30
        )
        assert result.returncode == 0, result.stdout + result.stderr

"""Starts a salience-server subprocess on a free port for a benchmark and stops it after."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_server(*args: str, timeout_s: float = 600) -> Iterator[str]:
    """Yields the target of a server started with ``args``, once it reports SERVING."""
    with started_server(*args, timeout_s=timeout_s) as (target, _):
        yield target


@contextlib.contextmanager
def started_server(
    *args: str, timeout_s: float = 600
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yields the target and the process of a server started with ``args``, once it
    reports SERVING."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "salience_server",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            *args,
        ]
    )
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError("the server exited during start-up")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not become ready")
                time.sleep(0.2)
        yield target, process
    finally:
        process.terminate()
        process.wait(timeout=30)

"""The server as a process: health, reflection, and a graceful stop on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from tests.helpers import server_start_failure


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_health_reflection_and_sigterm_with_a_call_in_flight(tiny_llama_dir) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "salience_server",
            "--model",
            str(tiny_llama_dir),
            "--port",
            str(port),
            "--max-batch-tokens",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(iter(responses)).list_services_response.service}
        assert {"salience.v1.Salience", "grpc.health.v1.Health"} <= names
        stub = salience_pb2_grpc.SalienceStub(channel)
        session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
        stream = stub.Generate(
            pb.GenerateRequest(session_id=session_id, append_tokens=[3] * 400, max_tokens=100)
        )
        next(stream)  # wait until it runs
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            for _ in stream:
                pass
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE  # failed cleanly, not dropped
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - start < 15
        assert "Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_a_port_in_use_fails_at_once_with_a_message(tiny_llama_dir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stderr = server_start_failure("--model", str(tiny_llama_dir), "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in stderr

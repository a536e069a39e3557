"""The server as a process: health, reflection, and a graceful drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.__main__ import parse_args
from tests.conftest import default_model_available
from tests.helpers import error_reason, free_port, server_command, server_start_failure

GRACE_S = 40
"""Long enough for the call in flight (one token a step) on a loaded machine."""


def _serving(model_dir, *flags: str) -> tuple[subprocess.Popen[str], grpc.Channel]:
    """A server process decoding a token a step, with ``GRACE_S``, once it is SERVING."""
    port = free_port()
    command = server_command("--model", str(model_dir), "--port", str(port))
    command += ["--max-batch-tokens", "1", "--grace-s", str(GRACE_S), *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return process, channel
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    process.kill()
    assert process.stdout is not None
    pytest.fail(f"not serving within a minute; the server said:\n{process.stdout.read()}")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["term", "hup"])
def test_health_reflection_and_a_drain_with_a_call_in_flight(
    long_context_llama_dir, stop_signal
) -> None:
    """SIGTERM drains (SPEC 2.6): health turns NOT_SERVING, new calls get UNAVAILABLE,
    the call in flight runs to its end, and the process exits 0 within the grace. A
    terminal's hang-up (SIGHUP) too: it killed the process at once, resetting the call.
    The call is 2,000 tokens long, seconds here, so that it is still running when the
    signal comes (200 tokens could end first, and the drain then had nothing to wait for)."""
    metrics_port = free_port()
    process, channel = _serving(long_context_llama_dir, "--metrics-port", str(metrics_port))
    try:
        health = health_pb2_grpc.HealthStub(channel)
        status = health_pb2.HealthCheckResponse.SERVING
        by_name = health_pb2.HealthCheckRequest(service="salience.v1.Salience")
        assert health.Check(by_name).status == status  # it was NOT_FOUND
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(iter(responses)).list_services_response.service}
        assert {"salience.v1.Salience", "grpc.health.v1.Health"} <= names
        stub = salience_pb2_grpc.SalienceStub(channel)
        session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
        stream = stub.Generate(
            pb.GenerateRequest(
                session_id=session_id, append_tokens=[3] * 10, max_tokens=2000, ignore_eos=True
            )
        )
        events = [next(stream)]  # it runs
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            metrics = response.read().decode()
        assert "salience_running_requests 1.0" in metrics
        start = time.monotonic()
        process.send_signal(stop_signal)
        refused = None
        while refused is None and time.monotonic() - start < 10:
            try:
                stub.OpenSession(pb.OpenSessionRequest())
            except grpc.RpcError as error:
                refused = error
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(refused) == "SHUTTING_DOWN"
        for request in (health_pb2.HealthCheckRequest(), by_name):
            assert health.Check(request).status == health_pb2.HealthCheckResponse.NOT_SERVING
        events += list(stream)  # the call in flight completes
        assert events[-1].HasField("done") and events[-1].done.completion_tokens == 2000
        assert process.wait(timeout=GRACE_S) == 0
        assert time.monotonic() - start < GRACE_S
        assert "Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_a_second_stop_signal_ends_the_calls_in_flight_at_once(long_context_llama_dir) -> None:
    """The grace is for the calls in flight, not a wait an operator cannot cut short: a
    second SIGINT waited out the whole grace, as the first. The call would run for a
    minute or more, one token a step (the tiny model's 512 positions ended it in 0.5 s,
    as the second signal came)."""
    process, channel = _serving(long_context_llama_dir)
    try:
        stub = salience_pb2_grpc.SalienceStub(channel)
        session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
        stream = stub.Generate(
            pb.GenerateRequest(
                session_id=session_id, append_tokens=[3] * 10, max_tokens=60000, ignore_eos=True
            )
        )
        next(stream)
        start = time.monotonic()
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        with pytest.raises(grpc.RpcError) as ended:
            list(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.wait(timeout=GRACE_S) == 0
        assert time.monotonic() - start < GRACE_S / 2
        assert process.stdout is not None and "Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_stop_signals_in_a_burst_end_the_server_cleanly(tiny_llama_dir) -> None:
    """An operator pressing Ctrl-C again and again: every signal, whenever it comes
    (draining, stopping, in the interpreter's clean-up), ends the process with 0 and
    no traceback. One that came after the event loop closed raised KeyboardInterrupt."""
    process, _ = _serving(tiny_llama_dir)
    try:
        while process.poll() is None:
            process.send_signal(signal.SIGINT)
            time.sleep(0.005)
        assert process.returncode == 0
        assert process.stdout is not None and "Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_a_model_that_fails_to_load_is_one_line_with_the_shim_too(tmp_path) -> None:
    """With --http-port the shim answers while the model loads; a load that failed left
    it to asyncio's shutdown, which logged uvicorn's cancelled tasks' tracebacks."""
    (tmp_path / "config.json").write_text("{}")
    stderr = server_start_failure("--model", str(tmp_path), "--http-port", str(free_port()))
    assert "cannot load" in stderr


def test_a_port_in_use_fails_at_once_with_a_message(tiny_llama_dir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stderr = server_start_failure("--model", str(tiny_llama_dir), "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in stderr


def test_a_missing_model_and_a_host_that_does_not_resolve_say_so(tmp_path, tiny_llama_dir) -> None:
    """A missing .gguf was "neither a Hugging Face model directory nor a .gguf file";
    a host name that resolves nowhere was "(in use?)"."""
    stderr = server_start_failure("--model", str(tmp_path / "model.gguf"))
    assert "model.gguf': no such file or directory" in stderr
    stderr = server_start_failure("--model", str(tiny_llama_dir), "--host", "999.1.1.1")
    assert "the host '999.1.1.1' does not resolve" in stderr


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--port", "99999"], "--port 99999 is out of range"),
        (["--port", "-1"], "--port -1 is out of range"),
        (["--metrics-port", "70000"], "--metrics-port 70000 is out of range"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        # A zero-cost verification divided by zero in every step; nan never drafted.
        (["--speculative-cost=-1,0"], "--speculative-cost SWITCH,ROW must be finite"),
        (["--speculative-cost", "nan,nan"], "--speculative-cost SWITCH,ROW must be finite"),
        (
            ["--speculative", "ngram", "--num-speculative-tokens", "4096"],
            "below --max-batch-tokens",
        ),
        (["--log-level", "foo"], "invalid choice: 'FOO'"),  # was a traceback
        (["--grace-s", "nan"], "--grace-s must be finite"),
        # Checked before the model loads (or converts, the first time).
        (["--readout", "/nonexistent/readout.safetensors"], "readout.safetensors': no such file"),
        (["--session-ttl", "-5"], "--session-ttl must be 0 (no expiry) or a positive"),
        (["--keepalive-s", "0.001"], "--keepalive-s must be finite and at least 1"),
        (["--kv-cache-memory", "lots"], "not a size: 'lots' (try 2GiB"),  # named its parser
        (["--host-kv-memory", "1e999"], "too large a size: '1e999'"),  # was an OverflowError
        (["--speculative-cost", "abc"], "not two numbers SWITCH,ROW: 'abc'"),
        (["--max-image-pixels", "-1"], "--max-image-bytes and --max-image-pixels must be"),
        (["--max-running", "0"], "--max-batch-tokens, --max-running and --max-sessions must"),
        (["--max-sessions", "0"], "--max-batch-tokens, --max-running and --max-sessions must"),
    ],
)
def test_bad_flags_are_refused_before_anything_starts(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """They were taken as they came: --port 99999 listened on some other port, --device
    tpu ended in a traceback once the model loaded."""
    with pytest.raises(SystemExit) as exited:
        parse_args(flags)
    assert exited.value.code == 2 and says in capsys.readouterr().err


def test_sizes_take_units_and_exponents() -> None:
    config = parse_args(["--kv-cache-memory", "1e9", "--host-kv-memory", "1.5GiB"])
    assert config.engine.kv_cache_bytes == 10**9
    assert config.engine.host_kv_bytes == 3 << 29


def test_metrics_are_served_on_their_port_beside_the_shim(tiny_llama_dir) -> None:
    """--metrics-port with --http-port: both serve the metrics (the port was ignored)."""
    http_port, metrics_port = free_port(), free_port()
    command = server_command("--model", str(tiny_llama_dir))
    command += ["--port", str(free_port()), "--http-port", str(http_port)]
    process = subprocess.Popen([*command, "--metrics-port", str(metrics_port)])
    try:
        for port in (metrics_port, http_port):
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as reply:
                        assert "salience_requests_total" in reply.read().decode()
                        break
                except OSError:
                    assert time.monotonic() < deadline, f"nothing serves metrics on {port}"
                    time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0


@pytest.mark.skipif(not default_model_available(), reason="the default model is not installed")
def test_the_shim_answers_while_the_model_loads() -> None:
    """Its port took connections during loading but answered none until the model was
    loaded: an HTTP liveness probe on /health failed for the whole load (a first start's
    conversion takes a minute), where it should say 503 until then."""
    http_port = free_port()
    command = server_command("--port", str(free_port()), "--http-port", str(http_port))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    statuses: list[int] = []
    try:
        deadline = time.monotonic() + 300  # a first start converts the model first
        while 200 not in statuses and time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{http_port}/health"
                with urllib.request.urlopen(url, timeout=1) as reply:
                    statuses.append(reply.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
            except OSError:  # not listening yet, or no answer within the second
                statuses.append(0)
            time.sleep(0.05)
        assert statuses[-1] == 200
        loading = statuses[statuses.index(503) :] if 503 in statuses else []
        assert loading and set(loading) == {503, 200}, statuses  # 503 until loaded, no hang
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_limits_beyond_what_the_model_or_a_block_holds_are_said_in_the_log(
    tiny_llama_dir, server_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """--max-context past the model's positions, and a KV budget under one block, were
    adjusted without a word."""
    caplog.set_level(logging.WARNING)
    server = server_factory(tiny_llama_dir, max_context=100_000, kv_cache_bytes=1, block_size=4)
    # The one block bounds a session too (a session's whole KV is on the device).
    assert server.engine.max_context == 4 and server.engine.block_manager.num_blocks == 1
    said = " ".join(record.getMessage() for record in caplog.records)
    assert "--max-context 100000 is beyond the model's 512 positions" in said
    assert "less than the least pool, 1 block of 4 tokens" in said
    assert "the KV pool holds 4 tokens, fewer than the 512 positions" in said


def _wait_until_catching(pid: int, signum: int, timeout_s: float = 20.0) -> bool:
    """Whether process ``pid`` catches ``signum`` within ``timeout_s`` (its SigCgt mask in
    /proc): before that, a signal finds Python's default."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as status:
            caught = next(line for line in status if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) >> (signum - 1) & 1:
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("moment", ["importing", "loading"])
def test_a_stop_signal_before_serving_exits_0_at_once(moment: str) -> None:
    """A signal while the model loaded aborted the process (exit 134, "terminate called
    without an active exception": the interpreter's clean-up met the loading thread
    inside torch); one while it imported ended it 143 (SIGTERM) or with a traceback."""
    if moment == "loading" and not default_model_available():
        pytest.skip("the default model is not installed")  # the tiny one loads too fast
    command = server_command("--port", str(free_port()))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None
    lines = []
    try:
        if moment == "importing":  # once its handlers are in (0.4 s in, on a loaded CPU):
            # SIGHUP, the last of them (Python catches SIGINT from its start)
            assert _wait_until_catching(process.pid, signal.SIGHUP)
        else:
            for line in process.stdout:  # the pool is sized: the warm-up pass is next
                lines.append(line)
                if "KV pool" in line:
                    break
        start = time.monotonic()
        process.send_signal(signal.SIGTERM if moment == "loading" else signal.SIGINT)
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - start < 5
        output = "".join(lines) + process.stdout.read()
        assert "Traceback" not in output and "terminate called" not in output
    finally:
        if process.poll() is None:
            process.kill()

"""The shim as a program: ``salience-server --http-port`` serves it beside the gRPC server,
``python -m salience_server.http`` (``salience-shim``) alone; neither imports the engine
into the shim."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from salience_client import SalienceClient
from salience_server.http.config import ShimConfig
from salience_server.http.serving import ShimServer
from tests.helpers import free_port, server_command
from tests.shim_support import RunningShim, error_body

REPO = Path(__file__).resolve().parents[2]


def _wait_for(pattern: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text()):
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


def test_the_shim_never_imports_the_engine() -> None:
    code = (
        "import sys, salience_server.http.__main__;"
        "bad = [m for m in sys.modules if m.startswith(('salience_server.engine',"
        " 'salience_server.rpc', 'torch'))];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_salience_server_http_port_serves_both(tiny_llama_dir: Path, tmp_path: Path) -> None:
    http_port = free_port()
    log = tmp_path / "server.log"
    command = server_command("--model", str(tiny_llama_dir))
    command += ["--port", "0", "--http-port", str(http_port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(r"OpenAI shim on http://127\.0\.0\.1:\d+/v1", process, log, 120)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=tiny_llama_dir.name,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            extra_body={"ignore_eos": True},  # sampled: an EOS drawn early ended it at 2
        )
        assert reply.usage.completion_tokens == 3
        # The server's own metrics are on the shim's port.
        metrics = httpx.get(f"{base}/metrics")
        assert metrics.status_code == 200
        assert 'salience_requests_total{code="OK",rpc="Generate"} 1.0' in metrics.text
        assert 'salience_tokens_total{kind="decoded"} 3.0' in metrics.text
    finally:
        code = _stop(process)
    assert code == 0, log.read_text()


def _server_with_shim(
    model_dir: Path, log: Path, *flags: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The server and its shim, on a port of its own, writing to ``log``; and the shim's
    base URL."""
    http_port = free_port()
    command = server_command("--model", str(model_dir), "--port", "0", *flags)
    command += ["--http-port", str(http_port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{http_port}"


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
"""The start of every log line (``--log-level``'s format)."""


def test_the_shim_beside_the_server_logs_at_its_log_level(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """``--log-level warning`` quietens the shim beside the server too: uvicorn's own
    handlers logged each HTTP request and its start and stop at INFO whatever the level,
    and without the time or the logger's name."""
    log = tmp_path / "server.log"
    process, base = _server_with_shim(tiny_llama_dir, log, "--log-level", "WARNING")
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.1)
        assert httpx.get(f"{base}/v1/models").status_code == 200
    finally:
        code = _stop(process)
    assert code == 0, log.read_text()
    assert "INFO" not in log.read_text(), log.read_text()


def test_the_shim_alone_writes_every_log_line_in_one_format(tmp_path: Path) -> None:
    """uvicorn's lines (its start, each request, its stop) carry the time, the level and
    the logger's name as the shim's own do (they read ``INFO:     127.0.0.1:5 - ...``)."""
    log = tmp_path / "shim.log"
    process, port = _shim_alone(f"127.0.0.1:{free_port()}", log)  # no server there
    try:
        _wait_for(r"Application startup complete", process, log, 30)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 503
        _wait_for(r"GET /v1/models", process, log, 10)
    finally:
        code = _stop(process)
    assert code == 0, log.read_text()
    lines = log.read_text().splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), "\n".join(lines)


def test_a_taken_port_fails_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            ShimServer(ShimConfig(port=port))


def test_salience_shim_alone(llama_server: Any, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Served alone; stopped by a burst of Ctrl-C, which ends it with 0 and no traceback
    (one that came after its event loop closed raised KeyboardInterrupt)."""
    log = tmp_path / "shim.log"
    process, port = _shim_alone(llama_server.target, log, "--served-model-name", "tiny")
    try:
        _wait_for(r"Application startup complete", process, log, 30)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [tiny_llama_dir.name, "tiny"]
        while process.poll() is None:
            process.send_signal(signal.SIGINT)
            time.sleep(0.005)
    finally:
        code = _stop(process) if process.poll() is None else process.returncode
    assert code == 0 and "Traceback" not in log.read_text(), log.read_text()


def test_stopping_ends_open_shim_requests_cleanly_within_the_grace(
    long_context_llama_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM with HTTP requests in flight: they run on while the server drains, then end
    with its UNAVAILABLE as OpenAI's 503 (an error event and [DONE] once a stream has
    started), and the process exits soon after the grace. The built-in shim retried
    SHUTTING_DOWN against its own draining server: the stream was cut without an error,
    the plain request got a bare 500, and the process outlived the grace by seconds.
    (The long-context model: 60,000 tokens outlast the grace on any machine, where the
    default model's 200 tokens outlasted it only for its slow steps; and the signal
    waits until the server runs both requests, where it waited for the stream alone.)"""
    log = tmp_path / "server.log"
    process, base = _server_with_shim(long_context_llama_dir, log, "--grace-s", "0.5")
    try:
        _wait_for(r"serving \S+ on", process, log, 120)  # the shim answers from the start
        threads, replies, _ = _ask_without_end(base, long_context_llama_dir.name)
        deadline = time.monotonic() + 60
        while "salience_running_requests 2.0" not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline, "the two requests did not both run within 60 s"
            time.sleep(0.05)
        stopped = time.monotonic()  # both decode now
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - stopped < 0.5 + 5
        for thread in threads:
            thread.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    _assert_ended_unavailable(replies)
    text = log.read_text()
    assert "Traceback" not in text and "Cancel" not in text, text
    assert "resuming" not in text, text  # its one server has no other replica to retry
    assert "the grace period ended with 2 calls in flight" in text, text  # it said how many


def test_stopping_the_shim_alone_ends_open_requests_cleanly_after_its_grace(
    long_context_llama_dir: Path, tmp_path: Path
) -> None:
    """The shim alone, its server going on: on SIGTERM its open requests run on for
    ``--grace-s``, then end as OpenAI's 503 (an error event and [DONE] once a stream has
    started), and it exits, its pool's sessions closed on the server. Its grace was a
    fixed 5 s, after which uvicorn cut the stream with no error event and logged a
    traceback; the first mend left the pool's sessions open (its client was closed)."""
    from tests.conftest import start_server

    server = start_server(str(long_context_llama_dir), block_size=16, kv_cache_bytes=64 << 20)
    log = tmp_path / "shim.log"
    process, port = _shim_alone(server.target, log, "--grace-s", "0.5")
    try:
        _wait_for(r"Application startup complete", process, log, 30)
        base = f"http://127.0.0.1:{port}"
        done = {"model": long_context_llama_dir.name, "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{base}/v1/completions", json=done, timeout=60).status_code == 200
        threads, replies, streaming = _ask_without_end(base, long_context_llama_dir.name)
        assert streaming.wait(60), "the stream sent nothing within 60 s"
        deadline = time.monotonic() + 60
        while len(server.engine.scheduler.running) < 2:  # the plain request runs too
            assert time.monotonic() < deadline, "the two requests did not both run within 60 s"
            time.sleep(0.05)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - stopped < 0.5 + 5
        for thread in threads:
            thread.join(timeout=30)
        with SalienceClient(server.target) as client:
            assert client.list_sessions() == []  # an idle one and two lent ones were held
    finally:
        if process.poll() is None:
            process.kill()
        server.stop()
    _assert_ended_unavailable(replies)
    assert "Traceback" not in log.read_text(), log.read_text()


def _shim_alone(target: str, log: Path, *flags: str) -> tuple[subprocess.Popen[bytes], int]:
    """``salience-shim`` for ``target`` on a free port, writing to ``log``."""
    port = free_port()
    command = [sys.executable, "-m", "salience_server.http", "--target", target]
    command += ["--port", str(port), *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return process, port


def _ask_without_end(
    base: str, model: str
) -> tuple[list[threading.Thread], dict[bool, httpx.Response], threading.Event]:
    """A streamed and a plain completion that decode on and on, each in a thread: the
    threads, the replies (by ``stream``) once they end, and an event set at the stream's
    first line."""
    body = {"model": model, "prompt": "Once", "max_tokens": 60000, "ignore_eos": True}
    replies: dict[bool, httpx.Response] = {}
    streaming = threading.Event()

    def ask(stream: bool) -> None:
        url = f"{base}/v1/completions"
        if not stream:
            replies[stream] = httpx.post(url, json=body, timeout=60)
            return
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as reply:
            lines = []
            for line in reply.iter_lines():
                streaming.set()
                lines.append(line)
            replies[stream] = httpx.Response(reply.status_code, text="\n".join(lines))

    threads = [threading.Thread(target=ask, args=(stream,)) for stream in (True, False)]
    for thread in threads:
        thread.start()
    return threads, replies, streaming


def _assert_ended_unavailable(replies: dict[bool, httpx.Response]) -> None:
    """The plain request answered 503; the stream ended with such an error event."""
    plain = replies[False]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "service_unavailable"
    events = [line for line in replies[True].text.splitlines() if line.startswith("data: ")]
    assert replies[True].status_code == 200 and events[-1] == "data: [DONE]"
    assert '"code": "service_unavailable"' in events[-2]


def test_unknown_routes_and_methods_answer_as_openai_does(shim: RunningShim) -> None:
    """An unknown route is OpenAI's 404 ("Invalid URL (POST /v1/...)", an
    invalid_request_error); a method a route does not take is a 405 that says which it
    takes (the Allow header was dropped)."""
    response = httpx.post(f"{shim.base_url}/nothing", json={})
    assert response.status_code == 404
    assert error_body(response) == {
        "message": "Invalid URL (POST /v1/nothing)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    response = httpx.put(f"{shim.base_url}/models")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert error_body(response)["type"] == "invalid_request_error"


def test_an_unexpected_error_is_logged_once(
    shim: RunningShim, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler's unexpected exception is a 500 logged with its traceback once: Starlette
    re-raises it after the shim's handler has answered, and uvicorn logged it again
    ("Exception in ASGI application", the same traceback)."""

    async def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(shim.backend, "model_info", broken)
    with caplog.at_level(logging.ERROR):
        response = httpx.get(f"{shim.base_url}/models")
        assert response.status_code == 500
        assert error_body(response)["code"] == "internal_error"
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1, [r.getMessage() for r in logged]

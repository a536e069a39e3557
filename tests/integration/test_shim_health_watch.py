"""The shim alone watches its server's health and logs each change: an operator whose
``--target`` is wrong, or whose server is down or not serving, learns it from the log
(every request was a 503 and the log said nothing)."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from salience_server.http.server_health import watch_health
from tests.fake_replica import RunningFake, start_fake
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
WATCH_INTERVAL_S = 0.05


def _watched(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "salience_server.http.server_health"
    ]


async def _until_logged(caplog: pytest.LogCaptureFixture, count: int) -> list[tuple[int, str]]:
    deadline = time.monotonic() + 20
    while len(_watched(caplog)) < count:
        assert time.monotonic() < deadline, _watched(caplog)
        await asyncio.sleep(0.02)
    await asyncio.sleep(10 * WATCH_INTERVAL_S)  # a change logged twice would show by now
    return _watched(caplog)


def test_each_change_of_the_servers_health_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unreachable (with a hint at --target, the first time), serving, not serving,
    unreachable again: one line each, warnings for the states that fail requests."""
    caplog.set_level(logging.INFO, logger="salience_server.http.server_health")
    port = free_port()
    target = f"127.0.0.1:{port}"
    fake: RunningFake | None = None

    async def scenario() -> list[tuple[int, str]]:
        nonlocal fake
        channel = grpc.aio.insecure_channel(target)
        watch = asyncio.create_task(watch_health(channel, target, WATCH_INTERVAL_S))
        try:
            await _until_logged(caplog, 1)
            fake = await asyncio.to_thread(start_fake, "watched", port)
            await _until_logged(caplog, 2)
            await asyncio.to_thread(fake.set_serving, False)
            await _until_logged(caplog, 3)
            await asyncio.to_thread(fake.stop)
            return await _until_logged(caplog, 4)
        finally:
            watch.cancel()
            await channel.close()

    try:
        lines = asyncio.run(scenario())
    finally:
        if fake is not None and fake.thread.is_alive():
            fake.stop()
    assert [level for level, _ in lines] == [
        logging.WARNING,
        logging.INFO,
        logging.WARNING,
        logging.WARNING,
    ]
    unreachable, serving, not_serving, unreachable_again = (text for _, text in lines)
    assert unreachable.startswith(f"cannot reach the Salience server at {target} (")
    assert unreachable.endswith("requests get 503 until it answers (is --target right?)")
    assert serving == f"the Salience server at {target} is serving"
    assert not_serving.startswith(f"the Salience server at {target} is not serving")
    assert unreachable_again.startswith(f"cannot reach the Salience server at {target} (")
    assert "--target" not in unreachable_again


def test_the_shim_alone_says_when_its_server_cannot_be_reached(tmp_path: Path) -> None:
    """``salience-shim`` with nothing at its ``--target`` warns in its log at once."""
    target = f"127.0.0.1:{free_port()}"
    log = tmp_path / "shim.log"
    command = [sys.executable, "-m", "salience_server.http", "--target", target]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(free_port())],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while f"cannot reach the Salience server at {target}" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert "WARNING salience_server.http.server_health" in log.read_text()
    assert "Traceback" not in log.read_text()

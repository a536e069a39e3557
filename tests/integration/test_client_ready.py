"""``wait_ready`` of both clients: it returns once the server's health service says
SERVING (a server loading its model says NOT_SERVING), and gives up after its timeout
with NOT_READY naming the target, whether nothing listens there or it never serves."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from salience_client import AsyncSalienceClient, SalienceClient, SalienceClientError
from tests.fake_replica import start_fake
from tests.helpers import free_port


def _wait_ready(target: str, timeout_s: float, use_async: bool) -> None:
    if not use_async:
        with SalienceClient(target) as client:
            client.wait_ready(timeout_s)
        return

    async def wait() -> None:
        async with AsyncSalienceClient(target) as client:
            await client.wait_ready(timeout_s)

    asyncio.run(wait())


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_ready_once_the_server_serves(use_async: bool) -> None:
    fake = start_fake()
    try:
        fake.set_serving(False)  # loading its model
        timer = threading.Timer(0.5, fake.set_serving, args=(True,))
        timer.start()
        started = time.monotonic()
        _wait_ready(fake.target, 10, use_async)
        assert 0.4 < time.monotonic() - started < 5
        timer.join()
    finally:
        fake.stop()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("serving", ["nothing listening", "never serving"])
def test_not_ready_after_the_timeout(use_async: bool, serving: str) -> None:
    fake = None
    target = f"127.0.0.1:{free_port()}"
    if serving == "never serving":
        fake = start_fake()
        fake.set_serving(False)
        target = fake.target
    try:
        started = time.monotonic()
        with pytest.raises(SalienceClientError) as caught:
            _wait_ready(target, 0.5, use_async)
        assert 0.5 <= time.monotonic() - started < 3
        error = caught.value
        assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "NOT_READY")
        assert target in str(error) and "0.5 s" in str(error)
    finally:
        if fake is not None:
            fake.stop()

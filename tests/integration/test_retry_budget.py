"""While no replica answers: a call retries within the failover's time budget (a
session's call or not), and spends it once, then raises."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from salience_client import AsyncSalienceClient, Failover, SalienceClient, SalienceClientError
from tests.fake_replica import start_fake


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "asyncio"])
def test_a_call_after_a_failed_one_spends_one_retry_budget(is_async: bool) -> None:
    """No replica answers: a call fails after its retry budget, and so does the next,
    once. The next spent a whole budget first looking whether the failed call's session
    was still busy (twice the budget in all)."""
    budget = Failover(retry_budget_s=1.0, first_retry_wait_s=0.05)
    running = start_fake()

    async def next_call_async() -> float:
        async with AsyncSalienceClient(running.target, timeout=10, replay=budget) as client:
            session = await client.open_session()
            running.stop()
            with pytest.raises(SalienceClientError):
                await session.prefill([1, 2])
            start = time.monotonic()
            with pytest.raises(SalienceClientError):
                await session.prefill([3])
            return time.monotonic() - start

    if is_async:
        elapsed = asyncio.run(next_call_async())
    else:
        with SalienceClient(running.target, timeout=10, replay=budget) as client:
            session = client.open_session()
            running.stop()
            with pytest.raises(SalienceClientError):
                session.prefill([1, 2])
            start = time.monotonic()
            with pytest.raises(SalienceClientError):
                session.prefill([3])
            elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 1.7


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "asyncio"])
def test_a_call_that_is_no_session_s_retries_while_no_replica_answers(is_async: bool) -> None:
    """GetModelInfo, Tokenize and the like failed at once while no replica answered
    (the shim, which tokenizes every request first, answered 503 at once); they retry
    within the budget as session calls do, and find a replica back within it."""
    budget = Failover(retry_budget_s=5.0, first_retry_wait_s=0.05)
    first = start_fake()
    port, restarted = first.port, []

    def restart_soon() -> None:
        time.sleep(0.5)
        restarted.append(start_fake(port=port))

    async def model_info_async() -> str:
        async with AsyncSalienceClient(first.target, timeout=10, replay=budget) as client:
            await client.model_info()  # a server has answered this client
            first.stop()
            threading.Thread(target=restart_soon).start()
            return (await client.model_info()).model_id

    try:
        if is_async:
            model_id = asyncio.run(model_info_async())
        else:
            with SalienceClient(first.target, timeout=10, replay=budget) as client:
                client.model_info()
                first.stop()
                threading.Thread(target=restart_soon).start()
                model_id = client.model_info().model_id
        assert model_id and restarted
    finally:
        for running in restarted:
            running.stop()

"""The calls of the replica schedule (tests/integration/test_replica_fuzz.py): its
sessions, its generate calls, and a driver making them through the sync client or the
asyncio one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from salience_client import AsyncSalienceClient, Done, Failover, SalienceClient, TokenEvent

CALL_TIMEOUT_S = 60.0
FAILOVER = Failover(retry_budget_s=20.0, max_replays=3)


@dataclass
class Tracked:
    """One session of the machine: its handle (sync or asyncio), its twin on the control
    replica, and the tokens it must hold."""

    session: Any
    twin: Any
    tokens: list[int] = field(default_factory=list)
    homes: set[str] = field(default_factory=set)
    """The replicas it was on after each step."""


@dataclass
class Call:
    """One generate call of the schedule."""

    tracked: Tracked
    tokens: list[int]
    options: dict[str, Any]
    first_scored: int
    """The first position of its logprobs range (none when it is the prompt's end)."""
    midway: Callable[[], None] | None = None
    """A fault made once its first event came."""
    leave_after: int = 0
    """Its caller leaves it after that many events (0: never)."""

    @property
    def offset(self) -> int:
        truncate_to = self.options["truncate_to"]
        return len(self.tracked.tokens) if truncate_to is None else int(truncate_to)

    @property
    def prompt_end(self) -> int:
        return self.offset + len(self.tokens)


class Driver:
    """The same calls through the sync client or the asyncio one (run on a loop thread)."""

    def __init__(self, target: str, is_async: bool) -> None:
        self.is_async = is_async
        self._loop: asyncio.AbstractEventLoop | None = None
        if is_async:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
            self._thread.start()
            self.client: Any = self.run(self._async_client(target))
        else:
            self.client = SalienceClient(target, timeout=CALL_TIMEOUT_S, replay=FAILOVER)

    @staticmethod
    async def _async_client(target: str) -> AsyncSalienceClient:
        return AsyncSalienceClient(target, timeout=CALL_TIMEOUT_S, replay=FAILOVER)

    def run(self, coroutine: Any) -> Any:
        """Runs a coroutine on the loop; a call still running after twice the call
        timeout hangs: the test fails."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(2 * CALL_TIMEOUT_S)

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        return self.run(result) if self.is_async else result

    def events(self, calls: list[Call]) -> list[list[TokenEvent | Done]]:
        """The events of each call, the calls made together (each its own session)."""
        if not self.is_async:
            if len(calls) == 1:
                return [self._read(calls[0])]
            with ThreadPoolExecutor(len(calls)) as pool:
                return list(pool.map(self._read, calls))

        async def together() -> list[list[TokenEvent | Done]]:
            return list(await asyncio.gather(*(self._read_async(call) for call in calls)))

        return self.run(together())  # type: ignore[no-any-return]

    @staticmethod
    def _read(call: Call) -> list[TokenEvent | Done]:
        got: list[TokenEvent | Done] = []
        stream = call.tracked.session.generate(call.tokens, **call.options)
        for event in stream:
            got.append(event)
            if call.midway is not None and len(got) == 1:
                call.midway()
            if len(got) == call.leave_after:
                stream.close()
                break
        return got

    @staticmethod
    async def _read_async(call: Call) -> list[TokenEvent | Done]:
        got: list[TokenEvent | Done] = []
        stream = call.tracked.session.generate(call.tokens, **call.options)
        async for event in stream:
            got.append(event)
            if call.midway is not None and len(got) == 1:
                call.midway()
            if len(got) == call.leave_after:
                await stream.aclose()
                break
        return got

    def close(self) -> None:
        if self._loop is None:
            self.client.close()
            return
        self.run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

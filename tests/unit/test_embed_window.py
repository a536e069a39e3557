"""``embed_inputs.InputWindow`` over a fake engine queue of a fixed capacity: the inputs
of a call already admitted wait for their own to make room; a call refused at its
first input is refused; other errors pass through."""

from __future__ import annotations

import asyncio

import pytest

from salience_server.engine.errors import Code, SalienceError
from salience_server.rpc.embed_inputs import InputWindow


class _Queue:
    """Takes ``capacity`` inputs at once (QUEUE_FULL beyond), each for a few loop turns."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.num_in = 0
        self.num_refused = 0

    async def embed(self, value: int) -> int:
        if self.num_in >= self.capacity:
            self.num_refused += 1
            raise SalienceError(Code.RESOURCE_EXHAUSTED, "QUEUE_FULL", "full")
        self.num_in += 1
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            return value * 10
        finally:
            self.num_in -= 1


async def _call(queue: _Queue, window: InputWindow, values: list[int]) -> list[int]:
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(window.run(lambda v=v: queue.embed(v))) for v in values]
    return [task.result() for task in tasks]


def test_calls_admitted_together_finish_whole_in_a_queue_they_overfill() -> None:
    """Three calls of 10 inputs, 4 at a time each, through a queue of 9: each call's
    first input gets in (all three admitted), and then they want 12 places. With a
    plain window of 4 the last call failed on its second input (QUEUE_FULL), its first
    vector made for nothing."""

    async def scenario() -> tuple[list[list[int]], int]:
        queue = _Queue(capacity=9)
        calls = [list(range(10 * c, 10 * c + 10)) for c in range(3)]
        windows = [InputWindow(4) for _ in calls]
        results = await asyncio.gather(
            *(_call(queue, window, values) for window, values in zip(windows, calls, strict=True))
        )
        return results, queue.num_refused

    results, num_refused = asyncio.run(scenario())
    assert results == [[v * 10 for v in range(10 * c, 10 * c + 10)] for c in range(3)]
    assert num_refused > 0  # the queue did refuse inputs; each tried again


def test_a_call_refused_at_its_first_input_is_refused() -> None:
    async def scenario() -> None:
        queue = _Queue(capacity=0)
        await InputWindow(4).run(lambda: queue.embed(1))

    with pytest.raises(SalienceError) as caught:
        asyncio.run(scenario())
    assert caught.value.reason == "QUEUE_FULL"


def test_other_failures_are_not_retried() -> None:
    calls = []

    async def failing() -> int:
        calls.append(1)
        raise SalienceError(Code.INVALID_ARGUMENT, "CONTEXT_EXCEEDED", "too long")

    async def scenario() -> None:
        await InputWindow(4).run(failing)

    with pytest.raises(SalienceError) as caught:
        asyncio.run(scenario())
    assert caught.value.reason == "CONTEXT_EXCEEDED" and len(calls) == 1

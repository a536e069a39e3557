"""``embed_inputs.InputWindow`` over a fake engine queue of a fixed capacity: the inputs
of a call already admitted wait for room (their own call's, or another's); a call
refused at its first input is refused; other errors pass through."""

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


def _refused_once() -> tuple[list[int], object]:
    """An input refused QUEUE_FULL on its first try, taken on the next; and its tries."""
    tries: list[int] = []

    async def embed() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise SalienceError(Code.RESOURCE_EXHAUSTED, "QUEUE_FULL", "full")
        return "C"

    return tries, embed


def test_a_refused_input_is_tried_again_when_a_later_input_of_its_call_ends() -> None:
    """A and B are in the engine; A ends; C is refused and waits; B ends: C is tried
    again. (Each end set the event its input saw as it began, not the one then
    current: B's end set A's, already set, and C waited for good.)"""

    async def scenario() -> list[str]:
        window = InputWindow(3)
        a_done, b_done = asyncio.Event(), asyncio.Event()

        async def wait_for(done: asyncio.Event, name: str) -> str:
            await done.wait()
            return name

        a = asyncio.create_task(window.run(lambda: wait_for(a_done, "A")))
        b = asyncio.create_task(window.run(lambda: wait_for(b_done, "B")))
        await asyncio.sleep(0.01)
        a_done.set()
        await asyncio.sleep(0.01)
        tries, embed = _refused_once()
        c = asyncio.create_task(window.run(embed))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert len(tries) == 1  # refused, waiting for B
        b_done.set()
        return [await a, await b, await asyncio.wait_for(c, 0.15)]

    assert asyncio.run(scenario()) == ["A", "B", "C"]


def test_an_input_refused_after_its_call_made_vectors_waits_for_room() -> None:
    """Input 0 made its vector; input 1 is refused while none of the call's is in the
    engine (other calls filled it): it tries again after a pause, and the call does not
    fail halfway."""

    async def scenario() -> list[str]:
        window = InputWindow(2)

        async def made() -> str:
            return "vector"

        first = await window.run(made)
        tries, embed = _refused_once()
        second = await asyncio.wait_for(window.run(embed), 1.0)  # type: ignore[arg-type]
        assert len(tries) == 2
        return [first, second]

    assert asyncio.run(scenario()) == ["vector", "C"]


def test_a_refused_call_submits_no_other_input() -> None:
    """The call's first input was refused (QUEUE_FULL, nothing of it in the engine): its
    other inputs, until the call's task group cancels them, submit nothing, even where
    room came meanwhile (they did: work for a refused call)."""

    async def scenario() -> list[int]:
        window = InputWindow(3)
        submitted: list[int] = []

        async def refused() -> str:
            raise SalienceError(Code.RESOURCE_EXHAUSTED, "QUEUE_FULL", "full")

        async def would_fit() -> str:
            submitted.append(1)
            return "vector"

        with pytest.raises(SalienceError):
            await window.run(refused)
        with pytest.raises(SalienceError) as caught:
            await window.run(would_fit)
        assert caught.value.reason == "QUEUE_FULL"
        return submitted

    assert asyncio.run(scenario()) == []

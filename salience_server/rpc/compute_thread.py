"""Torch work off the engine thread runs in a thread of its own, which ends with it.

torch's CPU operators run in OpenMP (libgomp) thread teams, one pool per thread that
starts a parallel region, kept until that thread ends. Once more pools exist than the
machine has cores, libgomp stops spinning between regions, and every region of the
engine's forward pass waits for its workers to wake: a default-model float32 decode
step took 55 ms through gRPC when the model had been loaded on an executor thread (a
pool that lived on), against 34 ms once the loading thread ended before the engine
started. So model loading and image encoding, the heavy torch work done outside the
engine thread, never run on the event loop or on the executor's reused threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_own_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a new thread; returns once that thread has ended (raises
    what it raised as soon as it raised it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as raised:
            result, error = None, raised
        # A loop closed meanwhile (its caller was cancelled and has gone): no one waits.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, future, result, error)

    thread = threading.Thread(target=run, name=f"salience-{function.__name__}", daemon=True)
    thread.start()
    result = await future  # cancelled: the thread finishes on its own, unwaited for
    await asyncio.to_thread(thread.join)  # it has returned: only its end is awaited
    return result


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

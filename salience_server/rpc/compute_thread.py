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
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_own_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a new thread; returns once that thread has ended."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as error:
            loop.call_soon_threadsafe(_settle, future, None, error)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    thread = threading.Thread(target=run, name=f"salience-{function.__name__}", daemon=True)
    thread.start()
    try:
        return await future
    finally:
        await asyncio.to_thread(thread.join)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

"""Stop signals outside the servers' event loops. Inside a loop, the server and the shim
drain on the first signal (see ``rpc.server.serve``); before the loop starts, and after
it has closed and handed the signals back to Python's defaults, a signal ends the
process at once, cleanly: SIGTERM killed it with 143, and SIGINT raised a
KeyboardInterrupt with a traceback (of the imports, or of the interpreter's clean-up)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that stop the server and the shim gracefully: SIGHUP too (a closed terminal
killed them at once, the calls in flight reset)."""


def exit_at_once_on_stop_signals(message: str | None = None) -> None:
    """From now until an event loop takes them over, a stop signal logs ``message``
    (where given) and ends the process with 0, skipping the interpreter's clean-up."""

    def stop(signum: int, frame: object) -> None:
        logging.getLogger("salience").info("%s", message)
        exit_now()

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop if message else _exit_at_once)


def _exit_at_once(signum: int, frame: object) -> None:
    exit_now()


@contextlib.contextmanager
def handled_in(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> Iterator[None]:
    """Within: each stop signal calls ``handler`` in ``loop``. After: a stop signal ends
    the process at once. (Left to the loop, its close gave the signals back to Python's
    defaults, and an operator's repeated Ctrl-C during the clean-up raised
    KeyboardInterrupt.)"""
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, handler)
    try:
        yield
    finally:
        try:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)  # which puts back Python's default
                signal.signal(signum, _exit_at_once)
        except KeyboardInterrupt:  # a Ctrl-C came in between: the default took it
            exit_now()


def exit_now() -> None:
    """Ends the process with 0 without the interpreter's clean-up, the logs flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

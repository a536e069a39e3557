"""Whether a ``generate()`` stream its caller holds is paused at a ``yield``: started and
not finished, so that a next call of its session closes it first."""

from __future__ import annotations

import inspect
from typing import Any


def is_suspended(stream: Any) -> bool:
    """A generator (``Session.generate``) paused at a ``yield``."""
    return inspect.getgeneratorstate(stream) == inspect.GEN_SUSPENDED


def is_async_suspended(stream: Any) -> bool:
    """An async generator (``AsyncSession.generate``) started and paused at a ``yield``
    (``inspect.getasyncgenstate`` says so from Python 3.12; before, a frame not at its
    first instruction and not running)."""
    state = getattr(inspect, "getasyncgenstate", None)
    if state is not None:
        return bool(state(stream) == "AGEN_SUSPENDED")
    frame = stream.ag_frame
    return frame is not None and not stream.ag_running and frame.f_lasti > 0

"""A session's owner and the calls waiting for it to be free."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from salience_server.engine.session import Session


def test_the_end_of_its_call_frees_the_session_and_tells_every_waiter() -> None:
    session = Session("s", max_context=64)
    owner: Any = object()  # a Request, as far as the session knows
    session.owner = owner
    assert session.is_busy
    waiting: Future[None] = Future()
    gave_up: Future[None] = Future()
    session.free_waiters += [gave_up, waiting]
    assert gave_up.cancel()  # its call stopped waiting (a deadline): no error for the engine
    session.free_of_owner()
    assert not session.is_busy and session.owner is None
    assert waiting.done() and waiting.result() is None
    assert session.free_waiters == []

"""Hand-made requests and a scheduler over a real block pool, for the scheduler's
unit tests."""

from __future__ import annotations

from salience_server.config import EngineConfig
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.evictor import Evictor
from salience_server.engine.request import GenerateParams, Request
from salience_server.engine.scheduler import Scheduler
from salience_server.engine.session import Session


def make_scheduler(
    config: EngineConfig, manager: BlockManager, sessions=None, host_bytes=0
) -> Scheduler:
    evictor = Evictor(sessions if sessions is not None else {}, manager, host_bytes, 1)
    return Scheduler(config, manager, evictor)


def make_request(
    request_id: int, priority: int, prompt_len: int = 4, max_tokens: int = 4
) -> Request:
    session = Session(f"s{request_id}", max_context=128, token_ids=list(range(prompt_len)))
    params = GenerateParams(
        session_id=session.session_id,
        append_tokens=list(range(prompt_len)),
        max_tokens=max_tokens,
        priority=priority,
    )
    return Request(request_id, params, session, lambda event: None, set(), None)


def continuing(request_id: int, session: Session, offset: int, max_tokens: int = 1) -> Request:
    """A call on ``session`` as it stands (``offset`` its length, nothing appended)."""
    params = GenerateParams(session_id=session.session_id, offset=offset, max_tokens=max_tokens)
    return Request(request_id, params, session, lambda event: None, set(), None)


def run_step(scheduler: Scheduler) -> list[tuple[int, int]]:
    """Schedules one step and pretends the model ran it: (request id, tokens fed)."""
    output = scheduler.schedule()
    for chunk in output.chunks:
        session = chunk.request.session
        session.num_computed = chunk.start + chunk.num_tokens
        if session.num_computed == session.length and chunk.request.wants_decode:
            session.token_ids.append(0)
            chunk.request.num_decoded += 1
        if chunk.request.is_finished:
            scheduler.finish(chunk.request)
    return [(chunk.request.request_id, chunk.num_tokens) for chunk in output.chunks]


def owning(sessions: dict[str, Session], *requests: Request) -> None:
    """The requests' sessions in the engine's table, each owned by its call (as the
    engine holds a session busy while its call runs)."""
    for request in requests:
        sessions[request.session.session_id] = request.session
        request.session.owner = request

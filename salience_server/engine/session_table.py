"""The live sessions: creation, forks, closing and expiry, and what they hold.

Not thread-safe by itself: the engine calls it under its lock.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass

from salience_client.failover import SESSION_ID_PATTERN
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.errors import (
    Code,
    SalienceError,
    invalid,
    session_not_found,
    shown_id,
)
from salience_server.engine.evictor import Evictor
from salience_server.engine.images import ImageStore
from salience_server.engine.model_runner import ModelRunner
from salience_server.engine.session import Residency, Session

log = logging.getLogger(__name__)


@dataclass
class SessionInfo:
    session_id: str
    length: int
    max_context: int
    residency: Residency
    num_blocks: int
    kv_bytes: int
    idle_seconds: float
    is_busy: bool


def context_limit(asked: int, model_limit: int, pool_tokens: int) -> tuple[int, str]:
    """The positions a session may hold, and what sets them (for the errors of calls
    that pass it): ``asked`` (``--max-context``; 0: the model's), never past the model's
    own nor past the KV pool (a session's whole KV is on the device while it computes);
    the log says when either cuts it."""
    limit = min(asked or model_limit, model_limit)
    source = "--max-context" if asked and asked < model_limit else "the model's positions"
    if asked > model_limit:
        log.warning(
            "--max-context %d is beyond the model's %d positions: sessions hold %d",
            asked,
            model_limit,
            model_limit,
        )
    if limit > pool_tokens:
        log.warning(
            "the KV pool holds %d tokens, fewer than the %d positions a session could "
            "hold: sessions hold %d; raise --kv-cache-memory for more",
            pool_tokens,
            limit,
            pool_tokens,
        )
        return pool_tokens, "the KV pool's size: raise --kv-cache-memory for more"
    return limit, source


class SessionTable:
    def __init__(
        self,
        block_manager: BlockManager,
        evictor: Evictor,
        images: ImageStore,
        runner: ModelRunner,
        max_context: int,
        block_bytes: int,
        max_sessions: int = 16384,
    ) -> None:
        self.sessions: dict[str, Session] = evictor.sessions
        self.max_sessions = max_sessions
        self.block_manager = block_manager
        self.evictor = evictor
        self.images = images
        self.runner = runner
        self.max_context = max_context
        self.block_bytes = block_bytes

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise session_not_found(session_id)
        return session

    def open(self, session_id: str = "", max_context: int = 0) -> Session:
        if session_id and not SESSION_ID_PATTERN.fullmatch(session_id):
            raise invalid(
                "INVALID_SESSION_ID",
                f"session ids are 1 to 128 visible ASCII characters, got {shown_id(session_id)}",
            )
        session_id = session_id or uuid.uuid4().hex
        if session_id in self.sessions:
            raise SalienceError(
                Code.ALREADY_EXISTS,
                "SESSION_EXISTS",
                f"session {shown_id(session_id)} already exists",
            )
        if len(self.sessions) >= self.max_sessions:
            raise SalienceError(
                Code.RESOURCE_EXHAUSTED,
                "TOO_MANY_SESSIONS",
                f"{len(self.sessions)} sessions are open (--max-sessions "
                f"{self.max_sessions}): close some, or wait for idle ones to expire",
            )
        limit = min(max_context, self.max_context) if max_context else self.max_context
        session = Session(session_id, limit)
        self.sessions[session_id] = session
        return session

    def fork(self, parent: Session, new_session_id: str = "") -> Session:
        """A child sharing the parent's committed tokens and KV blocks (copy-on-write)."""
        child = self.open(new_session_id, parent.max_context)
        child.token_ids = list(parent.token_ids)
        if parent.ngram_index is not None:
            child.ngram_index = parent.ngram_index.copy()
        child.acceptance = dataclasses.replace(parent.acceptance)
        child.images = [self.images.copy(child, span) for span in parent.images]
        if parent.residency == Residency.RESIDENT:
            child.block_table = self.block_manager.share(parent.block_table)
            child.num_computed = parent.num_computed
        else:  # the child computes its KV on first use
            child.residency = Residency.DROPPED
        # Its history is the parent's: KV the parent lost is recomputed, not new.
        child.num_ever_computed = parent.num_ever_computed
        parent.touch()
        return child

    def remove(self, session: Session) -> None:
        """Forgets a session; its memory is freed now, or when its call ends if busy."""
        del self.sessions[session.session_id]
        session.is_closed = True
        if not session.is_busy:
            self.free(session)

    def free(self, session: Session) -> None:
        """Returns a closed session's blocks, image embeddings and host memory."""
        self.block_manager.free(session.block_table)
        self.images.drop(session.images)
        if session.residency == Residency.OFFLOADED:
            self.evictor.forget(session)
            self.runner.discard_host_kv(session.session_id)

    def release_rewound_host_kv(self, session: Session) -> None:
        """After a rewind: an offloaded session keeps (and counts) only the host KV of
        the tokens it still has."""
        if session.residency != Residency.OFFLOADED:
            return
        self.evictor.shrink(session)
        num_blocks = self.block_manager.blocks_for(session.num_computed)
        self.runner.trim_host_kv(session.session_id, num_blocks)

    def expire(self, ttl_s: float) -> None:
        """Closes sessions idle for longer than ``ttl_s`` (0: never): no call owns them,
        and their clients have read none of their events for that long."""
        if ttl_s <= 0:
            return
        for session in list(self.sessions.values()):
            if not session.is_busy and session.idle_seconds() > ttl_s:
                log.info("session %s expired after %.0f s idle", session.session_id, ttl_s)
                self.remove(session)

    def info(self, session: Session) -> SessionInfo:
        num_blocks = len(session.block_table)
        return SessionInfo(
            session_id=session.session_id,
            length=session.length,
            max_context=session.max_context,
            residency=session.residency,
            num_blocks=num_blocks,
            kv_bytes=session.host_kv_bytes or num_blocks * self.block_bytes,
            idle_seconds=session.idle_seconds(),
            is_busy=session.is_busy,
        )

"""Who loses KV residency when the block pool runs short. Plain Python, no tensors.

Victims are the least recently used sessions not in the current step: idle sessions
first, then sessions whose requests wait. A victim's KV goes to host memory while the
host budget allows (offloaded: restored by copying back), else it is dropped
(recomputed from the session's tokens on next use). Tokens are never lost.
"""

from __future__ import annotations

from dataclasses import dataclass

from salience_server.engine.block_manager import BlockManager
from salience_server.engine.session import Residency, Session


@dataclass
class SwapOut:
    """Copy the KV of ``num_tokens`` tokens in ``block_ids`` to host memory."""

    session_id: str
    block_ids: list[int]
    num_tokens: int


@dataclass
class SwapIn:
    """Copy a session's host KV back into ``block_ids``."""

    session_id: str
    block_ids: list[int]


class Evictor:
    def __init__(
        self,
        sessions: dict[str, Session],
        block_manager: BlockManager,
        host_kv_bytes: int,
        kv_bytes_per_token: int,
    ) -> None:
        self.sessions = sessions
        self.block_manager = block_manager
        self.host_kv_bytes = host_kv_bytes
        self.kv_bytes_per_token = kv_bytes_per_token
        self.host_bytes_used = 0

    def make_room(self, num_blocks: int, protected: set[str], swap_outs: list[SwapOut]) -> bool:
        """Evicts until ``num_blocks`` blocks are free; False if that is impossible
        without touching the ``protected`` sessions (this step's)."""
        while self.block_manager.num_free < num_blocks:
            victim = self._pick(protected)
            if victim is None:
                return False
            self.evict(victim, swap_outs)
        return True

    def evict(self, session: Session, swap_outs: list[SwapOut]) -> None:
        """Takes ``session``'s blocks away, offloading its KV if the host budget allows."""
        num_bytes = session.num_computed * self.kv_bytes_per_token
        if 0 < num_bytes <= self.host_kv_bytes - self.host_bytes_used:
            num_blocks = self.block_manager.blocks_for(session.num_computed)
            swap_outs.append(
                SwapOut(session.session_id, session.block_table[:num_blocks], session.num_computed)
            )
            session.residency = Residency.OFFLOADED
            session.host_kv_bytes = num_bytes
            self.host_bytes_used += num_bytes
        else:
            session.residency = Residency.DROPPED
            session.num_computed = 0
        self.block_manager.free(session.block_table)

    def restore(self, session: Session, swap_ins: list[SwapIn]) -> None:
        """Marks an offloaded session resident; its blocks must already be allocated."""
        num_blocks = self.block_manager.blocks_for(session.num_computed)
        swap_ins.append(SwapIn(session.session_id, session.block_table[:num_blocks]))
        self.forget(session)
        session.residency = Residency.RESIDENT

    def shrink(self, session: Session) -> None:
        """An offloaded session was rewound: only the host KV of the tokens it still has
        stays budgeted; with none left it counts as dropped."""
        num_bytes = session.num_computed * self.kv_bytes_per_token
        self.host_bytes_used -= session.host_kv_bytes - num_bytes
        session.host_kv_bytes = num_bytes
        if num_bytes == 0:
            session.residency = Residency.DROPPED

    def forget(self, session: Session) -> None:
        """Releases a session's host budget (restored or closed)."""
        self.host_bytes_used -= session.host_kv_bytes
        session.host_kv_bytes = 0

    def _pick(self, protected: set[str]) -> Session | None:
        candidates = [
            s for s in self.sessions.values() if s.block_table and s.session_id not in protected
        ]
        if not candidates:
            return None
        # Idle before waiting; sessions that free blocks before ones sharing all theirs.
        return min(
            candidates,
            key=lambda s: (
                s.is_busy,
                self.block_manager.num_owned(s.block_table) == 0,
                s.last_used,
            ),
        )

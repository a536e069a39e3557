"""Which idle session loses KV residency, and how. Plain Python, no tensors.

A victim's KV goes to host memory while the host budget allows (offloaded: restored
by copying back), else it is dropped (recomputed from the session's tokens on next
use). Tokens are never lost. The host tier keeps the most recently used sessions: an
idle session offloaded earlier, and used less recently than the victim, is dropped to
make room for the victim's KV (least recently used first), where that makes room. The
host budget also holds the image embeddings kept for recomputing image placeholders:
they come first, and an image that needs room drops offloaded KV (idle sessions' least
recently used first).

The KV moves a step needs are returned in the order they were decided, and the model
runner makes them in that order: a block freed by one eviction and handed to another
session later in the same step is read (swapped out, or copied for copy-on-write)
before it is written.
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


@dataclass
class CopyBlocks:
    """Copy-on-write: copy each ``(source, destination)`` block."""

    pairs: list[tuple[int, int]]


KvMove = SwapOut | SwapIn | CopyBlocks


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
        """Offloaded KV plus kept image embeddings."""
        self.discarded_host_kv: list[str] = []
        """Sessions whose host KV was given up (for images, or for a more recently used
        session's KV); the engine frees it (``take_discarded``)."""
        self.num_offloaded = 0
        """Since the start: evictions whose KV went to host memory."""
        self.num_dropped = 0
        """Since the start: evictions whose KV was dropped (no host room for it)."""
        self.num_host_kv_dropped = 0
        """Since the start: offloaded sessions whose host KV was given up later (for a
        more recently used session's KV, or for an image's embeddings)."""

    def idle_sessions(self, protected: set[str]) -> list[Session]:
        """The idle sessions holding blocks, outside ``protected``."""
        return [
            s
            for s in self.sessions.values()
            if s.block_table and not s.is_busy and s.session_id not in protected
        ]

    def pick_idle(self, protected: set[str]) -> Session | None:
        """The least recently used idle session holding blocks, outside ``protected``;
        sessions that free blocks before ones sharing all theirs with forks."""
        return min(
            self.idle_sessions(protected),
            key=lambda s: (self.block_manager.num_owned(s.block_table) == 0, s.last_used),
            default=None,
        )

    def evict(self, session: Session, moves: list[KvMove]) -> None:
        """Takes ``session``'s blocks away, offloading its KV if the host budget allows
        (after dropping less recently used offloaded KV, where that makes room)."""
        num_bytes = self._host_bytes(session.num_computed)
        self._make_host_room(num_bytes, session.last_used, moves)
        if 0 < num_bytes <= self.host_kv_bytes - self.host_bytes_used:
            num_blocks = self.block_manager.blocks_for(session.num_computed)
            moves.append(
                SwapOut(session.session_id, session.block_table[:num_blocks], session.num_computed)
            )
            session.residency = Residency.OFFLOADED
            session.host_kv_bytes = num_bytes
            self.host_bytes_used += num_bytes
            self.num_offloaded += 1
        else:
            session.residency = Residency.DROPPED
            session.num_computed = 0
            self.num_dropped += 1
        self.block_manager.free(session.block_table)

    def _host_bytes(self, num_tokens: int) -> int:
        """Host memory the KV of a session's first ``num_tokens`` tokens takes there:
        whole blocks (with 256-token blocks, a 20-token session's KV takes 256 tokens')."""
        num_blocks = self.block_manager.blocks_for(num_tokens)
        return num_blocks * self.block_manager.block_size * self.kv_bytes_per_token

    def _make_host_room(self, num_bytes: int, last_used: float, moves: list[KvMove]) -> None:
        """Drops the host KV of idle sessions used before ``last_used``, least recently
        used first, until ``num_bytes`` fit; nothing where dropping them all would not
        make the room. A busy session's host KV stays (its request may be restoring it
        in this very step)."""
        free = self.host_kv_bytes - self.host_bytes_used
        if num_bytes == 0 or num_bytes <= free:
            return
        older = sorted(
            (
                s
                for s in self.sessions.values()
                if s.residency == Residency.OFFLOADED and not s.is_busy and s.last_used < last_used
            ),
            key=lambda s: s.last_used,
        )
        if free + sum(s.host_kv_bytes for s in older) < num_bytes:
            return
        for session in older:
            if num_bytes <= self.host_kv_bytes - self.host_bytes_used:
                break
            self._drop_offloaded(session, moves)

    def _drop_offloaded(self, session: Session, moves: list[KvMove]) -> None:
        """An offloaded session's KV is given up: its session recomputes it. A swap-out
        decided earlier in this step is taken back (its copy is not made); host KV
        from an earlier step is freed by the engine (``take_discarded``)."""
        self.forget(session)
        session.residency = Residency.DROPPED
        session.num_computed = 0
        self.num_host_kv_dropped += 1
        for index in range(len(moves) - 1, -1, -1):  # the copy its host KV was to be
            move = moves[index]
            if isinstance(move, SwapOut) and move.session_id == session.session_id:
                del moves[index]
                return
        self.discarded_host_kv.append(session.session_id)

    def take_discarded(self) -> list[str]:
        """The sessions whose host KV was given up since the last call, for the engine
        to free."""
        discarded, self.discarded_host_kv = self.discarded_host_kv, []
        return discarded

    def restore(self, session: Session, moves: list[KvMove]) -> None:
        """Marks an offloaded session resident; its blocks must already be allocated."""
        num_blocks = self.block_manager.blocks_for(session.num_computed)
        moves.append(SwapIn(session.session_id, session.block_table[:num_blocks]))
        self.forget(session)
        session.residency = Residency.RESIDENT

    def shrink(self, session: Session) -> None:
        """An offloaded session was rewound: only the host KV of the tokens it still has
        stays budgeted; with none left it counts as dropped."""
        num_bytes = self._host_bytes(session.num_computed)
        self.host_bytes_used -= session.host_kv_bytes - num_bytes
        session.host_kv_bytes = num_bytes
        if num_bytes == 0:
            session.residency = Residency.DROPPED

    def forget(self, session: Session) -> None:
        """Releases a session's host budget (restored or closed)."""
        self.host_bytes_used -= session.host_kv_bytes
        session.host_kv_bytes = 0

    def recover_from_failed_moves(self, moves: list[KvMove]) -> None:
        """A step's KV moves failed part-way (host memory ran out, say), and none of its
        swap-outs was kept: their sessions drop, and every session whose blocks a swap-in
        or copy-on-write was to write recomputes its KV from its tokens, rather than
        trust blocks the failed copies may have left half-written."""
        swapped_out = {move.session_id for move in moves if isinstance(move, SwapOut)}
        written: set[int] = set()
        for move in moves:
            if isinstance(move, SwapIn):
                written.update(move.block_ids)
            elif isinstance(move, CopyBlocks):
                written.update(target for _, target in move.pairs)
        for session in self.sessions.values():
            if session.session_id in swapped_out and session.residency == Residency.OFFLOADED:
                self.forget(session)
                session.residency = Residency.DROPPED
                session.num_computed = 0
            elif written.intersection(session.block_table):
                session.num_computed = 0

    def can_hold_image(self, num_bytes: int) -> bool:
        """Whether ``num_bytes`` of image embeddings fit, counting offloaded KV as room
        (images come first)."""
        offloaded = sum(s.host_kv_bytes for s in self.sessions.values())
        return self.host_bytes_used - offloaded + num_bytes <= self.host_kv_bytes

    def hold_image(self, num_bytes: int) -> None:
        """Budgets image embeddings, dropping offloaded KV to make room: idle sessions'
        first (least recently used first), then those of calls waiting to run."""
        offloaded = sorted(
            (s for s in self.sessions.values() if s.residency == Residency.OFFLOADED),
            key=lambda s: (s.is_busy, s.last_used),
        )
        for session in offloaded:
            if self.host_bytes_used + num_bytes <= self.host_kv_bytes:
                break
            self._drop_offloaded(session, [])  # images come at intake, not in a step
        self.host_bytes_used += num_bytes

    def release_image(self, num_bytes: int) -> None:
        self.host_bytes_used -= num_bytes

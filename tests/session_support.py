"""A session table over a real block pool, evictor and image store, and no model (the
runner is a stand-in that records what it is told to do with host KV): for the unit
tests of the table and of the engine's intake of calls."""

from __future__ import annotations

import torch

from salience_server.engine.block_manager import BlockManager
from salience_server.engine.evictor import Evictor
from salience_server.engine.images import ImageStore
from salience_server.engine.session import Session
from salience_server.engine.session_table import SessionTable

BLOCK_SIZE = 4
BLOCK_BYTES = 100


class RecordingRunner:
    """What the table and the intake ask of the model runner: its device, and host KV
    to discard or trim."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.discarded: list[str] = []
        self.trimmed: list[tuple[str, int]] = []

    def discard_host_kv(self, session_id: str) -> None:
        self.discarded.append(session_id)

    def trim_host_kv(self, session_id: str, num_blocks: int) -> None:
        self.trimmed.append((session_id, num_blocks))


def make_table(max_sessions: int = 16, host_bytes: int = 10_000) -> SessionTable:
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    evictor = Evictor({}, manager, host_bytes, kv_bytes_per_token=1)
    runner = RecordingRunner()
    return SessionTable(
        manager, evictor, ImageStore(evictor), runner, 64, BLOCK_BYTES, max_sessions
    )


def computed(table: SessionTable, session: Session, num_tokens: int) -> Session:
    """``session`` holding ``num_tokens`` tokens, all with KV."""
    session.token_ids = list(range(num_tokens))
    table.block_manager.append(session.block_table, num_tokens, 0)
    session.num_computed = session.num_ever_computed = num_tokens
    return session


def check_pool(table: SessionTable) -> None:
    table.block_manager.check_invariants([s.block_table for s in table.sessions.values()])

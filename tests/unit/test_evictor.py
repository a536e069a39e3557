"""The evictor alone, with a real block pool and hand-made sessions; no model. (Its
choices inside a scheduler's step: test_scheduler, test_kv_moves.)"""

from __future__ import annotations

from salience_server.engine.block_manager import BlockManager
from salience_server.engine.evictor import CopyBlocks, Evictor, KvMove, SwapIn, SwapOut
from salience_server.engine.session import Residency, Session

BLOCK_SIZE = 4


def _session(manager: BlockManager, name: str, num_tokens: int, last_used: float) -> Session:
    session = Session(name, max_context=64, token_ids=list(range(num_tokens)))
    manager.append(session.block_table, num_tokens, 0)
    session.num_computed = session.num_ever_computed = num_tokens
    session.last_used = last_used
    return session


def test_evictions_are_counted_by_where_their_kv_went() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first, second = _session(manager, "a", 8, 1.0), _session(manager, "b", 8, 2.0)
    evictor = Evictor({"a": first, "b": second}, manager, 8, 1)  # room for one
    moves: list[KvMove] = []
    blocks = list(second.block_table)
    evictor.evict(first, moves)
    evictor.evict(second, moves)  # no room left, and "a" is older: "a" gives its room up
    assert moves == [SwapOut("b", blocks, 8)]  # the copy of "a" is taken back
    assert (evictor.num_offloaded, evictor.num_dropped, evictor.num_host_kv_dropped) == (2, 0, 1)
    assert first.residency == Residency.DROPPED and second.residency == Residency.OFFLOADED
    assert evictor.take_discarded() == [] and evictor.host_bytes_used == 8
    third = _session(manager, "c", 4, 0.5)
    evictor.sessions["c"] = third
    evictor.evict(third, [])  # older than "b": it does not take its room
    assert (evictor.num_offloaded, evictor.num_dropped) == (2, 1)
    assert third.residency == Residency.DROPPED and third.num_computed == 0
    manager.check_invariants([s.block_table for s in evictor.sessions.values()])


def test_failed_moves_leave_every_session_they_touched_to_recompute() -> None:
    """Swap-outs of the failed step drop their sessions' KV; sessions whose blocks a
    swap-in or a copy was to write recompute theirs; the others keep theirs."""
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    sessions = {
        name: _session(manager, name, 8, float(i))
        for i, name in enumerate(["out", "in", "copied", "kept"])
    }
    evictor = Evictor(sessions, manager, 1000, 1)
    moves: list[KvMove] = []
    evictor.evict(sessions["out"], moves)
    assert evictor.host_bytes_used == 8
    restored = sessions["in"]
    moves.append(SwapIn("in", restored.block_table[1:]))
    moves.append(CopyBlocks([(restored.block_table[0], sessions["copied"].block_table[1])]))
    evictor.recover_from_failed_moves(moves)
    assert sessions["out"].residency == Residency.DROPPED and evictor.host_bytes_used == 0
    assert [s.num_computed for s in sessions.values()] == [0, 0, 0, 8]
    assert sessions["kept"].residency == Residency.RESIDENT


def test_host_bytes_are_whole_blocks_of_the_kv_of_a_token() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    session = _session(manager, "s", 6, 1.0)  # 2 blocks: 8 tokens' room
    evictor = Evictor({"s": session}, manager, 1000, kv_bytes_per_token=10)
    evictor.evict(session, [])
    assert session.host_kv_bytes == evictor.host_bytes_used == 80
    manager.append(session.block_table, 6, 0)
    moves: list[KvMove] = []
    evictor.restore(session, moves)
    assert moves == [SwapIn("s", session.block_table)]
    assert session.residency == Residency.RESIDENT and evictor.host_bytes_used == 0


def test_a_session_without_computed_kv_is_dropped_not_offloaded() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    session = _session(manager, "s", 8, 1.0)
    session.num_computed = 0  # its blocks were taken for KV not computed yet
    evictor = Evictor({"s": session}, manager, 1000, 1)
    moves: list[KvMove] = []
    evictor.evict(session, moves)
    assert moves == [] and session.residency == Residency.DROPPED
    assert evictor.host_bytes_used == 0 and session.block_table == []


def test_host_room_is_made_by_dropping_as_few_older_sessions_as_needed() -> None:
    """A victim's KV takes host room from offloaded sessions used before it, least
    recently used first, and no more than it needs; host KV offloaded in an earlier step
    is discarded by the engine, a swap-out of this step is taken back."""
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    names = ["a", "b", "c", "d"]
    sessions = {name: _session(manager, name, 8, float(i)) for i, name in enumerate(names)}
    evictor = Evictor(sessions, manager, 24, 1)  # three sessions' KV
    evictor.evict(sessions["a"], [])  # an earlier step
    moves: list[KvMove] = []
    blocks = {name: list(sessions[name].block_table) for name in names}
    for name in ["b", "c", "d"]:
        evictor.evict(sessions[name], moves)  # "d" needs room: "a" alone gives it
    assert moves == [SwapOut(name, blocks[name], 8) for name in ["b", "c", "d"]]
    assert evictor.take_discarded() == ["a"] and evictor.host_bytes_used == 24
    assert [s.residency for s in sessions.values()] == [Residency.DROPPED] + [
        Residency.OFFLOADED
    ] * 3

"""The KV moves of one step under any interleaving: a copy-on-write source block that an
eviction frees in the same step, and that a restored session then takes, is copied
before it is overwritten. The scheduler decides; a real ModelRunner moves the tensors."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from salience_server.config import EngineConfig
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.evictor import CopyBlocks, Evictor, SwapIn, SwapOut
from salience_server.engine.model_runner import ModelRunner
from salience_server.engine.request import GenerateParams, Request
from salience_server.engine.scheduler import Scheduler
from salience_server.engine.session import Residency, Session
from tests.helpers import TEST_DEVICE

BLOCK_SIZE = 4


def _runner(num_blocks: int) -> ModelRunner:
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = AutoModelForCausalLM.from_config(config).eval().to(TEST_DEVICE)
    return ModelRunner(model, num_blocks, BLOCK_SIZE, "sdpa")


def _host_kv(runner: ModelRunner, value: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An offloaded session's KV of one block: ``value`` in its keys, minus it in its
    values, in every layer."""
    keys = torch.full_like(runner.kv_caches[0][0][:1], value, device="cpu")
    return [(keys, -keys) for _ in runner.kv_caches]


def _request(request_id: int, session: Session, max_tokens: int) -> Request:
    params = GenerateParams(
        session_id=session.session_id, offset=session.length, max_tokens=max_tokens
    )
    return Request(request_id, params, session, lambda event: None, set(), None)


def _session(name: str, num_tokens: int, manager: BlockManager, last_used: float) -> Session:
    session = Session(name, max_context=64, token_ids=list(range(num_tokens)), last_used=last_used)
    manager.append(session.block_table, num_tokens, 0)
    session.num_computed = session.num_ever_computed = num_tokens
    return session


def test_a_cow_source_freed_and_reused_in_one_step_is_copied_first() -> None:
    manager = BlockManager(num_blocks=5, block_size=BLOCK_SIZE)
    runner = _runner(5)
    # Each block holds its own id in every slot, in every layer: a copy is visible.
    for keys, values in runner.kv_caches:
        for block_id in range(5):
            keys[block_id] = block_id
            values[block_id] = -block_id
    parent = _session("parent", 6, manager, last_used=1.0)  # blocks 0, 1 (1 half full)
    child = Session("child", 64, token_ids=list(parent.token_ids) + [9], last_used=2.0)
    child.block_table = manager.share(parent.block_table)
    child.num_computed = child.num_ever_computed = 6
    running = _session("running", 8, manager, last_used=3.0)  # blocks 2, 3
    running.num_computed = 7  # decoding: feeds position 7, inside block 3
    restored = Session("restored", 64, token_ids=[5, 6, 7, 8], last_used=0.5)
    restored.num_computed = restored.num_ever_computed = 3
    restored.residency = Residency.OFFLOADED
    runner.host_kv["restored"] = _host_kv(runner, 77.0)
    sessions = {s.session_id: s for s in (parent, child, running, restored)}
    evictor = Evictor(sessions, manager, host_kv_bytes=1 << 20, kv_bytes_per_token=1)
    evictor.host_bytes_used = restored.host_kv_bytes = 3
    scheduler = Scheduler(EngineConfig(), manager, evictor)
    for index, session in enumerate((running, child, restored)):
        request = _request(index, session, max_tokens=4)
        session.owner = request  # busy: not the eviction's to take
        scheduler.add(request)

    output = scheduler.schedule()

    assert [c.request.session.session_id for c in output.chunks] == ["running", "child", "restored"]
    # The child copies the shared half-full block 1 into the one free block (4); then
    # the restored session needs a block: the idle parent is offloaded, freeing block
    # 1, which the restored session takes.
    assert output.kv_moves == [
        CopyBlocks([(1, 4)]),
        SwapOut("parent", [0, 1], 6),
        SwapIn("restored", [1]),
    ]
    runner.move_kv(output.kv_moves)
    for keys, values in runner.kv_caches:
        assert bool((keys[4] == 1).all()) and bool((values[4] == -1).all())  # the parent's KV
        assert bool((keys[1] == 77).all())  # then the restored session's
    parent_host_keys = runner.host_kv["parent"][0][0]
    assert parent_host_keys[0].eq(0).all() and parent_host_keys[1].eq(1).all()
    assert child.block_table == [0, 4] and restored.block_table == [1]
    manager.check_invariants([s.block_table for s in sessions.values()])


def _filled_runner(num_blocks: int) -> ModelRunner:
    runner = _runner(num_blocks)
    for keys, values in runner.kv_caches:
        for block_id in range(num_blocks):
            keys[block_id] = block_id
            values[block_id] = -block_id
    return runner


def test_discards_and_trims_that_come_during_a_swap_out_copy_apply_after_it() -> None:
    """The engine copies KV without its lock, so the event loop may rewind or close an
    offloaded session while its swap-out is being copied: the trim or discard waits for
    the copy, in the order they came, and nothing is left behind."""
    runner = _filled_runner(6)
    planned = runner.start_moves(
        [SwapOut("rewound", [0, 1, 2], 12), SwapOut("closed", [3], 4), SwapOut("kept", [4], 4)]
    )
    runner.trim_host_kv("rewound", 2)  # a rewind to 8 tokens, then to 4
    runner.trim_host_kv("rewound", 1)
    runner.discard_host_kv("closed")
    assert runner.host_kv == {}  # nothing before the copy
    runner.finish_moves(runner.copy_kv(planned))
    assert set(runner.host_kv) == {"rewound", "kept"}
    for keys, values in runner.host_kv["rewound"]:
        assert keys.shape[0] == 1 and bool(keys.eq(0).all()) and bool(values.eq(0).all())
    assert bool(runner.host_kv["kept"][0][0].eq(4).all())
    runner.discard_host_kv("kept")  # after the copy: at once
    assert set(runner.host_kv) == {"rewound"}


def test_a_swap_in_takes_its_host_kv_when_it_is_planned() -> None:
    runner = _filled_runner(4)
    runner.host_kv["restored"] = _host_kv(runner, 7.0)
    planned = runner.start_moves([SwapIn("restored", [2])])
    assert "restored" not in runner.host_kv
    runner.finish_moves(runner.copy_kv(planned))
    for keys, values in runner.kv_caches:
        assert bool(keys[2].eq(7).all()) and bool(values[2].eq(-7).all())


def test_a_session_swapped_out_and_back_in_one_step_gets_its_own_kv() -> None:
    """The scheduler may offload a waiting request's session and restore it later in the
    same step: the swap-in takes the copy the swap-out just made (found by the stress
    test once swap-ins took their host KV when planned)."""
    runner = _filled_runner(5)
    planned = runner.start_moves([SwapOut("s", [0, 1], 8), SwapIn("s", [3, 2])])
    runner.finish_moves(runner.copy_kv(planned))
    for keys, values in runner.kv_caches:
        assert bool(keys[3].eq(0).all()) and bool(keys[2].eq(1).all())
        assert bool(values[3].eq(0).all()) and bool(values[2].eq(-1).all())
    assert runner.host_kv == {}


def test_an_offload_taken_back_in_its_step_for_a_more_recent_session_copies_nothing() -> None:
    """Host memory for one session: evicting the least recently used session offloads
    it; evicting a more recently used one in the same step drops the first (its
    swap-out is taken back, not copied and then freed) and offloads the second."""
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    runner = _filled_runner(4)
    older = _session("older", 8, manager, last_used=1.0)  # blocks 0, 1
    newer = _session("newer", 8, manager, last_used=2.0)  # blocks 2, 3
    sessions = {s.session_id: s for s in (older, newer)}
    evictor = Evictor(sessions, manager, host_kv_bytes=8, kv_bytes_per_token=1)
    moves: list = []
    evictor.evict(older, moves)
    assert moves == [SwapOut("older", [0, 1], 8)] and older.residency == Residency.OFFLOADED
    evictor.evict(newer, moves)
    assert moves == [SwapOut("newer", [2, 3], 8)]
    assert older.residency == Residency.DROPPED and older.num_computed == 0
    assert newer.residency == Residency.OFFLOADED and evictor.host_bytes_used == 8
    assert evictor.take_discarded() == []  # nothing of the older one reached host memory
    runner.move_kv(moves)
    assert set(runner.host_kv) == {"newer"}
    assert bool(runner.host_kv["newer"][0][0][1].eq(3).all())


def test_host_kv_of_an_earlier_step_is_given_up_for_a_more_recent_session() -> None:
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    older = _session("older", 8, manager, last_used=1.0)
    newer = _session("newer", 8, manager, last_used=2.0)
    busy = Session("busy", 64, token_ids=list(range(8)), last_used=0.5)
    sessions = {s.session_id: s for s in (older, newer, busy)}
    evictor = Evictor(sessions, manager, host_kv_bytes=16, kv_bytes_per_token=1)
    busy.residency, busy.host_kv_bytes, busy.num_computed = Residency.OFFLOADED, 8, 8
    busy.owner = _request(0, busy, max_tokens=1)  # waiting: its KV may be restored now
    evictor.host_bytes_used = 8
    evictor.evict(older, [])  # an earlier step
    moves: list = []
    evictor.evict(newer, moves)
    assert moves == [SwapOut("newer", [2, 3], 8)]
    assert older.residency == Residency.DROPPED and busy.residency == Residency.OFFLOADED
    assert evictor.take_discarded() == ["older"] and evictor.take_discarded() == []
    assert evictor.host_bytes_used == 16


def test_offloaded_kv_is_not_given_up_where_that_would_not_make_room() -> None:
    manager = BlockManager(num_blocks=5, block_size=BLOCK_SIZE)
    older = _session("older", 3, manager, last_used=1.0)  # block 0: 4 bytes on the host
    newer = _session("newer", 8, manager, last_used=2.0)  # blocks 1, 2
    busy = Session("busy", 64, token_ids=list(range(6)), last_used=0.5)
    busy.residency, busy.host_kv_bytes, busy.num_computed = Residency.OFFLOADED, 6, 6
    busy.owner = _request(0, busy, max_tokens=1)
    sessions = {s.session_id: s for s in (older, newer, busy)}
    evictor = Evictor(sessions, manager, host_kv_bytes=10, kv_bytes_per_token=1)
    evictor.host_bytes_used = 6
    evictor.evict(older, [])
    moves: list = []
    evictor.evict(newer, moves)  # 8 bytes; only the older session's 4 could be freed
    assert moves == [] and newer.residency == Residency.DROPPED
    assert older.residency == Residency.OFFLOADED and evictor.take_discarded() == []
    assert evictor.host_bytes_used == 10


def test_an_image_takes_host_room_from_idle_sessions_before_a_waiting_call_s() -> None:
    """Image embeddings come first in host memory: they drop offloaded KV, an idle
    session's before that of a session whose call waits to restore it, even one used
    less recently."""
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    busy = Session("busy", 64, token_ids=list(range(8)), last_used=0.5)
    idle = Session("idle", 64, token_ids=list(range(8)), last_used=1.0)
    for session in (busy, idle):
        session.residency, session.host_kv_bytes, session.num_computed = (
            Residency.OFFLOADED,
            8,
            8,
        )
    busy.owner = _request(0, busy, max_tokens=1)
    evictor = Evictor({"busy": busy, "idle": idle}, manager, host_kv_bytes=20, kv_bytes_per_token=1)
    evictor.host_bytes_used = 16
    assert evictor.can_hold_image(12)
    evictor.hold_image(12)
    assert idle.residency == Residency.DROPPED and busy.residency == Residency.OFFLOADED
    assert evictor.take_discarded() == ["idle"] and evictor.host_bytes_used == 20
    assert evictor.num_host_kv_dropped == 1

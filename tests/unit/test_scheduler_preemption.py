"""The scheduler short of room: who is preempted, who waits, who takes whose place.
A real block pool and hand-made requests; no model."""

from __future__ import annotations

from salience_server.config import EngineConfig
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.session import Residency, Session
from tests.scheduler_support import continuing, make_request, make_scheduler, owning, run_step


def test_request_short_of_memory_waits_while_others_run() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    scheduler = make_scheduler(EngineConfig(), manager)
    first, second = make_request(0, 0, prompt_len=8), make_request(1, 0, prompt_len=8)
    sessions = {r.session.session_id: r.session for r in (first, second)}
    scheduler.evictor.sessions.update(sessions)
    scheduler.add(first)
    scheduler.add(second)
    output = scheduler.schedule()
    # Both fit (2 blocks each). Decoding grows both: the pool is full after one more block.
    assert len(output.chunks) == 2
    for request in (first, second):
        request.session.mark_computed(0, 8)
        request.session.token_ids.extend([0] * 4)  # pretend they decoded past a block boundary
        request.session.num_computed = 11
    output = scheduler.schedule()
    assert [c.request for c in output.chunks] == [first]
    assert second not in scheduler.running and output.failed == []
    assert second.session.residency == Residency.DROPPED  # its KV made room for the first
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_a_request_that_cannot_fit_yet_preempts_no_one() -> None:
    """A waiting request that would not fit even after preempting every later one
    preempts none: it waits for the earlier work to end. (It preempted a later request
    every other step, which then recomputed its whole prompt for each token it decoded.)"""
    manager = BlockManager(num_blocks=10, block_size=4)
    sessions: dict[str, Session] = {}
    scheduler = make_scheduler(EngineConfig(), manager, sessions)
    first = make_request(0, 0, prompt_len=16, max_tokens=8)  # 4 blocks, then 5 and 6
    second = make_request(1, 0, prompt_len=23, max_tokens=4)  # 6 blocks
    late = make_request(2, 0, prompt_len=12, max_tokens=4)  # 3 blocks
    owning(sessions, first, second, late)
    scheduler.add(first)
    scheduler.add(second)
    assert run_step(scheduler) == [(0, 16), (1, 23)]  # the pool is full
    assert run_step(scheduler) == [(0, 1)]  # the first grows: the second makes room
    scheduler.add(late)  # the second needs 6 blocks of the 5 free; the late one fits
    preemptions = scheduler.num_preemptions
    assert run_step(scheduler) == [(0, 1), (2, 12)]
    for _ in range(3):
        assert run_step(scheduler) == [(0, 1), (2, 1)]
    assert scheduler.num_preemptions == preemptions and late.num_recomputed == 0
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_an_urgent_request_that_cannot_fit_yet_takes_no_ones_place() -> None:
    """A more urgent waiting request that would not fit even with the place's holder
    gone leaves it running: it took the place every other step, for nothing."""
    manager = BlockManager(num_blocks=10, block_size=4)
    sessions: dict[str, Session] = {}
    scheduler = make_scheduler(EngineConfig(max_running=2), manager, sessions)
    first = make_request(0, 0, prompt_len=24, max_tokens=20)  # 6 blocks, then 7
    background = make_request(1, 5, prompt_len=4, max_tokens=20)  # 1 block, then 2
    urgent = make_request(2, 0, prompt_len=16, max_tokens=4)  # 4 blocks
    owning(sessions, first, background, urgent)
    scheduler.add(first)
    scheduler.add(background)
    assert run_step(scheduler) == [(0, 24), (1, 4)]
    scheduler.add(urgent)  # it needs 4 blocks: 3 are free, and 1 more is the background's
    for _ in range(4):
        assert run_step(scheduler) == [(0, 1), (1, 1)]
    assert scheduler.num_preemptions == 0
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_a_step_that_preempts_admits_no_later_arrival() -> None:
    """The step that sends a request back to wait for room admits no waiting request
    later in order (vLLM admits none in such a step): the room is short, and the later
    arrival took a place before the preempted request could resume in it."""
    manager = BlockManager(num_blocks=8, block_size=4)
    sessions: dict[str, Session] = {}
    scheduler = make_scheduler(EngineConfig(max_running=2), manager, sessions)
    first = make_request(0, 0, prompt_len=8, max_tokens=12)  # 2 blocks, growing to 5
    second = make_request(1, 0, prompt_len=8, max_tokens=12)
    late = make_request(2, 0, prompt_len=4, max_tokens=4)  # 1 block
    owning(sessions, first, second, late)
    for request in (first, second, late):
        scheduler.add(request)
    assert run_step(scheduler) == [(0, 8), (1, 8)]  # the late one waits for a place
    for _ in range(8):
        assert run_step(scheduler) == [(0, 1), (1, 1)]  # the pool fills up
    assert run_step(scheduler) == [(0, 1)]  # the second makes room for the first
    assert scheduler.num_preemptions == 1 and late not in scheduler.running
    assert run_step(scheduler) == [(0, 1), (2, 4)]  # the second needs 5 blocks, 3 are free
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_a_waiting_requests_kv_makes_room_before_anyone_is_preempted() -> None:
    """With no idle session to evict, the KV of a session whose call waits for a place
    makes room for a running request's next block, the latest in order first; no
    running request is preempted."""
    manager = BlockManager(num_blocks=4, block_size=4)
    sessions: dict[str, Session] = {}
    scheduler = make_scheduler(EngineConfig(max_running=1), manager, sessions)
    first = make_request(0, 0, prompt_len=8, max_tokens=50)  # 2 blocks, then 3
    earlier, later = make_request(1, 0, prompt_len=8), make_request(2, 0, prompt_len=8)
    for waiting in (earlier, later):  # KV of an earlier call: a block each
        manager.append(waiting.session.block_table, 4, 0)
        waiting.session.num_computed = waiting.session.num_ever_computed = 4
    owning(sessions, first, earlier, later)
    scheduler.add(first)
    assert run_step(scheduler) == [(0, 8)]
    scheduler.add(earlier)  # no place for them: they wait, the pool full
    scheduler.add(later)
    assert run_step(scheduler) == [(0, 1)]  # position 8 takes a third block
    assert later.session.residency == Residency.DROPPED
    assert later.session.block_table == [] and later.session.num_computed == 0
    assert earlier.session.residency == Residency.RESIDENT
    assert len(earlier.session.block_table) == 1 and earlier.session.num_computed == 4
    assert scheduler.num_preemptions == 0 and scheduler.running == [first]
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_a_request_preempted_for_room_is_not_fed_again_in_that_step() -> None:
    """The running request preempted to make room for an earlier one goes back to wait:
    the step does not feed it again, even where the budget and the blocks left would
    let it recompute part of what it just gave up."""
    manager = BlockManager(num_blocks=4, block_size=4)
    sessions: dict[str, Session] = {}
    scheduler = make_scheduler(EngineConfig(max_batch_tokens=4), manager, sessions)
    first = make_request(0, 0, prompt_len=8, max_tokens=50)
    second = make_request(1, 1, prompt_len=8, max_tokens=50)
    owning(sessions, first, second)
    for request in (first, second):  # each about to decode position 8: 2 blocks held
        manager.append(request.session.block_table, 8, 0)
        request.session.num_computed = 8
        request.session.token_ids.append(0)
        request.num_decoded = 1
    scheduler.running.extend([first, second])
    assert run_step(scheduler) == [(0, 1)]  # 1 block and 3 tokens of budget are left
    assert second.session.block_table == [] and scheduler.num_preemptions == 1
    assert [r for _, r in scheduler.waiting] == [second]
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_a_fork_whose_copies_find_no_room_waits_for_the_step_to_end() -> None:
    """A fork writing into the blocks it shares with a session fed in the same step
    needs copies no eviction can give (that session is untouchable in the step, and
    nothing else holds blocks): it waits, the step goes on without it."""
    manager = BlockManager(num_blocks=3, block_size=4)
    sessions: dict[str, Session] = {}
    scheduler = make_scheduler(EngineConfig(), manager, sessions)
    parent = make_request(0, 0, prompt_len=8, max_tokens=50)
    manager.append(parent.session.block_table, 8, 0)
    parent.session.num_computed = 8
    parent.session.token_ids.append(0)  # about to decode position 8: a third block
    parent.num_decoded = 1
    child_session = Session("child", max_context=128, token_ids=list(range(8)))
    child_session.block_table = manager.share(parent.session.block_table)
    child_session.num_computed = 4  # rescoring from position 4: block 1 must be copied
    child = continuing(1, child_session, 8, 0)
    owning(sessions, parent, child)
    scheduler.running.append(parent)
    scheduler.add(child)
    output = scheduler.schedule()
    assert [c.request for c in output.chunks] == [parent] and output.failed == []
    assert [r for _, r in scheduler.waiting] == [child] and output.kv_moves == []
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_a_later_request_never_takes_the_kv_of_a_waiting_one_ahead_of_it() -> None:
    """A request never takes memory from one ahead of it in order, waiting ones
    included: a background call that fitted only by evicting the resident history of an
    urgent call waiting for room dropped that history (recomputed when the urgent call
    ran), and a lower-priority call ran on memory taken from a higher-priority one."""
    manager = BlockManager(num_blocks=10, block_size=4)
    sessions: dict[str, Session] = {}
    scheduler = make_scheduler(EngineConfig(), manager, sessions)
    first = make_request(0, 0, prompt_len=22, max_tokens=2)  # 6 blocks
    urgent = make_request(1, 0, prompt_len=20, max_tokens=2)  # 5 blocks, 3 of them resident
    manager.append(urgent.session.block_table, 12, 0)
    urgent.session.num_computed = urgent.session.num_ever_computed = 12
    background = make_request(2, 10, prompt_len=8, max_tokens=2)  # 2 blocks
    owning(sessions, first, urgent, background)
    scheduler.add(first)
    assert run_step(scheduler) == [(0, 22)]  # 1 block is left free
    scheduler.add(urgent)  # it needs 2 more blocks: it waits for the first to end
    scheduler.add(background)  # it needs 2 blocks: only the urgent call's KV would give them
    assert run_step(scheduler) == [(0, 1)]
    assert urgent.session.residency == Residency.RESIDENT and urgent.session.num_computed == 12
    assert len(urgent.session.block_table) == 3 and background.session.block_table == []
    first.session.free_of_owner()  # the first ended: its session is idle, its KV evictable
    assert run_step(scheduler) == [(1, 8), (2, 8)]  # the first's KV makes room for both
    assert urgent.num_recomputed == 0 and scheduler.num_preemptions == 0
    manager.check_invariants([s.block_table for s in sessions.values()])

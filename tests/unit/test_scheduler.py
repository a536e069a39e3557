"""The scheduler with a real block pool and hand-made requests; no model."""

from __future__ import annotations

import pytest

from salience_server.config import EngineConfig
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.errors import SalienceError
from salience_server.engine.evictor import SwapIn
from salience_server.engine.request import Request
from salience_server.engine.session import Residency, Session
from tests.scheduler_support import continuing, make_request, make_scheduler, owning, run_step


@pytest.fixture
def pool():
    manager = BlockManager(num_blocks=64, block_size=4)
    requests: list[Request] = []
    yield manager, requests
    manager.check_invariants([r.session.block_table for r in requests])


def test_admission_follows_priority_then_arrival(pool) -> None:
    manager, requests = pool
    scheduler = make_scheduler(EngineConfig(max_running=1), manager)
    requests.extend(
        [make_request(0, 5), make_request(1, 0), make_request(2, 3), make_request(3, 0)]
    )
    for request in requests:
        scheduler.add(request)
    started = []
    while scheduler.has_work():
        for request_id, _ in run_step(scheduler):
            if request_id not in started:
                started.append(request_id)
    assert started == [1, 3, 2, 0]


def test_all_running_requests_share_each_step_up_to_the_token_budget(pool) -> None:
    manager, requests = pool
    scheduler = make_scheduler(EngineConfig(max_batch_tokens=10), manager)
    requests.extend([make_request(0, 0, prompt_len=8), make_request(1, 1, prompt_len=8)])
    for request in requests:
        scheduler.add(request)
    assert run_step(scheduler) == [(0, 8), (1, 2)]  # prefill chunked at the budget
    assert run_step(scheduler) == [(0, 1), (1, 6)]  # a decode and the rest of the prefill
    assert run_step(scheduler) == [(0, 1), (1, 1)]


def test_a_request_the_spent_budget_leaves_out_is_not_admitted(pool) -> None:
    """Once the step's token budget is spent, the requests after take no place in the
    running set (nor an empty chunk): the third runs when the first two leave room."""
    manager, requests = pool
    scheduler = make_scheduler(EngineConfig(max_batch_tokens=8), manager)
    requests.extend(make_request(i, 0, prompt_len=4, max_tokens=1) for i in range(3))
    for request in requests:
        scheduler.add(request)
    assert run_step(scheduler) == [(0, 4), (1, 4)]
    assert scheduler.running == [] and [r for _, r in scheduler.waiting] == [requests[2]]
    assert run_step(scheduler) == [(2, 4)]


def test_higher_priority_arrival_preempts_at_the_next_step(pool) -> None:
    manager, requests = pool
    scheduler = make_scheduler(EngineConfig(max_running=1), manager)
    low = make_request(0, 5, max_tokens=50)
    requests.append(low)
    scheduler.add(low)
    assert run_step(scheduler) == [(0, 4)]
    high = make_request(1, 0, max_tokens=2)
    requests.append(high)
    scheduler.add(high)
    assert run_step(scheduler) == [(1, 4)]
    assert [r.request_id for _, r in scheduler.waiting] == [0]
    assert run_step(scheduler) == [(1, 1)]
    assert run_step(scheduler) == [(0, 1)]  # resumes where it stopped


def test_queue_is_bounded(pool) -> None:
    """``max_queue`` bounds what waits beyond the running set's free places: on an idle
    scheduler a burst of max_running + max_queue requests is taken, one more is not."""
    manager, requests = pool
    scheduler = make_scheduler(EngineConfig(max_running=2, max_queue=2), manager)
    requests.extend(make_request(i, 0, max_tokens=50) for i in range(6))
    for request in requests[:4]:
        scheduler.add(request)
    with pytest.raises(SalienceError) as caught:
        scheduler.add(requests[4])
    assert caught.value.reason == "QUEUE_FULL"
    run_step(scheduler)  # two run, two wait: the queue is full
    assert len(scheduler.running) == 2
    with pytest.raises(SalienceError):
        scheduler.add(requests[4])
    requests[0].is_cancelled = True
    run_step(scheduler)  # one leaves and a waiting one runs: room for one
    scheduler.add(requests[4])
    with pytest.raises(SalienceError):
        scheduler.add(requests[5])


def test_cancelled_requests_leave_at_the_next_step(pool) -> None:
    manager, requests = pool
    scheduler = make_scheduler(EngineConfig(max_running=1), manager)
    running, queued = make_request(0, 0, max_tokens=50), make_request(1, 0)
    requests.extend([running, queued])
    scheduler.add(running)
    scheduler.add(queued)
    run_step(scheduler)
    running.is_cancelled = queued.is_cancelled = True
    output = scheduler.schedule()
    assert output.chunks == [] and set(output.cancelled) == {running, queued}
    assert not scheduler.has_work()


def test_a_request_that_cannot_get_blocks_fails_instead_of_hanging() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    scheduler = make_scheduler(EngineConfig(), manager)
    request = make_request(0, 0, prompt_len=12)
    scheduler.add(request)
    output = scheduler.schedule()
    assert output.chunks == [] and output.failed[0][0] is request
    assert output.failed[0][1].reason == "KV_CACHE_FULL"
    assert not scheduler.has_work()  # it leaves with the output, failing once
    assert scheduler.schedule().failed == []
    manager.check_invariants([request.session.block_table])


def test_a_running_request_that_outgrows_the_pool_fails_and_leaves() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    scheduler = make_scheduler(EngineConfig(), manager)
    request = make_request(0, 0, prompt_len=8, max_tokens=4)
    scheduler.add(request)
    assert run_step(scheduler) == [(0, 8)]  # the whole pool; position 8 needs a third
    output = scheduler.schedule()
    assert output.chunks == [] and [r for r, _ in output.failed] == [request]
    assert output.failed[0][1].reason == "KV_CACHE_FULL"
    assert scheduler.running == [] and not scheduler.has_work()
    manager.check_invariants([request.session.block_table])


def _idle_session(manager: BlockManager, name: str, num_tokens: int, last_used: float) -> Session:
    session = Session(name, max_context=128, token_ids=list(range(num_tokens)))
    manager.append(session.block_table, num_tokens, 0)
    session.num_computed = session.num_ever_computed = num_tokens
    session.last_used = last_used
    return session


@pytest.mark.parametrize("host_bytes", [0, 1000])
def test_least_recently_used_idle_session_is_evicted_first(host_bytes: int) -> None:
    manager = BlockManager(num_blocks=5, block_size=4)
    sessions = {
        "old": _idle_session(manager, "old", 8, last_used=1.0),
        "new": _idle_session(manager, "new", 8, last_used=2.0),
    }
    scheduler = make_scheduler(EngineConfig(), manager, sessions, host_bytes)
    request = make_request(0, 0, prompt_len=8)
    sessions["s0"] = request.session
    scheduler.add(request)
    output = scheduler.schedule()
    assert [c.request for c in output.chunks] == [request]
    old, new = sessions["old"], sessions["new"]
    assert new.residency == Residency.RESIDENT and len(new.block_table) == 2
    assert old.block_table == []
    if host_bytes:
        assert old.residency == Residency.OFFLOADED and old.num_computed == 8
        assert [(s.session_id, s.num_tokens) for s in output.kv_moves] == [("old", 8)]
    else:
        assert old.residency == Residency.DROPPED and old.num_computed == 0
        assert output.kv_moves == []
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_an_idle_session_that_frees_blocks_goes_before_one_sharing_all_of_its() -> None:
    """Evicting a session whose blocks a fork shares frees none: an idle session that
    owns blocks goes first, though more recently used."""
    manager = BlockManager(num_blocks=6, block_size=4)
    old = _idle_session(manager, "old", 8, last_used=1.0)
    fork = Session("fork", max_context=128, token_ids=list(range(8)), last_used=3.0)
    fork.block_table = manager.share(old.block_table)
    fork.num_computed = 8
    sessions = {"old": old, "fork": fork, "new": _idle_session(manager, "new", 8, 2.0)}
    scheduler = make_scheduler(EngineConfig(), manager, sessions)
    request = make_request(0, 0, prompt_len=12)  # 3 blocks, 2 free
    sessions["s0"] = request.session
    scheduler.add(request)
    assert [c.request for c in scheduler.schedule().chunks] == [request]
    assert sessions["new"].residency == Residency.DROPPED
    assert old.residency == fork.residency == Residency.RESIDENT
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_offloaded_session_is_restored_into_fresh_blocks() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    session = _idle_session(manager, "s0", 8, last_used=1.0)
    sessions = {"s0": session}
    scheduler = make_scheduler(EngineConfig(), manager, sessions, host_bytes=1000)
    scheduler.evictor.evict(session, [])
    assert session.residency == Residency.OFFLOADED and scheduler.evictor.host_bytes_used == 8
    request = continuing(1, session, 8, 1)
    session.num_computed = 7  # the engine feeds the last token again for its distribution
    scheduler.add(request)
    output = scheduler.schedule()
    assert output.chunks[0].start == 7 and output.chunks[0].num_tokens == 1
    assert output.kv_moves == [SwapIn("s0", session.block_table[:2])]
    assert session.residency == Residency.RESIDENT and scheduler.evictor.host_bytes_used == 0
    manager.check_invariants([session.block_table])


def test_a_dropped_session_is_resident_again_once_fed() -> None:
    """A session whose KV was dropped recomputes it from its tokens when a call feeds
    it: from that step on it is resident again (forks share its blocks; the session
    list says so)."""
    manager = BlockManager(num_blocks=4, block_size=4)
    session = _idle_session(manager, "s0", 8, last_used=1.0)
    scheduler = make_scheduler(EngineConfig(), manager, {"s0": session})
    scheduler.evictor.evict(session, [])
    assert session.residency == Residency.DROPPED and session.num_computed == 0
    request = continuing(1, session, 8, 1)
    scheduler.add(request)
    output = scheduler.schedule()
    assert [(c.start, c.num_tokens) for c in output.chunks] == [(0, 8)]
    assert output.kv_moves == [] and session.residency == Residency.RESIDENT
    manager.check_invariants([session.block_table])


def test_evicting_a_forks_partner_ends_the_copies_a_write_needs() -> None:
    """A fork writing into blocks it shares needs copies; if the only room comes from
    evicting its idle parent, the blocks are then its own and need no copy. (Found by
    the stress test: the request failed KV_CACHE_FULL though it fit.)"""
    manager = BlockManager(num_blocks=12, block_size=4)
    parent = _idle_session(manager, "parent", 40, last_used=1.0)  # 10 blocks
    child = Session("child", max_context=128, token_ids=list(range(40)))
    child.block_table = manager.share(parent.block_table)
    child.num_computed = child.num_ever_computed = 22  # rescoring from position 22
    sessions = {"parent": parent, "child": child}
    scheduler = make_scheduler(EngineConfig(), manager, sessions)
    request = continuing(0, child, 40, 0)
    child.owner = request
    scheduler.add(request)
    output = scheduler.schedule()
    assert output.failed == [] and [c.request for c in output.chunks] == [request]
    assert parent.residency == Residency.DROPPED and parent.block_table == []
    manager.check_invariants([s.block_table for s in sessions.values()])


def test_lower_priority_waiting_requests_leave_room_for_urgent_ones(pool) -> None:
    """A queue full of lower-priority requests still takes a higher-priority one:
    ``max_queue`` counts those of its priority or higher only (a batch backlog refused
    every interactive call QUEUE_FULL); twice that room bounds the queue whatever
    the priorities (ever more urgent calls grew it without end)."""
    manager, requests = pool
    scheduler = make_scheduler(EngineConfig(max_running=1, max_queue=2), manager)
    batch = [make_request(i, 5, max_tokens=50) for i in range(4)]
    urgent = [make_request(4 + i, p) for i, p in enumerate((0, 0, 0, 0, -1, -1))]
    requests.extend(batch + urgent)
    scheduler.add(batch[0])
    run_step(scheduler)  # it runs
    scheduler.add(batch[1])
    scheduler.add(batch[2])  # two wait: the queue is full for priority 5
    with pytest.raises(SalienceError) as caught:
        scheduler.add(batch[3])
    assert caught.value.reason == "QUEUE_FULL"
    for request in urgent[:3]:  # priority 0: nothing of its rank waits, and one of
        scheduler.add(request)  # them will take the running batch request's place
    with pytest.raises(SalienceError):
        scheduler.add(urgent[3])  # three of priority 0 wait now
    scheduler.add(urgent[4])
    # Six wait, twice the room of any call: full for anyone, however urgent.
    with pytest.raises(SalienceError):
        scheduler.add(urgent[5])
    assert run_step(scheduler)[0][0] == urgent[4].request_id  # the most urgent runs first


def test_a_request_waits_for_the_room_a_call_cancelled_in_its_step_leaves() -> None:
    """A request that fit was refused KV_CACHE_FULL when it came in the step that
    dropped a cancelled call (a soak saw 20, each beside a cancel): that call's session
    was still owned, so not evictable, and nothing else was scheduled, which read as
    "can never fit". It waits a step instead, and then runs."""
    manager = BlockManager(num_blocks=4, block_size=4)
    sessions: dict[str, Session] = {}
    scheduler = make_scheduler(EngineConfig(), manager, sessions)
    first = make_request(0, 0, prompt_len=12, max_tokens=50)
    second = make_request(1, 0, prompt_len=12)
    owning(sessions, first, second)
    scheduler.add(first)
    run_step(scheduler)  # the first holds 3 of the 4 blocks
    first.is_cancelled = True
    scheduler.add(second)
    output = scheduler.schedule()
    assert output.failed == [] and output.chunks == [] and output.cancelled == [first]
    first.session.free_of_owner()  # as the step's end retires it
    output = scheduler.schedule()
    assert output.failed == [] and [chunk.request for chunk in output.chunks] == [second]


def test_requests_cancelled_while_waiting_leave_their_places_at_once(pool) -> None:
    """A call whose client left (a deadline passed) while it waited no longer holds a
    place in the queue, though the engine drops it only at its next step (a long step
    refused new calls QUEUE_FULL for a queue of calls nobody waited for)."""
    manager, requests = pool
    scheduler = make_scheduler(EngineConfig(max_running=1, max_queue=1), manager)
    requests.extend(make_request(i, 0, max_tokens=50) for i in range(4))
    scheduler.add(requests[0])
    run_step(scheduler)
    scheduler.add(requests[1])  # the queue is full
    with pytest.raises(SalienceError):
        scheduler.add(requests[2])
    requests[1].is_cancelled = True
    assert scheduler.num_waiting == 0  # the queue depth the metrics report
    scheduler.add(requests[2])
    assert scheduler.num_waiting == 1
    with pytest.raises(SalienceError):
        scheduler.add(requests[3])
    output = scheduler.schedule()
    assert output.cancelled == [requests[1]]


def test_an_urgent_call_is_queued_where_it_would_preempt(pool) -> None:
    """Places in the running set held by less urgent requests count as free for a
    call: with ``max_queue`` 0 and the running set full, an urgent call was refused
    QUEUE_FULL though it would have taken a place at the next step."""
    manager, requests = pool
    scheduler = make_scheduler(EngineConfig(max_running=1, max_queue=0), manager)
    background, same, urgent, second = (
        make_request(0, 5, max_tokens=50),
        make_request(1, 5),
        make_request(2, 0),
        make_request(3, 0),
    )
    requests.extend([background, same, urgent, second])
    scheduler.add(background)
    run_step(scheduler)
    with pytest.raises(SalienceError):
        scheduler.add(same)  # it would wait: no queue
    scheduler.add(urgent)
    with pytest.raises(SalienceError):
        scheduler.add(second)  # the one place it could take is claimed
    assert run_step(scheduler) == [(2, 4)]

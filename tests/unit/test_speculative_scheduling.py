"""Speculation's drafts in the scheduler, with a real block pool and hand-made
requests; no model. Drafts take free blocks only: a guess never evicts or preempts
anyone, neither for itself nor by taking blocks that later requests in the step need."""

from __future__ import annotations

import dataclasses

import pytest

from salience_server.config import EngineConfig
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.draft_cost import DraftCost
from salience_server.engine.evictor import Evictor
from salience_server.engine.ngram import PROBE_EVERY, NgramProposer
from salience_server.engine.request import GenerateParams, Request
from salience_server.engine.scheduler import Scheduler
from salience_server.engine.session import Residency, Session

BLOCK_SIZE = 4


def decoding(
    manager: BlockManager, request_id: int, tokens: list[int], priority: int = 0
) -> Request:
    """A running call about to decode: every token but the last has KV."""
    session = Session(f"s{request_id}", max_context=128, token_ids=list(tokens))
    manager.append(session.block_table, len(tokens) - 1, 0)
    session.num_computed = len(tokens) - 1
    params = GenerateParams(session.session_id, list(tokens), max_tokens=50, priority=priority)
    request = Request(request_id, params, session, lambda event: None, set(), None)
    session.owner = request
    return request


@pytest.mark.parametrize("with_idle_session", [True, False])
def test_drafts_take_no_block_a_later_decode_in_the_step_needs(with_idle_session: bool) -> None:
    """A speculating call first in order drafted into the pool's last free block; the
    decode after it, which needed that block for its own token, then evicted an idle
    session (here dropping its KV) or, with none, was preempted: without speculation
    neither. Now the drafts get what the step leaves free."""
    manager = BlockManager(num_blocks=8 if with_idle_session else 6, block_size=BLOCK_SIZE)
    first = decoding(manager, 0, [1, 2, 3] * 3 + [1])  # position 9: its block is there
    later = decoding(manager, 1, [7, 8, 9, 10] * 2 + [5], priority=1)  # 8: a new block
    sessions = {r.session.session_id: r.session for r in (first, later)}
    idle = Session("idle", max_context=128, token_ids=list(range(8)))
    if with_idle_session:
        manager.append(idle.block_table, 8, 0)
        idle.num_computed = 8
        sessions[idle.session_id] = idle
    assert manager.num_free == 1
    proposer = NgramProposer(4, 2, 4, DraftCost(0.0, 0.0))
    evictor = Evictor(sessions, manager, 0, 1)
    scheduler = Scheduler(EngineConfig(speculative="ngram"), manager, evictor, proposer)
    scheduler.running.extend([first, later])
    output = scheduler.schedule()
    fed = [(c.request.request_id, c.num_tokens, c.draft_token_ids) for c in output.chunks]
    assert fed == [(0, 3, [2, 3]), (1, 1, [])]  # the drafts that still fit block 2
    assert scheduler.num_preemptions == 0 and scheduler.running == [first, later]
    assert evictor.num_dropped == 0
    if with_idle_session:
        assert idle.residency == Residency.RESIDENT and len(idle.block_table) == 2
    assert manager.num_free == 0
    manager.truncate(first.session.block_table, first.session.length)  # the step's end
    tables = [s.block_table for s in sessions.values()]
    manager.check_invariants(tables)


def test_drafts_take_the_blocks_left_free_at_the_end_of_the_step() -> None:
    """With room, the first call drafts as many as it finds (a new block for them)."""
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = decoding(manager, 0, [1, 2, 3] * 3 + [1])
    later = decoding(manager, 1, [7, 8, 9, 10] * 2 + [5], priority=1)
    sessions = {r.session.session_id: r.session for r in (first, later)}
    proposer = NgramProposer(4, 2, 4, DraftCost(0.0, 0.0))
    scheduler = Scheduler(
        EngineConfig(speculative="ngram"), manager, Evictor(sessions, manager, 0, 1), proposer
    )
    scheduler.running.extend([first, later])
    output = scheduler.schedule()
    fed = [(c.request.request_id, c.num_tokens, c.draft_token_ids) for c in output.chunks]
    assert fed == [(0, 4, [2, 3, 1]), (1, 1, [])]  # position 12: a new block
    assert len(first.session.block_table) == 4 and len(later.session.block_table) == 3
    assert output.kv_moves == []  # fresh blocks, nothing shared: nothing to copy


def test_drafts_take_the_token_budget_the_steps_own_tokens_leave() -> None:
    """With ``--max-batch-tokens 8`` and 4 drafts, the first two calls' drafts took the
    whole budget and the third call was left out of the step, at every step while
    drafts came; now each call's own token comes first, and drafts share the rest."""
    manager = BlockManager(num_blocks=64, block_size=BLOCK_SIZE)
    requests = [decoding(manager, i, [1, 2, 3] * 4 + [1]) for i in range(3)]
    proposer = NgramProposer(4, 2, 4, DraftCost(0.0, 0.0))
    config = EngineConfig(speculative="ngram", max_batch_tokens=8, num_speculative_tokens=4)
    scheduler = Scheduler(config, manager, Evictor({}, manager, 0, 1), proposer)
    scheduler.running.extend(requests)
    output = scheduler.schedule()
    fed = [(c.request.request_id, c.num_tokens, c.draft_token_ids) for c in output.chunks]
    assert fed == [(0, 4, [2, 3, 1]), (1, 3, [2, 3]), (2, 1, [])]
    assert scheduler.running == requests and scheduler.num_preemptions == 0


def test_a_probe_that_finds_no_budget_is_kept_for_a_later_step() -> None:
    """A session drafting nothing (its acceptance too low to pay) probes with full
    drafts every ``PROBE_EVERY`` steps. Drafts are proposed once the step's own tokens
    have the budget: proposed before, with no budget left for them, they were dropped,
    yet the probe counted as made (and every decode ran the proposer in every step)."""
    manager = BlockManager(num_blocks=64, block_size=BLOCK_SIZE)
    requests = [decoding(manager, i, [1, 2, 3] * 4 + [1]) for i in range(5)]
    requests[0].session.acceptance.steps_since_drafts = PROBE_EVERY  # its probe is due
    proposer = NgramProposer(4, 2, 4, DraftCost(10.0, 10.0))  # drafts never pay
    config = EngineConfig(speculative="ngram", max_batch_tokens=5, num_speculative_tokens=4)
    scheduler = Scheduler(config, manager, Evictor({}, manager, 0, 1), proposer)
    scheduler.running.extend(requests)
    output = scheduler.schedule()
    assert [(c.num_tokens, c.draft_token_ids) for c in output.chunks] == [(1, [])] * 5
    scheduler.config = dataclasses.replace(config, max_batch_tokens=8)  # room at last
    output = scheduler.schedule()
    assert (output.chunks[0].num_tokens, output.chunks[0].draft_token_ids) == (4, [2, 3, 1])


@pytest.mark.parametrize("room", [1, 2, 3])
def test_drafts_leave_room_for_the_token_after_them(room: int) -> None:
    """A verification emits its accepted drafts and one token more: a call that may
    decode ``room`` more tokens drafts at most ``room - 1``."""
    manager = BlockManager(num_blocks=64, block_size=BLOCK_SIZE)
    request = decoding(manager, 0, [1, 2, 3] * 4 + [1])
    request.num_decoded = request.params.max_tokens - room
    proposer = NgramProposer(4, 2, 4, DraftCost(0.0, 0.0))
    config = EngineConfig(speculative="ngram", num_speculative_tokens=4)
    scheduler = Scheduler(config, manager, Evictor({}, manager, 0, 1), proposer)
    scheduler.running.append(request)
    (chunk,) = scheduler.schedule().chunks
    assert chunk.draft_token_ids == [2, 3, 1][: room - 1]  # the proposal: [2, 3, 1]
    assert chunk.num_tokens == room

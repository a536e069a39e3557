"""Picks the work of each engine step. Plain Python: no tensors, no I/O.

Requests are served in ``order_key`` order: lower ``priority`` first, then arrival.
Each step walks the running and the waiting requests in that order and feeds each one
chunk (a decode token, or part of a prefill) while ``max_batch_tokens`` lasts; at most
``max_running`` requests run. A waiting request that outranks a running one when the
running set is full takes its place.

Room in the KV pool (SPEC 2.4) is made in this order, never touching what this step
already scheduled:
1. idle sessions lose residency, least recently used first (``Evictor``);
2. then the sessions of waiting requests later in order than the one that needs room,
   latest first;
3. then running requests later in order than it are preempted (the most recently
   arrived, lowest priority first, as vLLM does): sent back to wait, their KV
   evicted. Their streams stay exact (``Request.next_event_position``).
A request never takes memory from one ahead of it in order, running or waiting: a
lower-priority call that fitted only by evicting the KV of a more urgent one waiting
for room made that one restore or recompute it.
A request that still finds no room waits (preempted) while others hold memory, and
fails with KV_CACHE_FULL only when nothing else holds any. One that would not fit even
with all of that gone evicts and preempts no one: it waits for the earlier work to end.
A step that preempts a request admits no waiting request later in order than it (as
vLLM admits none in a step that preempted): the room was short, and a later arrival
would take what the preempted request just gave back. From the next step on, the
preempted request waits as any other: first in order, and where it cannot fit yet,
later ones that fit may run meanwhile.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from salience_server.config import EngineConfig
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.errors import Code, SalienceError
from salience_server.engine.evictor import CopyBlocks, Evictor, KvMove
from salience_server.engine.ngram import NgramProposer
from salience_server.engine.request import Request
from salience_server.engine.session import Residency


@dataclass
class ScheduledChunk:
    """Feed ``num_tokens`` of ``request``'s session, from position ``start``: its own
    tokens, then ``draft_token_ids`` (speculation: verified in this step)."""

    request: Request
    start: int
    num_tokens: int
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    kv_moves: list[KvMove] = field(default_factory=list)
    """KV to move before the forward pass, in the order it was decided: swap-outs of
    evicted sessions, copy-on-write copies, swap-ins of restored sessions."""
    cancelled: list[Request] = field(default_factory=list)
    """Requests the client gave up on; they leave the scheduler with this output."""
    failed: list[tuple[Request, SalienceError]] = field(default_factory=list)
    """Requests that cannot go on (no KV room); they leave with this output."""


@dataclass
class _Step:
    """What one ``schedule`` call has decided so far."""

    output: SchedulerOutput
    budget: int
    scheduled: set[str] = field(default_factory=set)
    """Sessions fed in this step: their blocks are untouchable."""
    preempted: set[int] = field(default_factory=set)
    """Request ids sent back to wait in this step (not fed again in it)."""
    first_preempted: tuple[int, int] | None = None
    """The earliest ``order_key`` among them: no later waiting request is admitted."""


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        evictor: Evictor,
        proposer: NgramProposer | None = None,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.evictor = evictor
        self.proposer = proposer
        """Drafts for decode steps (speculative decoding), or None."""
        self.waiting: list[tuple[tuple[int, int], Request]] = []  # heap on order_key
        self.running: list[Request] = []
        self.num_preemptions = 0
        """Running requests sent back to wait, since start."""

    def check_room(self, priority: int) -> None:
        """RESOURCE_EXHAUSTED when the queue is full for a request of ``priority``:
        ``max_queue`` requests of its priority or a higher one wait beyond the running
        set's free places, or twice that many of any priority. A request waits for the
        next step even where a place is free (counted as queued, a burst of
        ``max_running + max_queue`` calls on an idle server had some refused);
        lower-priority requests waiting count only towards the second bound, so that a
        backlog never locks out urgent calls, which may take the queue past
        ``max_queue`` but no further than twice it. The running set's places held by
        less urgent requests count as free for it: it would take them (with
        ``max_queue`` 0, an urgent call was refused while it would have preempted). A
        request cancelled while it waits (its client left) holds no place, though it
        leaves only at the next step."""
        free = self.config.max_running - len(self.running)
        free += sum(1 for r in self.running if r.priority > priority)
        room = self.config.max_queue + max(0, free)
        waiting = [r for _, r in self.waiting if not r.is_cancelled]
        ahead = sum(1 for r in waiting if r.priority <= priority)
        if ahead >= room or len(waiting) >= 2 * room:
            raise SalienceError(
                Code.RESOURCE_EXHAUSTED,
                "QUEUE_FULL",
                f"{len(waiting)} requests wait, {ahead} of them of this priority or "
                f"higher (--max-queue {self.config.max_queue}, {len(self.running)} "
                "running); retry later",
            )

    def add(self, request: Request) -> None:
        """Queues a request; RESOURCE_EXHAUSTED when the queue is full for it."""
        self.check_room(request.priority)
        heapq.heappush(self.waiting, (request.order_key, request))

    @property
    def num_waiting(self) -> int:
        """Requests waiting to run (not those cancelled meanwhile, which leave at the
        next step)."""
        return sum(1 for _, r in self.waiting if not r.is_cancelled)

    def requests(self) -> list[Request]:
        """Every request the scheduler holds, running or waiting."""
        return self.running + [request for _, request in self.waiting]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Removes a finished (or failed) request from the running set."""
        self.running.remove(request)

    def schedule(self) -> SchedulerOutput:
        step = _Step(SchedulerOutput(), self.config.max_batch_tokens)
        self._drop_cancelled(step.output)
        for request in sorted(self.requests(), key=lambda r: r.order_key):
            if step.budget == 0:
                break
            if request.request_id in step.preempted:
                continue
            is_waiting = request not in self.running
            if is_waiting and _after(request, step.first_preempted):
                continue
            num_tokens = min(request.num_tokens_to_feed, step.budget)
            if is_waiting and not self._free_slot(request, num_tokens, step):
                continue
            if self._reserve(request, num_tokens, step):
                if is_waiting:
                    self._remove_waiting(request)
                    self.running.append(request)
                step.budget -= num_tokens
                step.scheduled.add(request.session.session_id)
            elif not step.scheduled and not step.output.cancelled and not self._ahead_hold(request):
                # Everything else was evicted: it can never fit. (A call cancelled in
                # this step still owns its session, which the step's end frees, and a
                # waiting one ahead keeps its KV until it runs: wait.)
                self._remove(request)
                step.output.failed.append((request, _kv_cache_full()))
            elif not is_waiting:
                self._preempt(request, step)  # room comes back as this step's work ends
        self._place_drafts(step)
        return step.output

    def _free_slot(self, request: Request, num_tokens: int, step: _Step) -> bool:
        """A place in the running set for waiting ``request``: free, or taken from the
        lowest-priority running request when ``request`` outranks it and may fit once
        its next ``num_tokens`` are fed (else the place would be taken for nothing)."""
        if len(self.running) < self.config.max_running:
            return True
        worst = max(self.running, key=lambda r: r.order_key)
        if request.priority >= worst.priority:
            return False
        if not self._may_fit(request, request.session.num_computed + num_tokens, step):
            return False
        self._preempt(worst, step)
        return True

    def _drafts(self, chunk: ScheduledChunk, budget: int) -> list[int]:
        """At most ``budget`` draft tokens to verify beside a decode step, when
        speculation is on. Asked only for drafts the step can feed: the proposer counts
        a proposal as its session's probe, and proposing costs every decode each step."""
        request = chunk.request
        if self.proposer is None or chunk.num_tokens != 1 or not request.wants_decode:
            return []
        if request.session.num_computed != request.session.length - 1:
            return []  # not a plain decode step
        if not request.may_speculate:
            return []
        limit = min(budget, request.room_to_decode() - 1)
        return self.proposer.propose(request.session, limit)

    def _place_drafts(self, step: _Step) -> None:
        """Proposes the step's drafts once every chunk has its own tokens, in order,
        while the token budget and the free blocks last, dropping the drafts that find
        no room: a guess never evicts or preempts anyone, nor takes what a later
        request in the step needs (that request then evicted an idle session or
        was preempted for a block, or was left out of the step for the budget, at every
        step while the drafts came: with ``--max-batch-tokens 8`` and 4 drafts, the
        third decoding call never ran). What the step feeds of the requests' own tokens
        is what it feeds without speculation."""
        for chunk in step.output.chunks:
            drafts = self._drafts(chunk, step.budget)
            table = chunk.request.session.block_table
            first = chunk.start + chunk.num_tokens  # the first draft's position
            while (
                drafts
                and self.block_manager.num_new_blocks(table, first + len(drafts), first)
                > self.block_manager.num_free
            ):
                drafts.pop()
            step.budget -= len(drafts)
            if drafts:
                chunk.draft_token_ids = drafts
                copies = self.block_manager.append(table, first + len(drafts), first)
                if copies:
                    step.output.kv_moves.append(CopyBlocks(copies))
                chunk.num_tokens += len(drafts)

    def _reserve(self, request: Request, num_tokens: int, step: _Step) -> bool:
        """Makes room in the block pool for the next chunk of ``request`` and schedules
        it, restoring its session's KV if it was offloaded (drafts come later in the
        step: ``_place_drafts``)."""
        session = request.session
        start = session.num_computed
        if not self._may_fit(request, start + num_tokens, step):
            return False  # evicting or preempting anyone would be in vain
        # Recounted after each eviction: evicting a fork's partner can end the sharing
        # of blocks, and with it the copies this chunk would need.
        while self.block_manager.num_free < self.block_manager.num_new_blocks(
            session.block_table, start + num_tokens, start
        ):
            if not self._make_room(request, step):
                return False
        copies = self.block_manager.append(session.block_table, start + num_tokens, start)
        if copies:
            step.output.kv_moves.append(CopyBlocks(copies))
        if session.residency == Residency.OFFLOADED:
            self.evictor.restore(session, step.output.kv_moves)
        session.residency = Residency.RESIDENT
        step.output.chunks.append(ScheduledChunk(request, start, num_tokens))
        return True

    def _may_fit(self, request: Request, num_tokens: int, step: _Step) -> bool:
        """Whether ``request``'s session can hold ``num_tokens`` once every session that
        ``_make_room`` may evict for it is gone (copies of shared blocks not counted:
        evicting a partner can end them). Where it cannot, nothing is evicted or
        preempted for it: a request waiting for earlier work to end otherwise preempted
        a later one each step, which then recomputed its KV each time it ran."""
        table = request.session.block_table
        grow = max(0, self.block_manager.blocks_for(num_tokens) - len(table))
        if grow <= self.block_manager.num_free:
            return True
        protected = step.scheduled | {request.session.session_id}
        victims = {s.session_id: s for s in self.evictor.idle_sessions(protected)}
        holders, later = self._holders(request, protected)
        victims.update((r.session.session_id, r.session) for r in holders + later)
        freed = self.block_manager.num_freed_by([s.block_table for s in victims.values()])
        return grow <= self.block_manager.num_free + freed

    def _holders(
        self, request: Request, protected: set[str]
    ) -> tuple[list[Request], list[Request]]:
        """The requests whose sessions' KV may make room for ``request``: the waiting
        ones and the running ones (to be preempted) later in order."""
        holders = [
            r
            for r in self.requests()
            if r.session.block_table
            and r.session.session_id not in protected
            and r.order_key > request.order_key
        ]
        waiting = [r for r in holders if r not in self.running]
        later = [r for r in holders if r in self.running]
        return waiting, later

    def _ahead_hold(self, request: Request) -> bool:
        """Whether a waiting request ahead of ``request`` in order holds KV, which
        ``request`` may not take: it may fit once that one has run."""
        return any(
            r.session.block_table and r.order_key < request.order_key for _, r in self.waiting
        )

    def _make_room(self, request: Request, step: _Step) -> bool:
        """Evicts one session for ``request`` (see the module docstring for the order);
        False when none may be evicted."""
        protected = step.scheduled | {request.session.session_id}
        moves = step.output.kv_moves
        idle = self.evictor.pick_idle(protected)
        if idle is not None:
            self.evictor.evict(idle, moves)
            return True
        waiting, later = self._holders(request, protected)
        if waiting:
            self.evictor.evict(max(waiting, key=lambda r: r.order_key).session, moves)
            return True
        if later:
            victim = max(later, key=lambda r: r.order_key)
            self._preempt(victim, step)
            self.evictor.evict(victim.session, moves)
            return True
        return False

    def _preempt(self, request: Request, step: _Step) -> None:
        """Sends a running request back to wait; it resumes where it stopped."""
        self.running.remove(request)
        heapq.heappush(self.waiting, (request.order_key, request))
        step.preempted.add(request.request_id)
        if not _after(request, step.first_preempted):
            step.first_preempted = request.order_key
        self.num_preemptions += 1

    def _remove(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        else:
            self._remove_waiting(request)

    def _remove_waiting(self, request: Request) -> None:
        self.waiting = [(key, r) for key, r in self.waiting if r is not request]
        heapq.heapify(self.waiting)

    def _drop_cancelled(self, output: SchedulerOutput) -> None:
        output.cancelled.extend(r for r in self.running if r.is_cancelled)
        output.cancelled.extend(r for _, r in self.waiting if r.is_cancelled)
        self.running = [r for r in self.running if not r.is_cancelled]
        self.waiting = [(k, r) for k, r in self.waiting if not r.is_cancelled]
        heapq.heapify(self.waiting)


def _after(request: Request, order_key: tuple[int, int] | None) -> bool:
    return order_key is not None and request.order_key > order_key


def _kv_cache_full() -> SalienceError:
    return SalienceError(
        Code.RESOURCE_EXHAUSTED,
        "KV_CACHE_FULL",
        "the request does not fit in the KV block pool; raise --kv-cache-memory",
    )

"""Picks the work of each engine step. Plain Python: no tensors, no I/O.

Requests wait in a priority queue (lower ``priority`` first, then arrival order) and
run in a set of at most ``max_running``. Every step feeds one decode token of every
running request plus chunks of pending prefills, in priority order, up to
``max_batch_tokens``. A waiting request that outranks a running one when the running
set is full takes its place at the next step; the preempted request goes back to
waiting (its session keeps its tokens and KV, so it resumes where it stopped).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from salience_server.config import EngineConfig
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.errors import Code, SalienceError
from salience_server.engine.evictor import Evictor, SwapIn, SwapOut
from salience_server.engine.request import Request
from salience_server.engine.session import Residency


@dataclass
class ScheduledChunk:
    """Feed ``num_tokens`` of ``request``'s session, from position ``start``."""

    request: Request
    start: int
    num_tokens: int


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(source, destination) blocks to copy before the forward pass (copy-on-write)."""
    cancelled: list[Request] = field(default_factory=list)
    """Requests the client gave up on; they leave the scheduler with this output."""
    failed: list[tuple[Request, SalienceError]] = field(default_factory=list)
    """Requests that cannot go on (no KV room); they leave with this output."""
    swap_outs: list[SwapOut] = field(default_factory=list)
    """KV to copy to host memory first (evicted sessions)."""
    swap_ins: list[SwapIn] = field(default_factory=list)
    """Host KV to copy back into the pool after the swap-outs."""


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, evictor: Evictor) -> None:
        self.config = config
        self.block_manager = block_manager
        self.evictor = evictor
        self.waiting: list[tuple[tuple[int, int], Request]] = []  # heap on order_key
        self.running: list[Request] = []

    def check_room(self) -> None:
        """RESOURCE_EXHAUSTED when the queue is full."""
        if len(self.waiting) >= self.config.max_queue:
            raise SalienceError(
                Code.RESOURCE_EXHAUSTED,
                "QUEUE_FULL",
                f"{len(self.waiting)} requests already wait; retry later",
            )

    def add(self, request: Request) -> None:
        """Queues a request; RESOURCE_EXHAUSTED when the queue is full."""
        self.check_room()
        heapq.heappush(self.waiting, (request.order_key, request))

    def requests(self) -> list[Request]:
        """Every request the scheduler holds, running or waiting."""
        return self.running + [request for _, request in self.waiting]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Removes a finished request from the running set."""
        self.running.remove(request)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        self._drop_cancelled(output)
        self._admit()
        budget = self.config.max_batch_tokens
        scheduled: set[str] = set()
        for request in sorted(self.running, key=lambda r: r.order_key):
            if budget == 0:
                break
            num_tokens = min(request.num_tokens_to_feed, budget)
            if self._reserve(request, num_tokens, scheduled, output):
                budget -= num_tokens
                scheduled.add(request.session.session_id)
            elif scheduled:
                self._preempt(request)  # room comes back when this step's work finishes
            else:
                self.running.remove(request)
                output.failed.append((request, _kv_cache_full()))
        return output

    def _reserve(
        self, request: Request, num_tokens: int, scheduled: set[str], output: SchedulerOutput
    ) -> bool:
        """Makes room in the block pool for the next chunk of ``request``, evicting
        other sessions' KV if needed and restoring this session's if it was offloaded."""
        session = request.session
        start = session.num_computed
        needed = self.block_manager.num_new_blocks(session.block_table, start + num_tokens, start)
        protected = scheduled | {session.session_id}
        if not self.evictor.make_room(needed, protected, output.swap_outs):
            return False
        copies = self.block_manager.append(session.block_table, start + num_tokens, start)
        if session.residency == Residency.OFFLOADED:
            self.evictor.restore(session, output.swap_ins)
        session.residency = Residency.RESIDENT
        output.block_copies.extend(copies)
        output.chunks.append(ScheduledChunk(request, start, num_tokens))
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        heapq.heappush(self.waiting, (request.order_key, request))

    def _drop_cancelled(self, output: SchedulerOutput) -> None:
        output.cancelled.extend(r for r in self.running if r.is_cancelled)
        output.cancelled.extend(r for _, r in self.waiting if r.is_cancelled)
        self.running = [r for r in self.running if not r.is_cancelled]
        self.waiting = [(k, r) for k, r in self.waiting if not r.is_cancelled]
        heapq.heapify(self.waiting)

    def _admit(self) -> None:
        """Moves waiting requests into the running set, preempting lower-priority ones."""
        while self.waiting:
            key, request = self.waiting[0]
            if len(self.running) < self.config.max_running:
                heapq.heappop(self.waiting)
                self.running.append(request)
                continue
            worst = max(self.running, key=lambda r: r.order_key)
            if request.priority >= worst.priority:
                return
            heapq.heappop(self.waiting)
            self.running.remove(worst)
            self.running.append(request)
            heapq.heappush(self.waiting, (worst.order_key, worst))


def _kv_cache_full() -> SalienceError:
    return SalienceError(
        Code.RESOURCE_EXHAUSTED,
        "KV_CACHE_FULL",
        "the request does not fit in the KV block pool; raise --kv-cache-memory",
    )

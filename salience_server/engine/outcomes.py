"""How requests end, and what a step's results send them: the events they are owed,
then Done, an error of their own (INTERNAL, the batch goes on), or a retirement (the
client went away, no room). Every end gives the session back. Not thread-safe: the
engine calls it under its lock."""

from __future__ import annotations

import logging
import time

import torch

from salience_server.engine import outputs
from salience_server.engine.batch_builder import StepRows
from salience_server.engine.constraints import ConstraintFailed
from salience_server.engine.errors import Code, SalienceError, out_of_memory
from salience_server.engine.model_runner import ForwardOutput
from salience_server.engine.request import Request
from salience_server.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from salience_server.engine.session_table import SessionTable
from salience_server.engine.uploads import Uploads
from salience_server.metrics import Metrics

log = logging.getLogger(__name__)

NAN_STATES = (
    "the model's final hidden states are not finite (NaN or infinite: an overflow in the "
    "model's dtype?)"
)

Sampled = tuple[outputs.RowResults, dict[Request, Exception]]
"""Each request's row results, and the requests whose rows failed."""


class Outcomes:
    def __init__(self, scheduler: Scheduler, session_table: SessionTable, metrics: Metrics) -> None:
        self.scheduler = scheduler
        self.session_table = session_table
        self.metrics = metrics

    def plan(
        self, chunks: list[ScheduledChunk], rows: StepRows, vocab_size: int, uploads: Uploads
    ) -> outputs.RowsPlan:
        """Plans the sampling of the step's rows on the host, before its forward pass:
        their indices and parameters join the forward's inputs in ``uploads``. Called
        without the engine's lock, as ``sample``."""
        drafts = {c.request: c.draft_token_ids for c in chunks if c.draft_token_ids}
        return outputs.plan_rows(rows.logits, rows.readouts, drafts, vocab_size, uploads)

    def sample(
        self, chunks: list[ScheduledChunk], plan: outputs.RowsPlan, forward: ForwardOutput
    ) -> Sampled:
        """Samples and scores the step's rows (device work, then one trip to the host).
        Called without the engine's lock: it reads only what the step's busy sessions
        hold, which nothing else changes meanwhile."""
        if forward.embeddings is not None:  # pooled under the lock: on the host by then
            forward.embeddings = forward.embeddings.cpu()
        return outputs.row_results(plan, forward.logits, forward.readout)

    def commit(
        self,
        chunks: list[ScheduledChunk],
        rows: StepRows,
        forward: ForwardOutput,
        sampled: Sampled,
    ) -> None:
        """Records the new KV and pools Embed inputs' states, then sends each request the
        events it is owed: scored prefill tokens, and the tokens drawn for it, committed
        now."""
        for chunk in chunks:
            # Drafts' KV counts only once they are accepted (below).
            request = chunk.request
            end = chunk.start + chunk.num_tokens - len(chunk.draft_token_ids)
            first_new = max(chunk.start, request.session.num_ever_computed)
            recomputed = request.session.mark_computed(chunk.start, end)
            request.num_recomputed += recomputed
            self.metrics.recomputed_tokens.inc(recomputed)
            self.metrics.prefilled_tokens.inc(max(0, min(end, request.prompt_len) - first_new))
        for row, state in zip(rows.embeds, _rows_of(forward.embeddings), strict=True):
            request = row.request
            is_sum = request.params.pooling == "mean" and request.pooled is not None
            request.pooled = request.pooled + state if is_sum else state
            request.num_pooled = row.position + 1
        results, errors = sampled
        for chunk in chunks:
            request = chunk.request
            if request.is_cancelled:
                self._free_draft_blocks(chunk)
                continue
            error = errors.get(request)
            if error is None:
                try:
                    for event in outputs.chunk_events(request, chunk, results.get(request, {})):
                        request.sink(event)
                        if not event.is_prefill:
                            self._count_decoded(request)
                except Exception as failure:
                    error = failure
            if chunk.draft_token_ids and error is None:
                self._count_speculation(chunk)
            if error is not None:
                self._free_draft_blocks(chunk)
                self.fail(request, error)
            elif request.is_finished:
                self.scheduler.finish(request)
                self.finish(request)

    def _count_speculation(self, chunk: ScheduledChunk) -> None:
        """After a verification step: the accepted drafts have KV (they were fed as the
        tokens they turned out to be); the rejected ones' KV is past num_computed,
        overwritten when those positions are fed. Counts drafts and acceptances."""
        request, session = chunk.request, chunk.request.session
        fed_last = chunk.start + chunk.num_tokens - 1  # the last draft's position
        computed = min(session.length - 1, fed_last + 1)
        if computed > session.num_computed:
            session.mark_computed(session.num_computed, computed)
        accepted = computed - (chunk.start + 1)
        request.num_drafted += len(chunk.draft_token_ids)
        request.num_accepted += accepted
        session.acceptance.record(len(chunk.draft_token_ids), accepted)
        self.metrics.drafted_tokens.inc(len(chunk.draft_token_ids))
        self.metrics.accepted_tokens.inc(accepted)
        self._free_draft_blocks(chunk)

    def _free_drafts(self, request: Request) -> None:
        """Gives back any blocks past ``request``'s session's length: only a step's
        drafts take them, and a request that failed outside ``commit`` (run alone, or in
        a step that failed as a whole) still holds them."""
        session = request.session
        self.session_table.block_manager.truncate(session.block_table, session.length)

    def _free_draft_blocks(self, chunk: ScheduledChunk) -> None:
        """Gives back the blocks taken for a chunk's drafts past the session's length
        (also when its request was cancelled or failed in the step)."""
        if chunk.draft_token_ids:
            session = chunk.request.session
            self.session_table.block_manager.truncate(session.block_table, session.length)

    def _count_decoded(self, request: Request) -> None:
        now = time.monotonic()
        if request.num_decoded == 1:
            self.metrics.time_to_first_token.observe(now - request.arrival_time)
        elif request.last_token_time is not None:
            self.metrics.inter_token_latency.observe(now - request.last_token_time)
        request.last_token_time = now
        self.metrics.decoded_tokens.inc()

    def finish(self, request: Request) -> None:
        done = request.done_event()
        if request.params.pooling:  # [H]: the last state, or the mean of all
            pooled = request.pooled
            if request.params.pooling == "mean":
                pooled = pooled / request.session.length
            if not torch.isfinite(pooled).all():  # no vector a client could use (nor JSON hold)
                self.fail(request, ValueError(NAN_STATES))
                return
            done.embedding = pooled.tolist()
        request.sink(done)
        self.release(request)
        log.info(
            "request %d on session %s: %s after %d prompt (%d cached, %d recomputed) and "
            "%d decoded tokens in %.0f ms",
            request.request_id,
            request.session.session_id,
            done.finish_reason.value,
            done.prompt_tokens,
            done.cached_tokens,
            done.recomputed_tokens,
            done.completion_tokens,
            done.queue_ms + done.prefill_ms + done.decode_ms,
        )

    def fail(self, request: Request, error: Exception) -> None:
        """Ends one request with INTERNAL after a failure of its own; the rest of the
        batch goes on. A constraint that failed while decoding is CONSTRAINT_FAILED; a
        step of this request alone that ran out of memory is RESOURCE_EXHAUSTED."""
        self._free_drafts(request)
        if isinstance(error, ConstraintFailed):
            # The grammar engine's message names the token and may quote text: not at
            # INFO or above (the logs name ids only), its client has it.
            log.warning("request %d: its constraint failed while decoding", request.request_id)
            log.debug("request %d: %s", request.request_id, error)
            self._end_failed(request, "CONSTRAINT_FAILED", f"the constraint failed: {error}")
            return
        if out_of_memory(error):
            log.warning("request %d: its step ran out of memory: %s", request.request_id, error)
            what = (
                "its step ran out of memory, even alone (the memory the KV pool leaves free "
                "holds each step's activations and logits): lower --kv-cache-memory or "
                "--max-batch-tokens, or ask for fewer scored positions per call"
            )
            self._end_failed(request, "OUT_OF_MEMORY", what, Code.RESOURCE_EXHAUSTED)
            return
        log.error(
            "request %d on session %s failed: %r",
            request.request_id,
            request.session.session_id,
            error,
            exc_info=error,
        )
        self._end_failed(request, "REQUEST_FAILED", f"{type(error).__name__}: {error}")

    def _end_failed(
        self, request: Request, reason: str, what: str, code: Code = Code.INTERNAL
    ) -> None:
        """Ends ``request`` with ``code`` (``reason``), freeing its session."""
        if request in self.scheduler.running:
            self.scheduler.finish(request)
        request.sink(SalienceError(code, reason, f"request {request.request_id} failed: {what}"))
        self.release(request)

    def release(self, request: Request) -> None:
        """Gives the session back; frees its blocks if it was closed meanwhile."""
        session = request.session
        session.free_of_owner()
        session.touch()
        if session.is_closed:
            self.session_table.free(session)

    def retire(self, output: SchedulerOutput) -> None:
        """Ends the requests the scheduler took out: cancelled ones (their client went
        away, or a deadline passed) and those it refused (``output.failed``)."""
        for request in output.cancelled:
            self.release(request)
            log.info(
                "request %d on session %s: cancelled after %d decoded tokens",
                request.request_id,
                request.session.session_id,
                request.num_decoded,
            )
        for request, error in output.failed:
            request.sink(error)
            self.release(request)
            log.info(
                "request %d on session %s: refused: %s",
                request.request_id,
                request.session.session_id,
                error,
            )

    def fail_running(self) -> None:
        """After a failure of the step itself (not of one request): fail the running
        requests, keep serving."""
        for request in list(self.scheduler.running):
            self.scheduler.finish(request)
            self._free_drafts(request)
            request.sink(
                SalienceError(
                    Code.INTERNAL,
                    "STEP_FAILED",
                    f"request {request.request_id}: the engine step failed",
                )
            )
            self.release(request)


def _rows_of(tensor: torch.Tensor | None) -> list[torch.Tensor]:
    return list(tensor) if tensor is not None else []

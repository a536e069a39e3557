"""One engine step: schedule, move KV, build, run, sample, commit.

The engine's lock is held for the bookkeeping only: not while the device moves KV or
runs the model, nor while the step's rows are sampled (the results reach the host
first), so the server's event loop never waits on the device. A failure in one
request's part of a forward pass fails that request alone (``_isolate``).
"""

from __future__ import annotations

import logging
import threading
import time

from salience_server.engine.batch import ForwardBatch
from salience_server.engine.batch_builder import StepRows, build_batch
from salience_server.engine.errors import device_lost, out_of_memory, release_cached_memory
from salience_server.engine.evictor import Evictor
from salience_server.engine.images import ImageStore
from salience_server.engine.model_runner import ForwardOutput, ModelRunner
from salience_server.engine.outcomes import Outcomes, Sampled
from salience_server.engine.scheduler import ScheduledChunk, Scheduler
from salience_server.engine.uploads import Uploads

log = logging.getLogger(__name__)

OUT_OF_MEMORY_WARNING_S = 60.0
"""At most one warning of steps out of memory in this many seconds."""


class Stepper:
    def __init__(
        self,
        lock: threading.Condition,
        scheduler: Scheduler,
        outcomes: Outcomes,
        runner: ModelRunner,
        evictor: Evictor,
        images: ImageStore,
        *,
        uses_mrope: bool,
        has_readout: bool,
    ) -> None:
        self.lock = lock
        self.scheduler = scheduler
        self.outcomes = outcomes
        self.runner = runner
        self.evictor = evictor
        self.images = images
        self.uses_mrope = uses_mrope
        self.has_readout = has_readout
        self._out_of_memory_steps = 0
        """Steps that ran out of memory since the last warning."""
        self._out_of_memory_warned = -OUT_OF_MEMORY_WARNING_S

    def step(self) -> None:
        """Schedule, move KV, build, run, sample, commit. The lock is not held while
        the device moves KV or runs the model, nor while its rows are sampled (the
        results reach the host first), so the server's event loop never waits on it."""
        with self.lock:
            output = self.scheduler.schedule()
            self.outcomes.retire(output)
            moves = self.runner.start_moves(output.kv_moves)
            for session_id in self.evictor.take_discarded():  # for more recent sessions' KV
                self.runner.discard_host_kv(session_id)
            batch, rows = self._build(output.chunks)
        if moves:
            swapped_out = {}
            try:
                swapped_out = self.runner.copy_kv(moves)
            except Exception:
                with self.lock:
                    self.evictor.recover_from_failed_moves(output.kv_moves)
                raise
            finally:
                with self.lock:
                    self.runner.finish_moves(swapped_out)
        if not output.chunks:
            return
        try:
            forward, sampled = self._run(output.chunks, batch, rows)
        except Exception as error:
            if device_lost(error) or not out_of_memory(error) and len(output.chunks) == 1:
                raise
            ran_out = out_of_memory(error)
        else:
            with self.lock:
                self.outcomes.commit(output.chunks, rows, forward, sampled)
            return
        # Out of the handler: its traceback held the failed pass's activations, which
        # the cache could not give back while it lived.
        if ran_out:  # each chunk alone needs less; a lone one tries again
            release_cached_memory()
            self._warn_out_of_memory(len(output.chunks))
        self._isolate(output.chunks)

    def _warn_out_of_memory(self, num_chunks: int) -> None:
        """Logs, at most once a minute, that steps run out of memory: each then runs
        as a failed pass and one pass per request, a server too tight for its load."""
        self._out_of_memory_steps += 1
        now = time.monotonic()
        if now - self._out_of_memory_warned < OUT_OF_MEMORY_WARNING_S:
            return
        log.warning(
            "%d step(s) ran out of memory since the last warning (this one with %d "
            "requests), each then run a request at a time: lower --max-batch-tokens or "
            "--kv-cache-memory",
            self._out_of_memory_steps,
            num_chunks,
        )
        self._out_of_memory_steps, self._out_of_memory_warned = 0, now

    def _build(self, chunks: list[ScheduledChunk]) -> tuple[ForwardBatch, StepRows]:
        block_size = self.runner.block_size
        return build_batch(chunks, block_size, self.images, self.uses_mrope, self.has_readout)

    def _run(
        self, chunks: list[ScheduledChunk], batch: ForwardBatch, rows: StepRows
    ) -> tuple[ForwardOutput, Sampled]:
        """Plans the sampling, runs the forward pass (the step's inputs, the sampler's
        with them, go up in one copy) and samples: results reach the host in one copy."""
        uploads = Uploads(self.runner.device)
        plan = self.outcomes.plan(chunks, rows, self.runner.logits_width, uploads)
        forward = self.runner.execute(batch, uploads)
        return forward, self.outcomes.sample(chunks, plan, forward)

    def _isolate(self, chunks: list[ScheduledChunk]) -> None:
        """After a forward pass over several requests failed: runs each request's
        chunk alone, so that only the ones that fail alone fail. Rewriting the KV the
        failed pass may have written is harmless: the same values at the same slots."""
        for chunk in chunks:
            with self.lock:
                batch, rows = self._build([chunk])
            try:
                forward, sampled = self._run([chunk], batch, rows)
            except Exception as error:
                if device_lost(error):
                    raise
                with self.lock:
                    self.outcomes.fail(chunk.request, error)
                continue
            with self.lock:
                self.outcomes.commit([chunk], rows, forward, sampled)

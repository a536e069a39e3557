"""The engine: sessions, the scheduler and the model runner, stepped in their own thread.

Each step is one sentence: schedule, run, sample, commit. Calls from the server's
event loop (submit, cancel, session management) take the same lock as the step's
bookkeeping; only the forward pass runs without it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import torch

from salience_server.config import EngineConfig
from salience_server.engine import outputs, paged_attention, sampler
from salience_server.engine.batch_builder import LogitsRow, build_batch
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.detokenizer import IncrementalDetokenizer
from salience_server.engine.errors import Code, SalienceError
from salience_server.engine.evictor import Evictor
from salience_server.engine.images import ImageStore
from salience_server.engine.loader import LoadedModel
from salience_server.engine.model_runner import ModelRunner, kv_bytes_per_token, kv_shape
from salience_server.engine.readout import Readout
from salience_server.engine.request import (
    EventSink,
    GenerateParams,
    Request,
    TokenEvent,
    in_ranges,
)
from salience_server.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from salience_server.engine.session import Session
from salience_server.engine.session_table import SessionInfo, SessionTable
from salience_server.engine.validation import check_generate, offset_mismatch
from salience_server.engine.vision import EncodedImage, ImageLimits, VisionEncoder, decode_image

log = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 1 << 30
_CUDA_KV_FRACTION = 0.6  # of the memory free after loading the model
_EXPIRY_PERIOD_S = 0.25


class Engine:
    def __init__(
        self, loaded: LoadedModel, config: EngineConfig, readout: Readout | None = None
    ) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.vocab_size = int(loaded.model.get_input_embeddings().weight.shape[0])
        self.max_context = min(config.max_context or loaded.max_context, loaded.max_context)
        self.eos_token_ids = set(loaded.eos_token_ids)
        self.readout = readout
        self.has_readout = readout is not None
        self.uses_mrope = loaded.uses_mrope
        self.image_token_id = loaded.special_token_id("image_token_id")
        self.images = ImageStore()
        self.vision = (
            VisionEncoder(loaded.model, loaded.image_processor) if loaded.supports_images else None
        )
        self.kv_bytes_per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
        self.block_size = config.block_size or paged_attention.default_block_size(
            config.attention_backend, loaded.device, loaded.dtype, kv_shape(loaded.model.config)[2]
        )
        block_bytes = self.kv_bytes_per_token * self.block_size
        num_blocks = max(1, self._kv_budget_bytes() // block_bytes)
        log.info(
            "KV pool: %d blocks of %d tokens (%.1f MiB)",
            num_blocks,
            self.block_size,
            num_blocks * block_bytes / 2**20,
        )
        self.block_manager = BlockManager(num_blocks, self.block_size)
        self.runner = ModelRunner(
            loaded.model,
            num_blocks,
            self.block_size,
            self.max_context,
            config.attention_backend,
        )
        self.runner.warm_up(self.uses_mrope, may_fall_back=config.attention_backend == "auto")
        if readout is not None:
            self.runner.enable_readout(readout)
        self.sessions: dict[str, Session] = {}
        self.evictor = Evictor(
            self.sessions, self.block_manager, config.host_kv_bytes, self.kv_bytes_per_token
        )
        self.session_table = SessionTable(
            self.block_manager,
            self.evictor,
            self.images,
            self.runner,
            self.max_context,
            block_bytes,
        )
        self.scheduler = Scheduler(config, self.block_manager, self.evictor)
        self._request_ids = itertools.count()
        self._lock = threading.Condition()
        self._is_stopping = False
        self._thread = threading.Thread(target=self._loop, name="salience-engine", daemon=True)

    def _kv_budget_bytes(self) -> int:
        if self.config.kv_cache_bytes:
            return self.config.kv_cache_bytes
        if self.loaded.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.loaded.device)
            return int(free_bytes * _CUDA_KV_FRACTION)
        return _CPU_DEFAULT_KV_BYTES

    # ----- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fails every pending request with UNAVAILABLE and stops the loop."""
        with self._lock:
            self._is_stopping = True
            for request in self.scheduler.requests():
                request.sink(_shutting_down())
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ----- sessions ----------------------------------------------------------------

    def open_session(self, session_id: str = "", max_context: int = 0) -> Session:
        with self._lock:
            return self.session_table.open(session_id, max_context)

    def close_session(self, session_id: str) -> None:
        """Frees the session; a call running on it is cancelled first."""
        with self._lock:
            session = self.session_table.get(session_id)
            for request in self.scheduler.requests():
                if request.session is session and not request.is_cancelled:
                    request.is_cancelled = True
                    request.sink(
                        SalienceError(
                            Code.CANCELLED,
                            "SESSION_CLOSED",
                            "the session was closed during the call",
                        )
                    )
            self.session_table.remove(session)
            self._lock.notify_all()

    def fork_session(self, session_id: str, new_session_id: str = "") -> Session:
        """A child sharing the parent's committed tokens and KV blocks (copy-on-write)."""
        with self._lock:
            parent = self.session_table.get(session_id)
            if parent.is_busy:
                raise _busy(session_id)
            return self.session_table.fork(parent, new_session_id)

    def get_session(self, session_id: str) -> SessionInfo:
        with self._lock:
            return self.session_table.info(self.session_table.get(session_id))

    def list_sessions(self) -> list[SessionInfo]:
        with self._lock:
            return [self.session_table.info(s) for s in self.sessions.values()]

    # ----- requests ----------------------------------------------------------------

    def submit(
        self, params: GenerateParams, sink: EventSink, image: EncodedImage | None = None
    ) -> Request:
        """Checks and queues a Generate call; raises SalienceError for a bad one.

        ``sink`` receives TokenEvents, then a DoneEvent or a SalienceError, from the
        engine thread. Nothing changes when the call is refused.
        """
        with self._lock:
            if self._is_stopping:
                raise _shutting_down()
            session = self.session_table.get(params.session_id)
            if session.is_busy:
                raise _busy(params.session_id)
            check_generate(params, session, self.vocab_size, self.has_readout)
            self._check_fits(params)
            self.scheduler.check_room()
            request = self._accept(params, session, sink, image)
            if request.is_finished:
                self._finish(request)
            else:
                self.scheduler.add(request)
                self._lock.notify_all()
            return request

    def _check_fits(self, params: GenerateParams) -> None:
        """RESOURCE_EXHAUSTED at once for a prompt the whole pool cannot hold."""
        num_tokens = params.offset + len(params.append_tokens) + 1
        if self.block_manager.blocks_for(num_tokens) > self.block_manager.num_blocks:
            capacity = self.block_manager.num_blocks * self.block_size
            raise SalienceError(
                Code.RESOURCE_EXHAUSTED,
                "KV_CACHE_FULL",
                f"{num_tokens} tokens do not fit in the KV pool ({capacity} tokens); "
                "raise --kv-cache-memory",
            )

    def check_image_target(self, session_id: str, offset: int, truncating: bool) -> None:
        """The cheap checks of an AppendImage call, made before the image is decoded."""
        if self.vision is None:
            raise _images_unsupported()
        with self._lock:
            session = self.session_table.get(session_id)
            if session.is_busy:
                raise _busy(session_id)
            mismatch = offset_mismatch(session, offset, truncating)
            if mismatch is not None:
                raise mismatch

    def encode_image(self, data: bytes, mime_type: str) -> EncodedImage:
        """Decodes, checks and encodes an image (slow: call it off the event loop)."""
        if self.vision is None:
            raise _images_unsupported()
        limits = ImageLimits(self.config.max_image_bytes, self.config.max_image_pixels)
        return self.vision.encode(decode_image(data, mime_type, limits))

    def submit_image(
        self, session_id: str, offset: int, truncating: bool, image: EncodedImage, sink: EventSink
    ) -> Request:
        """Appends an encoded image as placeholder tokens (a prefill-only request);
        ``sink`` gets a DoneEvent once their KV is written."""
        if self.image_token_id is None:
            raise _images_unsupported()
        params = GenerateParams(
            session_id=session_id,
            append_tokens=[self.image_token_id] * image.embeds.shape[0],
            offset=offset,
            truncating=truncating,
        )
        return self.submit(params, sink, image)

    def _accept(
        self, params: GenerateParams, session: Session, sink: EventSink, image: EncodedImage | None
    ) -> Request:
        """Commits the call's effect on the session and makes its Request."""
        if params.offset < session.length:
            self.images.drop(session.rewind(params.offset))
            self.block_manager.truncate(session.block_table, params.offset)
        if image is not None:
            session.images.append(self.images.add(session, image))
        session.token_ids.extend(params.append_tokens)
        session.num_busy = 1
        session.touch()
        detokenizer = None
        if params.return_text or params.stop_strings:
            detokenizer = IncrementalDetokenizer(self.tokenizer, session.token_ids)
        request = Request(
            next(self._request_ids), params, session, sink, self.eos_token_ids, detokenizer
        )
        if params.offset > 0 and request.needs_logits_at(params.offset - 1):
            # The distribution at offset - 1 is not kept: feed that token again
            # (not counted as a recomputation).
            session.num_computed = min(session.num_computed, params.offset - 1)
            session.num_ever_computed = min(session.num_ever_computed, params.offset - 1)
        self.session_table.release_rewound_host_kv(session)
        request.num_cached = session.num_computed
        if params.offset == 0 and session.length > 0:
            if in_ranges(0, params.logprobs_ranges) or in_ranges(0, params.readout_ranges):
                sink(TokenEvent(position=0, token_id=session.token_ids[0], is_prefill=True))
        request.generator = sampler.make_generator(params.sampling, self.loaded.device)
        return request

    def cancel(self, request: Request) -> None:
        """Stops a request at the next step (the client went away)."""
        with self._lock:
            request.is_cancelled = True
            self._lock.notify_all()

    # ----- the loop ----------------------------------------------------------------

    def _loop(self) -> None:
        next_expiry = 0.0
        while True:
            with self._lock:
                while True:
                    if time.monotonic() >= next_expiry:  # also while busy
                        self.session_table.expire(self.config.session_ttl_s)
                        next_expiry = time.monotonic() + _EXPIRY_PERIOD_S
                    if self._is_stopping or self.scheduler.has_work():
                        break
                    self._lock.wait(timeout=_EXPIRY_PERIOD_S)
                if self._is_stopping:
                    return
            try:
                self.step()
            except Exception:
                log.exception("engine step failed")
                self._fail_running()

    def step(self) -> None:
        """Schedule, run, sample, commit."""
        with self._lock:
            output = self.scheduler.schedule()
            self._retire(output)
            self.runner.move_kv(output.swap_outs, output.swap_ins, output.block_copies)
            batch, rows = build_batch(
                output.chunks,
                self.block_size,
                self.images,
                self.uses_mrope,
                self.has_readout,
            )
        if not output.chunks:
            return
        forward = self.runner.execute(batch)
        logprobs = sampler.log_softmax(forward.logits)  # [K, V]
        with self._lock:
            self._commit(output.chunks, rows, logprobs, forward.readout)

    def _commit(
        self,
        chunks: list[ScheduledChunk],
        rows: list[LogitsRow],
        logprobs: torch.Tensor,
        readout: torch.Tensor | None,
    ) -> None:
        """Records the new KV, emits prefill tokens, samples and commits decoded ones.
        Tokens, scores and readout of all rows are computed together and reach the host
        in a few copies, not a few per row (each one a device sync on CUDA)."""
        for chunk in chunks:
            end = chunk.start + chunk.num_tokens
            chunk.request.num_recomputed += chunk.request.session.mark_computed(chunk.start, end)
        targets = [row.fed_position + 1 for row in rows]  # the positions the rows predict
        picks = [outputs.pick(row.request, t) for row, t in zip(rows, targets, strict=True)]
        token_ids, argmax_rows = sampler.pick_tokens(logprobs, picks)
        top_ks = [outputs.top_k(row.request, t) for row, t in zip(rows, targets, strict=True)]
        scores = sampler.score(logprobs, token_ids, top_ks, argmax_rows)
        readout_values = readout.flatten(1).tolist() if readout is not None else []  # [R, L * C]
        for row, target, pick, token_id, scored in zip(
            rows, targets, picks, token_ids.tolist(), scores, strict=True
        ):
            request = row.request
            if request.is_cancelled:
                continue
            values: list[float] = []
            if row.readout_index is not None and readout_values:
                values = readout_values[row.readout_index]  # [n_layers * n_concepts]
            if isinstance(pick, int):
                request.sink(outputs.prefill_token(request, target, scored, values))
            else:
                request.sink(outputs.decode_token(request, token_id, scored, values))
        for chunk in chunks:
            if chunk.request.is_finished and not chunk.request.is_cancelled:
                self.scheduler.finish(chunk.request)
                self._finish(chunk.request)

    def _finish(self, request: Request) -> None:
        request.sink(request.done_event())
        self._release(request)

    def _release(self, request: Request) -> None:
        """Gives the session back; frees its blocks if it was closed meanwhile."""
        session = request.session
        session.num_busy = 0
        session.touch()
        if session.is_closed:
            self.session_table.free(session)

    def _retire(self, output: SchedulerOutput) -> None:
        for request in output.cancelled:
            self._release(request)
        for request, error in output.failed:
            request.sink(error)
            self._release(request)

    def _fail_running(self) -> None:
        """After an unexpected failure: fail the running requests, keep serving."""
        with self._lock:
            for request in list(self.scheduler.running):
                self.scheduler.finish(request)
                request.sink(SalienceError(Code.INTERNAL, "INTERNAL", "the engine step failed"))
                self._release(request)


def _shutting_down() -> SalienceError:
    return SalienceError(Code.UNAVAILABLE, "SHUTTING_DOWN", "the server is stopping")


def _images_unsupported() -> SalienceError:
    return SalienceError(
        Code.FAILED_PRECONDITION, "IMAGES_UNSUPPORTED", "the served model does not take images"
    )


def _busy(session_id: str) -> SalienceError:
    return SalienceError(
        Code.FAILED_PRECONDITION, "SESSION_BUSY", f"session {session_id!r} is running another call"
    )

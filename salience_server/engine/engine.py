"""The engine: sessions, the scheduler and the model runner, stepped in their own thread.

Each step is one sentence: schedule, move KV, build, run, commit (``stepping``). Calls
from the server's event loop (submit, cancel, session management) take the same lock as
the step's bookkeeping; the device's work (KV moves, the forward pass) and sampling run
without it. A failure in one request's part of a step fails that request alone
(``outcomes``); if the thread itself dies, every call gets UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import Future

from salience_server.config import EngineConfig
from salience_server.engine.block_manager import BlockManager
from salience_server.engine.constraints import (
    CompiledConstraint,
    ConstraintCompiler,
    ConstraintSpec,
)
from salience_server.engine.engine_thread import EngineThread
from salience_server.engine.errors import (
    images_unsupported,
    session_busy,
    session_closed,
)
from salience_server.engine.evictor import Evictor
from salience_server.engine.images import ImageStore
from salience_server.engine.intake import Intake
from salience_server.engine.kv_pool import fit_pool, size_pool
from salience_server.engine.loader import LoadedModel
from salience_server.engine.model_runner import ModelRunner
from salience_server.engine.ngram import draft_proposer
from salience_server.engine.outcomes import Outcomes
from salience_server.engine.readout import Readout
from salience_server.engine.request import EventSink, GenerateParams, Request
from salience_server.engine.scheduler import Scheduler
from salience_server.engine.session import Residency, Session
from salience_server.engine.session_table import (
    SessionInfo,
    SessionTable,
    context_limit,
)
from salience_server.engine.stepping import Stepper
from salience_server.engine.validation import Limits, offset_mismatch
from salience_server.engine.vision import (
    EncodedImage,
    ImageLimits,
    VisionEncoder,
    decode_image,
    open_image,
)
from salience_server.metrics import EngineGauges, Metrics


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        readout: Readout | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.vocab_size = int(loaded.model.get_input_embeddings().weight.shape[0])
        self.eos_token_ids = set(loaded.eos_token_ids)
        self.readout = readout
        self.has_readout = readout is not None
        self.uses_mrope = loaded.uses_mrope
        self.image_token_id = loaded.special_token_id("image_token_id")
        self.vision = (
            VisionEncoder(loaded.model, loaded.image_processor) if loaded.supports_images else None
        )
        pool = size_pool(loaded, config)
        self.runner = ModelRunner(
            loaded.model,
            pool.num_blocks,
            pool.block_size,
            config.attention_backend,
        )
        self.runner.warm_up(self.uses_mrope, may_fall_back=config.attention_backend == "auto")
        if readout is not None:
            self.runner.enable_readout(readout)
        if pool.provisional:  # sized from what the largest step takes, measured now
            pool = fit_pool(
                pool,
                self.runner,
                config,
                max_context=min(config.max_context or loaded.max_context, loaded.max_context),
                uses_mrope=self.uses_mrope,
                vision=self.vision,
            )
        self.max_context, context_source = context_limit(
            config.max_context, loaded.max_context, pool.num_blocks * pool.block_size
        )
        self.kv_bytes_per_token = pool.bytes_per_token
        self.block_size = pool.block_size
        self.block_manager = BlockManager(pool.num_blocks, self.block_size)
        # Ids past the output layer's width have no logit to score or bias (on CUDA an
        # index past it is a device assert, fatal to the engine): valid ids are below both.
        self.vocab_size = min(self.vocab_size, self.runner.logits_width)
        # An EOS id past them is never decoded, and banned (``min_tokens``) it indexed
        # past the logits.
        self.eos_token_ids = {t for t in self.eos_token_ids if t < self.vocab_size}
        self.sessions: dict[str, Session] = {}
        self.evictor = Evictor(
            self.sessions, self.block_manager, config.host_kv_bytes, self.kv_bytes_per_token
        )
        self.images = ImageStore(self.evictor)
        self.session_table = SessionTable(
            self.block_manager,
            self.evictor,
            self.images,
            self.runner,
            self.max_context,
            pool.block_bytes,
            config.max_sessions,
        )
        proposer = draft_proposer(config, self.runner, self.uses_mrope, self.max_context)
        self.scheduler = Scheduler(config, self.block_manager, self.evictor, proposer)
        self.metrics = metrics or Metrics()
        self.metrics.watch(self.gauges)
        self.constraints = ConstraintCompiler(
            self.tokenizer, self.vocab_size, sorted(self.eos_token_ids)
        )
        self.intake = Intake(
            self.constraints,
            self.session_table,
            self.runner,
            self.tokenizer,
            self.vocab_size,
            self.eos_token_ids,
            self.has_readout,
            Limits.from_config(config, self.max_context, context_source),
            self.image_token_id,
        )
        self.outcomes = Outcomes(self.scheduler, self.session_table, self.metrics)
        self._embed_ids = itertools.count()
        self._image_turn = threading.Lock()
        """Held while an image is decoded and encoded (``encode_image``)."""
        self._lock = threading.Condition()
        self.stepper = Stepper(
            self._lock,
            self.scheduler,
            self.outcomes,
            self.runner,
            self.evictor,
            self.images,
            uses_mrope=self.uses_mrope,
            has_readout=self.has_readout,
        )
        self.thread = EngineThread(
            self._lock,
            self.scheduler,
            self.session_table,
            self.outcomes,
            lambda: self.step(),  # looked up at each step: tests instrument engine.step
            config.session_ttl_s,
            device=loaded.device,
        )

    # ----- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def drain(self, grace_s: float) -> int:
        """Refuses new work and waits up to ``grace_s`` for the calls in flight to end;
        how many did not (``EngineThread.drain``)."""
        return self.thread.drain(grace_s)

    def stop(self) -> None:
        """Fails every pending request with UNAVAILABLE and stops the thread
        (``EngineThread.stop``)."""
        self.thread.stop()

    @property
    def death(self) -> BaseException | None:
        """What killed the engine thread, if it died; every call is then UNAVAILABLE."""
        return self.thread.death

    def gauges(self) -> EngineGauges:
        """What the engine holds now, for the metrics endpoint."""
        with self._lock:
            by_residency = {residency.value: 0 for residency in Residency}
            for session in self.sessions.values():
                by_residency[session.residency.value] += 1
            num_free = self.block_manager.num_free
            return EngineGauges(
                num_waiting=self.scheduler.num_waiting,
                num_running=len(self.scheduler.running),
                sessions_by_residency=by_residency,
                num_blocks_used=self.block_manager.num_blocks - num_free,
                num_blocks_free=num_free,
                host_kv_bytes_used=self.evictor.host_bytes_used,
                num_preemptions=self.scheduler.num_preemptions,
                num_offloaded=self.evictor.num_offloaded,
                num_dropped=self.evictor.num_dropped,
                num_host_kv_dropped=self.evictor.num_host_kv_dropped,
            )

    # ----- sessions ----------------------------------------------------------------

    def open_session(self, session_id: str = "", max_context: int = 0) -> Session:
        with self._lock:
            self.thread.check_serving()
            return self.session_table.open(session_id, max_context)

    @contextlib.contextmanager
    def preparing_call(self, session_id: str) -> Iterator[None]:
        """While a call on ``session_id`` is prepared before its submit (its image
        encoded, its constraint compiled), the session does not expire; its idle time
        starts again after. An unknown session holds nothing (the submit refuses it); one
        closed meanwhile ends the call CANCELLED (SESSION_CLOSED), as a call running is."""
        with self._lock:
            session = self.sessions.get(session_id)
            if session is not None:
                session.num_preparing += 1
        try:
            yield
        finally:
            if session is not None:
                with self._lock:
                    session.num_preparing -= 1
                    session.touch()
        if session is not None and session.is_closed:
            raise session_closed()

    def close_session(self, session_id: str) -> None:
        """Frees the session; a call running on it is cancelled first."""
        with self._lock:
            session = self.session_table.get(session_id)
            for request in self.scheduler.requests():
                if request.session is session and not request.is_cancelled:
                    request.is_cancelled = True
                    request.sink(session_closed())
            self.session_table.remove(session)
            self._lock.notify_all()

    def fork_session(self, session_id: str, new_session_id: str = "") -> Session:
        """A child sharing the parent's committed tokens and KV blocks (copy-on-write)."""
        with self._lock:
            self.thread.check_serving()
            parent = self.session_table.get(session_id)
            if parent.is_busy:
                raise session_busy(session_id)
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
        engine thread. Nothing changes when the call is refused. The caller calls
        ``delivered`` for each event it passes on: each renews the session's idle time
        (``--session-ttl``), so a client still reading keeps it alive.
        """
        with self._lock:
            self.thread.check_serving()
            session = self.session_table.get(params.session_id)
            if session.is_busy:
                raise session_busy(params.session_id)
            self.intake.check(params, session, image)
            self.scheduler.check_room(params.priority)
            request = self.intake.accept(params, session, sink, image)
            if request.is_finished:
                self.outcomes.finish(request)
            else:
                self.scheduler.add(request)
                self._lock.notify_all()
            return request

    def compile_constraint(self, spec: ConstraintSpec) -> CompiledConstraint:
        """Validates a constraint (cached; slow the first time: call it off the event
        loop); INVALID_ARGUMENT (INVALID_CONSTRAINT) when it does not compile."""
        return self.constraints.compile(spec)

    def check_image_target(self, session_id: str, offset: int, truncating: bool) -> None:
        """The cheap checks of an AppendImage call, made before the image is decoded."""
        if self.vision is None:
            raise images_unsupported()
        with self._lock:
            session = self.session_table.get(session_id)
            if session.is_busy:
                raise session_busy(session_id)
            mismatch = offset_mismatch(session, offset, truncating)
            if mismatch is not None:
                raise mismatch

    def encode_image(self, data: bytes, mime_type: str) -> EncodedImage:
        """Decodes, checks and encodes an image (slow: call it off the event loop). One
        image at a time: each takes host memory for its pixels and the device's for the
        vision tower's activations (the start-up measurement leaves room for one), so
        that calls arriving together wait rather than hold them all at once."""
        if self.vision is None:
            raise images_unsupported()
        limits = ImageLimits(self.config.max_image_bytes, self.config.max_image_pixels)
        with self._image_turn:
            return self.vision.encode(decode_image(data, mime_type, limits))

    def image_placeholder_count(self, data: bytes, mime_type: str) -> int:
        """The placeholder tokens ``encode_image`` would make of an image, from its
        checked header (nothing decoded: quick, and no turn taken)."""
        if self.vision is None:
            raise images_unsupported()
        limits = ImageLimits(self.config.max_image_bytes, self.config.max_image_pixels)
        return self.vision.placeholder_count(open_image(data, mime_type, limits))

    def submit_image(
        self,
        session_id: str,
        offset: int,
        truncating: bool,
        image: EncodedImage,
        sink: EventSink,
        priority: int = 0,
    ) -> Request:
        """Appends an encoded image as placeholder tokens (a prefill-only request at
        ``priority``); ``sink`` gets a DoneEvent once their KV is written."""
        if self.image_token_id is None:
            raise images_unsupported()
        params = GenerateParams(
            session_id=session_id,
            append_tokens=[self.image_token_id] * image.embeds.shape[0],
            offset=offset,
            truncating=truncating,
            priority=priority,
        )
        return self.submit(params, sink, image)

    def submit_embedding(
        self, token_ids: list[int], pooling: str, priority: int, sink: EventSink
    ) -> Request:
        """Queues one Embed input: a prefill of ``token_ids`` in a session of its own
        that lives for this request only (never listed; freed when it ends). ``sink``
        gets a DoneEvent whose ``embedding`` is the pooled final hidden state."""
        with self._lock:
            self.thread.check_serving()
            params = GenerateParams(
                session_id="", append_tokens=token_ids, pooling=pooling, priority=priority
            )
            session = Session(f"embed-{next(self._embed_ids)}", self.max_context)
            self.intake.check(params, session, None)
            self.scheduler.check_room(params.priority)
            session.is_closed = True  # freed as its request ends
            request = self.intake.accept(params, session, sink, None)
            self.scheduler.add(request)
            self._lock.notify_all()
            return request

    def end_of_cancelled_call(self, session_id: str) -> tuple[bool, Future[None] | None]:
        """(whether ``session_id`` is owned by a call, and where that call is already
        cancelled (its client went away: the engine drops it at its next step) a future
        the engine completes once the session is free, else None). An unknown session
        is not owned."""
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None or session.owner is None:
                return False, None
            if not session.owner.is_cancelled:
                return True, None
            waiter: Future[None] = Future()
            session.free_waiters.append(waiter)
            return True, waiter

    def delivered(self, request: Request) -> None:
        """An event of ``request`` (from ``submit``) reached its client, or its stream
        ended: its session's idle time starts again. A stream still being written after
        the engine finished keeps the session alive while its client reads it, and no
        longer. Without the lock (the event loop calls it for every event): one float
        is written, and the expiry reading an older one only delays an expiry."""
        request.session.touch()

    def cancel(self, request: Request) -> None:
        """Stops a request at the next step (the client went away)."""
        with self._lock:
            request.is_cancelled = True
            self._lock.notify_all()

    def step(self) -> None:
        """One step (``Stepper.step``)."""
        self.stepper.step()

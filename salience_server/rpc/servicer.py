"""The salience.v1.Salience servicer: convert, call the engine, map errors. No engine logic."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

import grpc

from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.engine import tokenization
from salience_server.engine.detokenizer import CONTEXT_TAIL, IncrementalDetokenizer
from salience_server.engine.engine import Engine
from salience_server.engine.errors import Code, SalienceError, invalid
from salience_server.engine.request import DoneEvent, Event, EventSink, Request, TokenEvent
from salience_server.rpc import chat_tokens, convert, embed_inputs
from salience_server.rpc.compute_thread import in_own_thread
from salience_server.rpc.errors import RefusalLog, abort, slow_reader

CANCELLED_CALL_WAIT_S = 10.0
"""How long a call waits for its session's cancelled call to end (``_after_cancelled_call``):
longer than a step, even a long prefill chunk's on a CPU."""
CANCEL_ARRIVAL_S = 0.1
"""How long a call on a session whose call is live waits for that call's cancellation to
reach the server, checking every ``CANCEL_POLL_S``: a client that cancels a stream and
at once makes its next call may be heard before its cancellation is (a review saw 2 of
40 such calls refused), and a refusal costs a client more than this wait."""
CANCEL_POLL_S = 0.005


class SalienceServicer(salience_pb2_grpc.SalienceServicer):
    def __init__(
        self, stream_buffer_events: int = 1 << 16, max_message_bytes: int = 64 << 20
    ) -> None:
        self.engine: Engine | None = None
        """Set once the model is loaded; calls before that get UNAVAILABLE."""
        self.stream_buffer_events = stream_buffer_events
        """Events one stream may hold unread; past that it alone is cancelled."""
        self.max_message_bytes = max_message_bytes
        """The largest answer gRPC sends (an Embed past it is refused before its work)."""
        self._refusals = RefusalLog()
        """Refusals for room, logged at most once per interval a reason."""
        self._image_turn = asyncio.Semaphore(1)
        """Images are encoded one at a time (``Engine.encode_image``): a call waits its
        turn here, so that one cancelled or past its deadline meanwhile starts none."""

    async def _abort(self, context: grpc.aio.ServicerContext, error: SalienceError) -> None:
        """Ends the call with ``error``, a refusal for room noted in the log."""
        self._refusals.note(error)
        await abort(context, error)

    async def _engine(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.engine is None:
            await abort(
                context, SalienceError(Code.UNAVAILABLE, "LOADING", "the model is still loading")
            )
        assert self.engine is not None
        try:
            # SPEC 2.6: every call, the ones that only read too (they would describe
            # sessions no call can use any more, and keep a client on a dead replica).
            self.engine.thread.check_alive()
        except SalienceError as error:
            await abort(context, error)
        return self.engine

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        """Creates an empty session."""
        engine = await self._engine(context)
        try:
            session = engine.open_session(request.session_id, request.max_context)
        except SalienceError as error:
            await self._abort(context, error)
        return pb.OpenSessionResponse(
            session_id=session.session_id,
            max_context=session.max_context,
            model_id=engine.loaded.model_id,
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        """Appends, optionally decodes; streams Token events then one Done."""
        engine = await self._engine(context)
        params = convert.generate_params(request, arrival_time=time.monotonic())
        try:
            spec = convert.constraint_spec(request)
            if spec is not None:
                with engine.preparing_call(params.session_id):  # the session never expires
                    compiled = await asyncio.to_thread(engine.compile_constraint, spec)
                params = dataclasses.replace(params, constraint=compiled)
        except SalienceError as error:
            await self._abort(context, error)
        # Text with stop strings comes from the engine (it must see them to stop); other
        # text is detokenized here, off the engine thread.
        detokenizes = params.return_text and not params.stop_strings
        detokenizer: IncrementalDetokenizer | None = None
        prompt: list[int] = []

        def submit(sink: EventSink) -> Request:
            engine_request = engine.submit(params, sink)
            if detokenizes:  # nothing after the submit may raise: the call is on
                end = engine_request.prompt_len
                prompt.extend(engine_request.session.token_ids[max(0, end - CONTEXT_TAIL) : end])
            return engine_request

        delivery = engine.metrics.token_delivery
        await _after_cancelled_call(engine, params.session_id, context)
        async for event in self._events(context, submit):
            if detokenizes and detokenizer is None:  # built within the stream's clean-up
                detokenizer = IncrementalDetokenizer(
                    engine.tokenizer, prompt, params.keep_special_tokens
                )
            if isinstance(event, TokenEvent):
                if detokenizer is not None and not event.is_prefill:
                    event.text = "" if event.hides_text else detokenizer.push(event.token_id)
                    if event.is_last:
                        event.text += detokenizer.flush()
                yield convert.token_event(event)  # returns once gRPC has written it
                if not event.is_prefill:
                    delivery.observe(time.monotonic() - event.made_at)
            else:
                yield convert.done_event(event)

    async def _events(
        self, context: grpc.aio.ServicerContext, submit: Callable[[EventSink], Request]
    ) -> AsyncIterator[TokenEvent | DoneEvent]:
        """A request's events until Done; a SalienceError aborts the call."""
        try:
            async for event in self._engine_events(await self._engine(context), submit):
                yield event
        except SalienceError as error:
            await self._abort(context, error)

    async def _engine_events(
        self, engine: Engine, submit: Callable[[EventSink], Request]
    ) -> AsyncIterator[TokenEvent | DoneEvent]:
        """Submits a request and yields its events until Done; a refusal or a
        SalienceError event is raised. If the caller stops early (the client went
        away), the request is cancelled. A client that reads too slowly
        (``stream_buffer_events`` unread) is cancelled with RESOURCE_EXHAUSTED: the
        engine never waits for a reader. Each event passed on renews the session
        (``Engine.delivered``), so it expires only once its client stops reading."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        limit = self.stream_buffer_events
        # Events sent and events read: each written by one side only (the sink runs
        # under the engine's lock; the reader in this event loop).
        num_sent, num_read = [0], [0]
        overflowed = [False]
        engine_request: Request | None = None

        def sink(event: Event) -> None:
            if overflowed[0]:
                return
            if num_sent[0] - num_read[0] >= limit:
                overflowed[0] = True
                if engine_request is not None:  # under the engine's lock: safe to mark
                    engine_request.is_cancelled = True  # dropped at the next step
                event = slow_reader(limit)
            num_sent[0] += 1
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the event loop is gone: the server is stopping

        engine_request = submit(sink)
        if overflowed[0]:  # before submit returned
            engine.cancel(engine_request)
        is_done = False
        try:
            while not is_done:
                event = await events.get()
                num_read[0] += 1
                if isinstance(event, SalienceError):
                    is_done = True
                    raise event
                is_done = isinstance(event, DoneEvent)
                yield event  # resumed once the caller has passed it on
                engine.delivered(engine_request)
        finally:
            if not is_done:  # the client went away
                engine.cancel(engine_request)
            engine.delivered(engine_request)

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        """Texts or token lists to one pooled, optionally normalised vector each; each
        input is a prefill batched with the engine's other work."""
        engine = await self._engine(context)
        pooling = "mean" if request.pooling == pb.POOLING_MEAN else "last"
        window = embed_inputs.InputWindow(embed_inputs.window(engine.config))

        async def embed_one(token_ids: list[int]) -> list[float]:
            def submit(sink: EventSink) -> Request:
                return engine.submit_embedding(token_ids, pooling, request.priority, sink)

            async for event in self._engine_events(engine, submit):
                if isinstance(event, DoneEvent) and event.embedding is not None:
                    return event.embedding
            raise SalienceError(Code.INTERNAL, "REQUEST_FAILED", "an input ended without a vector")

        async def embed(token_ids: list[int]) -> list[float]:
            return await window.run(lambda: embed_one(token_ids))

        failure: SalienceError | None = None
        try:
            embed_inputs.check_answer_size(request, engine, self.max_message_bytes)
            inputs = await asyncio.to_thread(embed_inputs.token_lists, engine, request)
            async with asyncio.TaskGroup() as group:  # one failure cancels the others
                tasks = [group.create_task(embed(token_ids)) for token_ids in inputs]
        except* SalienceError as failures:  # a refused input, or one that failed
            failure = failures.exceptions[0]  # type: ignore[assignment]
        if failure is not None:
            await self._abort(context, failure)
        vectors = [task.result() for task in tasks]
        if request.normalize:
            vectors = [embed_inputs.l2_normalized(vector) for vector in vectors]
        return pb.EmbedResponse(
            embeddings=[
                pb.Embedding(values=vector, num_tokens=len(token_ids))
                for vector, token_ids in zip(vectors, inputs, strict=True)
            ],
            prompt_tokens=sum(len(token_ids) for token_ids in inputs),
        )

    async def AppendImage(
        self, request: pb.AppendImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.AppendImageResponse:
        """Appends one image as placeholder tokens."""
        engine = await self._engine(context)
        session_id, offset, truncating = request.session_id, request.offset, request.truncating
        try:
            with engine.preparing_call(session_id):  # the session waits, never expires
                await _after_cancelled_call(engine, session_id, context)
                engine.check_image_target(session_id, offset, truncating)
                async with self._image_turn:
                    image = await in_own_thread(
                        engine.encode_image, request.image, request.mime_type
                    )
        except SalienceError as error:
            await self._abort(context, error)
        submit = lambda sink: engine.submit_image(  # noqa: E731
            session_id, offset, truncating, image, sink, request.priority
        )
        async for event in self._events(context, submit):
            if isinstance(event, DoneEvent):
                return pb.AppendImageResponse(
                    placeholder_count=int(image.embeds.shape[0]), total_length=event.total_tokens
                )
        return pb.AppendImageResponse()

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        """Frees the session and its KV."""
        engine = await self._engine(context)
        try:
            engine.close_session(request.session_id)
        except SalienceError as error:
            await self._abort(context, error)
        return pb.CloseSessionResponse()

    async def ForkSession(
        self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForkSessionResponse:
        """A new session sharing the parent's committed prefix, copy-on-write."""
        engine = await self._engine(context)
        await _after_cancelled_call(engine, request.session_id, context)
        try:
            child = engine.fork_session(request.session_id, request.new_session_id)
        except SalienceError as error:
            await self._abort(context, error)
        return pb.ForkSessionResponse(session_id=child.session_id, length=child.length)

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        """Length, residency, blocks and idle time of one session."""
        engine = await self._engine(context)
        try:
            info = engine.get_session(request.session_id)
        except SalienceError as error:
            await self._abort(context, error)
        return pb.GetSessionResponse(session=convert.session_info(info))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        """Every live session."""
        engine = await self._engine(context)
        return pb.ListSessionsResponse(
            sessions=[convert.session_info(info) for info in engine.list_sessions()]
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        """The served model: ids, limits, special tokens, capabilities. The EOS ids are
        sorted, the tokenizer's own EOS first where it is one of them (what the shim's
        /tokenizer_info names: Llama 3.1's and Qwen2.5's instruct models list a smaller
        one in their generation config, and it named that)."""
        engine = await self._engine(context)
        loaded = engine.loaded
        tokenizer = loaded.tokenizer
        return pb.GetModelInfoResponse(
            model_id=loaded.model_id,
            vocab_size=engine.vocab_size,
            max_context=engine.max_context,
            eos_token_ids=sorted(
                engine.eos_token_ids, key=lambda i: (i != tokenizer.eos_token_id, i)
            ),
            chat_template=tokenization.chat_template_text(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            supports_images=loaded.supports_images,
            image_pad_token_id=loaded.special_token_id("image_token_id"),
            vision_start_token_id=loaded.special_token_id("vision_start_token_id"),
            vision_end_token_id=loaded.special_token_id("vision_end_token_id"),
            supports_readout=engine.has_readout,
            readout_manifest=(
                pb.ReadoutManifest(concepts=engine.readout.concepts, layers=engine.readout.layers)
                if engine.readout is not None
                else None
            ),
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
        )

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """Text, or chat messages through the chat template, to token ids."""
        engine = await self._engine(context)
        tokenizer = engine.loaded.tokenizer
        try:
            if request.WhichOneof("input") == "messages":
                token_ids = await chat_tokens.tokenize_chat(engine, request)
            elif request.images:
                raise invalid("INVALID_INPUT", "images go with chat messages, not with text")
            else:
                token_ids = await asyncio.to_thread(
                    tokenization.encode_text, tokenizer, request.text, request.add_special_tokens
                )
        except SalienceError as error:
            await self._abort(context, error)
        return pb.TokenizeResponse(token_ids=token_ids)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        """Token ids to text; with ``return_token_bytes``, also each token's own bytes.
        Decoded off the event loop, as Tokenize encodes: a request may carry millions of
        ids (16 million took 8 s), and every other call would wait that long."""
        engine = await self._engine(context)
        try:
            text, token_bytes = await asyncio.to_thread(_detokenize, engine, request)
        except SalienceError as error:
            await self._abort(context, error)
        return pb.DetokenizeResponse(text=text, token_bytes=token_bytes)


def _detokenize(engine: Engine, request: pb.DetokenizeRequest) -> tuple[str, list[bytes]]:
    """Detokenize's text and, with ``return_token_bytes``, each token's bytes."""
    tokenizer = engine.loaded.tokenizer
    tokenization.check_count(request.token_ids)
    token_ids = list(request.token_ids)
    text = tokenization.decode(tokenizer, token_ids, engine.vocab_size, request.skip_special_tokens)
    if not request.return_token_bytes:
        return text, []
    return text, tokenization.token_bytes(tokenizer, token_ids, engine.vocab_size)


async def _after_cancelled_call(
    engine: Engine, session_id: str, context: grpc.aio.ServicerContext
) -> None:
    """Waits while ``session_id`` is owned by a call already cancelled, which the engine
    drops at its next step, up to ``CANCELLED_CALL_WAIT_S`` or the call's deadline: a
    client that cancels a call and at once makes the next one on the session is not
    refused SESSION_BUSY for that step. A session whose call stays live for
    ``CANCEL_ARRIVAL_S`` is refused then, as before."""
    is_owned, waiter = engine.end_of_cancelled_call(session_id)
    arrival = time.monotonic() + CANCEL_ARRIVAL_S
    while is_owned and waiter is None and time.monotonic() < arrival:
        await asyncio.sleep(CANCEL_POLL_S)
        is_owned, waiter = engine.end_of_cancelled_call(session_id)
    if waiter is None:
        return
    remaining = context.time_remaining()
    limit = CANCELLED_CALL_WAIT_S if remaining is None else min(CANCELLED_CALL_WAIT_S, remaining)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.wrap_future(waiter), max(limit, 0.0))

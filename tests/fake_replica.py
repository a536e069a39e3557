"""A fake ``salience.v1.Salience`` replica whose failures the test chooses, for the client's
failover (SPEC 2.7) where a model cannot be made to fail on cue.

Its "model" counts: each decoded token is the previous token plus one (mod 256), so a
resumed stream is right exactly when it continues the count. It streams an event for
each appended position inside ``logprobs_ranges`` first, as the real server does. It honours the client's
session ids (ALREADY_EXISTS on a taken one), records the ``x-session-id`` of every call,
and names itself through the real ``ReplicaInterceptor``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.rpc.replica import ReplicaInterceptor

EOS = 255
PLACEHOLDERS_PER_IMAGE = 3
IMAGE_PAD = 254


async def _abort(context: Any, code: grpc.StatusCode, reason: str, message: str) -> None:
    """Ends a call with a status; ``reason`` "" sends no ErrorInfo (as a proxy's reset)."""
    if not reason:
        await context.abort(code, message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain="salience.v1")
    detail = any_pb2.Any()
    detail.Pack(info)
    status = rpc_status.to_status(
        status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass
class Faults:
    """What goes wrong next; each fault fires once, then clears."""

    break_after: int | None = None
    """Break the next Generate after this many events."""
    break_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    break_reason: str = ""
    """ErrorInfo reason of the break ("": none, as a transport or a proxy reset)."""
    num_open_failures: int = 0
    """Fail this many OpenSession calls with UNAVAILABLE."""
    open_delay_s: float = 0.0
    """Answer the next OpenSession this late, the session made (past a client's
    deadline: the client cannot tell whether it was)."""
    get_session_delay_s: float = 0.0
    """Answer every GetSession this late (calls in flight together)."""
    fork_delay_s: float = 0.0
    """Answer the next ForkSession this late, the fork made."""
    failures_after_break: int = 0
    """After the break, fail this many Generate calls with UNAVAILABLE as they start."""
    num_generate_failures: int = 0
    prefill_delay_s: float = 0.0
    """Hold the next prefill-only Generate this long before it starts (a replay in
    flight)."""


@dataclass
class FakeReplica(salience_pb2_grpc.SalienceServicer):
    """Sessions as token lists, a counting decoder and scripted faults."""

    faults: Faults = field(default_factory=Faults)
    sessions: dict[str, list[int]] = field(default_factory=dict)
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    """(method, x-session-id) of every call, in order."""
    requests: list[Any] = field(default_factory=list)
    """Every GenerateRequest, in order."""
    running: set[str] = field(default_factory=set)
    """Sessions a Generate is running on: a fork of one is refused SESSION_BUSY, as the
    server refuses it."""

    def _note(self, method: str, context: Any) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.calls.append((method, metadata.get("x-session-id")))

    async def _session(self, session_id: str, context: Any) -> list[int]:
        if session_id not in self.sessions:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", "no session")
        return self.sessions[session_id]

    async def OpenSession(self, request: Any, context: Any) -> pb.OpenSessionResponse:
        self._note("OpenSession", context)
        if self.faults.num_open_failures:
            self.faults.num_open_failures -= 1
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "", "no replica")
        if request.session_id in self.sessions:
            await _abort(context, grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS", "taken")
        self.sessions[request.session_id] = []
        if self.faults.open_delay_s:
            delay, self.faults.open_delay_s = self.faults.open_delay_s, 0.0
            await asyncio.sleep(delay)
        return pb.OpenSessionResponse(session_id=request.session_id, max_context=1000)

    async def ForkSession(self, request: Any, context: Any) -> pb.ForkSessionResponse:
        self._note("ForkSession", context)
        tokens = await self._session(request.session_id, context)
        if request.session_id in self.running:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "SESSION_BUSY", "busy")
        self.sessions[request.new_session_id] = list(tokens)
        if self.faults.fork_delay_s:
            delay, self.faults.fork_delay_s = self.faults.fork_delay_s, 0.0
            await asyncio.sleep(delay)
        return pb.ForkSessionResponse(session_id=request.new_session_id, length=len(tokens))

    async def CloseSession(self, request: Any, context: Any) -> pb.CloseSessionResponse:
        self._note("CloseSession", context)
        await self._session(request.session_id, context)
        del self.sessions[request.session_id]
        return pb.CloseSessionResponse()

    async def GetSession(self, request: Any, context: Any) -> pb.GetSessionResponse:
        self._note("GetSession", context)
        await asyncio.sleep(self.faults.get_session_delay_s)
        tokens = await self._session(request.session_id, context)
        info = pb.SessionInfo(session_id=request.session_id, length=len(tokens), max_context=1000)
        return pb.GetSessionResponse(session=info)

    async def GetModelInfo(self, request: Any, context: Any) -> pb.GetModelInfoResponse:
        self._note("GetModelInfo", context)
        return pb.GetModelInfoResponse(model_id="fake", eos_token_ids=[EOS], max_context=1000)

    async def AppendImage(self, request: Any, context: Any) -> pb.AppendImageResponse:
        self._note("AppendImage", context)
        tokens = await self._session(request.session_id, context)
        del tokens[request.offset :]
        tokens.extend([IMAGE_PAD] * PLACEHOLDERS_PER_IMAGE)
        return pb.AppendImageResponse(
            placeholder_count=PLACEHOLDERS_PER_IMAGE, total_length=len(tokens)
        )

    async def _maybe_break(self, num_events: int, context: Any) -> None:
        if self.faults.break_after == num_events:
            self.faults.break_after = None
            self.faults.num_generate_failures = self.faults.failures_after_break
            await _abort(context, self.faults.break_code, self.faults.break_reason, "broken")

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[pb.GenerateEvent]:
        self.running.add(request.session_id)
        try:
            async for event in self._generate(request, context):
                yield event
        finally:
            self.running.discard(request.session_id)

    async def _generate(self, request: Any, context: Any) -> AsyncIterator[pb.GenerateEvent]:
        self._note("Generate", context)
        self.requests.append(request)
        if self.faults.num_generate_failures > 0:
            self.faults.num_generate_failures -= 1
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "", "no replica")
        if self.faults.prefill_delay_s and request.max_tokens == 0:
            delay_s, self.faults.prefill_delay_s = self.faults.prefill_delay_s, 0.0
            await asyncio.sleep(delay_s)
        tokens = await self._session(request.session_id, context)
        if request.offset != len(tokens) and not (
            request.truncating and request.offset < len(tokens)
        ):
            await _abort(context, grpc.StatusCode.ABORTED, "OFFSET_MISMATCH", "offset")
        del tokens[request.offset :]
        tokens.extend(request.append_tokens)
        prompt_length = len(tokens)
        scored = [
            p
            for p in range(request.offset, prompt_length)
            if any(r.start <= p < r.end for r in request.logprobs_ranges)
        ]
        for num_events, position in enumerate(scored):  # the scored prompt positions
            await self._maybe_break(num_events, context)
            token = pb.Token(id=tokens[position], position=position, is_prefill=True)
            yield pb.GenerateEvent(token=token)
        for num_decoded in range(request.max_tokens + 1):
            await self._maybe_break(len(scored) + num_decoded, context)
            is_eos = num_decoded > 0 and tokens[-1] == EOS and not request.ignore_eos
            if num_decoded == request.max_tokens or is_eos:
                break
            tokens.append((tokens[-1] + 1) % 256 if tokens else 0)
            yield pb.GenerateEvent(token=pb.Token(id=tokens[-1], position=len(tokens) - 1))
            await asyncio.sleep(0)
        completion = len(tokens) - prompt_length
        reason = pb.FINISH_REASON_PREFILL
        if request.max_tokens:
            reason = pb.FINISH_REASON_STOP if tokens[-1] == EOS else pb.FINISH_REASON_LENGTH
        done = pb.Done(
            prompt_tokens=prompt_length,
            completion_tokens=completion,
            total_tokens=len(tokens),
            finish_reason=reason,
        )
        yield pb.GenerateEvent(done=done)


@dataclass
class RunningFake:
    """A FakeReplica served on a loopback port from its own event-loop thread."""

    replica: FakeReplica
    port: int
    loop: asyncio.AbstractEventLoop
    server: Any
    thread: threading.Thread
    health: health.aio.HealthServicer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, is_serving: bool) -> None:
        """What its standard health service answers (SERVING or NOT_SERVING)."""
        status = health_pb2.HealthCheckResponse.SERVING
        if not is_serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.run_coroutine_threadsafe(self.health.set("", status), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def start_fake(replica_id: str = "fake-replica", port: int = 0) -> RunningFake:
    """A fake replica (SERVING) on ``port``, 0 for one the OS picks."""
    replica = FakeReplica()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def boot() -> tuple[Any, int, health.aio.HealthServicer]:
        server = grpc.aio.server(interceptors=[ReplicaInterceptor(replica_id)])
        salience_pb2_grpc.add_SalienceServicer_to_server(replica, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server, bound, health_servicer

    server, bound, health_servicer = asyncio.run_coroutine_threadsafe(boot(), loop).result(10)
    return RunningFake(replica, bound, loop, server, thread, health_servicer)

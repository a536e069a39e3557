"""How long a session lives: idle sessions expire after ``--session-ttl``; a session
is not idle while a call owns it, nor while its client reads a call's events (each one
read starts its idle time again)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine.engine import Engine
from salience_server.engine.loader import load_model
from salience_server.engine.request import DoneEvent, GenerateParams
from tests.helpers import TEST_DEVICE, error_reason, generate, open_session, session_info
from tests.tiny_models import build_tiny_vision_model
from tests.vision_support import encode, make_image

BLOCK_SIZE = 4


def test_idle_sessions_expire_and_free_their_blocks(tiny_llama_dir, server_factory) -> None:
    server = server_factory(
        tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20, session_ttl_s=1.0
    )
    stub = server.stub
    idle = open_session(stub)
    generate(stub, idle, append_tokens=[1] * 30)
    busy = open_session(stub)
    free_before = server.engine.block_manager.num_free
    # Keep the engine busy past the TTL with short calls on another session (a stall of
    # the TTL between two of them on a loaded machine would expire it too: 1 s of slack).
    deadline = time.monotonic() + 2.5
    length = 0
    while time.monotonic() < deadline:
        _, done = generate(stub, busy, append_tokens=[2] * 5, offset=0, truncating=True)
        length = done.total_tokens
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, idle, append_tokens=[3], offset=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert free_before == server.engine.block_manager.num_blocks - 8  # the idle one's 30 tokens
    busy_blocks = session_info(stub, busy).num_blocks
    assert (
        server.engine.block_manager.num_free == server.engine.block_manager.num_blocks - busy_blocks
    )
    assert session_info(stub, busy).length == length  # the active one lives on


def test_a_session_is_idle_once_its_client_stops_reading_its_events(tiny_llama_dir) -> None:
    """A call the engine has finished, whose events its caller is still passing on (a
    stream the server is still writing), keeps its session alive while they are read:
    each ``delivered`` event starts its idle time again. A client that stops reading
    does not keep it: the session expires a TTL after the last event it read."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device=TEST_DEVICE))
    engine = Engine(loaded, EngineConfig(block_size=BLOCK_SIZE, kv_cache_bytes=1 << 20))
    session = engine.open_session()  # the engine is stepped here, not started
    events: list[object] = []
    params = GenerateParams(session_id=session.session_id, append_tokens=[1, 2, 3], max_tokens=2)
    request = engine.submit(params, events.append)
    engine.session_table.expire(0.01)
    assert session.idle_seconds() == 0.0  # owned: never idle
    while not any(isinstance(event, DoneEvent) for event in events):
        engine.step()
    assert not session.is_busy
    for _ in range(3):  # read at a pace within the TTL: it lives on
        time.sleep(0.03)
        engine.delivered(request)
        engine.session_table.expire(0.05)
        assert session.session_id in engine.sessions
        assert session.idle_seconds() < 0.05
    time.sleep(0.06)  # then no event read for the TTL
    engine.session_table.expire(0.05)
    assert session.session_id not in engine.sessions


def test_a_client_that_stops_reading_a_finished_stream_lets_its_session_expire(
    tiny_llama_dir, server_factory
) -> None:
    """A client that keeps its connection but stops reading a stream the engine has
    finished (its unread events fill the HTTP/2 window, so the server's writes wait)
    kept its session alive for good; it now expires a TTL after the last event read.
    A client that reads on at its own pace keeps its session."""
    server = server_factory(
        tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20, session_ttl_s=1.0
    )
    # A small window, not grown by bandwidth probes: 200 events with top-20 logprobs
    # (about 100 KB) are far more than it holds.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        stalled, reading = open_session(stub), open_session(stub)

        def call(session_id: str) -> Iterator[pb.GenerateEvent]:
            request = pb.GenerateRequest(
                session_id=session_id,
                append_tokens=[1, 2, 3],
                max_tokens=200,
                ignore_eos=True,
                logprobs_ranges=[pb.PositionRange(start=3, end=2**32 - 1)],
                logprob_top_k=20,
            )
            return stub.Generate(request, timeout=30)

        stalled_stream, reading_stream = call(stalled), call(reading)
        next(stalled_stream)
        responses = []
        deadline = time.monotonic() + 10
        while server.engine.scheduler.has_work() and time.monotonic() < deadline:
            responses.append(next(reading_stream))  # slowly: the engine finishes both
            time.sleep(0.01)
        assert not server.engine.scheduler.has_work()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and stalled in server.engine.sessions:
            responses.append(next(reading_stream))  # 0.05 s apart: well within the TTL
            time.sleep(0.05)
            assert responses[-1].WhichOneof("event") == "token", "the stalled session outlived it"
        assert stalled not in server.engine.sessions
        responses.extend(reading_stream)
        assert responses[-1].WhichOneof("event") == "done"
        assert reading in server.engine.sessions
        stalled_stream.cancel()


def test_a_call_prepared_past_the_ttl_keeps_its_session(
    tmp_path, server_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An AppendImage whose image is still encoded, or a Generate whose constraint still
    compiles, when the session's TTL passes: the call did not own the session yet, so it
    expired under it and the call, found valid on arrival, ended NOT_FOUND. The session
    now waits for it, and expires a TTL after the call ends."""
    model_dir = build_tiny_vision_model(tmp_path, "qwen2_vl")
    server = server_factory(
        model_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20, session_ttl_s=0.5
    )
    stub, engine = server.stub, server.engine
    encode_image, compile_constraint = engine.encode_image, engine.compile_constraint
    monkeypatch.setattr(engine, "encode_image", lambda *a: time.sleep(1.0) or encode_image(*a))
    monkeypatch.setattr(
        engine, "compile_constraint", lambda *a: time.sleep(1.0) or compile_constraint(*a)
    )
    session_id = open_session(stub)
    generate(stub, session_id, append_tokens=[1, 2])
    image = encode(make_image(1))
    appended = stub.AppendImage(
        pb.AppendImageRequest(session_id=session_id, image=image, mime_type="image/png", offset=2)
    )
    placeholders = engine.image_placeholder_count(image, "image/png")
    assert (appended.placeholder_count, appended.total_length) == (placeholders, 2 + placeholders)
    tokens, done = generate(
        stub,
        session_id,
        offset=appended.total_length,
        append_tokens=[3],
        max_tokens=3,
        constraint=pb.Constraint(regex="[0-9]{3}"),
    )
    assert done.prompt_tokens == appended.total_length + 1 and len(tokens) == done.completion_tokens
    assert session_info(stub, session_id).length == done.total_tokens
    deadline = time.monotonic() + 5
    while session_id in engine.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session_id not in engine.sessions, "the session outlived its TTL after the calls"
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert len(engine.images) == 0


def test_a_session_closed_while_a_call_is_prepared_ends_it_session_closed(
    tmp_path, server_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session closed while an AppendImage's image is encoded: the call ends as one
    running does, CANCELLED (SESSION_CLOSED), not NOT_FOUND (which a client takes for
    a lost replica's session, and re-creates); nothing of it is left."""
    model_dir = build_tiny_vision_model(tmp_path, "qwen2_vl")
    server = server_factory(model_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20)
    stub, engine = server.stub, server.engine
    encoding, gate = threading.Event(), threading.Event()
    encode_image = engine.encode_image

    def held_encode(*args: object) -> object:
        encoding.set()
        gate.wait(10)
        return encode_image(*args)

    monkeypatch.setattr(engine, "encode_image", held_encode)
    session_id = open_session(stub)
    request = pb.AppendImageRequest(
        session_id=session_id, image=encode(make_image(1)), mime_type="image/png"
    )
    call = stub.AppendImage.future(request, timeout=30)
    assert encoding.wait(10)
    stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    gate.set()
    with pytest.raises(grpc.RpcError) as caught:
        call.result()
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert error_reason(caught.value) == "SESSION_CLOSED"
    assert len(engine.sessions) == 0 and len(engine.images) == 0
    assert engine.evictor.host_bytes_used == 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_sessions_past_max_sessions_are_refused_until_one_closes(
    tiny_llama_dir, server_factory
) -> None:
    """``--max-sessions`` bounds the sessions open at once, forks included (nothing did:
    a client opening sessions without end grew the server's memory till their TTL)."""
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=1 << 20, max_sessions=3)
    stub = server.stub
    sessions = [open_session(stub) for _ in range(2)]
    sessions.append(stub.ForkSession(pb.ForkSessionRequest(session_id=sessions[0])).session_id)
    for refused in (
        lambda: stub.OpenSession(pb.OpenSessionRequest()),
        lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=sessions[0])),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            refused()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(caught.value) == "TOO_MANY_SESSIONS"
        assert caught.value.details() == (
            "3 sessions are open (--max-sessions 3): close some, or wait for idle ones to expire"
        )
    stub.CloseSession(pb.CloseSessionRequest(session_id=sessions[1]))
    assert open_session(stub)
    assert len(stub.ListSessions(pb.ListSessionsRequest()).sessions) == 3

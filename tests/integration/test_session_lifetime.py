"""How long a session lives: idle sessions expire after ``--session-ttl``; a session
is not idle while a call owns it or while its call's events are still being written to
its client."""

from __future__ import annotations

import time

import grpc
import pytest

from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine.engine import Engine
from salience_server.engine.loader import load_model
from salience_server.engine.request import DoneEvent, GenerateParams
from tests.helpers import TEST_DEVICE, generate, open_session, session_info

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


def test_a_session_is_not_idle_until_its_call_s_events_are_delivered(tiny_llama_dir) -> None:
    """A call the engine has finished, whose events its caller has not passed on yet (a
    stream the server is still writing), keeps its session from expiring; once
    ``delivered``, the session's idle time starts."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device=TEST_DEVICE))
    engine = Engine(loaded, EngineConfig(block_size=BLOCK_SIZE, kv_cache_bytes=1 << 20))
    session = engine.open_session()  # the engine is stepped here, not started
    events: list[object] = []
    params = GenerateParams(session_id=session.session_id, append_tokens=[1, 2, 3], max_tokens=2)
    request = engine.submit(params, events.append)
    while not any(isinstance(event, DoneEvent) for event in events):
        engine.step()
    assert not session.is_busy
    time.sleep(0.02)
    engine.session_table.expire(0.01)
    assert session.session_id in engine.sessions and session.idle_seconds() == 0.0
    engine.delivered(request)
    time.sleep(0.02)
    assert session.idle_seconds() > 0.01
    engine.session_table.expire(0.01)
    assert session.session_id not in engine.sessions

"""A failure that is no request's own (SPEC 2.6): a lost device or a dead engine
thread stops the engine; health turns NOT_SERVING and every call gets UNAVAILABLE
(ENGINE_FAILED) instead of hanging or failing each call INTERNAL. A drain is not a
death: it refuses new work only."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience_client.pb import salience_pb2 as pb
from salience_server.engine import sampler, scoring
from tests.helpers import engine_held_in_a_step, error_reason, generate, open_session


@pytest.fixture
def server(tiny_llama_dir, server_factory):
    return server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=4 << 20)


def _wait_not_serving(server) -> None:
    """Health turns NOT_SERVING within 5 s."""
    health = health_pb2_grpc.HealthStub(server.channel)
    deadline = time.monotonic() + 5
    status = None
    while time.monotonic() < deadline:
        status = health.Check(health_pb2.HealthCheckRequest()).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.05)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in-a-batch"])
@pytest.mark.parametrize("where", ["forward", "results", "sampling"])
def test_a_lost_device_stops_the_engine_rather_than_fail_each_call(
    server, monkeypatch, alone: bool, where: str
) -> None:
    """A CUDA error (an illegal memory access) leaves the device unusable: the engine
    stops, every call is UNAVAILABLE and health says NOT_SERVING, where it went on
    failing each call INTERNAL while looking healthy. Asynchronous, it surfaces where
    the step next waits for the device: its forward pass, the one read of its results
    (whose failure was retried request by request, each failing INTERNAL), or a draw.
    A failure of one request's input is still that request's alone (above)."""
    stub = server.stub
    lost = getattr(torch, "AcceleratorError", RuntimeError)

    def fail(*args: object, **kwargs: object) -> None:
        raise lost("CUDA error: an illegal memory access was encountered")

    targets = {
        "forward": (server.engine.runner, "execute"),
        "results": (scoring, "to_host"),
        "sampling": (sampler, "draw_rows"),
    }
    monkeypatch.setattr(*targets[where], fail)
    calls = 1 if alone else 3
    outcomes: list[grpc.RpcError] = []

    def call() -> None:
        try:
            generate(
                stub, open_session(stub), append_tokens=[1, 2, 3], max_tokens=3, temperature=0.8
            )
        except grpc.RpcError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=call) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == calls
    assert all(error.code() == grpc.StatusCode.UNAVAILABLE for error in outcomes)
    assert server.engine.death is not None
    _wait_not_serving(server)


def test_a_dead_engine_thread_turns_everything_unavailable(server, monkeypatch) -> None:
    stub = server.stub
    session_id = open_session(stub)
    stream = stub.Generate(
        pb.GenerateRequest(
            session_id=session_id, append_tokens=[1] * 5, max_tokens=200, ignore_eos=True
        )
    )
    next(stream)
    engine = server.engine

    def broken(ttl: float) -> None:
        raise RuntimeError("a bug outside any request")

    # Held in a step past the next expiry, so that the loop calls the broken expiry
    # before the stream's next step (a tiny model's 200 tokens could end within the
    # 0.25 s between expiries, and the stream then ended without the engine dying).
    with engine_held_in_a_step(engine) as in_step:
        assert in_step.wait(10)
        monkeypatch.setattr(engine.session_table, "expire", broken)
        time.sleep(0.3)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, session_id, offset=6, append_tokens=[1])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(refused.value) == "ENGINE_FAILED"
    assert time.monotonic() - start < 1.0
    _wait_not_serving(server)
    with engine._lock:  # no request is left holding its session
        assert not any(s.is_busy for s in engine.sessions.values())
    # Every call, the ones that only read included: GetSession answered a session that
    # no call could use any more, as if the replica were fine.
    for call in (
        lambda: stub.GetSession(pb.GetSessionRequest(session_id=session_id)),
        lambda: stub.ListSessions(pb.ListSessionsRequest()),
        lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=session_id)),
        lambda: stub.GetModelInfo(pb.GetModelInfoRequest()),
        lambda: stub.Tokenize(pb.TokenizeRequest(text="a")),
        lambda: stub.Detokenize(pb.DetokenizeRequest(token_ids=[1])),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert error_reason(refused.value) == "ENGINE_FAILED"


def test_a_draining_server_still_answers_the_calls_that_only_read(server, monkeypatch) -> None:
    """Only a dead engine thread refuses every call (ENGINE_FAILED); a drain refuses new
    work (SHUTTING_DOWN) while the calls that read or free still answer."""
    stub = server.stub
    session_id = open_session(stub)
    monkeypatch.setattr(server.engine.thread, "is_draining", True)
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, session_id, offset=0, append_tokens=[1])
    assert error_reason(refused.value) == "SHUTTING_DOWN"
    stub.GetSession(pb.GetSessionRequest(session_id=session_id))
    stub.ListSessions(pb.ListSessionsRequest())
    stub.GetModelInfo(pb.GetModelInfoRequest())
    stub.Tokenize(pb.TokenizeRequest(text="a"))
    stub.Detokenize(pb.DetokenizeRequest(token_ids=[1]))
    stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))

"""Priorities, concurrent streams and cancellation through a real server."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine.engine import Engine
from salience_server.engine.errors import SalienceError
from salience_server.engine.loader import load_model
from salience_server.engine.request import GenerateParams
from tests.helpers import (
    TEST_DEVICE,
    engine_held_in_a_step,
    error_reason,
    generate,
    open_session,
)


def _wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_waiting_requests_start_in_priority_order(
    tiny_llama_dir, server_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """The order is the server's, read from its outcome lines in the order it wrote
    them: the order the client threads woke up in was not it (three short prefills end
    within a few steps, and the threads raced under load)."""
    server = server_factory(
        tiny_llama_dir, block_size=4, kv_cache_bytes=4 << 20, max_running=1, max_batch_tokens=1
    )
    stub = server.stub
    caplog.set_level(logging.INFO, logger="salience_server.engine.outcomes")
    blocker = open_session(stub)
    sessions = {open_session(stub): priority for priority in (5, 0, 3)}
    threads = [
        threading.Thread(
            target=generate,
            args=(stub, session_id),
            kwargs={"append_tokens": [1, 2, 3], "priority": priority},
        )
        for session_id, priority in sessions.items()
    ]
    with engine_held_in_a_step(server.engine) as in_step:
        blocker_stream = stub.Generate(
            pb.GenerateRequest(session_id=blocker, append_tokens=[7] * 30, priority=-1)
        )
        assert in_step.wait(10)  # the blocker runs (max_running=1): the others wait
        for number, thread in enumerate(threads, start=1):
            thread.start()
            assert _wait_until(lambda: len(server.engine.scheduler.waiting) == number)  # noqa: B023
    list(blocker_stream)
    for thread in threads:
        thread.join(timeout=30)

    def ended() -> list[int]:
        return [
            priority
            for record in caplog.records
            for session_id, priority in sessions.items()
            if session_id in record.getMessage()
        ]

    # A request's line is logged after its Done went out: its client may be back first.
    assert _wait_until(lambda: len(ended()) == 3)
    # max_running=1: each runs to the end before the next starts.
    assert ended() == [0, 3, 5]


def test_concurrent_streams_interleave_and_equal_their_solo_runs(
    tiny_llama_dir, server_factory
) -> None:
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=8 << 20)
    stub = server.stub
    prompts = [[10 + i, 20 + i, 30 + i, 40 + i] for i in range(4)]
    sampling = dict(max_tokens=24, temperature=1.0, top_k=20)
    solo = []
    for index, prompt in enumerate(prompts):
        tokens, _ = generate(stub, open_session(stub), append_tokens=prompt, seed=index, **sampling)
        solo.append([t.id for t in tokens])
    arrivals: list[int] = []
    together: list[list[int]] = [[] for _ in prompts]
    lock = threading.Lock()
    barrier = threading.Barrier(len(prompts))

    def run(index: int) -> None:
        session_id = open_session(stub)
        request = pb.GenerateRequest(
            session_id=session_id, append_tokens=prompts[index], seed=index, **sampling
        )
        barrier.wait()
        for event in stub.Generate(request):
            if event.HasField("token"):
                with lock:
                    arrivals.append(index)
                    together[index].append(event.token.id)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert together == solo
    # Interleaved: some stream's events arrive before another stream has finished.
    last_of = {index: max(i for i, a in enumerate(arrivals) if a == index) for index in range(4)}
    first_of = {index: arrivals.index(index) for index in range(4)}
    assert any(first_of[b] < last_of[a] for a in range(4) for b in range(4) if a != b)
    switches = sum(1 for x, y in zip(arrivals, arrivals[1:], strict=False) if x != y)
    assert switches > len(prompts)


def test_cancelled_stream_frees_its_request_and_keeps_committed_tokens(
    tiny_llama_dir, server_factory, caplog: pytest.LogCaptureFixture
) -> None:
    server = server_factory(
        tiny_llama_dir, block_size=4, kv_cache_bytes=8 << 20, max_batch_tokens=1
    )
    stub = server.stub
    session_id = open_session(stub)
    stream = stub.Generate(
        pb.GenerateRequest(
            session_id=session_id,
            append_tokens=[5] * 10,
            max_tokens=400,
            logprobs_ranges=[pb.PositionRange(start=0, end=0xFFFFFFFF)],
        )
    )
    received = [next(stream) for _ in range(12)]
    caplog.set_level(logging.INFO, logger="salience_server.engine.outcomes")
    stream.cancel()

    def settled() -> bool:  # between steps: a step drops the request, then logs it
        with server.engine._lock:
            return not server.engine.scheduler.running and not server.engine.scheduler.waiting

    assert _wait_until(settled)
    ended = [r.getMessage() for r in caplog.records if session_id in r.getMessage()]
    assert len(ended) == 1 and "cancelled after" in ended[0], ended  # one outcome line
    info = stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session
    assert not info.busy
    assert info.length >= 10 + sum(1 for e in received if not e.token.is_prefill)
    # The session and the server go on: the next call appends at the reported length.
    tokens, done = generate(stub, session_id, append_tokens=[1], offset=info.length, max_tokens=2)
    assert done.total_tokens == info.length + 1 + len(tokens)


def test_a_call_made_as_soon_as_its_session_s_call_is_cancelled_waits_for_it(
    tiny_llama_dir, server_factory
) -> None:
    """A client that cancels a stream and at once makes the next call on its session is
    not refused SESSION_BUSY while the engine is still in the step that will drop the
    cancelled call: the next call waits for that step. A session whose call is live is
    refused, as before (after ``CANCEL_ARRIVAL_S``)."""
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=8 << 20)
    stub, engine = server.stub, server.engine
    session_id = open_session(stub)
    stream = stub.Generate(
        pb.GenerateRequest(
            session_id=session_id, append_tokens=[5] * 10, max_tokens=400, ignore_eos=True
        )
    )
    next(stream)
    outcome: dict[str, object] = {}

    def next_call() -> None:
        try:
            outcome["tokens"] = generate(
                stub, session_id, offset=10, truncating=True, max_tokens=2, ignore_eos=True
            )[0]
        except grpc.RpcError as error:
            outcome["error"] = error_reason(error)

    with engine_held_in_a_step(engine) as in_step:
        assert in_step.wait(10)
        with pytest.raises(grpc.RpcError) as refused:  # the stream is live: refused
            generate(stub, session_id, offset=10, truncating=True, max_tokens=1)
        assert error_reason(refused.value) == "SESSION_BUSY"
        stream.cancel()
        assert _wait_until(lambda: all(r.is_cancelled for r in engine.scheduler.running))
        caller = threading.Thread(target=next_call)
        caller.start()
        caller.join(0.5)
        assert caller.is_alive() and outcome == {}  # waiting for the step, not refused
    caller.join(30)
    assert not caller.is_alive()
    assert "error" not in outcome, outcome
    assert len(outcome["tokens"]) == 2  # type: ignore[arg-type]


def test_a_call_made_right_after_a_cancel_is_not_refused_before_the_cancel_arrives(
    tiny_llama_dir, server_factory
) -> None:
    """The next call may reach the server before the cancellation it follows: it waits
    a moment for the cancellation, then for the step that drops the call (a review saw
    2 of 40 such calls refused SESSION_BUSY when only an arrived cancellation counted)."""
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=8 << 20)
    stub = server.stub
    session_id = open_session(stub)
    for _ in range(30):
        stream = stub.Generate(
            pb.GenerateRequest(
                session_id=session_id,
                append_tokens=[5] * 10,
                truncating=True,
                max_tokens=400,
                ignore_eos=True,
            )
        )
        next(stream)
        stream.cancel()
        tokens, _ = generate(
            stub, session_id, append_tokens=[6], truncating=True, max_tokens=1, ignore_eos=True
        )
        assert len(tokens) == 1


def test_deadline_stops_the_work(tiny_llama_dir, server_factory) -> None:
    server = server_factory(
        tiny_llama_dir, block_size=4, kv_cache_bytes=8 << 20, max_batch_tokens=1
    )
    stub = server.stub
    session_id = open_session(stub)
    try:
        list(
            stub.Generate(
                pb.GenerateRequest(session_id=session_id, append_tokens=[5] * 400, max_tokens=100),
                timeout=0.05,
            )
        )
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_until(lambda: not server.engine.scheduler.running)
    assert not stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.busy


def test_a_stopped_engine_gives_its_calls_sessions_back(tiny_llama_dir) -> None:
    """``Engine.stop`` ends the calls in flight and frees their sessions: a call waiting
    for a cancelled call's session is told at once (and then refused, the engine being
    stopped) rather than waiting out ``CANCELLED_CALL_WAIT_S``."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device=TEST_DEVICE))
    engine = Engine(loaded, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))  # not started
    session_id = engine.open_session().session_id
    events: list[object] = []
    params = GenerateParams(session_id=session_id, append_tokens=[1, 2, 3], max_tokens=4)
    request = engine.submit(params, events.append)
    engine.cancel(request)
    is_owned, freed = engine.end_of_cancelled_call(session_id)
    assert is_owned and freed is not None and not freed.done()
    engine.stop()
    assert freed.done()
    assert not engine.sessions[session_id].is_busy
    assert [type(event) for event in events] == [SalienceError]
    assert events[0].reason == "SHUTTING_DOWN"  # type: ignore[attr-defined]

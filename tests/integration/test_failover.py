"""The clients' failover (SPEC 2.7) against one server: routing metadata, the replica's
name, client-chosen ids, replay of a lost session and resume of a broken stream.

Scripted faults run on a fake replica whose decoder counts (tests/fake_replica.py): a
resumed stream is right when it continues the count. Replays of real sessions run on
the tiny models, against a control session that was never lost: greedy output equal
token for token, logprobs equal within TOLERANCE. The end-to-end version, with
replicas killed behind a real proxy, is test_replicas.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from salience_client import (
    END,
    AsyncSalienceClient,
    Done,
    Failover,
    SalienceClient,
    SalienceClientError,
    TokenEvent,
)
from salience_client.pb import salience_pb2 as pb
from tests.fake_replica import EOS, IMAGE_PAD, PLACEHOLDERS_PER_IMAGE, RunningFake, start_fake
from tests.helpers import error_reason

TOLERANCE = 1e-4
FAST = Failover(retry_budget_s=2.0, first_retry_wait_s=0.01)


def _decoded(events: list[TokenEvent | Done]) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent) and not e.is_prefill]


def _lose(fake: RunningFake, session_id: str) -> None:
    """The session's replica is gone: the server answers NOT_FOUND from now on."""
    del fake.replica.sessions[session_id]


# ----- protocol: metadata both ways ------------------------------------------------------


def test_every_session_call_carries_its_routing_key(fake: RunningFake) -> None:
    with SalienceClient(fake.target, timeout=10) as client:
        session = client.open_session()
        session.prefill([1, 2])
        session.append_image(b"png", "image/png")
        list(session.generate([7], max_tokens=2))
        child = session.fork()
        child.info()
        list(child.generate([9], max_tokens=1))
        child.close()
        client.get_session(session.session_id)
        client.model_info()
        session.close()
    key = session.session_id
    assert child.session_id != key and child.routing_key == key  # a fork keeps its family's
    assert len(key) == 32 and fake.replica.calls == [
        ("OpenSession", key),
        ("Generate", key),
        ("AppendImage", key),
        ("Generate", key),
        ("ForkSession", key),
        ("GetSession", key),
        ("Generate", key),
        ("CloseSession", key),
        ("GetSession", key),
        ("GetModelInfo", None),
        ("CloseSession", key),
    ]
    assert session.replica == child.replica == "fake-replica"


def test_the_server_names_its_replica_and_refuses_a_taken_id(llama_server: Any) -> None:
    stub = llama_server.stub
    response, call = stub.OpenSession.with_call(pb.OpenSessionRequest(session_id="taken"))
    assert response.session_id == "taken"
    assert ("salience-replica", llama_server.target) in call.initial_metadata()
    with pytest.raises(grpc.RpcError) as caught:
        stub.OpenSession(pb.OpenSessionRequest(session_id="taken"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(caught.value) == "SESSION_EXISTS"
    assert ("salience-replica", llama_server.target) in caught.value.initial_metadata()
    stream = stub.Generate(pb.GenerateRequest(session_id="taken", append_tokens=[1, 2]))
    assert list(stream)[-1].done.total_tokens == 2
    assert dict(stream.initial_metadata())["salience-replica"] == llama_server.target
    # The health and reflection services too, streaming or not.
    replica = ("salience-replica", llama_server.target)
    health = health_pb2_grpc.HealthStub(llama_server.channel)
    _, call = health.Check.with_call(health_pb2.HealthCheckRequest())
    assert replica in call.initial_metadata()
    watch = health.Watch(health_pb2.HealthCheckRequest())
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    assert replica in watch.initial_metadata()
    watch.cancel()
    reflection = reflection_pb2_grpc.ServerReflectionStub(llama_server.channel)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    answers = reflection.ServerReflectionInfo(iter([listing]))
    assert next(answers).list_services_response.service
    assert replica in answers.initial_metadata()
    answers.cancel()
    with SalienceClient(llama_server.target, timeout=10) as client:
        with pytest.raises(SalienceClientError) as error:
            client.open_session(session_id="taken")
        assert error.value.code == grpc.StatusCode.ALREADY_EXISTS
        client.session("taken").close()


# ----- replay --------------------------------------------------------------------------


def test_a_lost_session_is_replayed_with_its_images_then_the_call_retried(
    fake: RunningFake,
) -> None:
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        session = client.open_session()
        session.prefill([10, 11])
        session.append_image(b"png", "image/png")
        first = _decoded(list(session.generate([20], max_tokens=3)))
        want = [10, 11] + [IMAGE_PAD] * PLACEHOLDERS_PER_IMAGE + [20] + first
        assert fake.replica.sessions[session.session_id] == want
        _lose(fake, session.session_id)
        fake.replica.calls.clear()
        second = _decoded(list(session.generate([30], max_tokens=2)))
        assert second == [31, 32]
        assert fake.replica.sessions[session.session_id] == want + [30, 31, 32]
        assert [method for method, _ in fake.replica.calls] == [
            "Generate",  # NOT_FOUND
            "OpenSession",
            "Generate",  # the text before the image
            "AppendImage",
            "Generate",  # the text after it, and the reply
            "Generate",  # the call, retried
        ]
        assert session.num_replays == client.failover_stats.num_replays == 1
        assert client.failover_stats.num_replayed_tokens == len(want)
        assert session.history.length == len(want) + 3 and len(session.history.images) == 1


def test_a_fork_is_replayed_from_its_own_tokens(fake: RunningFake) -> None:
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        parent = client.open_session()
        parent.prefill([40, 41])
        child = parent.fork()
        list(child.generate([50], max_tokens=2))
        _lose(fake, child.session_id)
        assert _decoded(list(child.generate([60], max_tokens=1))) == [61]
        assert fake.replica.sessions[child.session_id] == [40, 41, 50, 51, 52, 60, 61]
        assert fake.replica.sessions[parent.session_id] == [40, 41]
        assert (child.num_replays, parent.num_replays) == (1, 0)


def test_a_replay_that_fails_twice_is_a_clear_error(fake: RunningFake) -> None:
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        session = client.open_session()
        session.prefill([1, 2, 3])
        _lose(fake, session.session_id)
        fake.replica.faults.num_open_failures = 5
        with pytest.raises(SalienceClientError) as caught:
            session.prefill([4])
    error = caught.value
    assert error.reason == "REPLAY_FAILED" and error.code == grpc.StatusCode.UNAVAILABLE
    assert "re-creating it failed 2 times" in error.message and session.session_id in error.message
    assert [m for m, _ in fake.replica.calls].count("OpenSession") == 1 + 2


def test_a_session_the_client_cannot_replay_is_a_clear_error(fake: RunningFake) -> None:
    with SalienceClient(fake.target, timeout=10) as client:
        opened = client.open_session()
        opened.prefill([1, 2, 3])
        handle = client.session(opened.session_id)  # knows its length, not its tokens
        _lose(fake, opened.session_id)
        with pytest.raises(SalienceClientError) as caught:
            handle.prefill([4])
    assert caught.value.reason == "SESSION_LOST" and caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "knows 0" in caught.value.message


def test_an_open_that_timed_out_closes_what_it_may_have_made(fake: RunningFake) -> None:
    """OpenSession's answer came after the client's deadline, the session made: the
    client closes it (it stayed until the server's TTL, 30 minutes by default, unknown
    to anyone). An id the caller chose may be someone else's, and stays."""
    with SalienceClient(fake.target, timeout=0.3) as client:
        fake.replica.faults.open_delay_s = 2.0
        with pytest.raises(SalienceClientError) as caught:
            client.open_session()
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert fake.replica.sessions == {}
        assert [method for method, _ in fake.replica.calls] == ["OpenSession", "CloseSession"]
        fake.replica.faults.open_delay_s = 2.0
        with pytest.raises(SalienceClientError):
            client.open_session(session_id="chosen")
        assert list(fake.replica.sessions) == ["chosen"]

    async def scenario() -> None:
        async with AsyncSalienceClient(fake.target, timeout=0.3) as client:
            fake.replica.faults.open_delay_s = 2.0
            with pytest.raises(SalienceClientError) as caught:
                await client.open_session()
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(scenario())
    assert list(fake.replica.sessions) == ["chosen"]


def test_with_replay_off_failures_reach_the_caller(fake: RunningFake) -> None:
    with SalienceClient(fake.target, timeout=10, replay=False) as client:
        session = client.open_session()
        session.prefill([1])
        fake.replica.faults.break_after = 2
        with pytest.raises(SalienceClientError) as caught:
            list(session.generate(max_tokens=5))
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        _lose(fake, session.session_id)
        with pytest.raises(SalienceClientError) as caught:
            session.prefill([2])
        assert caught.value.reason == "SESSION_NOT_FOUND"
    assert client.failover_stats.num_replays == client.failover_stats.num_resumes == 0


# ----- resume --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [(grpc.StatusCode.UNAVAILABLE, ""), (grpc.StatusCode.CANCELLED, "")],
    ids=["unavailable", "reset-by-a-proxy"],
)
def test_a_broken_stream_resumes_asking_only_for_the_rest(
    fake: RunningFake, code: grpc.StatusCode, reason: str
) -> None:
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        session = client.open_session()
        session.prefill([100, 101])
        faults = fake.replica.faults
        faults.break_after, faults.break_code, faults.break_reason = 3, code, reason
        events = list(session.generate([102], max_tokens=8))
    *tokens, done = events
    assert [t.token_id for t in tokens] == list(range(103, 111))
    assert [t.position for t in tokens] == list(range(3, 11))
    assert isinstance(done, Done) and (done.prompt_tokens, done.completion_tokens) == (3, 8)
    assert done.total_tokens == session.length == 11 and done.finish_reason == "length"
    resumed = fake.replica.requests[-1]
    assert list(resumed.append_tokens) == [] and resumed.offset == 6 and resumed.truncating
    assert resumed.max_tokens == 5
    assert resumed.decode_start == 3  # penalties and stop strings go on (test_resume_exact)
    assert session.num_resumes == client.failover_stats.num_resumes == 1


def test_one_break_is_one_resume_however_many_resuming_calls_fail(fake: RunningFake) -> None:
    """While no replica answers, each resuming call fails: one break still counts (and
    logs) one resume (it counted one per failed call)."""
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        session = client.open_session()
        faults = fake.replica.faults
        faults.break_after, faults.failures_after_break = 3, 4
        events = list(session.generate([100], max_tokens=6))
    assert _decoded(events) == list(range(101, 107))
    assert session.num_resumes == client.failover_stats.num_resumes == 1


def test_a_stream_broken_before_decoding_is_made_again_without_repeats(
    fake: RunningFake,
) -> None:
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        session = client.open_session()
        session.prefill([1, 2])
        fake.replica.faults.break_after = 2  # two of four scored prompt positions came
        events = list(session.generate([3, 4, 5, 6], max_tokens=2, logprobs_ranges=[(2, END)]))
    *tokens, done = events
    assert [(t.position, t.is_prefill) for t in tokens] == [  # type: ignore[union-attr]
        (2, True),
        (3, True),
        (4, True),
        (5, True),
        (6, False),
        (7, False),
    ]
    assert isinstance(done, Done) and done.total_tokens == session.length == 8
    first, again = fake.replica.requests[-2:]
    assert again.truncating and not first.truncating
    assert (again.offset, list(again.append_tokens)) == (first.offset, [3, 4, 5, 6])
    assert session.num_resumes == 1


def test_a_stream_that_broke_after_its_last_token_decodes_nothing_more(
    fake: RunningFake,
) -> None:
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        session = client.open_session()
        fake.replica.faults.break_after = 3  # after the last token, before Done
        *_, done = session.generate([1], max_tokens=3)
        assert isinstance(done, Done) and done.finish_reason == "length"
        assert done.completion_tokens == 3 and fake.replica.requests[-1].max_tokens == 0
        fake.replica.faults.break_after = 2  # right after EOS
        *tokens, done = session.generate([EOS - 2], max_tokens=10)
        assert [t.token_id for t in tokens] == [EOS - 1, EOS]  # type: ignore[union-attr]
        assert isinstance(done, Done) and done.finish_reason == "stop"
        assert fake.replica.requests[-1].max_tokens == 0
        assert session.length == 4 + 3 and session.num_resumes == 2


def test_a_stream_that_cannot_resume_keeps_what_it_delivered_for_the_next_replay() -> None:
    """The replica dies mid-stream and stays away past the retry budget: the call fails,
    but the append and the tokens it delivered were committed, so the session's length
    counts them and the next call, on a fresh replica, replays them first (it replayed
    only what the session held before the failed call, dropping them silently)."""
    budget = Failover(retry_budget_s=0.3, first_retry_wait_s=0.01)
    first = start_fake()
    with SalienceClient(first.target, timeout=10, replay=budget) as client:
        session = client.open_session()
        session.prefill([100, 101])
        first.replica.faults.break_after = 3
        received = []
        with pytest.raises(SalienceClientError) as caught:
            for event in session.generate([102], max_tokens=50):
                received.append(event.token_id)  # type: ignore[union-attr]
                if len(received) == 3:
                    first.stop()  # the stream breaks next; no replica answers its resume
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert received == [103, 104, 105] and session.length == 6
        assert session.num_resumes == 1  # one break, however many resuming calls failed
        fresh = start_fake(port=first.port)  # the session is not there
        try:
            client.wait_ready(10)
            session.prefill([7])
            assert fresh.replica.sessions[session.session_id] == [100, 101, 102, 103, 104, 105, 7]
            assert session.length == 7 and session.num_replays == 1
        finally:
            fresh.stop()


def test_a_broken_constrained_stream_resumes_under_its_grammar(fake: RunningFake) -> None:
    """The resuming call carries the constraint and ``decode_start``: the server's
    grammar reads the tokens decoded before the break again and goes on from there
    (``test_resume_exact.py``). It failed, saying a constrained call cannot resume."""
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        session = client.open_session()
        fake.replica.faults.break_after = 3
        constraint = {"regex": "[a-z]+"}
        events = list(session.generate([100], max_tokens=8, constraint=constraint))
        assert [e.token_id for e in events[:-1]] == list(range(101, 109))  # type: ignore[union-attr]
        assert session.length == 9 and session.num_resumes == 1
        resumed = fake.replica.requests[-1]
        assert resumed.constraint == pb.Constraint(regex="[a-z]+")
        assert resumed.decode_start == 1 and resumed.offset == 4 and resumed.max_tokens == 5


def test_a_server_error_mid_stream_is_not_resumed(fake: RunningFake) -> None:
    """A status the server itself sends (with its reason) is an answer, not a break."""
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        session = client.open_session()
        faults = fake.replica.faults
        faults.break_after, faults.break_code = 2, grpc.StatusCode.CANCELLED
        faults.break_reason = "SESSION_CLOSED"
        with pytest.raises(SalienceClientError) as caught:
            list(session.generate([1], max_tokens=5))
        assert caught.value.reason == "SESSION_CLOSED" and session.num_resumes == 0


def test_the_async_client_replays_and_resumes(fake: RunningFake) -> None:
    async def scenario() -> None:
        async with AsyncSalienceClient(fake.target, timeout=10, replay=FAST) as client:
            session = await client.open_session()
            await session.prefill([5, 6])
            await session.append_image(b"png", "image/png")
            _lose(fake, session.session_id)
            fake.replica.faults.break_after = 2
            events = [event async for event in session.generate([7], max_tokens=4)]
            assert _decoded(events) == [8, 9, 10, 11]
            want = [5, 6, *[IMAGE_PAD] * PLACEHOLDERS_PER_IMAGE, 7, 8, 9, 10, 11]
            assert fake.replica.sessions[session.session_id] == want
            assert (session.num_replays, session.num_resumes) == (1, 1)
            child = await session.fork()
            _lose(fake, child.session_id)
            assert (await child.info()).length == len(want) and child.num_replays == 1
            assert session.replica == child.replica == "fake-replica"

    asyncio.run(scenario())

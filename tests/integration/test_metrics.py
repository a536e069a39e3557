"""The Prometheus metrics count what happened (SPEC 2.6 observability)."""

from __future__ import annotations

import time

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.helpers import generate, metric_samples, open_session


def test_metrics_count_requests_tokens_latencies_and_memory(tiny_llama_dir, server_factory) -> None:
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=4 << 20)
    stub = server.stub
    session_id = open_session(stub)
    generate(stub, session_id, append_tokens=list(range(10)), max_tokens=5, ignore_eos=True)
    with pytest.raises(grpc.RpcError):
        stub.GetSession(pb.GetSessionRequest(session_id="missing"))
    counted = [
        ("salience_requests_total", (("code", "NOT_FOUND"), ("rpc", "GetSession"))),
        ("salience_requests_total", (("code", "OK"), ("rpc", "Generate"))),
    ]
    deadline = time.monotonic() + 2  # counted as the handler returns, after the reply
    while any(key not in metric_samples(server) for key in counted) and time.monotonic() < deadline:
        time.sleep(0.01)
    samples = metric_samples(server)
    assert samples[("salience_requests_total", (("code", "OK"), ("rpc", "Generate")))] == 1
    assert samples[("salience_requests_total", (("code", "OK"), ("rpc", "OpenSession")))] == 1
    assert samples[("salience_requests_total", (("code", "NOT_FOUND"), ("rpc", "GetSession")))] == 1
    assert samples[("salience_tokens_total", (("kind", "prefilled"),))] == 10
    assert samples[("salience_tokens_total", (("kind", "decoded"),))] == 5
    assert samples[("salience_tokens_total", (("kind", "recomputed"),))] == 0
    assert samples[("salience_time_to_first_token_seconds_count", ())] == 1
    assert samples[("salience_inter_token_latency_seconds_count", ())] == 4
    # Every decoded token's step-end-to-stream time, observed before Done is sent.
    assert samples[("salience_token_delivery_seconds_count", ())] == 5
    assert 0 < samples[("salience_token_delivery_seconds_sum", ())] < 5
    assert samples[("salience_sessions", (("residency", "resident"),))] == 1
    assert samples[("salience_queue_depth", ())] == 0
    assert samples[("salience_running_requests", ())] == 0
    used = samples[("salience_kv_blocks", (("state", "used"),))]
    assert used == 4  # 15 tokens, 14 with KV: 4 blocks of 4
    assert used + samples[("salience_kv_blocks", (("state", "free"),))] == (
        server.engine.block_manager.num_blocks
    )
    assert samples[("salience_preemptions_total", ())] == 0
    assert samples[("salience_evictions_total", (("outcome", "offloaded"),))] == 0
    assert samples[("salience_evictions_total", (("outcome", "dropped"),))] == 0
    assert samples[("salience_host_kv_dropped_total", ())] == 0


def test_streams_cut_by_the_clients_deadline_are_counted_as_such(
    long_context_llama_dir, server_factory
) -> None:
    """A stream whose deadline passes is counted DEADLINE_EXCEEDED, never UNKNOWN (a
    stream closed at its ``yield`` ended with GeneratorExit, read as an escaped error:
    about one in ten such calls). Each call would run for a minute or more, so the
    deadline always cuts it (the tiny Llama's 512 positions end a call in half a second
    here, sooner on a faster machine than the 110 ms deadline)."""
    server = server_factory(long_context_llama_dir, block_size=4, kv_cache_bytes=4 << 20)
    num_calls = 30
    for index in range(num_calls):
        session_id = open_session(server.stub)
        request = pb.GenerateRequest(
            session_id=session_id, append_tokens=[1, 2, 3], max_tokens=60_000, ignore_eos=True
        )
        with pytest.raises(grpc.RpcError) as caught:
            for _ in server.stub.Generate(request, timeout=0.02 + 0.01 * (index % 10)):
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    key = ("salience_requests_total", (("code", "DEADLINE_EXCEEDED"), ("rpc", "Generate")))
    deadline = time.monotonic() + 5
    while metric_samples(server).get(key, 0) < num_calls and time.monotonic() < deadline:
        time.sleep(0.01)
    samples = metric_samples(server)
    assert (
        samples.get(("salience_requests_total", (("code", "UNKNOWN"), ("rpc", "Generate")))) is None
    )
    assert samples[key] == num_calls, {
        k: v for k, v in samples.items() if k[0] == "salience_requests_total"
    }


def test_a_stream_the_client_cancels_early_is_cancelled_whatever_its_deadline(
    long_context_llama_dir, server_factory
) -> None:
    """A cancel long before a short deadline is the client's, not the deadline's (any
    cancel within a second of it counted DEADLINE_EXCEEDED). The deadline must stay
    under a second to tell the two apart, and the cancel must come in its first half
    (``DEADLINE_SLACK_SHARE``): a first call warms the server (its first step's one-off
    costs came inside that half), and the call would run for a minute or more (on the
    tiny Llama's 512 positions it could end, counted OK, before the cancel)."""
    server = server_factory(long_context_llama_dir, block_size=4, kv_cache_bytes=4 << 20)
    generate(server.stub, open_session(server.stub), append_tokens=[1, 2, 3], max_tokens=2)
    request = pb.GenerateRequest(
        session_id=open_session(server.stub),
        append_tokens=[1, 2, 3],
        max_tokens=60_000,
        ignore_eos=True,
    )
    stream = server.stub.Generate(request, timeout=0.9)
    next(stream)
    stream.cancel()
    key = ("salience_requests_total", (("code", "CANCELLED"), ("rpc", "Generate")))
    deadline = time.monotonic() + 5
    while metric_samples(server).get(key, 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    samples = metric_samples(server)
    assert samples.get(key) == 1, {k: v for k, v in samples.items() if "requests" in k[0]}


def test_time_to_first_token_counts_from_the_call_s_arrival(tiny_llama_dir, server_factory) -> None:
    """A constraint compiled for the call (the first use of a schema: 350 ms for one of 30
    fields on the default model) is part of its wait: TTFT and Done.queue_ms start when
    the call arrives, not when the engine takes it after the compilation."""
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=4 << 20)
    engine, delay_s = server.engine, 0.3
    compile_constraint = engine.compile_constraint

    def slow_compile(spec):  # type: ignore[no-untyped-def]
        time.sleep(delay_s)
        return compile_constraint(spec)

    engine.compile_constraint = slow_compile
    _, done = generate(
        server.stub,
        open_session(server.stub),
        append_tokens=[1, 2, 3],
        max_tokens=1,
        constraint=pb.Constraint(regex="[a-z]+"),
    )
    samples = metric_samples(server)
    assert samples[("salience_time_to_first_token_seconds_count", ())] == 1
    assert samples[("salience_time_to_first_token_seconds_sum", ())] >= delay_s
    assert done.queue_ms >= delay_s * 1e3

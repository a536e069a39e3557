"""Eviction, restore, recompute, fork and overload through a real server."""

from __future__ import annotations

import random
import threading

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.helpers import (
    U32_MAX,
    error_reason,
    generate,
    metric_samples,
    open_session,
    random_tokens,
    session_info,
)

TOLERANCE = 1e-4
TOKEN_BYTES = 512  # the tiny models: 2 layers x 2 KV heads x 16 dims x (K, V) x 4 bytes
BLOCK_SIZE = 4


def _run_cycle(stub, num_sessions: int, rounds: int, on_turn=None) -> list[list[tuple[int, float]]]:
    """Appends to every session in turn; returns each turn's (token, logprob) events."""
    rng = random.Random(11)
    sessions = [open_session(stub) for _ in range(num_sessions)]
    lengths = [0] * num_sessions
    results = []
    for round_index in range(rounds):
        for index, session_id in enumerate(sessions):
            append = [rng.randrange(256) for _ in range(40 if round_index == 0 else 6)]
            if on_turn is not None:
                on_turn(round_index, session_id)
            tokens, done = generate(
                stub,
                session_id,
                append_tokens=append,
                offset=lengths[index],
                max_tokens=5,
                logprobs_ranges=[(lengths[index], U32_MAX)],
            )
            lengths[index] = done.total_tokens
            results.append([(t.id, t.sampled_logprob) for t in tokens])
            results.append([(done.recomputed_tokens, 0.0)])
    return results


def _assert_same(got, want) -> None:
    for got_turn, want_turn in zip(got[::2], want[::2], strict=True):
        assert [t for t, _ in got_turn] == [t for t, _ in want_turn]
        assert (
            max(abs(a - b) for (_, a), (_, b) in zip(got_turn, want_turn, strict=True)) < TOLERANCE
        )


@pytest.mark.parametrize("host_kv_bytes", [0, 1 << 20], ids=["drop", "offload"])
def test_cycling_five_sessions_through_a_pool_for_two(
    host_kv_bytes, tiny_llama_dir, server_factory
) -> None:
    roomy = server_factory(tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20)
    # 28 blocks of 4 tokens: two sessions of ~51 tokens each, not three.
    tight = server_factory(
        tiny_llama_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=28 * BLOCK_SIZE * TOKEN_BYTES,
        host_kv_bytes=host_kv_bytes,
    )
    seen_residency = []

    def record(round_index: int, session_id: str) -> None:
        if round_index == 1:
            seen_residency.append(session_info(tight.stub, session_id).residency)

    want = _run_cycle(roomy.stub, 5, 2)
    got = _run_cycle(tight.stub, 5, 2, on_turn=record)
    _assert_same(got, want)
    recomputed = [turn[0][0] for turn in got[1::2]]
    assert all(r == 0 for r in recomputed[:5])  # the first round has nothing to recompute
    expected = pb.RESIDENCY_DROPPED if host_kv_bytes == 0 else pb.RESIDENCY_OFFLOADED
    assert seen_residency.count(expected) >= 3
    if host_kv_bytes == 0:
        assert all(r >= 40 for r in recomputed[5:8])  # dropped sessions were recomputed
    else:
        assert all(r == 0 for r in recomputed[5:])  # offloaded ones were copied back
    assert tight.engine.evictor.host_bytes_used <= host_kv_bytes


def test_listing_reports_residency_blocks_and_idle_time(tiny_llama_dir, server_factory) -> None:
    server = server_factory(
        tiny_llama_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=12 * BLOCK_SIZE * TOKEN_BYTES,
        host_kv_bytes=0,
    )
    first = open_session(server.stub)
    generate(server.stub, first, append_tokens=[1] * 30)
    second = open_session(server.stub)
    generate(server.stub, second, append_tokens=[2] * 30)
    listing = {s.session_id: s for s in server.stub.ListSessions(pb.ListSessionsRequest()).sessions}
    assert listing[first].residency == pb.RESIDENCY_DROPPED and listing[first].num_blocks == 0
    assert listing[second].residency == pb.RESIDENCY_RESIDENT and listing[second].num_blocks == 8
    assert listing[second].kv_bytes == 8 * BLOCK_SIZE * TOKEN_BYTES
    assert listing[first].idle_seconds >= listing[second].idle_seconds >= 0
    assert listing[first].length == 30


def test_the_host_tier_keeps_the_most_recently_used_sessions_kv(
    tiny_llama_dir, server_factory
) -> None:
    """With host memory for one session's KV, each eviction offloads the session just
    evicted and drops the one offloaded before (used less recently), rather than
    keeping the first offloaded session's KV for good and dropping every later one;
    the session whose KV was kept comes back without recomputing, exactly."""
    prompt_bytes = 32 * TOKEN_BYTES  # 30 tokens in whole blocks
    server = server_factory(
        tiny_llama_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=12 * BLOCK_SIZE * TOKEN_BYTES,  # one 30-token session at a time
        host_kv_bytes=prompt_bytes,
    )
    stub, engine = server.stub, server.engine
    prompts = [random_tokens(30, seed=20 + index) for index in range(3)]
    sessions = []
    for prompt in prompts:
        sessions.append(open_session(stub))
        generate(stub, sessions[-1], append_tokens=prompt)
    first, second, third = sessions
    assert session_info(stub, first).residency == pb.RESIDENCY_DROPPED
    assert session_info(stub, second).residency == pb.RESIDENCY_OFFLOADED
    assert session_info(stub, third).residency == pb.RESIDENCY_RESIDENT
    assert set(engine.runner.host_kv) == {second}  # the first's host copy is freed
    assert engine.evictor.host_bytes_used == prompt_bytes
    got, done = generate(stub, second, offset=30, max_tokens=3, logprobs_ranges=[(30, U32_MAX)])
    assert (done.cached_tokens, done.recomputed_tokens) == (29, 0)  # copied back
    # The first and second went to host memory, the first's KV left it for the second's;
    # the third was dropped for the second's return (the second's own KV, busy, stayed).
    samples = metric_samples(server)
    assert samples[("salience_evictions_total", (("outcome", "offloaded"),))] == 2
    assert samples[("salience_evictions_total", (("outcome", "dropped"),))] == 1
    assert samples[("salience_host_kv_dropped_total", ())] == 1
    roomy = server_factory(tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20)
    want, _ = generate(
        roomy.stub,
        open_session(roomy.stub),
        append_tokens=prompts[1],
        max_tokens=3,
        logprobs_ranges=[(30, U32_MAX)],
    )
    assert [t.id for t in got] == [t.id for t in want]
    assert all(
        abs(a.sampled_logprob - b.sampled_logprob) < TOLERANCE
        for a, b in zip(got, want, strict=True)
    )


def test_recomputed_tokens_count_only_the_kv_an_eviction_took(
    tiny_llama_dir, server_factory
) -> None:
    """``Done.recomputed_tokens`` of a dropped session's next call: the positions before
    the call whose KV the eviction took; for a fork of a dropped parent, the prefix it
    shares with the parent (it was counted new prefill: 0); for a scoring range before
    offset, only the positions before the range's first fed one (it counted every
    re-fed position too, which a resident session feeds again as well)."""
    server = server_factory(
        tiny_llama_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=12 * BLOCK_SIZE * TOKEN_BYTES,
        host_kv_bytes=0,
    )
    stub = server.stub
    prompt = random_tokens(30, seed=8)

    def dropped_session() -> str:
        session_id = open_session(stub)
        generate(stub, session_id, append_tokens=prompt)
        generate(stub, open_session(stub), append_tokens=[2] * 30)  # takes the pool
        assert session_info(stub, session_id).residency == pb.RESIDENCY_DROPPED
        return session_id

    parent = dropped_session()
    child = stub.ForkSession(pb.ForkSessionRequest(session_id=parent)).session_id
    for session_id in (child, parent):
        _, done = generate(stub, session_id, append_tokens=[5], offset=30, max_tokens=1)
        assert (done.cached_tokens, done.recomputed_tokens, done.prompt_tokens) == (0, 30, 31)
    scored = dropped_session()
    _, done = generate(stub, scored, offset=30, max_tokens=0, logprobs_ranges=[(11, U32_MAX)])
    # Position 11's logprob is read from position 10's logits: 10 positions were lost.
    assert (done.cached_tokens, done.recomputed_tokens) == (0, 10)
    resident = open_session(stub)
    generate(stub, resident, append_tokens=prompt)
    _, done = generate(stub, resident, offset=30, max_tokens=0, logprobs_ranges=[(11, U32_MAX)])
    assert (done.cached_tokens, done.recomputed_tokens) == (10, 0)


def test_fork_shares_blocks_and_each_branch_equals_a_fresh_session(
    tiny_llama_dir, server_factory
) -> None:
    server = server_factory(tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20)
    stub = server.stub
    prefix = random_tokens(50, seed=5)  # 12.5 blocks: the last is partial
    parent = open_session(stub)
    generate(stub, parent, append_tokens=prefix)
    free_before = server.engine.block_manager.num_free
    child = stub.ForkSession(pb.ForkSessionRequest(session_id=parent))
    assert child.length == 50
    assert server.engine.block_manager.num_free == free_before  # shared, counted once
    branches = {parent: [7, 8, 9], child.session_id: [100, 101]}
    results = {}
    for session_id, append in branches.items():
        tokens, done = generate(
            stub,
            session_id,
            append_tokens=append,
            offset=50,
            max_tokens=6,
            logprobs_ranges=[(50, U32_MAX)],
        )
        assert done.cached_tokens == 49 and done.recomputed_tokens == 0  # no prefill of the prefix
        results[session_id] = tokens
    # 12 full blocks stay shared; the partial 13th was copied once, then each side grew
    # to 15 blocks: 13 + 2 + 3 blocks in all, 5 more than before the fork.
    assert free_before - server.engine.block_manager.num_free == 5
    for session_id, append in branches.items():
        want, _ = generate(
            stub,
            open_session(stub),
            append_tokens=prefix + append,
            max_tokens=6,
            logprobs_ranges=[(50, U32_MAX)],
        )
        got = results[session_id]
        assert [t.id for t in got] == [t.id for t in want]
        assert (
            max(abs(a.sampled_logprob - b.sampled_logprob) for a, b in zip(got, want, strict=True))
            < TOLERANCE
        )


def test_eight_sessions_decoding_together_equal_each_alone(tiny_llama_dir, server_factory) -> None:
    server = server_factory(
        tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20, max_batch_tokens=64
    )
    stub = server.stub
    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(5 + 7 * i)] for i in range(8)]
    alone = [
        [t.id for t in generate(stub, open_session(stub), append_tokens=p, max_tokens=16)[0]]
        for p in prompts
    ]
    together: list[list[int]] = [[] for _ in prompts]
    steps_with_many = []
    original_execute = server.engine.runner.execute

    def counting_execute(batch, uploads=None):
        steps_with_many.append(len(batch.sequences))
        return original_execute(batch, uploads)

    server.engine.runner.execute = counting_execute
    barrier = threading.Barrier(len(prompts))

    def run(index: int) -> None:
        session_id = open_session(stub)
        barrier.wait()
        together[index] = [
            t.id for t in generate(stub, session_id, append_tokens=prompts[index], max_tokens=16)[0]
        ]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert together == alone
    assert max(steps_with_many) >= 6  # they really shared forward passes


def test_overload_queues_or_fails_fast_and_every_admitted_output_is_right(
    tiny_llama_dir, server_factory
) -> None:
    server = server_factory(
        tiny_llama_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=40 * BLOCK_SIZE * TOKEN_BYTES,
        max_running=2,
        max_queue=3,
        host_kv_bytes=0,
    )
    stub = server.stub
    prompt = [3, 1, 4, 1, 5, 9, 2, 6] * 8  # 64 tokens: 16 blocks; the pool holds two such sessions
    want = [
        t.id for t in generate(stub, open_session(stub), append_tokens=prompt, max_tokens=20)[0]
    ]
    outcomes: list[object] = []
    lock = threading.Lock()
    barrier = threading.Barrier(10)

    def run() -> None:
        session_id = open_session(stub)
        barrier.wait()
        try:
            tokens, _ = generate(stub, session_id, append_tokens=prompt, max_tokens=20)
            result: object = [t.id for t in tokens]
        except grpc.RpcError as error:
            result = (error.code(), error_reason(error))
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=run) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 10
    completed = [o for o in outcomes if isinstance(o, list)]
    refused = [o for o in outcomes if not isinstance(o, list)]
    assert all(o == want for o in completed) and len(completed) >= 2
    assert all(o == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL") for o in refused)


def test_a_session_never_outgrows_the_pool(tiny_llama_dir, server_factory) -> None:
    """The pool (32 tokens here) bounds the context: a prompt larger is refused at once,
    one that fills it exactly is taken, and decoding ends at it with finish reason
    ``context``. (Decoding failed KV_CACHE_FULL halfway and left a session that no
    later call could run; a prefill filling the pool was refused, counted one token
    over.)"""
    server = server_factory(
        tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=8 * BLOCK_SIZE * TOKEN_BYTES
    )
    stub = server.stub
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).max_context == 32
    session_id = open_session(stub)
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, session_id, append_tokens=[1] * 40)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "CONTEXT_EXCEEDED"
    # It says what sets the limit (the model's 512 positions would hold the prompt).
    assert caught.value.details() == (
        "40 tokens exceed the session's context limit of 32 (set by the KV pool's size: "
        "raise --kv-cache-memory for more)"
    )
    small = stub.OpenSession(pb.OpenSessionRequest(max_context=16)).session_id
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, small, append_tokens=[1] * 20)
    assert caught.value.details() == (
        "20 tokens exceed the session's context limit of 16 (the max_context it was opened with)"
    )
    assert session_info(stub, session_id).length == 0
    _, done = generate(stub, session_id, append_tokens=random_tokens(32, seed=3))
    assert done.total_tokens == 32
    decoding = open_session(stub)
    tokens, done = generate(
        stub, decoding, append_tokens=random_tokens(27, seed=4), max_tokens=20, ignore_eos=True
    )
    assert (len(tokens), done.finish_reason, done.total_tokens) == (5, 4, 32)  # CONTEXT
    # The session goes on: a rewind and another turn run.
    tokens, done = generate(
        stub, decoding, append_tokens=[7], offset=20, truncating=True, max_tokens=3
    )
    assert done.total_tokens == 24


def test_closing_a_session_frees_its_blocks_even_mid_call(tiny_llama_dir, server_factory) -> None:
    server = server_factory(
        tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20, max_batch_tokens=1
    )
    stub = server.stub
    session_id = open_session(stub)
    stream = stub.Generate(
        pb.GenerateRequest(session_id=session_id, append_tokens=[4] * 200, max_tokens=50)
    )
    total = server.engine.block_manager.num_blocks
    stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    with pytest.raises(grpc.RpcError):
        list(stream)  # the call was cancelled by the close (or ended): no hang
    import time

    deadline = time.monotonic() + 5
    while server.engine.block_manager.num_free != total and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.block_manager.num_free == total
